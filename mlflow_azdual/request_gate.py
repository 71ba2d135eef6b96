"""Pace the requests of a bulk job, such as ``mlflow-azdual mirror``, to one backend.

``RequestGate`` lets at most ``max_requests_per_s`` calls start per second (a token bucket
with room for one token, so there are no bursts). ``gated(target, gate)`` returns a proxy of a
store or an artifact repository whose public methods pass the gate before each call, so one
method call counts as one request. A call that the backend throttled (HTTP 429) or that could
not connect is retried under the retry policy, honouring Retry-After, because it was
certainly not applied. Any other failure is raised to the caller.
"""

import logging
import threading
import time

from mlflow_azdual.logs import get_logger
from mlflow_azdual.retry import RateLimitedLogger, RetryPolicy, classify

_logger = get_logger(__name__)
_retries = RateLimitedLogger(_logger)


class RequestGate:
    """A thread-safe pace of at most ``max_requests_per_s`` request starts per second.

    ``max_requests_per_s`` None means no pacing; ``requests`` counts the calls that passed.
    """

    def __init__(self, backend: str, max_requests_per_s=None, policy=None, clock=time.monotonic,
                 sleep=time.sleep):
        if max_requests_per_s is not None and not max_requests_per_s > 0:
            raise ValueError(
                f"max_requests_per_s must be a number greater than 0, got {max_requests_per_s!r}"
            )
        self.backend = backend
        self.max_requests_per_s = max_requests_per_s
        self.policy = policy or RetryPolicy()
        self.requests = 0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_start_s = None

    def wait(self) -> None:
        """Block until the next request may start, and count it."""
        with self._lock:
            self.requests += 1
            if self.max_requests_per_s is None:
                return
            now = self._clock()
            start = now if self._next_start_s is None else max(now, self._next_start_s)
            self._next_start_s = start + 1.0 / self.max_requests_per_s
        if start > now:
            self._sleep(start - now)

    def call(self, operation: str, function, *args, **kwargs):
        """Run ``function`` after the gate, retrying throttled and unconnected attempts."""
        started_s = self._clock()
        attempt = 0
        while True:
            self.wait()
            try:
                return function(*args, **kwargs)
            except Exception as error:
                decision = classify(error)
                if decision.ambiguous:
                    raise
                attempt += 1
                delay_s = self.policy.next_delay_s(attempt, decision, started_s, self._clock())
                if delay_s is None:
                    raise
                _retries.log(
                    logging.WARNING, (self.backend, operation),
                    "mlflow-azdual: %s on the %s backend failed (%s); retry %d in %.1f s",
                    operation, self.backend, decision.reason, attempt, delay_s,
                )
                self._sleep(delay_s)


class _Gated:
    """A proxy whose public methods go through a ``RequestGate``."""

    def __init__(self, target, gate: RequestGate):
        self._target = target
        self._gate = gate

    def __getattr__(self, name):
        value = getattr(self._target, name)
        if name.startswith("_") or not callable(value):
            return value

        def gated_call(*args, **kwargs):
            return self._gate.call(name, value, *args, **kwargs)

        return gated_call


def gated(target, gate: RequestGate):
    """Return ``target`` with every public method call paced by ``gate``."""
    return _Gated(target, gate)
