"""Give azureml-mlflow's artifact repository the Azure ML service context of the secondary store.

azureml-mlflow (read on 1.62.0.post6) takes the service context of an ``azureml://`` run
artifact repository from ``MlflowClient()``'s tracking store if that is an ``AzureMLRestStore``.
Otherwise it parses a token from the artifact URI, and a workspace's run artifact URIs contain
none. With an azdual tracking URI active, that store is the dual store. So this module wraps
azureml-mlflow's ``get_service_context`` once. While the plugin builds a secondary repository
on a thread, the wrapper returns the secondary store's ``service_context`` on that thread only,
and otherwise it calls the original. MLflow's tracking URI is never changed.
"""

import contextlib
import functools
import threading

from mlflow_azdual.logs import get_logger

_logger = get_logger(__name__)

# The azureml-mlflow module whose get_service_context is wrapped, and the function that looks
# that name up when it builds a repository.
_UTILS_MODULE = "azureml.mlflow._store.artifact.utils"
_HOOKED_FUNCTION = "get_service_context"
_CALLER_FUNCTION = "get_artifact_repository_client"

_pinned = threading.local()
_install_lock = threading.Lock()
# None until the first install attempt, then whether the wrapper is in place.
_installed = None


@contextlib.contextmanager
def pinned(artifact_uri, tracking_store):
    """Make azureml-mlflow use ``tracking_store.service_context`` on this thread, in the block.

    The block runs unchanged if ``artifact_uri`` is not ``azureml:``, if ``tracking_store`` has
    no service context (it is not an ``AzureMLRestStore``), or if this azureml-mlflow version
    lacks the wrapped internals.
    """
    service_context = getattr(tracking_store, "service_context", None)
    if (
        not str(artifact_uri).startswith("azureml:")
        or service_context is None
        or not _install()
    ):
        yield
        return

    previous = getattr(_pinned, "service_context", None)
    _pinned.service_context = service_context
    try:
        yield
    finally:
        _pinned.service_context = previous


def _install() -> bool:
    """Wrap azureml-mlflow's ``get_service_context`` once, and return whether the wrapper is in place."""
    global _installed
    if _installed is not None:
        return _installed
    with _install_lock:
        if _installed is None:
            _installed = _wrap_get_service_context()
    return _installed


def _wrap_get_service_context() -> bool:
    import importlib

    try:
        utils = importlib.import_module(_UTILS_MODULE)
    except ImportError as error:
        return _unsupported(f"{_UTILS_MODULE} does not import ({error})")
    original = getattr(utils, _HOOKED_FUNCTION, None)
    caller = getattr(utils, _CALLER_FUNCTION, None)
    if not callable(original) or not callable(caller):
        return _unsupported(f"{_UTILS_MODULE} has no {_HOOKED_FUNCTION} or {_CALLER_FUNCTION}")
    # The wrapper takes effect only if the caller looks the name up in the module's globals.
    if _HOOKED_FUNCTION not in getattr(getattr(caller, "__code__", None), "co_names", ()):
        return _unsupported(f"{_CALLER_FUNCTION} no longer calls {_HOOKED_FUNCTION}")
    if getattr(original, "_mlflow_azdual_wrapper", False):
        return True

    @functools.wraps(original)
    def get_service_context(*args, **kwargs):
        service_context = getattr(_pinned, "service_context", None)
        if service_context is not None:
            return service_context
        return original(*args, **kwargs)

    get_service_context._mlflow_azdual_wrapper = True
    setattr(utils, _HOOKED_FUNCTION, get_service_context)
    return True


def _unsupported(reason: str) -> bool:
    _logger.warning(
        "mlflow-azdual: this azureml-mlflow version is not supported for uploads to the "
        "secondary's azureml:// artifact locations (%s), so azureml-mlflow looks for a token in "
        "the artifact URI and such uploads fail. azureml-mlflow 1.62.0.post6 is supported.",
        reason,
    )
    return False
