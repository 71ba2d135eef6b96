"""MLflow 3 logged models mirrored to a secondary without the logged-model API.

The rig's secondary runs behind a policy proxy that emulates Azure ML's published behaviour:
the logged-model routes return 404 there, as reported in Azure/azure-sdk-for-python#44896.
This is an emulation of public reports, not Azure ML. With the `azureml` profile the plugin
keeps such a model as artifacts of the secondary run and registers versions from that folder.
"""

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

import mlflow_azdual
from mlflow_azdual.id_mapping import SECONDARY_MODEL_ID_TAG
from mlflow_azdual.registry_store import SECONDARY_VERSION_TAG
from mlflow_azdual.uri import explicit_tracking_uri
from tests.dual_helpers import backend_clients, secondary_run_id, unique_path
from tests.mlflow_versions import download_artifacts, needs_logged_models

pytestmark = needs_logged_models


def load_through(uri, model_uri):
    """Load a model with `uri` as both the tracking and the registry URI, then restore them."""
    tracking_uri, registry_uri = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)


def missing_route_rejections(rig):
    stats = rig.policy_control("secondary").stats()
    return stats["rejected"].get("missing_routes", 0)


@pytest.mark.smoke
def test_registered_log_model_loads_on_both(rig, dual, iris_model, tmp_path):
    primary, secondary = backend_clients(rig)
    model, features = iris_model
    name = "iris-logged-" + unique_path().split("/")[-2]
    rejections_before = missing_route_rejections(rig)
    mlflow.set_experiment(unique_path())

    with mlflow.start_run() as run:
        info = mlflow.sklearn.log_model(model, name="model", registered_model_name=name)
    assert mlflow_azdual.flush(timeout_s=120)

    mirror_id = secondary_run_id(primary, run.info.run_id)
    primary_version = primary.get_model_version(name, str(info.registered_model_version))
    secondary_version = secondary.get_model_version(name, primary_version.tags[SECONDARY_VERSION_TAG])
    mirror_root = secondary.get_run(mirror_id).info.artifact_uri
    assert secondary_version.source == f"{mirror_root}/model"
    assert secondary_version.run_id == mirror_id
    assert not getattr(secondary_version, "model_id", None)

    recorded = primary.get_logged_model(info.model_id).tags[SECONDARY_MODEL_ID_TAG]
    assert recorded == f"runs:/{mirror_id}/model"
    assert missing_route_rejections(rig) == rejections_before

    mlmodel_path = download_artifacts(secondary, mirror_id, "model/MLmodel", str(tmp_path))
    with open(mlmodel_path) as mlmodel_file:
        mlmodel = yaml.safe_load(mlmodel_file)
    assert mlmodel["run_id"] == mirror_id
    assert mlmodel["artifact_path"] == "model"
    assert "model_id" not in mlmodel
    assert "sklearn" in mlmodel["flavors"]

    expected = model.predict(features[:5])
    on_primary = load_through(rig.primary_uri, f"models:/{name}/{primary_version.version}")
    assert np.array_equal(on_primary.predict(features[:5]), expected)
    on_secondary = load_through(rig.secondary_uri, f"models:/{name}/{secondary_version.version}")
    assert np.array_equal(on_secondary.predict(features[:5]), expected)


def test_model_history_tag_on_secondary_run(rig, dual, iris_model):
    primary, secondary = backend_clients(rig)
    model, _ = iris_model
    mlflow.set_experiment(unique_path())

    with mlflow.start_run() as run:
        mlflow.sklearn.log_model(model, name="classifier")
    assert mlflow_azdual.flush(timeout_s=120)

    mirror = secondary.get_run(secondary_run_id(primary, run.info.run_id))
    history = yaml.safe_load(mirror.data.tags["mlflow.log-model.history"])
    assert [entry["artifact_path"] for entry in history] == ["classifier"]
    assert history[0]["run_id"] == mirror.info.run_id
    assert "sklearn" in history[0]["flavors"]


def test_model_outputs_and_metrics_stay_on_primary(rig, dual, iris_model):
    primary, secondary = backend_clients(rig)
    model, features = iris_model
    mlflow.set_experiment(unique_path())

    with mlflow.start_run() as run:
        info = mlflow.sklearn.log_model(model, name="model")
        mlflow.log_metric("accuracy", 0.97, model_id=info.model_id)
    assert mlflow_azdual.flush(timeout_s=120)

    mirror = secondary.get_run(secondary_run_id(primary, run.info.run_id))
    assert mirror.data.metrics["accuracy"] == 0.97
    assert [output.model_id for output in primary.get_run(run.info.run_id).outputs.model_outputs] == [
        info.model_id
    ]
    mirror_outputs = mirror.outputs.model_outputs if mirror.outputs else []
    assert mirror_outputs == []
    loaded = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert np.array_equal(loaded.predict(features[:3]), model.predict(features[:3]))


def test_model_without_run_stays_on_primary(rig, dual, iris_model):
    primary, _ = backend_clients(rig)
    model, features = iris_model
    mlflow.set_experiment(unique_path())
    assert mlflow.active_run() is None

    info = mlflow.sklearn.log_model(model, name="standalone")
    assert mlflow_azdual.flush(timeout_s=120)

    logged = primary.get_logged_model(info.model_id)
    assert not logged.source_run_id
    assert SECONDARY_MODEL_ID_TAG not in logged.tags
    loaded = mlflow.pyfunc.load_model(f"models:/{info.model_id}")
    assert np.array_equal(loaded.predict(features[:3]), model.predict(features[:3]))


def test_plain_mlflow_secondary_keeps_logged_models(rig, iris_model, tmp_path):
    """A secondary with the logged-model API (the mlflow profile) gets a real logged model."""
    primary = MlflowClient(rig.primary_uri)
    secondary = MlflowClient(rig.secondary_server_uri)
    model, _ = iris_model
    uri = explicit_tracking_uri(
        rig.primary_uri, rig.secondary_server_uri, primary_profile="databricks",
        spool_dir=str(tmp_path / "spool"),
    )
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(unique_path())
        with mlflow.start_run():
            info = mlflow.sklearn.log_model(model, name="model")
        assert mlflow_azdual.flush(timeout_s=120)
    finally:
        mlflow.set_tracking_uri(previous_uri)

    mirror_id = primary.get_logged_model(info.model_id).tags[SECONDARY_MODEL_ID_TAG]
    assert mirror_id.startswith("m-")
    assert secondary.get_logged_model(mirror_id).name == "model"
