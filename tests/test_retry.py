"""The retry policy: error classification, Retry-After parsing, backoff and log rate limits."""

import email.utils
import http.client
import logging
import socket
import sys
import threading

import azure.core.exceptions as azure_errors
import pytest
import requests.exceptions
import urllib3.exceptions
from mlflow.exceptions import InvalidUrlException, MlflowException, RestException
from mlflow.protos.databricks_pb2 import ErrorCode

from mlflow_azdual.retry import (
    MAX_REASON_CHARS,
    BackendHttpError,
    Decision,
    RateLimitedLogger,
    RetryPolicy,
    classify,
    parse_retry_after_s,
)

URL = "https://adb-123.azuredatabricks.net/api/2.0/mlflow/runs/log-batch"


def refused_connection_error():
    # The shape requests raises when nothing listens on the port.
    reason = urllib3.exceptions.NewConnectionError(
        None, "Failed to establish a new connection: [Errno 111] Connection refused"
    )
    return requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, URL, reason))


def dns_failure_error():
    reason = urllib3.exceptions.NameResolutionError(
        "adb-123.azuredatabricks.net", None, socket.gaierror(-2, "Name or service not known")
    )
    return requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, URL, reason))


def aborted_connection_error():
    # The shape requests raises when the server closes the connection before sending a response.
    reason = urllib3.exceptions.ProtocolError(
        "Connection aborted.",
        http.client.RemoteDisconnected("Remote end closed connection without response"),
    )
    return requests.exceptions.ConnectionError(reason)


def read_timeout_error():
    reason = urllib3.exceptions.ReadTimeoutError(None, URL, "Read timed out. (read timeout=30)")
    return requests.exceptions.ReadTimeout(reason)


def status_retries_exhausted_error(status):
    reason = urllib3.exceptions.ResponseError(f"too many {status} error responses")
    return requests.exceptions.RetryError(urllib3.exceptions.MaxRetryError(None, URL, reason))


def mlflow_wrapped(error):
    """Raise ``error`` through the same wrapping as mlflow.utils.rest_utils.http_request."""
    try:
        try:
            raise error
        except requests.exceptions.Timeout as timeout:
            raise MlflowException(
                f"API request to {URL} failed with timeout exception {timeout}."
            ) from timeout
        except requests.exceptions.InvalidURL as invalid:
            raise InvalidUrlException(f"Invalid url: {URL}") from invalid
        except requests.exceptions.RequestException as other:
            raise MlflowException(f"API request to {URL} failed with exception {other}")
    except MlflowException as wrapped:
        return wrapped


def mlflow_text_only(error):
    """Return an MlflowException with the wrapped message text but no chained exception."""
    wrapped = mlflow_wrapped(error)
    return MlflowException(wrapped.message)


def mlflow_error(code):
    return MlflowException("failed", error_code=ErrorCode.Value(code))


def azure_response_error(status):
    response = type("Response", (), {"status_code": status, "reason": "error", "headers": {}})()
    return azure_errors.HttpResponseError(message="service error", response=response)


def fake_azure_class(name, *bases):
    # Stands in for an azure-core class when the package is not installed.
    return type(name, bases or (Exception,), {"__module__": "azure.core.exceptions"})


FakeAzureError = fake_azure_class("AzureError")
FakeServiceRequestError = fake_azure_class("ServiceRequestError", FakeAzureError)
FakeServiceResponseError = fake_azure_class("ServiceResponseError", FakeAzureError)
FakeHttpResponseError = fake_azure_class("HttpResponseError", FakeAzureError)


def fake_azure_response_error(status):
    error = FakeHttpResponseError("service error")
    error.status_code = status
    return error


