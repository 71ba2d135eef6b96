"""Differences between the MLflow versions the plugin supports (2.9 to 3.x), in one place.

Every call into an MLflow internal whose name or signature changed between versions goes
through this module. MLflow internals are imported inside functions: a module-level import of
MLflow's store registries from the plugin's entry-point modules is circular during
``import mlflow``, which makes MLflow skip the plugin with only a UserWarning.
"""

import functools
import inspect


def build_tracking_store(uri: str):
    """Build the tracking store for ``uri`` through MLflow's registry, outside its build lock.

    ``_get_store`` holds a non-re-entrant module lock on MLflow 2.22+, and the dual store is
    itself built under that lock, so sub-stores come straight from the registered builder.
    """
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    builder = _tracking_store_registry.get_store_builder(uri)
    return builder(store_uri=uri, artifact_uri=None)


def build_registry_store(uri: str, tracking_uri: str):
    """Build the model registry store for ``uri`` through MLflow's registry."""
    from mlflow.tracking._model_registry import utils

    if hasattr(utils, "_get_store_registry"):
        registry = utils._get_store_registry()
    else:  # MLflow 2.x builds the registry at import time.
        registry = utils._model_registry_store_registry
    builder = registry.get_store_builder(uri)
    parameters = _parameter_names(builder)
    if "tracking_uri" in parameters or "kwargs" in parameters:
        return builder(store_uri=uri, tracking_uri=tracking_uri)
    return builder(store_uri=uri)


def build_artifact_repository(artifact_uri: str, tracking_uri=None, registry_uri=None,
                              tracking_store=None):
    """Build the artifact repository for ``artifact_uri``, passing the URIs the version takes.

    ``tracking_uri=`` was added to MLflow's repository registry in 3.2, ``registry_uri=`` in 3.5.
    ``tracking_store`` is the store of ``tracking_uri`` when the plugin has built it: an
    ``azureml://`` repository then gets its Azure ML service context (azureml_service_context).
    """
    from mlflow.store.artifact.artifact_repository_registry import (
        get_artifact_repository,
    )

    from mlflow_azdual import azureml_service_context

    parameters = _parameter_names(get_artifact_repository)
    keywords = {}
    if "tracking_uri" in parameters and tracking_uri is not None:
        keywords["tracking_uri"] = tracking_uri
    if "registry_uri" in parameters and registry_uri is not None:
        keywords["registry_uri"] = registry_uri
    with azureml_service_context.pinned(artifact_uri, tracking_store):
        return get_artifact_repository(artifact_uri, **keywords)


def artifact_repository_base_init(repository, artifact_uri, tracking_uri=None, registry_uri=None):
    """Call ``ArtifactRepository.__init__`` with the arguments this MLflow version accepts."""
    from mlflow.store.artifact.artifact_repo import ArtifactRepository

    parameters = _parameter_names(ArtifactRepository.__init__)
    keywords = {}
    if "tracking_uri" in parameters:
        keywords["tracking_uri"] = tracking_uri
    if "registry_uri" in parameters:
        keywords["registry_uri"] = registry_uri
    ArtifactRepository.__init__(repository, artifact_uri, **keywords)


def add_databricks_profile(artifact_uri: str, tracking_uri: str) -> str:
    """Return a ``dbfs:/`` artifact URI carrying the profile of a ``databricks://`` tracking URI.

    Databricks artifact repositories otherwise look up credentials through the active tracking
    URI, which is the azdual URI.
    """
    if not artifact_uri.startswith("dbfs:") or not tracking_uri.startswith("databricks"):
        return artifact_uri
    from mlflow.utils.uri import add_databricks_profile_info_to_artifact_uri

    return add_databricks_profile_info_to_artifact_uri(artifact_uri, tracking_uri)


def drain_mlflow_async_queue(store) -> None:
    """Send what MLflow's own async logging queue holds for ``store`` through ``log_batch``.

    MLflow 2.16+ drains the queue in ``end_run`` before ending the run. 2.13 to 2.15 end the run
    without it, so a ``log_param`` queued by ``MLFLOW_ENABLE_ASYNC_LOGGING`` arrived after the
    run's end. The queue of 2.9 has no ``flush`` and is left alone.
    """
    queue = getattr(store, "_async_logging_queue", None)
    if queue is not None and hasattr(queue, "flush") and queue.is_active():
        queue.flush()


@functools.lru_cache(maxsize=None)
def _parameter_names(function) -> frozenset:
    try:
        return frozenset(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return frozenset()


def public_methods(cls) -> set:
    """Return the names of the public callables that ``cls`` defines or inherits."""
    return {
        name
        for name, value in inspect.getmembers(cls)
        if callable(value) and not name.startswith("_")
    }


def registered_store_builders(scheme: str) -> dict:
    """Return what MLflow's three plugin registries map ``scheme`` to, None where unregistered.

    Keys are the entry-point groups: ``mlflow.tracking_store``, ``mlflow.model_registry_store``
    and ``mlflow.artifact_repository``. Each registry keeps its schemes in a ``_registry`` dict
    (read on MLflow 3.17; ``build_registry_store`` above covers the 2.x model registry).
    """
    from mlflow.store.artifact import artifact_repository_registry
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    if hasattr(registry_utils, "_get_store_registry"):
        model_registry = registry_utils._get_store_registry()
    else:  # MLflow 2.x builds the registry at import time.
        model_registry = registry_utils._model_registry_store_registry
    artifact_registry = artifact_repository_registry._artifact_repository_registry
    return {
        "mlflow.tracking_store": _tracking_store_registry._registry.get(scheme),
        "mlflow.model_registry_store": model_registry._registry.get(scheme),
        "mlflow.artifact_repository": artifact_registry._registry.get(scheme),
    }


def rest_endpoint(store, api):
    """Return ``(path, HTTP method)`` of the MLflow REST message ``api`` for a REST store.

    MLflow 3 keeps the tracking table on the store class, with a second table for its v3 APIs.
    The registry store resolves a message with ``_get_endpoint_from_method``. MLflow 2 keeps
    the tracking table in the store's module. Raises LookupError when no table names ``api``.
    """
    import sys

    table = getattr(store, "_METHOD_TO_INFO", None)
    if table is not None:
        if api in getattr(store, "_V3_APIS", ()):
            return store._V3_METHOD_TO_INFO[api]
        return table[api]
    if hasattr(store, "_get_endpoint_from_method"):
        return store._get_endpoint_from_method(api)
    for cls in type(store).__mro__:
        module_table = getattr(sys.modules.get(cls.__module__), "_METHOD_TO_INFO", None)
        if module_table is not None and api in module_table:
            return module_table[api]
    raise LookupError(f"no REST endpoint of {api.__name__} is known for {type(store).__name__}")
