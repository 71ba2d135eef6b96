"""Helpers for tests that write through the dual store and read each backend directly."""

import contextlib
import uuid

from mlflow import MlflowClient

import mlflow_azdual
from mlflow_azdual.backend_profiles import PROFILES

from mlflow_azdual.id_mapping import (
    PRIMARY_EXPERIMENT_ID_TAG,
    SECONDARY_RUN_ID_TAG,
    TAG_PREFIX,
)


def dual_tracking_uri(rig) -> str:
    return rig.dual_tracking_uri()


def backend_clients(rig):
    """Return plain MlflowClients for the primary and the secondary server."""
    primary = MlflowClient(tracking_uri=rig.primary_uri, registry_uri=rig.primary_uri)
    secondary = MlflowClient(tracking_uri=rig.secondary_uri, registry_uri=rig.secondary_uri)
    return primary, secondary


def unique_path(leaf: str = "exp") -> str:
    return f"/Users/tester@example.com/{uuid.uuid4().hex[:10]}/{leaf}"


def secondary_run_id(primary_client, run_id: str) -> str:
    """Return the id of the run's mirror, once every queued secondary write is sent."""
    assert mlflow_azdual.flush(timeout_s=120)
    return primary_client.get_run(run_id).data.tags[SECONDARY_RUN_ID_TAG]


def secondary_experiment(secondary_client, primary_experiment_id: str):
    """Return the secondary experiment that mirrors ``primary_experiment_id``."""
    assert mlflow_azdual.flush(timeout_s=120)
    matches = [
        experiment
        for experiment in secondary_client.search_experiments(view_type=3)
        if experiment.tags.get(PRIMARY_EXPERIMENT_ID_TAG) == primary_experiment_id
    ]
    assert len(matches) == 1, f"expected one mirror, found {len(matches)}"
    return matches[0]


def user_tags(tags: dict) -> dict:
    """Return ``tags`` without the plugin's id-mapping tags."""
    return {key: value for key, value in tags.items() if not key.startswith(TAG_PREFIX)}


def mirrored_user_tags(primary_tags: dict) -> dict:
    """Return the user tags that the rig's Azure ML stand-in should have of ``primary_tags``:
    all but those the azureml profile refuses, such as ``mlflow.user``."""
    refused = PROFILES["azureml"].refused_tags
    return {key: value for key, value in user_tags(primary_tags).items() if key not in refused}


# Azure ML, and the rig's emulation of it, takes metric-history pages under 1,000 points.
HISTORY_PAGE_SIZE = 999


def metric_history(client, run_id: str, key: str) -> list:
    """Return every point of ``key``, read in pages that the Azure ML stand-in accepts."""
    store = client._tracking_client.store
    points, page_token = [], None
    while True:
        page = store.get_metric_history(
            run_id, key, max_results=HISTORY_PAGE_SIZE, page_token=page_token
        )
        points.extend(page)
        page_token = page.token
        if not page_token:
            return points


def metric_points(client, run_id: str, key: str):
    return sorted((m.step, m.value, m.timestamp) for m in metric_history(client, run_id, key))


@contextlib.contextmanager
def active_dual_client(uri: str):
    """Yield an MlflowClient on ``uri``, set as MLflow's tracking and registry URI meanwhile.

    Runs still active at the end of the block are ended.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        while mlflow.active_run():
            mlflow.end_run()