# (case id, exception factory, expected retry, expected ambiguous)
CLASSIFICATION_CASES = [
    ("http 429", lambda: BackendHttpError("throttled", 429), True, False),
    ("http 503", lambda: BackendHttpError("unavailable", 503), True, False),
    ("http 500", lambda: BackendHttpError("server error", 500), True, True),
    ("http 502", lambda: BackendHttpError("bad gateway", 502), True, True),
    ("http 504", lambda: BackendHttpError("gateway timeout", 504), True, True),
    ("http 501", lambda: BackendHttpError("not implemented", 501), False, False),
    ("http 408", lambda: BackendHttpError("request timeout", 408), True, False),
    ("http 401", lambda: BackendHttpError("token expired", 401), True, False),
    ("http 400", lambda: BackendHttpError("bad value", 400), False, False),
    ("http 403", lambda: BackendHttpError("forbidden", 403), False, False),
    ("http 404", lambda: BackendHttpError("no such run", 404), False, False),
    ("http 409", lambda: BackendHttpError("conflict", 409), False, False),
    ("code request limit", lambda: mlflow_error("REQUEST_LIMIT_EXCEEDED"), True, False),
    ("code resource exhausted", lambda: mlflow_error("RESOURCE_EXHAUSTED"), True, False),
    ("code temporarily unavailable", lambda: mlflow_error("TEMPORARILY_UNAVAILABLE"), True, False),
    ("code unauthenticated", lambda: mlflow_error("UNAUTHENTICATED"), True, False),
    ("code internal error", lambda: mlflow_error("INTERNAL_ERROR"), True, True),
    ("code deadline exceeded", lambda: mlflow_error("DEADLINE_EXCEEDED"), True, True),
    ("code endpoint not found", lambda: mlflow_error("ENDPOINT_NOT_FOUND"), False, False),
    ("code invalid parameter", lambda: mlflow_error("INVALID_PARAMETER_VALUE"), False, False),
    ("code permission denied", lambda: mlflow_error("PERMISSION_DENIED"), False, False),
    ("code does not exist", lambda: mlflow_error("RESOURCE_DOES_NOT_EXIST"), False, False),
    (
        "rest exception 429",
        lambda: RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}),
        True,
        False,
    ),
    ("mlflow wrapped refused", lambda: mlflow_wrapped(refused_connection_error()), True, False),
    ("mlflow wrapped dns", lambda: mlflow_wrapped(dns_failure_error()), True, False),
    ("mlflow wrapped aborted", lambda: mlflow_wrapped(aborted_connection_error()), True, True),
    ("mlflow wrapped read timeout", lambda: mlflow_wrapped(read_timeout_error()), True, True),
    (
        "mlflow wrapped invalid url",
        lambda: mlflow_wrapped(requests.exceptions.InvalidURL("bad url")),
        False,
        False,
    ),
    (
        "mlflow wrapped too many 503",
        lambda: mlflow_wrapped(status_retries_exhausted_error(503)),
        True,
        False,
    ),
    ("mlflow text refused", lambda: mlflow_text_only(refused_connection_error()), True, False),
    ("mlflow text dns", lambda: mlflow_text_only(dns_failure_error()), True, False),
    ("mlflow text aborted", lambda: mlflow_text_only(aborted_connection_error()), True, True),
    ("mlflow text read timeout", lambda: mlflow_text_only(read_timeout_error()), True, True),
    (
        "mlflow text too many 429",
        lambda: mlflow_text_only(status_retries_exhausted_error(429)),
        True,
        False,
    ),
    (
        "mlflow text too many 500",
        lambda: mlflow_text_only(status_retries_exhausted_error(500)),
        True,
        True,
    ),
    ("requests refused", refused_connection_error, True, False),
    ("requests dns failure", dns_failure_error, True, False),
    ("requests connect timeout", lambda: requests.exceptions.ConnectTimeout("timed out"), True, False),
    ("requests aborted", aborted_connection_error, True, True),
    (
        "requests reset",
        lambda: requests.exceptions.ConnectionError(ConnectionResetError(104, "reset by peer")),
        True,
        True,
    ),
    ("requests read timeout", read_timeout_error, True, True),
    (
        "requests chunked encoding",
        lambda: requests.exceptions.ChunkedEncodingError("Connection broken"),
        True,
        True,
    ),
    ("requests too many 429", lambda: status_retries_exhausted_error(429), True, False),
    ("requests too many 502", lambda: status_retries_exhausted_error(502), True, True),
    ("requests invalid url", lambda: requests.exceptions.InvalidURL("bad url"), False, False),
    ("requests missing schema", lambda: requests.exceptions.MissingSchema("no schema"), False, False),
    (
        "urllib3 protocol error",
        lambda: urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead"),
        True,
        True,
    ),
    (
        "urllib3 new connection",
        lambda: urllib3.exceptions.NewConnectionError(None, "Connection refused"),
        True,
        False,
    ),
    (
        "urllib3 read timeout",
        lambda: urllib3.exceptions.ReadTimeoutError(None, URL, "Read timed out."),
        True,
        True,
    ),
    (
        "remote disconnected",
        lambda: http.client.RemoteDisconnected("Remote end closed connection"),
        True,
        True,
    ),
    ("incomplete read", lambda: http.client.IncompleteRead(b"partial"), True, True),
    ("connection reset", lambda: ConnectionResetError(104, "reset by peer"), True, True),
    ("connection aborted", lambda: ConnectionAbortedError(103, "aborted"), True, True),
    ("broken pipe", lambda: BrokenPipeError(32, "broken pipe"), True, True),
    ("timeout error", lambda: TimeoutError("timed out"), True, True),
    ("connection refused", lambda: ConnectionRefusedError(111, "refused"), True, False),
    ("gaierror", lambda: socket.gaierror(-2, "Name or service not known"), True, False),
    ("other os error", lambda: OSError(5, "I/O error"), True, True),
    (
        "azure service request",
        lambda: azure_errors.ServiceRequestError("cannot connect"),
        True,
        False,
    ),
    (
        "azure service request timeout",
        lambda: azure_errors.ServiceRequestTimeoutError("connect timed out"),
        True,
        False,
    ),
    (
        "azure service response",
        lambda: azure_errors.ServiceResponseError("connection reset"),
        True,
        True,
    ),
    (
        "azure service response timeout",
        lambda: azure_errors.ServiceResponseTimeoutError("read timed out"),
        True,
        True,
    ),
    ("azure http 429", lambda: azure_response_error(429), True, False),
    ("azure http 500", lambda: azure_response_error(500), True, True),
    ("azure http 400", lambda: azure_response_error(400), False, False),
    (
        "azure auth without status",
        lambda: azure_errors.ClientAuthenticationError("token request failed"),
        True,
        False,
    ),
    ("fake azure service request", lambda: FakeServiceRequestError("no connect"), True, False),
    ("fake azure service response", lambda: FakeServiceResponseError("reset"), True, True),
    ("fake azure http 503", lambda: fake_azure_response_error(503), True, False),
    ("fake azure http 502", lambda: fake_azure_response_error(502), True, True),
    ("fake azure http 404", lambda: fake_azure_response_error(404), False, False),
    ("type error", lambda: TypeError("unsupported operand"), False, False),
    ("key error", lambda: KeyError("run_id"), False, False),
    ("lookup error", lambda: LookupError("missing"), False, False),
    ("value error", lambda: ValueError("bad value"), False, False),
    ("runtime error", lambda: RuntimeError("boom"), False, False),
]


