"""Make an MLflow REST store send each request once, so the writer's retry policy governs.

MLflow's HTTP client retries 429, 5xx and connection resets on every method, POST included,
for minutes by default (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR).
For a writer thread that is wrong twice: a create that the server committed before a reset is
sent again and creates a second run, and the Retry-After of a 429 is lost in an exception.
``make_single_attempt`` gives one store instance a ``_call_endpoint`` that sends one request,
with a timeout, and raises ``BackendHttpError`` (with the HTTP status and Retry-After) on a
non-2xx response. Credentials are still fetched per request with the store's own
``get_host_creds``. Only instances of classes that keep MLflow's ``_call_endpoint`` are
changed; a store class with its own (a plugin's) keeps its behaviour.
"""

import json

from mlflow_azdual import compat
from mlflow_azdual.logs import get_logger
from mlflow_azdual.retry import BackendHttpError, parse_retry_after_s

_logger = get_logger(__name__)


def _rest_store_classes():
    from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
    from mlflow.store.tracking.rest_store import RestStore

    return RestStore, RegistryRestStore


def make_single_attempt(store, timeout_s: float):
    """Return ``store`` with its REST calls sent once; other stores are returned unchanged."""
    for base in _rest_store_classes():
        if isinstance(store, base) and type(store)._call_endpoint is base._call_endpoint:
            original = store._call_endpoint

            def call_endpoint(api, json_body=None, endpoint=None, response_proto=None,
                              call_all_endpoints=False, extra_headers=None, **_):
                if call_all_endpoints or extra_headers:
                    return original(
                        api, json_body, call_all_endpoints=call_all_endpoints,
                        extra_headers=extra_headers,
                    )
                return _call_once(store, api, json_body, endpoint, response_proto, timeout_s)

            store._call_endpoint = call_endpoint
            return store
    return store


def _call_once(store, api, json_body, endpoint, response_proto, timeout_s):
    from mlflow.utils.proto_json_utils import parse_dict
    from mlflow.utils.rest_utils import http_request

    default_endpoint, method = compat.rest_endpoint(store, api)
    endpoint = endpoint or default_endpoint
    body = json.loads(json_body) if json_body is not None else None
    arguments = {"params": body} if method == "GET" else {"json": body}
    response = http_request(
        store.get_host_creds(), endpoint, method, max_retries=0, timeout=timeout_s,
        raise_on_status=False, **arguments,
    )
    if not 200 <= response.status_code < 300:
        raise _http_error(response, endpoint)
    response_proto = response_proto or api.Response()
    if response.status_code == 204 or not response.text:
        return response_proto
    parse_dict(js_dict=json.loads(response.text), message=response_proto)
    return response_proto


def _http_error(response, endpoint) -> BackendHttpError:
    error_code, message = None, response.text[:500]
    try:
        document = json.loads(response.text)
        error_code = document.get("error_code")
        message = document.get("message", message)
    except (ValueError, AttributeError):
        pass
    code = f" {error_code}" if error_code else ""
    return BackendHttpError(
        f"{endpoint} returned HTTP {response.status_code}{code}: {message}",
        http_status=response.status_code,
        error_code=error_code,
        retry_after_s=parse_retry_after_s(response.headers.get("Retry-After")),
    )
