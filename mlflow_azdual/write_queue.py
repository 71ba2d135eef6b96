"""A FIFO of writes for one backend, made durable in the spool and drained by one worker.

Callers ``submit`` writes and return at once; the worker takes everything queued, merges it
with ``coalesce`` and sends it. It sends when the queue contains ``flush_threshold_points``
entities, when its oldest write is ``flush_interval_s`` old, or when a caller asks for a
flush. Thread-safe. After ``os.fork`` the child gets an empty queue and a worker of its own,
and never sends the parent's writes.

With a spool (the default), every write is staged in the process's spool file when it is
submitted, and the worker sends a write only after its row is committed, so a write is on
disk before any backend receives it. A write's row is deleted once the backend acknowledged it.
When the in-memory queue is full the caller does not block: the write goes to the spool only
("spilled"), and the worker reads the spilled writes back from the spool, in order, after the
in-memory ones. Without a spool a full queue blocks the caller for at most
``backpressure_timeout_s``, then raises; a write is never dropped from the queue.

Delivery follows a ``RetryPolicy``: a transient failure (connection error, timeout, 429, 5xx)
is retried with backoff, honouring Retry-After, and a request that may have been applied
although it failed is retried as ``uncertain`` so the sender checks before writing again. A
permanent rejection goes to the spool's dead letters with the reason. When a write has been
retried for ``policy.total_s`` the queue gives it up for this process: it logs an ERROR,
reports the write as undelivered (``undelivered``), keeps it in the spool, and goes on probing
the backend every ``policy.max_backoff_s`` so that a backend that returns later still gets it.
"""

import collections
import itertools
import os
import threading
import time
import weakref
from typing import Callable, List, Optional

from mlflow_azdual.coalesce import Batch, BatchLimits, Write, coalesce
from mlflow_azdual.delivery import (
    DELIVERED,
    REJECTED,
    Delivery,
    operation_of,
    size_of,
    writes_of,
)
from mlflow_azdual.logs import get_logger
from mlflow_azdual.retry import RetryPolicy

_logger = get_logger(__name__)

# One sequence for every queue of the process, so that writes can be ordered across backends.
_sequence = itertools.count(1)
_queues = weakref.WeakSet()


def next_seq() -> int:
    return next(_sequence)


class QueueFullError(Exception):
    """Raised when a caller waited ``backpressure_timeout_s`` for room in a full queue."""


class Failure:
    """A write the queue could not deliver: rejected (dead letter) or given up after retries."""

    __slots__ = ("operation", "run_id", "reason", "points", "dead_letter")

    def __init__(self, operation, run_id, reason, points, dead_letter):
        self.operation = operation
        self.run_id = run_id
        self.reason = reason
        self.points = points
        self.dead_letter = dead_letter

    def __repr__(self) -> str:
        kind = "rejected" if self.dead_letter else "not delivered"
        return f"{self.operation} of run {self.run_id or '-'} ({self.points} entities) {kind}: {self.reason}"


