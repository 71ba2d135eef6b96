"""The retry policy of the background writers: error classification, backoff and log limits.

``classify`` turns an exception from a backend write into a ``Decision`` (retry or not, and
whether the server may have applied the write anyway). ``RetryPolicy`` is an immutable value
that computes backoff delays within a time budget per write. The module has no I/O and never
sleeps: callers wait themselves. Every value here is immutable and safe to share between
threads, and ``RateLimitedLogger`` is thread-safe.
"""

from __future__ import annotations

import calendar
import dataclasses
import email.utils
import http.client
import logging
import math
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import requests.exceptions
import urllib3.exceptions
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode

MAX_REASON_CHARS = 300

# Depth limit when following ``__cause__``, ``__context__``, ``args`` and ``.reason`` links.
_MAX_CHAIN_DEPTH = 8

_ERROR_CODE_BY_STATUS = {
    400: "INVALID_PARAMETER_VALUE",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",
    429: "REQUEST_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
    502: "INTERNAL_ERROR",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "INTERNAL_ERROR",
}


class BackendHttpError(MlflowException):
    """A non-2xx response from a backend, raised by this project's REST helper.

    ``retry_after_s`` is the server's Retry-After header in seconds, or None when absent.
    ``error_code`` is an MLflow ``ErrorCode`` name or number, and defaults to a code derived
    from ``http_status``.
    """

    def __init__(
        self,
        message: str,
        http_status: int,
        error_code=None,
        retry_after_s: float | None = None,
    ):
        if error_code is None:
            error_code = _default_error_code(http_status)
        if isinstance(error_code, str):
            error_code = ErrorCode.Value(error_code)
        super().__init__(message, error_code=error_code)
        self.http_status = int(http_status)
        self.retry_after_s = retry_after_s


def _default_error_code(http_status: int) -> str:
    if http_status in _ERROR_CODE_BY_STATUS:
        return _ERROR_CODE_BY_STATUS[http_status]
    if 400 <= http_status < 500:
        return "BAD_REQUEST"
    return "INTERNAL_ERROR"


