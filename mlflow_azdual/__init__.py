"""MLflow plugin that mirrors every write from Databricks to Azure Machine Learning.

Set ``MLFLOW_TRACKING_URI`` to an ``azdual`` URI (see ``tracking_uri``); MLflow then loads the
plugin's stores through its entry points. This module imports MLflow lazily, because MLflow
imports the plugin while it is itself being imported.
"""

__version__ = "0.1.0"


def tracking_uri(workspace_or_uri, databricks_profile=None, **options) -> str:
    """Build an azdual tracking URI from an azureml-core ``Workspace`` or an azureml:// URI."""
    from mlflow_azdual.uri import tracking_uri as build

    return build(workspace_or_uri, databricks_profile=databricks_profile, **options)


def flush(timeout_s=None) -> bool:
    """Send every queued write of this process to both backends and wait for it.

    Returns True when everything was sent, False if ``timeout_s`` seconds passed first.
    """
    from mlflow_azdual.tracking_store import flush as flush_stores

    return flush_stores(timeout_s=timeout_s)


__all__ = ["flush", "tracking_uri", "__version__"]