class WriteQueue:
    """The write-behind queue of one backend and the worker thread that drains it."""

    def __init__(
        self,
        backend: str,
        send: Callable[[object, bool], None],
        limits: BatchLimits,
        capacity_points: int,
        flush_interval_s: float,
        flush_threshold_points: int,
        backpressure_timeout_s: float,
        policy: RetryPolicy = RetryPolicy(),
        spool: Optional[Callable[[], object]] = None,
        on_failure: Optional[Callable[[Failure], None]] = None,
    ):
        """``send(request, uncertain)`` sends one ``Batch`` or barrier ``Write`` and raises on
        failure. ``spool()`` returns this process's spool, or None to keep writes in memory
        only. ``on_failure`` is called with every dead letter and every give-up.
        """
        self.backend = backend
        self._send = send
        self.limits = limits
        self.capacity_points = capacity_points
        self.flush_interval_s = flush_interval_s
        self.flush_threshold_points = min(flush_threshold_points, capacity_points)
        self.backpressure_timeout_s = backpressure_timeout_s
        self.policy = policy
        self._spool_provider = spool
        self._on_failure = on_failure
        self._reset()
        _queues.add(self)

    def _reset(self):
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue = collections.deque()
        self._pending_points = 0
        self._last_submitted_seq = 0
        self._last_seq_by_run = {}
        self._done_seq = 0
        self._flush_seq = 0
        self._in_flight = 0
        self._thread = None
        self._pid = os.getpid()
        self._stopped = threading.Event()
        # Spilled writes are in the spool only; the worker reads them back after the queue.
        self._spilled = False
        self._spilled_writes = 0
        self._spill_after_id = 0
        self._delivery = None
        self.sent_batches = 0
        self.retries = 0
        self.dead_letters = 0
        # Writes given up in this process and still waiting in the spool.
        self.undelivered = {}
        self.stalled_since_s = None

    # Caller side

    def _current_spool(self):
        return self._spool_provider() if self._spool_provider is not None else None

    def reserve(self, size: int) -> None:
        """Block until ``size`` entities fit, up to ``backpressure_timeout_s``; queue nothing.

        Raises QueueFullError on timeout. Lets a caller check every queue before it appends to
        any, so that a write is queued for all backends or for none. Never blocks with a spool,
        because a full queue then spills to disk.
        """
        if self._pid != os.getpid():
            self._reset()
        if self._spool_provider is not None:
            return
        with self._lock:
            if self._used_points() and self._used_points() + size > self.capacity_points:
                self._wait_for_room(size)

    def submit(self, write: Write, wait_for_room: bool = True) -> None:
        """Append ``write``; without a spool, block while the queue is full.

        With ``wait_for_room=False`` the write is appended at once, after a ``reserve``. The
        queue may then exceed its capacity by the writes of callers that reserved together.
        """
        if self._pid != os.getpid():
            self._reset()
        spool = self._current_spool()
        with self._lock:
            size = write.size
            full = self._used_points() and self._used_points() + size > self.capacity_points
            if not write.enqueued_s:
                write.enqueued_s = time.monotonic()
            self._last_submitted_seq = max(self._last_submitted_seq, write.seq)
            if write.run_id is not None:
                self._last_seq_by_run[write.run_id] = write.seq
            if spool is not None:
                spool.add(self.backend, write)
                if self._spilled or full:
                    self._spilled = True
                    self._spilled_writes += 1
                    self._ensure_worker()
                    self._changed.notify_all()
                    return
            elif wait_for_room and full:
                self._wait_for_room(size)
            self._queue.append(write)
            self._pending_points += size
            self._ensure_worker()
            if self._pending_points >= self.flush_threshold_points or write.is_barrier:
                self._changed.notify_all()

    def _ensure_worker(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"mlflow-azdual-{self.backend}-writer", daemon=True
            )
            self._thread.start()

    def _wait_for_room(self, size: int) -> None:
        deadline = time.monotonic() + self.backpressure_timeout_s
        self._flush_seq = max(self._flush_seq, self._last_submitted_seq)
        self._changed.notify_all()
        while self._used_points() and self._used_points() + size > self.capacity_points:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueueFullError(
                    f"the {self.backend} write queue stayed full "
                    f"({self._used_points()} of {self.capacity_points} entities) for "
                    f"{self.backpressure_timeout_s:g} s because the {self.backend} backend is "
                    "not accepting writes. Nothing queued was dropped. Check that backend, or "
                    "raise buffer_capacity_points or backpressure_timeout_s, or turn the spool "
                    "on (spool=true), which holds the excess on disk instead."
                )
            self._changed.wait(remaining)

    def flush(self, timeout_s: Optional[float] = None, run_id: Optional[str] = None) -> bool:
        """Send everything queued so far (for ``run_id`` only, if given) and wait for it.

        Returns False if ``timeout_s`` passed first. Writes submitted during the flush are
        not waited for. A write counts as done when it was delivered or dead-lettered.
        """
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            target = self._last_seq_by_run.get(run_id, 0) if run_id else self._last_submitted_seq
            if self._done_seq >= target:
                return True
            self._flush_seq = max(self._flush_seq, target)
            self._changed.notify_all()
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while self._done_seq < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def wake(self) -> None:
        """Start sending what is queued now, without waiting for it."""
        with self._lock:
            self._flush_seq = max(self._flush_seq, self._last_submitted_seq)
            self._changed.notify_all()

    def stop(self) -> None:
        """Make the worker stop after its current request, without sending what is left."""
        self._stopped.set()
        with self._lock:
            self._changed.notify_all()

    def _used_points(self) -> int:
        # Entities being sent still hold memory, so they count against the capacity.
        return self._pending_points + self._in_flight

    @property
    def pending_points(self) -> int:
        """Entities queued in memory or being sent, plus writes spilled to the spool."""
        return self._used_points() + self._spilled_writes

    def is_worker_thread(self) -> bool:
        """Return True when called from this queue's worker thread."""
        return self._thread is threading.current_thread()

    @property
    def stopped(self) -> bool:
        """True once ``stop`` was called."""
        return self._stopped.is_set()

    @property
    def retrying(self) -> bool:
        """True while the worker waits to retry a failed request."""
        return self._delivery is not None and self._delivery.retrying

    # Worker side

    def _due_locked(self) -> bool:
        if not self._queue:
            return self._spilled
        if self._pending_points >= self.flush_threshold_points or self._flush_seq > self._done_seq:
            return True
        oldest = self._queue[0]
        return oldest.is_barrier or time.monotonic() - oldest.enqueued_s >= self.flush_interval_s

    def _take_window_locked(self) -> list:
        window, points = [], 0
        max_points = max(self.limits.max_metrics * 10, 1)
        while self._queue and (not window or points + self._queue[0].size <= max_points):
            write = self._queue.popleft()
            window.append(write)
            points += write.size
        self._pending_points -= points
        self._in_flight = points
        return window

    def _run(self) -> None:
        my_pid = os.getpid()
        while True:
            with self._lock:
                while not self._due_locked():
                    if self._pid != my_pid or self._stopped.is_set():
                        return
                    timeout = None
                    if self._queue:
                        age = time.monotonic() - self._queue[0].enqueued_s
                        timeout = max(self.flush_interval_s - age, 0.001)
                    self._changed.wait(timeout)
                if self._pid != my_pid or self._stopped.is_set():
                    return
                window = self._take_window_locked() if self._queue else None
                self._changed.notify_all()

            try:
                if window is None:
                    window = self._drain_spilled()
                else:
                    self._send_window(window)
            except Exception:  # noqa: BLE001 - the worker must outlive any bug in a send.
                if self._stopped.is_set():
                    return  # The spool was closed at exit while this window was in flight.
                _logger.exception("mlflow-azdual: unexpected error in the %s writer", self.backend)

            with self._lock:
                self._in_flight = 0
                if window:
                    self._done_seq = max(self._done_seq, max(write.seq for write in window))
                self._changed.notify_all()

    def _send_window(self, window: List[Write]) -> None:
        spool = self._current_spool()
        if spool is not None:
            spool.wait_durable(window)
        for request in coalesce(window, self.limits):
            if self._stopped.is_set():
                return
            self._deliver(request, spool)
        if spool is not None:
            spool.ack(self.backend, window)

    def _drain_spilled(self) -> List[Write]:
        """Send the next spilled writes from the spool; leave spill mode once all are sent."""
        spool = self._current_spool()
        spool.commit()
        limit = max(self.limits.max_metrics * 10, 1)
        window = spool.read_pending(self.backend, after_id=self._spill_after_id, limit=limit)
        if window:
            self._spill_after_id = window[-1].spool_id
            with self._lock:
                self._in_flight = sum(write.size for write in window)
            self._send_window(window)
        with self._lock:
            self._spilled_writes = max(self._spilled_writes - len(window), 0)
            if self._spilled_writes == 0:
                self._spilled = False
            elif not window:
                # Spilled writes not yet committed: the next commit is at most one interval away.
                self._changed.wait(0.05)
        return window

    def _deliver(self, request, spool) -> None:
        delivery = self._delivery
        if delivery is None or delivery.stop is not self._stopped:
            delivery = self._delivery = Delivery(
                self.backend, self._send, self.policy, self._stopped,
                (lambda write, reason: spool.record_failure(self.backend, write, reason))
                if spool is not None else None,
            )
        outcome = delivery.deliver(
            request,
            keep_probing=True,
            on_give_up=lambda reason: self._give_up(request, reason, spool),
            on_recovered=lambda: self._recovered(request),
        )
        self.retries = delivery.retries
        if outcome.status == REJECTED and isinstance(request, Batch) and len(request.writes) > 1:
            # One bad item must not cost the other writes merged into the batch: each write
            # is sent on its own, and only the ones rejected again become dead letters.
            for write in request.writes:
                write.uncertain = True
                for part in coalesce([write], self.limits):
                    self._deliver(part, spool)
            return
        if outcome.status == REJECTED:
            self.dead_letters += 1
            if spool is not None:
                for write in writes_of(request):
                    spool.dead_letter(self.backend, write, outcome.reason)
            delivery.log_rejection(request, outcome.reason, " in the spool" if spool else "")
            self._report(
                Failure(operation_of(request), request.run_id, outcome.reason, size_of(request), True)
            )
        elif outcome.status == DELIVERED and isinstance(request, Batch):
            self.sent_batches += 1

    def _give_up(self, request, reason, spool) -> None:
        with self._lock:
            if self.stalled_since_s is None:
                self.stalled_since_s = time.monotonic()
            self.undelivered[id(request)] = size_of(request)
        where = (
            f"the write stays in the spool ({spool.path}) for the next process or "
            "`mlflow-azdual sync`"
            if spool is not None
            else "the write is kept in memory only (the spool is off)"
        )
        self._delivery.log_give_up(
            request, reason, f"{where}, and the writer keeps probing every "
            f"{self.policy.max_backoff_s:.0f} s"
        )
        self._report(
            Failure(operation_of(request), request.run_id, reason, size_of(request), False)
        )

    def _recovered(self, request) -> None:
        with self._lock:
            self.undelivered.pop(id(request), None)
            if not self.undelivered:
                self.stalled_since_s = None
        _logger.warning(
            "mlflow-azdual: the %s backend accepts writes again; sending what was held back",
            self.backend,
        )

    def _report(self, failure: Failure) -> None:
        if self._on_failure is not None:
            try:
                self._on_failure(failure)
            except Exception:  # noqa: BLE001 - reporting must not stop the worker.
                _logger.exception("mlflow-azdual: failure callback raised")


def _reset_all_after_fork() -> None:
    # The parent's queued writes stay with the parent: each queue in the child starts empty.
    for queue in list(_queues):
        queue._reset()
    # MLflow caches its HTTP sessions; a child must not share the parent's keep-alive sockets.
    try:
        from mlflow.utils import rest_utils

        rest_utils._get_request_session.cache_clear()
    except (ImportError, AttributeError):
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_all_after_fork)