@pytest.mark.parametrize(
    ("make_error", "retry", "ambiguous"),
    [pytest.param(make, retry, ambiguous, id=case) for case, make, retry, ambiguous in CLASSIFICATION_CASES],
)
def test_classify_table(make_error, retry, ambiguous):
    decision = classify(make_error())
    assert decision.retry is retry
    assert decision.ambiguous is ambiguous


def test_classify_carries_retry_after():
    decision = classify(BackendHttpError("throttled", 429, retry_after_s=7.0))
    assert decision.retry_after_s == 7.0


def test_classify_without_retry_after():
    assert classify(BackendHttpError("throttled", 429)).retry_after_s is None


def test_classify_mlflow_unrelated_context_ignored():
    # A permanent code stays permanent although an OSError was being handled.
    try:
        try:
            raise FileNotFoundError(2, "No such file")
        except FileNotFoundError:
            raise MlflowException("no run", error_code=ErrorCode.Value("RESOURCE_DOES_NOT_EXIST"))
    except MlflowException as error:
        decision = classify(error)
    assert decision.retry is False


def test_reason_names_type_and_message():
    decision = classify(BackendHttpError("Too many requests on run abc", 429))
    assert decision.reason == "BackendHttpError: Too many requests on run abc"


def test_reason_is_one_line():
    decision = classify(ValueError("first line\nsecond line\n"))
    assert decision.reason == "ValueError: first line second line"


def test_reason_cut_to_max_chars():
    decision = classify(BackendHttpError("x" * 5000, 500))
    assert len(decision.reason) == MAX_REASON_CHARS
    assert decision.reason.endswith("...")


