"""Artifacts and registered models through the azdual URI reach both rig servers.

The primary stand-in keeps artifacts in moto S3, the secondary in Azurite blob storage, as
Databricks and Azure ML keep them in their own cloud storage.
"""

import mlflow
import numpy as np
import pytest

import mlflow_azdual
from mlflow_azdual.artifact_uri import is_dual_artifact_uri, resolve
from mlflow_azdual.registry_store import PRIMARY_VERSION_TAG, SECONDARY_VERSION_TAG
from tests.dual_helpers import backend_clients, secondary_run_id, unique_path
from tests.mlflow_versions import artifact_repository, download_artifacts, log_sklearn_model


def artifact_paths(client, run_id, path=None):
    """Return the paths of a run's files, listed from its artifact location.

    MLflow 3's ``client.list_artifacts(run_id, sub_path)`` also searches logged models, an API
    that the Azure ML stand-in does not have, so the run's storage is listed directly.
    """
    repository = artifact_repository(
        client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri
    )
    return _list_files(repository, path)


def _list_files(repository, path):
    paths = []
    for info in repository.list_artifacts(path):
        if info.is_dir:
            paths.extend(_list_files(repository, info.path))
        else:
            paths.append(info.path)
    return sorted(paths)


@pytest.mark.smoke
def test_run_artifact_uri_is_dual(rig, dual):
    mlflow.set_experiment(unique_path())
    with mlflow.start_run() as run:
        early_uri = mlflow.get_artifact_uri()
    assert mlflow_azdual.flush(timeout_s=60)
    uri = dual.get_run(run.info.run_id).info.artifact_uri

    assert is_dual_artifact_uri(early_uri)
    assert resolve(early_uri).secondary or resolve(early_uri).mirror_of == f"run:{run.info.run_id}"
    roots = resolve(uri)
    assert roots.primary.startswith("s3://")
    assert roots.secondary.startswith("wasbs://")
    assert roots.primary == resolve(early_uri).primary


@pytest.mark.smoke
def test_log_artifacts_land_in_both_stores(rig, dual, tmp_path):
    primary, secondary = backend_clients(rig)
    (tmp_path / "report.txt").write_text("accuracy 0.97\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss.csv").write_text("epoch,loss\n0,1.0\n")
    mlflow.set_experiment(unique_path())

    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "report.txt"))
        mlflow.log_artifacts(str(tmp_path / "plots"), artifact_path="plots")

    mirror_id = secondary_run_id(primary, run.info.run_id)
    expected = ["plots/loss.csv", "report.txt"]
    assert artifact_paths(primary, run.info.run_id) == expected
    assert artifact_paths(secondary, mirror_id) == expected
    downloaded = download_artifacts(secondary, mirror_id, "report.txt", str(tmp_path / "out"))
    assert open(downloaded).read() == "accuracy 0.97\n"
    assert artifact_paths(dual, run.info.run_id) == expected


@pytest.mark.smoke
def test_model_loads_through_runs_uri(rig, dual, iris_model):
    primary, secondary = backend_clients(rig)
    model, features = iris_model
    mlflow.set_experiment(unique_path())

    with mlflow.start_run() as run:
        log_sklearn_model(model, "model")

    loaded = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert np.array_equal(loaded.predict(features[:5]), model.predict(features[:5]))
    mirror_id = secondary_run_id(primary, run.info.run_id)
    assert secondary.get_run(mirror_id).info.status == "FINISHED"


@pytest.mark.smoke
def test_registered_model_version_on_both(rig, dual, iris_model):
    primary, secondary = backend_clients(rig)
    model, features = iris_model
    name = "iris-" + unique_path().split("/")[-2]
    # A version made on the secondary alone shifts its numbering, so the mapping is exercised.
    secondary.create_registered_model(name)
    secondary.create_model_version(name, "wasbs://x@devstoreaccount1.blob.core.windows.net/y")
    mlflow.set_experiment(unique_path())

    with mlflow.start_run():
        log_sklearn_model(model, "model", registered_model_name=name)
    assert mlflow_azdual.flush(timeout_s=120)

    primary_version = primary.get_model_version(name, "1")
    secondary_number = primary_version.tags[SECONDARY_VERSION_TAG]
    secondary_version = secondary.get_model_version(name, secondary_number)
    assert secondary_number == "2"
    assert secondary_version.tags[PRIMARY_VERSION_TAG] == "1"
    assert secondary_version.source.startswith("wasbs://")
    assert secondary_version.run_id == secondary_run_id(primary, primary_version.run_id)

    dual.set_registered_model_alias(name, "champion", "1")
    dual.set_model_version_tag(name, "1", "validated", "true")
    dual.update_model_version(name, "1", description="first model")
    assert mlflow_azdual.flush(timeout_s=120)
    mirrored = secondary.get_model_version(name, secondary_number)
    assert secondary.get_model_version_by_alias(name, "champion").version == secondary_number
    assert mirrored.tags["validated"] == "true"
    assert mirrored.description == "first model"

    by_name = mlflow.pyfunc.load_model(f"models:/{name}/1")
    assert np.array_equal(by_name.predict(features[:3]), model.predict(features[:3]))
    by_alias = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert np.array_equal(by_alias.predict(features[:3]), model.predict(features[:3]))
    assert [str(v.version) for v in primary.search_model_versions(f"name='{name}'")] == ["1"]


