"""A bounded FIFO of writes for one backend, drained in order by one background worker.

Callers ``submit`` writes and return at once; the worker takes everything queued, merges it
with ``coalesce`` and sends it. It sends when the queue contains ``flush_threshold_points``
entities, when its oldest write is ``flush_interval_s`` old, or when a caller asks for a
flush. A full queue blocks the caller for at most ``backpressure_timeout_s``, then raises; a
write is never dropped from the queue. Thread-safe. After ``os.fork`` the child gets an empty
queue and a worker of its own, and never sends the parent's writes.
"""

import collections
import itertools
import logging
import os
import threading
import time
import weakref
from typing import Callable, Optional

from mlflow_azdual.coalesce import Batch, BatchLimits, Write, coalesce

_logger = logging.getLogger(__name__)

# One sequence for every queue of the process, so that writes can be ordered across backends.
_sequence = itertools.count(1)
_queues = weakref.WeakSet()


def next_seq() -> int:
    return next(_sequence)


class QueueFullError(Exception):
    """Raised when a caller waited ``backpressure_timeout_s`` for room in a full queue."""


class WriteQueue:
    """The write-behind queue of one backend and the worker thread that drains it."""

    def __init__(
        self,
        backend: str,
        send_batch: Callable[[Batch], None],
        limits: BatchLimits,
        capacity_points: int,
        flush_interval_s: float,
        flush_threshold_points: int,
        backpressure_timeout_s: float,
    ):
        self.backend = backend
        self._send_batch = send_batch
        self.limits = limits
        self.capacity_points = capacity_points
        self.flush_interval_s = flush_interval_s
        self.flush_threshold_points = min(flush_threshold_points, capacity_points)
        self.backpressure_timeout_s = backpressure_timeout_s
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
        self.sent_batches = 0

    # Caller side

    def reserve(self, size: int) -> None:
        """Block until ``size`` entities fit, up to ``backpressure_timeout_s``; queue nothing.

        Raises QueueFullError on timeout. Lets a caller check every queue before it appends to
        any, so that a write is queued for all backends or for none.
        """
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            if self._used_points() and self._used_points() + size > self.capacity_points:
                self._wait_for_room(size)

    def submit(self, write: Write, wait_for_room: bool = True) -> None:
        """Append ``write``; block while the queue is full, up to ``backpressure_timeout_s``.

        With ``wait_for_room=False`` the write is appended at once, after a ``reserve``. The
        queue may then exceed its capacity by the writes of callers that reserved together.
        """
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            size = write.size
            full = self._used_points() and self._used_points() + size > self.capacity_points
            if wait_for_room and full:
                self._wait_for_room(size)
            if not write.enqueued_s:
                write.enqueued_s = time.monotonic()
            self._queue.append(write)
            self._pending_points += size
            self._last_submitted_seq = max(self._last_submitted_seq, write.seq)
            if write.run_id is not None:
                self._last_seq_by_run[write.run_id] = write.seq
            if self._thread is None:
                self._start_worker()
            if self._pending_points >= self.flush_threshold_points or write.call is not None:
                self._changed.notify_all()

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
                    "raise buffer_capacity_points or backpressure_timeout_s."
                )
            self._changed.wait(remaining)

    def flush(self, timeout_s: Optional[float] = None, run_id: Optional[str] = None) -> bool:
        """Send everything queued so far (for ``run_id`` only, if given) and wait for it.

        Returns False if ``timeout_s`` passed first. Writes submitted during the flush are
        not waited for.
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

    def _used_points(self) -> int:
        # Entities being sent still hold memory, so they count against the capacity.
        return self._pending_points + self._in_flight

    @property
    def pending_points(self) -> int:
        """Entities queued or being sent."""
        return self._used_points()

    # Worker side

    def _start_worker(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"mlflow-azdual-{self.backend}-writer", daemon=True
        )
        self._thread.start()

    def _due_locked(self) -> bool:
        if not self._queue:
            return False
        if self._pending_points >= self.flush_threshold_points or self._flush_seq > self._done_seq:
            return True
        oldest = self._queue[0]
        return oldest.call is not None or time.monotonic() - oldest.enqueued_s >= self.flush_interval_s

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
                if self._pid != my_pid:
                    return
                while not self._due_locked():
                    timeout = None
                    if self._queue:
                        age = time.monotonic() - self._queue[0].enqueued_s
                        timeout = max(self.flush_interval_s - age, 0.001)
                    self._changed.wait(timeout)
                    if self._pid != my_pid:
                        return
                window = self._take_window_locked()
                self._changed.notify_all()

            self._send_window(window)

            with self._lock:
                self._in_flight = 0
                self._done_seq = max(self._done_seq, max(write.seq for write in window))
                self._changed.notify_all()

    def _send_window(self, window: list) -> None:
        for request in coalesce(window, self.limits):
            try:
                if isinstance(request, Batch):
                    self._send_batch(request)
                    self.sent_batches += 1
                else:
                    request.call()
            except Exception:  # noqa: BLE001 - the worker must outlive any failed request.
                _logger.exception(
                    "mlflow-azdual: unexpected error in the %s writer; the request was not sent",
                    self.backend,
                )


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