def test_reason_masks_credentials():
    message = (
        "Authorization: Bearer eyJhbGciOi.payload.sig failed; "
        "token dapi0123456789abcdef0123456789abcdef at https://h/x?sig=abc123&a=1"
    )
    reason = classify(BackendHttpError(message, 401)).reason
    assert "eyJhbGciOi" not in reason
    assert "dapi0123456789abcdef" not in reason
    assert "abc123" not in reason
    assert "a=1" in reason


def test_decision_is_frozen():
    decision = classify(ValueError("x"))
    with pytest.raises(AttributeError):
        decision.retry = True


@pytest.mark.parametrize(
    ("status", "error_code"),
    [
        (429, "REQUEST_LIMIT_EXCEEDED"),
        (503, "TEMPORARILY_UNAVAILABLE"),
        (500, "INTERNAL_ERROR"),
        (502, "INTERNAL_ERROR"),
        (504, "INTERNAL_ERROR"),
        (507, "INTERNAL_ERROR"),
        (400, "INVALID_PARAMETER_VALUE"),
        (401, "UNAUTHENTICATED"),
        (403, "PERMISSION_DENIED"),
        (404, "RESOURCE_DOES_NOT_EXIST"),
        (409, "BAD_REQUEST"),
        (422, "BAD_REQUEST"),
    ],
)
def test_backend_http_error_default_code(status, error_code):
    error = BackendHttpError("failed", status)
    assert error.error_code == error_code
    assert error.http_status == status


def test_backend_http_error_explicit_code():
    error = BackendHttpError("exists", 400, error_code="RESOURCE_ALREADY_EXISTS", retry_after_s=2.5)
    assert error.error_code == "RESOURCE_ALREADY_EXISTS"
    assert error.retry_after_s == 2.5
    assert error.message == "exists"


def test_backend_http_error_is_mlflow_exception():
    assert isinstance(BackendHttpError("failed", 500), MlflowException)


@pytest.mark.parametrize(
    ("header", "expected_s"),
    [("120", 120.0), (" 5 ", 5.0), ("0", 0.0), ("1.5", 1.5), ("-3", 0.0)],
)
def test_retry_after_seconds(header, expected_s):
    assert parse_retry_after_s(header) == expected_s


def test_retry_after_http_date():
    now_s = 1_700_000_000.0
    header = email.utils.formatdate(now_s + 90, usegmt=True)
    assert parse_retry_after_s(header, now_s=now_s) == pytest.approx(90.0)


def test_retry_after_http_date_in_past():
    now_s = 1_700_000_000.0
    header = email.utils.formatdate(now_s - 600, usegmt=True)
    assert parse_retry_after_s(header, now_s=now_s) == 0.0


def test_retry_after_http_date_other_zone():
    # 01:01:30 at +0100 is 00:01:30 GMT, 90 s after midnight GMT.
    now_s = 1_700_006_400.0  # Wed, 15 Nov 2023 00:00:00 GMT
    header = "Wed, 15 Nov 2023 01:01:30 +0100"
    assert parse_retry_after_s(header, now_s=now_s) == pytest.approx(90.0)


@pytest.mark.parametrize("header", [None, "", "   ", "soon", "nan", "inf", "Wed, 99 Foo 2023"])
def test_retry_after_garbage(header):
    assert parse_retry_after_s(header) is None


def test_backoff_grows_exponentially():
    policy = RetryPolicy(initial_backoff_s=0.5, backoff_multiplier=2.0, jitter_fraction=0.0)
    delays = [policy.backoff_s(attempt) for attempt in range(1, 5)]
    assert delays == [0.5, 1.0, 2.0, 4.0]


def test_backoff_capped_at_max():
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=10.0, jitter_fraction=0.0)
    assert policy.backoff_s(5) == 10.0
    assert policy.backoff_s(10_000) == 10.0


@pytest.mark.parametrize("attempt", [1, 3, 20])
def test_backoff_jitter_bounds(attempt):
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=8.0, jitter_fraction=0.5)
    ceiling_s = min(8.0, 2.0 ** (attempt - 1))
    assert policy.backoff_s(attempt, random_fraction=0.0) == pytest.approx(ceiling_s * 0.5)
    assert policy.backoff_s(attempt, random_fraction=0.999999) == pytest.approx(ceiling_s)
    for _ in range(200):
        delay_s = policy.backoff_s(attempt)
        assert ceiling_s * 0.5 <= delay_s <= ceiling_s


