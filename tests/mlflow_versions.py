"""Differences between MLflow versions that test code meets, in one place.

Tests call these helpers in place of MLflow APIs whose names or arguments changed between 2.9
and 3.x. A test is skipped only through the markers below, each for a feature that the
installed MLflow does not have, with a reason that names the version and the missing API.
"""

import inspect
import os

import mlflow
import mlflow.sklearn
import pytest
from mlflow import MlflowClient
from mlflow.entities import RunInfo
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

MLFLOW_VERSION = mlflow.__version__

# MLflow 3.0 added logged models (`MlflowClient.create_logged_model`, `log_model` returning a
# `model_id`, `models:/<model id>` URIs).
HAS_LOGGED_MODELS = hasattr(MlflowClient, "create_logged_model")

needs_logged_models = pytest.mark.skipif(
    not HAS_LOGGED_MODELS,
    reason=f"MLflow {MLFLOW_VERSION} has no logged models (MlflowClient.create_logged_model, 3.0+)",
)


def _server_serves_traces() -> bool:
    """Return whether the installed MLflow's server, which the rig runs, has a trace endpoint."""
    from mlflow.server import handlers

    return hasattr(handlers, "_start_trace") or hasattr(handlers, "_start_trace_v3")


# MLflow 2.13.1 has mlflow.trace in the client, but its server has no trace endpoint.
needs_tracing = pytest.mark.skipif(
    not hasattr(mlflow, "trace") or not _server_serves_traces(),
    reason=f"MLflow {MLFLOW_VERSION} has no tracing, or its server has no trace endpoints",
)

needs_delete_experiment_tag = pytest.mark.skipif(
    not hasattr(MlflowClient, "delete_experiment_tag"),
    reason=f"MLflow {MLFLOW_VERSION} has no MlflowClient.delete_experiment_tag",
)


def log_sklearn_model(model, name: str, **kwargs):
    """Log a scikit-learn model as ``name``: ``name=`` on MLflow 3, ``artifact_path=`` before."""
    if "name" in inspect.signature(mlflow.sklearn.log_model).parameters:
        return mlflow.sklearn.log_model(model, name=name, **kwargs)
    return mlflow.sklearn.log_model(model, artifact_path=name, **kwargs)


def artifact_repository(artifact_uri: str, tracking_uri: str):
    """Return MLflow's artifact repository for ``artifact_uri``.

    ``get_artifact_repository`` takes ``tracking_uri=`` from MLflow 3.2 on.
    """
    if "tracking_uri" in inspect.signature(get_artifact_repository).parameters:
        return get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    return get_artifact_repository(artifact_uri)


def download_artifacts(client, run_id: str, path: str, dst_path: str) -> str:
    """Download a run's artifact into ``dst_path`` from the run's artifact location.

    The folder is created first because MLflow 2 raises on a missing one. The repository is
    built from the run's artifact URI because ``MlflowClient.download_artifacts`` of MLflow
    3.0.1 reads the run through the active tracking URI, not the client's.
    """
    os.makedirs(dst_path, exist_ok=True)
    repository = artifact_repository(client.get_run(run_id).info.artifact_uri, client.tracking_uri)
    return repository.download_artifacts(path, dst_path)


def run_info(run_id: str, **fields) -> RunInfo:
    """Return a ``RunInfo``, whose first argument is ``run_uuid`` before MLflow 3 and ``run_id``
    from 3.0 on."""
    if "run_uuid" in inspect.signature(RunInfo.__init__).parameters:
        return RunInfo(run_uuid=run_id, run_id=run_id, **fields)
    return RunInfo(run_id=run_id, **fields)


def flush_traces() -> None:
    """Wait for asynchronous trace export, on versions that have ``flush_trace_async_logging``."""
    if hasattr(mlflow, "flush_trace_async_logging"):
        mlflow.flush_trace_async_logging()