def test_register_model_from_runs_uri(rig, dual, iris_model):
    primary, secondary = backend_clients(rig)
    model, _ = iris_model
    name = "iris-runs-" + unique_path().split("/")[-2]
    mlflow.set_experiment(unique_path())
    with mlflow.start_run() as run:
        log_sklearn_model(model, "model")

    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", name)
    assert mlflow_azdual.flush(timeout_s=120)

    primary_version = primary.get_model_version(name, version.version)
    mirrored = secondary.get_model_version(name, primary_version.tags[SECONDARY_VERSION_TAG])
    assert mirrored.run_id == secondary_run_id(primary, run.info.run_id)
    assert not primary_version.source.startswith("azdual")
    assert mirrored.source.startswith("wasbs://")


def test_download_falls_back_to_secondary(rig, dual, tmp_path, caplog):
    import logging

    import boto3

    (tmp_path / "weights.bin").write_bytes(b"\x00\x01\x02")
    mlflow.set_experiment(unique_path())
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "weights.bin"))
    assert mlflow_azdual.flush(timeout_s=60)
    primary_root = resolve(dual.get_run(run.info.run_id).info.artifact_uri).primary
    bucket, prefix = primary_root[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=rig.s3_endpoint_url)
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/weights.bin")
    caplog.set_level(logging.WARNING, logger="mlflow_azdual")

    local = download_artifacts(dual, run.info.run_id, "weights.bin", str(tmp_path / "out"))

    assert open(local, "rb").read() == b"\x00\x01\x02"
    assert any("secondary's copy was used" in record.getMessage() for record in caplog.records)


def test_missing_artifact_raises_primary_error(rig, dual, tmp_path, caplog):
    import logging

    from mlflow.exceptions import MlflowException

    primary, _ = backend_clients(rig)
    mlflow.set_experiment(unique_path())
    with mlflow.start_run() as run:
        pass
    caplog.set_level(logging.WARNING, logger="mlflow_azdual")

    with pytest.raises(MlflowException) as dual_error:
        dual.download_artifacts(run.info.run_id, "absent.txt", str(tmp_path))
    with pytest.raises(MlflowException) as plain_error:
        primary.download_artifacts(run.info.run_id, "absent.txt", str(tmp_path))

    assert dual_error.value.message == plain_error.value.message
    assert not [record for record in caplog.records if "secondary's copy" in record.getMessage()]


@pytest.mark.smoke
def test_stage_transition_and_model_tags_on_both(rig, dual):
    primary, secondary = backend_clients(rig)
    name = "staged-" + unique_path().split("/")[-2]
    mlflow.set_experiment(unique_path())
    with mlflow.start_run():
        mlflow.log_text("weights", "model/weights.txt")
    dual.create_registered_model(name, tags={"owner": "ana"}, description="churn model")
    run_id = mlflow.last_active_run().info.run_id
    source = dual.get_run(run_id).info.artifact_uri + "/model"
    dual.create_model_version(name, source, run_id=run_id)

    dual.transition_model_version_stage(name, "1", "Staging")
    dual.set_registered_model_tag(name, "domain", "churn")
    assert mlflow_azdual.flush(timeout_s=120)
    mirrored_number = primary.get_model_version(name, "1").tags[SECONDARY_VERSION_TAG]
    mirrored_model = secondary.get_registered_model(name)

    assert secondary.get_model_version(name, mirrored_number).current_stage == "Staging"
    assert mirrored_model.description == "churn model"
    assert mirrored_model.tags == {"owner": "ana", "domain": "churn"}
    assert secondary.get_model_version(name, mirrored_number).source.startswith("wasbs://")
    assert primary.get_model_version(name, "1").source.startswith("s3://")


def test_failed_staging_copy_is_logged(rig, dual, tmp_path, monkeypatch, caplog):
    import logging

    from mlflow_azdual import artifact_repository

    primary, _ = backend_clients(rig)
    (tmp_path / "notes.txt").write_text("kept on the primary")
    mlflow.set_experiment(unique_path())

    def failing_copy(*_args, **_kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(artifact_repository.shutil, "copy2", failing_copy)
    caplog.set_level(logging.WARNING, logger="mlflow_azdual")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "notes.txt"))

    assert [info.path for info in primary.list_artifacts(run.info.run_id)] == ["notes.txt"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("No space left on device" in message for message in messages)
    assert any("operation=log_artifact" in message for message in messages)