def test_backoff_full_jitter_fraction():
    policy = RetryPolicy(initial_backoff_s=2.0, jitter_fraction=1.0)
    assert policy.backoff_s(1, random_fraction=0.0) == 0.0
    assert policy.backoff_s(1, random_fraction=0.25) == pytest.approx(0.5)


def test_backoff_retry_after_floor():
    policy = RetryPolicy(initial_backoff_s=0.5, jitter_fraction=0.0)
    assert policy.backoff_s(1, retry_after_s=7.0) == 7.0


def test_backoff_retry_after_below_backoff():
    policy = RetryPolicy(initial_backoff_s=4.0, jitter_fraction=0.0)
    assert policy.backoff_s(1, retry_after_s=1.0) == 4.0


def test_backoff_retry_after_above_max():
    policy = RetryPolicy(max_backoff_s=60.0, total_s=600.0, jitter_fraction=0.0)
    assert policy.backoff_s(1, retry_after_s=120.0) == 120.0


def test_backoff_retry_after_capped_at_total():
    policy = RetryPolicy(max_backoff_s=60.0, total_s=300.0)
    assert policy.backoff_s(1, retry_after_s=3600.0) == 300.0


def test_backoff_invalid_attempt():
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().backoff_s(0)


def test_backoff_invalid_random_fraction():
    with pytest.raises(ValueError, match="random_fraction"):
        RetryPolicy().backoff_s(1, random_fraction=1.5)


def test_exhausted_at_budget_end():
    policy = RetryPolicy(total_s=100.0)
    assert policy.exhausted(started_s=1000.0, now_s=1099.0) is False
    assert policy.exhausted(started_s=1000.0, now_s=1100.0) is True


def transient_decision(retry_after_s=None):
    return Decision(retry=True, ambiguous=False, retry_after_s=retry_after_s, reason="test")


def test_next_delay_within_budget():
    policy = RetryPolicy(initial_backoff_s=1.0, jitter_fraction=0.0, total_s=100.0)
    delay_s = policy.next_delay_s(3, transient_decision(), started_s=0.0, now_s=50.0)
    assert delay_s == 4.0


def test_next_delay_gives_up_past_budget():
    policy = RetryPolicy(initial_backoff_s=1.0, jitter_fraction=0.0, total_s=100.0)
    delay_s = policy.next_delay_s(3, transient_decision(), started_s=0.0, now_s=97.0)
    assert delay_s is None


def test_next_delay_retry_after_past_budget():
    policy = RetryPolicy(total_s=100.0)
    delay_s = policy.next_delay_s(1, transient_decision(30.0), started_s=0.0, now_s=80.0)
    assert delay_s is None


def test_next_delay_permanent_decision():
    decision = Decision(retry=False, ambiguous=False, retry_after_s=None, reason="test")
    assert RetryPolicy().next_delay_s(1, decision, started_s=0.0, now_s=0.0) is None


def test_retry_policy_defaults():
    policy = RetryPolicy()
    assert policy.initial_backoff_s == 0.5
    assert policy.max_backoff_s == 60.0
    assert policy.attempt_timeout_s == 30.0
    assert policy.total_s == 600.0


def test_retry_policy_is_frozen():
    with pytest.raises(AttributeError):
        RetryPolicy().total_s = 1.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("initial_backoff_s", 0),
        ("initial_backoff_s", -1.0),
        ("max_backoff_s", float("nan")),
        ("attempt_timeout_s", 0.0),
        ("total_s", -5.0),
        ("total_s", float("inf")),
        ("backoff_multiplier", 0.5),
        ("jitter_fraction", -0.1),
        ("jitter_fraction", 1.5),
    ],
)
def test_retry_policy_invalid_value(field, value):
    with pytest.raises(ValueError, match=f"RetryPolicy.{field} .*{value!r}"):
        RetryPolicy(**{field: value})


def test_retry_policy_invalid_type():
    with pytest.raises(TypeError, match="RetryPolicy.total_s"):
        RetryPolicy(total_s="600")


def test_retry_policy_max_below_initial():
    with pytest.raises(ValueError, match=r"max_backoff_s \(1.0\) must be >= initial_backoff_s \(2.0\)"):
        RetryPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)


class FakeClock:
    def __init__(self):
        self.now_s = 0.0

    def __call__(self):
        return self.now_s


