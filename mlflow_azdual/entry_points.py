"""The builders that MLflow loads through the plugin's entry points.

MLflow imports entry-point modules while ``import mlflow`` is still running and skips a plugin
whose module fails then, with only a UserWarning. This module imports nothing from MLflow at
the top, so it loads in any import order; each builder imports its store when called.
"""


def build_tracking_store(store_uri, artifact_uri=None, **kwargs):
    """Build the dual tracking store (group ``mlflow.tracking_store``, name ``azdual``)."""
    from mlflow_azdual.tracking_store import build_tracking_store as build

    return build(store_uri, artifact_uri, **kwargs)


def build_artifact_repository(artifact_uri, tracking_uri=None, registry_uri=None, **kwargs):
    """Build the dual artifact repository (group ``mlflow.artifact_repository``)."""
    from mlflow_azdual.artifact_repository import build_artifact_repository as build

    return build(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri, **kwargs)


def build_registry_store(store_uri, tracking_uri=None, **kwargs):
    """Build the dual model registry store (group ``mlflow.model_registry_store``)."""
    from mlflow_azdual.registry_store import build_registry_store as build

    return build(store_uri, tracking_uri=tracking_uri, **kwargs)