def parse_retry_after_s(value: str | None, now_s: float | None = None) -> float | None:
    """Parse a Retry-After header value into seconds to wait from ``now_s``.

    The value is either delta-seconds (a decimal fraction is accepted too) or an HTTP-date,
    which is compared with ``now_s`` (default ``time.time()``). A time in the past or a
    negative number gives 0. A missing, empty or unparseable value gives None.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None

    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds):
            return None
        return max(0.0, seconds)

    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        # Python 3.9 raises TypeError on garbage, 3.10 and later raise ValueError.
        return None
    # HTTP-dates are in GMT. utctimetuple() converts an aware time and keeps a naive one,
    # which is what a "-0000" zone parses to.
    timestamp_s = calendar.timegm(moment.utctimetuple())
    if now_s is None:
        now_s = time.time()
    return max(0.0, timestamp_s - now_s)


@dataclasses.dataclass(frozen=True)
class Decision:
    """The result of ``classify``: whether to retry a failed write, and why.

    ``ambiguous`` is True when the server may have applied the write although the client saw
    an error, so the retry must check before writing again. ``retry_after_s`` is the server's
    minimum wait, if it sent one. ``reason`` is one line of at most ``MAX_REASON_CHARS``
    characters: the exception type and message, with bearer tokens and similar values masked.
    """

    retry: bool
    ambiguous: bool
    retry_after_s: float | None
    reason: str


# Masks credentials that a message could contain: "Bearer <token>", "Basic <token>",
# Databricks personal access tokens, and token-like query parameters.
_SECRET_PATTERNS = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"\bdapi[0-9a-fA-F]{8,}(-\d+)?"), "***"),
    (
        re.compile(r"(?i)\b(access_token|token|client_secret|secret|password|sig)=[^&\s'\"]+"),
        r"\1=***",
    ),
)


def _describe(error: BaseException) -> str:
    text = getattr(error, "message", None) if isinstance(error, MlflowException) else None
    if not isinstance(text, str):
        text = str(error)
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    line = " ".join(line.split())
    for pattern, replacement in _SECRET_PATTERNS:
        line = pattern.sub(replacement, line)
    if len(line) > MAX_REASON_CHARS:
        line = line[: MAX_REASON_CHARS - 3] + "..."
    return line


class NotReadyError(Exception):
    """Raised when a write depends on state another process is expected to create soon.

    Always retried, and never ambiguous: nothing was sent.
    """


def _permanent(reason: str) -> Decision:
    return Decision(retry=False, ambiguous=False, retry_after_s=None, reason=reason)


def _transient(reason: str, ambiguous: bool, retry_after_s: float | None = None) -> Decision:
    return Decision(retry=True, ambiguous=ambiguous, retry_after_s=retry_after_s, reason=reason)


def _classify_status(status: int, reason: str, retry_after_s: float | None = None) -> Decision:
    """Classify an HTTP error status.

    401 is retried because this project fetches credentials for every request, so the next
    attempt sends a fresh token when the old one has expired. 401, 408, 429 and 503 reject
    the request before it is processed, so they are not ambiguous. Other 5xx
    statuses are ambiguous, except 501 (Not Implemented), which never succeeds on retry.
    """
    if status in (401, 408, 429, 503):
        # NOTE: a server may send 503 after doing part of the work. It is still treated as a
        # rejection, because load balancers and throttles send most 503 responses.
        return _transient(reason, ambiguous=False, retry_after_s=retry_after_s)
    if 500 <= status < 600 and status != 501:
        return _transient(reason, ambiguous=True, retry_after_s=retry_after_s)
    return _permanent(reason)


# MLflow error codes worth retrying, with whether the server may have applied the write.
# RESOURCE_EXHAUSTED is included because mlflow.exceptions maps it to HTTP 429.
_TRANSIENT_ERROR_CODES = {
    "REQUEST_LIMIT_EXCEEDED": False,
    "RESOURCE_EXHAUSTED": False,
    "TEMPORARILY_UNAVAILABLE": False,
    "WORKSPACE_TEMPORARILY_UNAVAILABLE": False,
    "SERVICE_UNDER_MAINTENANCE": False,
    "UNAUTHENTICATED": False,
    "INTERNAL_ERROR": True,
    "DEADLINE_EXCEEDED": True,
}

# Text in an error message showing that no connection was made, so nothing was sent. MLflow
# keeps only the text of some transport errors.
_NOT_CONNECTED_MARKERS = (
    "connection refused",
    "newconnectionerror",
    "failed to establish a new connection",
    "nameresolutionerror",
    "failed to resolve",
)

# urllib3 retries on status codes end with "too many 503 error responses".
_TOO_MANY_RESPONSES = re.compile(r"too many (\d{3}) error responses")


def _linked_errors(error: BaseException) -> Iterator[BaseException]:
    """Yield the exceptions that ``error`` wraps, breadth first, without ``error`` itself."""
    seen = {id(error)}
    frontier = [error]
    for _ in range(_MAX_CHAIN_DEPTH):
        next_frontier = []
        for current in frontier:
            links = [current.__cause__, current.__context__, getattr(current, "reason", None)]
            links.extend(current.args)
            for linked in links:
                if isinstance(linked, BaseException) and id(linked) not in seen:
                    seen.add(id(linked))
                    next_frontier.append(linked)
                    yield linked
        if not next_frontier:
            return
        frontier = next_frontier


def _is_not_connected(error: BaseException) -> bool:
    """Return True when ``error`` shows that the connection was never made."""
    not_connected_types = (
        ConnectionRefusedError,
        socket.gaierror,
        urllib3.exceptions.NewConnectionError,
        urllib3.exceptions.ConnectTimeoutError,
        requests.exceptions.ConnectTimeout,
    )
    for candidate in (error, *_linked_errors(error)):
        if isinstance(candidate, not_connected_types):
            return True
    text = str(error).lower()
    return any(marker in text for marker in _NOT_CONNECTED_MARKERS)


def _too_many_responses_status(error: BaseException) -> int | None:
    match = _TOO_MANY_RESPONSES.search(str(error))
    return int(match.group(1)) if match else None


def _azure_class_names(error: BaseException) -> tuple[str, ...]:
    # Matched by name so that azure-core need not be installed.
    return tuple(
        cls.__name__ for cls in type(error).__mro__ if cls.__module__.startswith("azure.")
    )


def _is_transport_error(error: BaseException) -> bool:
    return isinstance(
        error, (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException)
    ) or "AzureError" in _azure_class_names(error)


def _classify_azure(error: BaseException, names: tuple[str, ...], reason: str) -> Decision:
    if "ServiceRequestError" in names:
        return _transient(reason, ambiguous=False)
    if "ServiceResponseError" in names or "IncompleteReadError" in names:
        return _transient(reason, ambiguous=True)
    if "HttpResponseError" in names:
        status = getattr(error, "status_code", None)
        if isinstance(status, int) and 400 <= status < 600:
            return _classify_status(status, reason)
        if "ClientAuthenticationError" in names:
            # Raised with no status when a token could not be fetched, before any request.
            return _transient(reason, ambiguous=False)
        return _transient(reason, ambiguous=True)
    return _permanent(reason)


def _classify_transport(error: BaseException, reason: str) -> Decision:
    """Classify an error from requests, urllib3, http.client, the socket layer or azure-core."""
    names = _azure_class_names(error)
    if names:
        return _classify_azure(error, names, reason)

    if isinstance(error, (requests.exceptions.RetryError, urllib3.exceptions.MaxRetryError)):
        status = _too_many_responses_status(error)
        if status is not None:
            return _classify_status(status, reason)
        wrapped = getattr(error, "reason", None)
        if isinstance(wrapped, BaseException):
            return _classify_transport(wrapped, reason)
        return _transient(reason, ambiguous=True)

    if isinstance(error, requests.exceptions.ConnectTimeout):
        return _transient(reason, ambiguous=False)
    if isinstance(error, requests.exceptions.ConnectionError):
        # Includes SSLError and ProxyError. A reset or a dropped connection after the request
        # was sent is ambiguous, but a refused connection or a failed DNS lookup is not.
        return _transient(reason, ambiguous=not _is_not_connected(error))
    if isinstance(error, (requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError)):
        return _transient(reason, ambiguous=True)
    if isinstance(error, requests.exceptions.RequestException):
        # InvalidURL, MissingSchema, InvalidHeader, TooManyRedirects and similar.
        return _permanent(reason)

    if isinstance(error, (ConnectionRefusedError, socket.gaierror)):
        return _transient(reason, ambiguous=False)
    if isinstance(error, urllib3.exceptions.HTTPError):
        if isinstance(error, urllib3.exceptions.ConnectTimeoutError):
            # Also NewConnectionError and NameResolutionError, its subclasses in urllib3 2.
            return _transient(reason, ambiguous=False)
        return _transient(reason, ambiguous=True)
    if isinstance(error, (OSError, http.client.HTTPException)):
        # Resets, aborts, RemoteDisconnected, TimeoutError and socket.timeout among them.
        return _transient(reason, ambiguous=True)
    return _permanent(reason)


def _classify_mlflow(error: MlflowException, reason: str) -> Decision:
    """Classify an MlflowException by its error code and, for INTERNAL_ERROR, its cause.

    MLflow's REST client turns a failed connection into INTERNAL_ERROR with the message
    "API request to <url> failed with exception ..." (or "with timeout exception"). The
    original error is in ``__cause__`` or ``__context__`` and decides, so a wrapped invalid URL
    is permanent. Without it, the message text decides.
    """
    code = error.error_code
    if code not in _TRANSIENT_ERROR_CODES:
        return _permanent(reason)
    if code != "INTERNAL_ERROR":
        return _transient(reason, ambiguous=_TRANSIENT_ERROR_CODES[code])

    for linked in _linked_errors(error):
        if isinstance(linked, MlflowException):
            continue
        if _is_transport_error(linked):
            return _classify_transport(linked, reason)

    status = _too_many_responses_status(error)
    if status is not None:
        return _classify_status(status, reason)
    return _transient(reason, ambiguous=not _is_not_connected(error))


def classify(error: BaseException) -> Decision:
    """Decide whether the write that raised ``error`` is retried, and if it may have been applied.

    Errors outside the HTTP, MLflow, transport and azure-core families (TypeError,
    KeyError, ValueError and the like) are permanent: they are bugs or writes that a backend
    never accepts, and the caller records them as dead letters.
    """
    reason = _describe(error)
    if isinstance(error, NotReadyError):
        return _transient(reason, ambiguous=False)
    if isinstance(error, BackendHttpError):
        return _classify_status(error.http_status, reason, error.retry_after_s)
    if isinstance(error, MlflowException):
        return _classify_mlflow(error, reason)
    if _is_transport_error(error):
        return _classify_transport(error, reason)
    return _permanent(reason)


def _require_seconds(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"RetryPolicy.{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"RetryPolicy.{name} must be a positive finite number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with equal jitter, within a time budget per write.

    The delay before retry ``n`` (``n`` = 1 for the first retry) is
    ``d = min(max_backoff_s, initial_backoff_s * backoff_multiplier ** (n - 1))``, drawn
    uniformly from ``[d * (1 - jitter_fraction), d]`` ("equal jitter" when the fraction is
    0.5), so that writers that failed together do not retry together. ``attempt_timeout_s``
    is the HTTP timeout the caller passes for each request. ``total_s`` is the time budget
    of one write, after which this process gives the write up. An invalid field raises
    ValueError, or TypeError when it is not a number, and the message names the field.
    """

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 60.0
    backoff_multiplier: float = 2.0
    jitter_fraction: float = 0.5
    attempt_timeout_s: float = 30.0
    total_s: float = 600.0

    def __post_init__(self):
        for name in ("initial_backoff_s", "max_backoff_s", "attempt_timeout_s", "total_s"):
            _require_seconds(name, getattr(self, name))

        multiplier = self.backoff_multiplier
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
            raise TypeError(f"RetryPolicy.backoff_multiplier must be a number, got {multiplier!r}")
        if not (math.isfinite(multiplier) and multiplier >= 1.0):
            raise ValueError(
                f"RetryPolicy.backoff_multiplier must be a finite number >= 1, got {multiplier!r}"
            )

        jitter = self.jitter_fraction
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)):
            raise TypeError(f"RetryPolicy.jitter_fraction must be a number, got {jitter!r}")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"RetryPolicy.jitter_fraction must be between 0 and 1, got {jitter!r}")

        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"RetryPolicy.max_backoff_s ({self.max_backoff_s!r}) must be >= "
                f"initial_backoff_s ({self.initial_backoff_s!r})"
            )

    def backoff_s(
        self,
        attempt: int,
        retry_after_s: float | None = None,
        random_fraction: float | None = None,
    ) -> float:
        """Compute the delay in seconds before retry number ``attempt`` (1 for the first).

        A server's ``retry_after_s`` is a lower bound, so the delay may exceed
        ``max_backoff_s`` to honour it, but it never exceeds ``total_s``.
        ``random_fraction`` in [0, 1] replaces ``random.random()``, for tests.
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an integer >= 1, got {attempt!r}")
        if random_fraction is None:
            random_fraction = random.random()
        elif not 0.0 <= random_fraction <= 1.0:
            raise ValueError(f"random_fraction must be between 0 and 1, got {random_fraction!r}")

        try:
            growth = self.backoff_multiplier ** (attempt - 1)
        except OverflowError:
            growth = math.inf
        ceiling_s = min(self.max_backoff_s, self.initial_backoff_s * growth)
        delay_s = ceiling_s * (1.0 - self.jitter_fraction + self.jitter_fraction * random_fraction)

        # A NaN compares False here, so it is ignored like a missing header.
        if retry_after_s is not None and retry_after_s > 0:
            delay_s = max(delay_s, retry_after_s)
        return min(delay_s, self.total_s)

    def exhausted(self, started_s: float, now_s: float) -> bool:
        """Return True when the budget of a write that started at ``started_s`` is used up."""
        return now_s - started_s >= self.total_s

    def next_delay_s(
        self,
        attempt: int,
        decision: Decision,
        started_s: float,
        now_s: float,
        random_fraction: float | None = None,
    ) -> float | None:
        """Return the delay before retry ``attempt``, or None to give the write up.

        The write is given up when ``decision`` is permanent or when the wait would end after
        ``started_s + total_s``. Times are seconds on one clock, such as ``time.monotonic()``.
        """
        if not decision.retry:
            return None
        delay_s = self.backoff_s(attempt, decision.retry_after_s, random_fraction)
        if now_s + delay_s > started_s + self.total_s:
            return None
        return delay_s


class RateLimitedLogger:
    """A wrapper of a ``logging.Logger`` that emits at most one record per key per interval.

    Records suppressed for a key are counted, and the next record emitted for that key ends
    with " (N similar messages suppressed)". ``clock`` returns seconds, ``time.monotonic`` by
    default. Thread-safe.
    """

    # NOTE: the state of every key is kept for the logger's lifetime, so keys should come
    # from a small set (an error kind and a backend name), not from run ids.

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)):
            raise TypeError(f"interval_s must be a number of seconds, got {interval_s!r}")
        if not (math.isfinite(interval_s) and interval_s >= 0):
            raise ValueError(f"interval_s must be a finite number >= 0, got {interval_s!r}")
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (time of the last emitted record, records suppressed since then)
        self._state: dict[object, tuple[float, int]] = {}

    def log(self, level: int, key, message: str, *args, **kwargs) -> bool:
        """Log ``message % args`` at ``level`` unless a record for ``key`` was emitted recently.

        Keyword arguments (``exc_info``, ``extra``, ``stacklevel``) go to ``Logger.log``.
        Returns True when the record was emitted.
        """
        if not self.logger.isEnabledFor(level):
            return False

        with self._lock:
            now_s = self._clock()
            state = self._state.get(key)
            if state is not None and now_s - state[0] < self.interval_s:
                self._state[key] = (state[0], state[1] + 1)
                return False
            suppressed = state[1] if state is not None else 0
            self._state[key] = (now_s, 0)

        if suppressed:
            message = f"{message} ({suppressed} similar messages suppressed)"
        # Report the caller of this method as the record's origin, not this method.
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
        self.logger.log(level, message, *args, **kwargs)
        return True