LOGGER_NAME = "mlflow_azdual.test_retry"


def rate_limited_logger(interval_s=30.0):
    clock = FakeClock()
    return RateLimitedLogger(logging.getLogger(LOGGER_NAME), interval_s=interval_s, clock=clock), clock


def test_rate_limit_first_record_emitted(caplog):
    limited, _ = rate_limited_logger()
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        emitted = limited.log(logging.WARNING, "secondary", "retrying run %s", "abc")
    assert emitted is True
    assert [record.getMessage() for record in caplog.records] == ["retrying run abc"]


def test_rate_limit_suppresses_within_interval(caplog):
    limited, clock = rate_limited_logger(interval_s=30.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        limited.log(logging.WARNING, "secondary", "retrying run %s", "a")
        clock.now_s = 10.0
        emitted = limited.log(logging.WARNING, "secondary", "retrying run %s", "b")
        clock.now_s = 29.9
        limited.log(logging.WARNING, "secondary", "retrying run %s", "c")
    assert emitted is False
    assert [record.getMessage() for record in caplog.records] == ["retrying run a"]


def test_rate_limit_reports_suppressed_count(caplog):
    limited, clock = rate_limited_logger(interval_s=30.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        for step in range(4):
            clock.now_s = float(step)
            limited.log(logging.WARNING, "secondary", "retrying run %s", step)
        clock.now_s = 30.0
        limited.log(logging.WARNING, "secondary", "retrying run %s", "late")
        clock.now_s = 60.0
        limited.log(logging.WARNING, "secondary", "retrying run %s", "later")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "retrying run 0",
        "retrying run late (3 similar messages suppressed)",
        "retrying run later",
    ]


def test_rate_limit_keys_independent(caplog):
    limited, _ = rate_limited_logger()
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        limited.log(logging.WARNING, "primary", "primary failed")
        limited.log(logging.WARNING, "secondary", "secondary failed")
        limited.log(logging.WARNING, "primary", "primary failed")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["primary failed", "secondary failed"]


def test_rate_limit_keeps_level_and_caller(caplog):
    limited, _ = rate_limited_logger()
    with caplog.at_level(logging.ERROR, logger=LOGGER_NAME):
        limited.log(logging.ERROR, "give-up", "gave up write %d", 7)
    record = caplog.records[0]
    assert record.levelno == logging.ERROR
    assert record.funcName == "test_rate_limit_keeps_level_and_caller"


def test_rate_limit_passes_exc_info(caplog):
    limited, _ = rate_limited_logger()
    with caplog.at_level(logging.ERROR, logger=LOGGER_NAME):
        try:
            raise ValueError("bad")
        except ValueError:
            limited.log(logging.ERROR, "give-up", "gave up", exc_info=True)
    assert caplog.records[0].exc_info[0] is ValueError


def test_rate_limit_disabled_level_not_counted(caplog):
    limited, _ = rate_limited_logger()
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        limited.log(logging.DEBUG, "secondary", "debug detail")
        emitted = limited.log(logging.WARNING, "secondary", "retrying")
    assert emitted is True
    assert [record.getMessage() for record in caplog.records] == ["retrying"]


@pytest.fixture
def frequent_thread_switches():
    # Switching threads every microsecond makes lost updates likely when a lock is missing.
    interval_s = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval_s)


def test_rate_limit_thread_safe(caplog, frequent_thread_switches):
    limited, clock = rate_limited_logger(interval_s=30.0)
    thread_count = 8
    calls_per_thread = 2000
    barrier = threading.Barrier(thread_count)

    def log_many():
        barrier.wait()
        for _ in range(calls_per_thread):
            limited.log(logging.WARNING, "secondary", "retrying")

    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        threads = [threading.Thread(target=log_many) for _ in range(thread_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        clock.now_s = 30.0
        limited.log(logging.WARNING, "secondary", "retrying")

    messages = [record.getMessage() for record in caplog.records]
    suppressed = thread_count * calls_per_thread - 1
    assert messages == ["retrying", f"retrying ({suppressed} similar messages suppressed)"]


def test_not_ready_error_is_retried_and_not_ambiguous():
    from mlflow_azdual.retry import NotReadyError

    decision = classify(NotReadyError("mirror not created yet"))
    assert decision.retry
    assert not decision.ambiguous
