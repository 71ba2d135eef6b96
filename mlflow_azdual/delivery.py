"""Send one request to a backend under a retry policy, and report how it ended.

``deliver`` runs ``send(request, uncertain)`` until it succeeds, the backend rejects it for
good, or the policy's time budget runs out. A transient failure (see ``retry.classify``) is
retried after a backoff that honours Retry-After; each retry is logged at WARNING, rate-limited
per backend and operation. A failure after which the request may have been applied
(``Decision.ambiguous``) makes every later attempt ``uncertain``, so the sender checks the
backend before writing again. Every failed attempt is recorded on the request's writes
(``attempts``, ``uncertain``) and, through ``record_failure``, in the spool.

When the budget runs out, ``keep_probing=False`` returns ``GIVEN_UP``. Replay uses it and
leaves the write in its spool file. With ``keep_probing=True`` it calls ``on_give_up`` once and
goes on retrying every ``policy.max_backoff_s``. A live process's writer uses that, so that a
backend that returns later still gets the write.
"""

import logging
import threading
import time
from typing import Callable, Optional

from mlflow_azdual.coalesce import Batch
from mlflow_azdual.logs import get_logger
from mlflow_azdual.retry import RateLimitedLogger, RetryPolicy, classify
from mlflow_azdual.uri import redact_text

_logger = get_logger(__name__)
_rate_limited = RateLimitedLogger(_logger)

DELIVERED = "delivered"
REJECTED = "rejected"
GIVEN_UP = "given_up"
STOPPED = "stopped"


def describe_error(error: BaseException) -> str:
    """Return the first line of ``error`` with its type, secrets redacted, cut to 300 characters."""
    text = f"{type(error).__name__}: {error}"
    first_line = text.splitlines()[0] if text.strip() else type(error).__name__
    return redact_text(first_line)[:300]


def operation_of(request) -> str:
    return "log_batch" if isinstance(request, Batch) else request.operation


def size_of(request) -> int:
    """Entities in a batch, or the buffer slots of another write."""
    return request.entities if isinstance(request, Batch) else request.size


def writes_of(request) -> list:
    return request.writes if isinstance(request, Batch) else [request]


class Outcome:
    """The end of a delivery: ``status`` is DELIVERED, REJECTED, GIVEN_UP or STOPPED."""

    __slots__ = ("status", "reason")

    def __init__(self, status: str, reason: str = ""):
        self.status = status
        self.reason = reason


class Delivery:
    """Retries requests of one backend under one policy."""

    def __init__(
        self,
        backend: str,
        send: Callable[[object, bool], object],
        policy: RetryPolicy,
        stop: Optional[threading.Event] = None,
        record_failure: Optional[Callable[[object, str], None]] = None,
    ):
        self.backend = backend
        self.send = send
        self.policy = policy
        self.stop = stop or threading.Event()
        self.record_failure = record_failure
        self.retries = 0
        # True while a request waits for its next attempt after a failure.
        self.retrying = False

    def deliver(
        self,
        request,
        keep_probing: bool = False,
        on_give_up: Optional[Callable[[str], None]] = None,
        on_recovered: Optional[Callable[[], None]] = None,
    ) -> Outcome:
        writes = writes_of(request)
        uncertain = any(write.uncertain for write in writes)
        started_s = time.monotonic()
        attempt = 0
        given_up = False
        while True:
            try:
                self.send(request, uncertain)
            except Exception as error:  # noqa: BLE001 - classified below, never raised.
                decision = classify(error)
                reason = describe_error(error)
                if not decision.retry:
                    return Outcome(REJECTED, reason)
                attempt += 1
                self.retries += 1
                uncertain = uncertain or decision.ambiguous
                for write in writes:
                    write.attempts += 1
                    write.uncertain = uncertain
                    if self.record_failure is not None:
                        self.record_failure(write, reason)
                delay_s = self.policy.next_delay_s(attempt, decision, started_s, time.monotonic())
                if delay_s is None:
                    if not keep_probing:
                        return Outcome(GIVEN_UP, reason)
                    delay_s = max(self.policy.max_backoff_s, decision.retry_after_s or 0)
                    if not given_up:
                        given_up = True
                        if on_give_up is not None:
                            on_give_up(reason)
                else:
                    _rate_limited.log(
                        logging.WARNING,
                        (self.backend, "retry", operation_of(request)),
                        "mlflow-azdual: %s write failed, retrying in %.1f s (attempt %d): "
                        "operation=%s run_id=%s error=%s",
                        self.backend, delay_s, attempt, operation_of(request),
                        request.run_id or "-", reason,
                    )
                self.retrying = True
                if self.stop.wait(delay_s):
                    return Outcome(STOPPED, reason)
                continue
            self.retrying = False
            if given_up and on_recovered is not None:
                on_recovered()
            return Outcome(DELIVERED)

    def log_rejection(self, request, reason: str, where: str) -> None:
        """Log a rejected request at ERROR, rate-limited per backend and operation."""
        _rate_limited.log(
            logging.ERROR,
            (self.backend, "dead_letter", operation_of(request)),
            "mlflow-azdual: the %s backend rejected a write, which was recorded as a dead "
            "letter%s: operation=%s run_id=%s error=%s",
            self.backend, where, operation_of(request), request.run_id or "-", reason,
        )

    def log_give_up(self, request, reason: str, where: str) -> None:
        """Log a request given up after the policy's time budget at ERROR, rate-limited."""
        _rate_limited.log(
            logging.ERROR,
            (self.backend, "give_up"),
            "mlflow-azdual: gave up sending to the %s backend after %.0f s of retries; %s: "
            "operation=%s run_id=%s error=%s",
            self.backend, self.policy.total_s, where, operation_of(request),
            request.run_id or "-", reason,
        )
