"""The plugin through MLflow's real Databricks client: `databricks://rig` as the primary.

MLflow's Databricks stores and the Databricks SDK read the profile `rig` from the rig's
config file and reach the primary MLflow server through its https front door. The front door
checks the profile's bearer token and emulates the DBFS calls of MLflow's DBFS artifact
repository.
The secondary is the rig's plain Azure ML stand-in. Every test runs with the
`databricks_primary` fixture's environment.
"""

import configparser
import os
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

import mlflow_azdual
from mlflow_azdual.artifact_uri import is_dual_artifact_uri, resolve
from mlflow_azdual.registry_store import SECONDARY_VERSION_TAG
from mlflow_azdual.uri import explicit_tracking_uri, parse_tracking_uri
from rig.servers import DATABRICKS_PROFILE, PLUGIN_PROFILE_OPTIONS
from tests.dual_helpers import (
    active_dual_client,
    metric_history, secondary_experiment, secondary_run_id, unique_path,
)

CLI = Path(sys.executable).with_name("mlflow-azdual")
WRONG_PROFILE = "rig-wrong-token"
WRONG_TOKEN = "dapi-wrong-token-do-not-print-7788"
# The front door rejects a wrong token at once, so the bound leaves room for a slow machine.
REJECTED_TOKEN_BOUND_S = 15
# The doctor gives each read twice its timeout (5 s by default), and the process takes a few
# seconds to start.
DOCTOR_BOUND_S = 30


@pytest.fixture
def dual(databricks_primary):
    """An MlflowClient on the azdual URI whose primary is `databricks://rig`, also set active."""
    with active_dual_client(databricks_primary.databricks_dual_tracking_uri()) as client:
        yield client


@pytest.fixture
def primary_server(databricks_primary):
    """A plain client of the primary MLflow server, to check what landed there."""
    uri = databricks_primary.primary_server_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture
def secondary_server(databricks_primary):
    uri = databricks_primary.secondary_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture
def front_stats(databricks_primary):
    """Return a function that reads the request counters of the https front door."""
    return databricks_primary.policy_control("primary-databricks").stats


@pytest.fixture
def wrong_token_profile(databricks_primary, tmp_path, monkeypatch):
    """Write a copy of the rig's config file with a profile that has a wrong token.

    Returns the profile's name.
    """
    config = configparser.ConfigParser()
    config.read(databricks_primary.databricks_config_path)
    config[WRONG_PROFILE] = {**config[DATABRICKS_PROFILE], "token": WRONG_TOKEN}
    path = tmp_path / "databrickscfg"
    with open(path, "w") as config_file:
        config.write(config_file)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(path))
    return WRONG_PROFILE


def dual_uri_with_profile(rig, profile: str) -> str:
    """Return the azdual URI of the rig with `databricks://<profile>` as the primary."""
    return explicit_tracking_uri(
        f"databricks://{profile}", rig.secondary_uri,
        secondary_profile=PLUGIN_PROFILE_OPTIONS["secondary_profile"],
    )


def run_doctor(uri: str, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """Run `mlflow-azdual doctor URI` and return the completed process and its duration in s."""
    started = time.monotonic()
    completed = subprocess.run(
        [str(CLI), "doctor", uri], check=False, env=env, capture_output=True, text=True,
        timeout=180,
    )
    return completed, time.monotonic() - started


def failed_lines(stdout: str) -> list:
    return [line for line in stdout.splitlines() if line.startswith("FAILED")]


def dbfs_location(databricks_primary, leaf: str) -> tuple[str, Path]:
    """Return a new `dbfs:/` artifact location and the folder of the rig's DBFS emulation for it."""
    path = f"azdual-tests/{uuid.uuid4().hex[:10]}/{leaf}"
    return f"dbfs:/{path}", databricks_primary.dbfs_root / path


# The primary's stores


def test_primary_stores_are_databricks_clients(dual):
    from mlflow.store.model_registry.databricks_workspace_model_registry_rest_store import (
        DatabricksWorkspaceModelRegistryRestStore,
    )
    from mlflow.store.tracking.databricks_rest_store import DatabricksTracingRestStore

    tracking = dual._tracking_client.store
    registry = dual._get_registry_client().store

    assert isinstance(tracking.primary, DatabricksTracingRestStore)
    assert isinstance(registry.primary, DatabricksWorkspaceModelRegistryRestStore)
    assert tracking.primary.get_host_creds().host.startswith("https://127.0.0.1:")


def test_registry_default_is_workspace_registry(databricks_primary):
    config = parse_tracking_uri(databricks_primary.databricks_dual_tracking_uri())

    assert config.primary_uri == "databricks://rig"
    assert config.primary_registry_uri == "databricks://rig"


def test_unity_catalog_registry_when_chosen(databricks_primary):
    from mlflow.store._unity_catalog.registry.rest_store import UcModelRegistryStore

    uri = databricks_primary.databricks_dual_tracking_uri(primary_registry_uri="databricks-uc://rig")
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)._get_registry_client().store

    assert isinstance(registry.primary, UcModelRegistryStore)
    # The rig's primary is OSS MLflow, which has no Unity Catalog API.
    with pytest.raises(MlflowException, match="404"):
        registry.search_registered_models(max_results=1)


def test_linked_form_resolves_profile(databricks_primary):
    from mlflow_azdual import compat

    uri = (
        "azdual://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/00000000-0000-0000-0000-"
        "000000000000/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces"
        "/ws?databricks_profile=rig"
    )
    config = parse_tracking_uri(uri)
    primary = compat.build_tracking_store(config.primary_uri)

    assert config.primary_uri == "databricks://rig"
    assert config.primary_registry_uri == "databricks://rig"
    assert config.secondary_uri.startswith("azureml://westeurope.api.azureml.ms/mlflow/v1.0/")
    assert "databricks_profile" not in config.secondary_uri
    assert primary.get_host_creds().host == databricks_primary.primary_databricks_host
    assert primary.search_experiments(max_results=1) is not None


# Writes through the Databricks client land on both backends


def test_experiment_by_workspace_path(dual, primary_server, secondary_server, front_stats):
    leaf = "databricks-client-" + uuid.uuid4().hex[:8]
    name = unique_path(leaf)
    before = front_stats()

    experiment = mlflow.set_experiment(name)

    after = front_stats()
    assert dual.get_experiment_by_name(name).experiment_id == experiment.experiment_id
    assert primary_server.get_experiment_by_name(name).experiment_id == experiment.experiment_id
    mirror = secondary_experiment(secondary_server, experiment.experiment_id)
    assert mirror.name == leaf
    assert after["routes"].get("experiments/create", 0) > before["routes"].get("experiments/create", 0)
    assert after["unauthenticated"] == before["unauthenticated"]


def test_run_lands_on_both(dual, primary_server, secondary_server, tmp_path):
    (tmp_path / "notes.txt").write_text("trained on iris\n")
    mlflow.set_experiment(unique_path())

    with mlflow.start_run() as run:
        mlflow.log_param("alpha", "0.5")
        mlflow.set_tag("team", "churn")
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_artifact(str(tmp_path / "notes.txt"))

    mirror_id = secondary_run_id(primary_server, run.info.run_id)
    for client, run_id in ((primary_server, run.info.run_id), (secondary_server, mirror_id)):
        data = client.get_run(run_id).data
        assert data.params == {"alpha": "0.5"}
        assert data.tags["team"] == "churn"
        assert len(metric_history(client, run_id, "loss")) == 5
        assert [info.path for info in client.list_artifacts(run_id)] == ["notes.txt"]
    assert dual.get_run(run.info.run_id).info.status == "FINISHED"


def test_registered_model_on_both(dual, primary_server, secondary_server, iris_model):
    model, features = iris_model
    name = "databricks-client-" + uuid.uuid4().hex[:10]
    mlflow.set_experiment(unique_path())

    with mlflow.start_run():
        info = mlflow.sklearn.log_model(model, name="model", registered_model_name=name)

    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{info.registered_model_version}")
    assert np.array_equal(loaded.predict(features[:5]), model.predict(features[:5]))
    assert mlflow_azdual.flush(timeout_s=120)
    primary_version = primary_server.get_model_version(name, "1")
    mirrored = secondary_server.get_model_version(name, primary_version.tags[SECONDARY_VERSION_TAG])
    assert mirrored.source.startswith("wasbs://")


# Errors and the doctor


def test_wrong_token_raises_at_call_site(databricks_primary, wrong_token_profile, front_stats):
    mlflow.set_tracking_uri(dual_uri_with_profile(databricks_primary, wrong_token_profile))
    before = front_stats()["unauthenticated"]
    started = time.monotonic()

    with pytest.raises(MlflowException) as raised:
        mlflow.set_experiment(unique_path())

    elapsed_s = time.monotonic() - started
    message = raised.value.message
    assert raised.value.error_code == "UNAUTHENTICATED"
    assert wrong_token_profile in message
    assert databricks_primary.primary_databricks_host in message
    assert WRONG_TOKEN not in str(raised.value)
    assert elapsed_s < REJECTED_TOKEN_BOUND_S
    assert front_stats()["unauthenticated"] > before


def test_doctor_passes(databricks_primary, subprocess_env):
    completed, elapsed_s = run_doctor(databricks_primary.databricks_dual_tracking_uri(),
                                      subprocess_env)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "primary backend databricks://rig returned" in completed.stdout
    assert elapsed_s < DOCTOR_BOUND_S


def test_doctor_fails_with_front_stopped(databricks_primary, subprocess_env):
    uri = databricks_primary.databricks_dual_tracking_uri()
    databricks_primary.stop_server("primary-databricks")
    try:
        completed, elapsed_s = run_doctor(uri, subprocess_env)
    finally:
        databricks_primary.start_server("primary-databricks")

    failed = failed_lines(completed.stdout)
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert [line.split(":")[0] for line in failed] == [
        "FAILED   primary tracking read", "FAILED   primary registry read",
    ]
    assert all("start the primary backend" in line for line in failed)
    assert elapsed_s < DOCTOR_BOUND_S


def test_doctor_reads_backends_concurrently(databricks_primary):
    from mlflow_azdual.doctor import FAILED, run_checks

    timeout_s = 2
    databricks_primary.stop_server("primary-databricks")
    try:
        started = time.monotonic()
        results = run_checks(databricks_primary.databricks_dual_tracking_uri(), timeout_s)
        elapsed_s = time.monotonic() - started
    finally:
        databricks_primary.start_server("primary-databricks")

    failed = [result.name for result in results if result.status == FAILED]
    assert failed == ["primary tracking read", "primary registry read"]
    # Each primary read waits out its deadline of twice the timeout. Run one after the other,
    # the two would take 4 timeouts.
    assert elapsed_s < 3 * timeout_s


def test_doctor_bounds_databricks_retries():
    from mlflow_azdual.doctor import bounded_mlflow_http

    with bounded_mlflow_http(3.5):
        inside = os.environ["MLFLOW_DATABRICKS_ENDPOINT_HTTP_RETRY_TIMEOUT"]

    assert inside == "4"


def test_doctor_fails_with_wrong_token(databricks_primary, subprocess_env, wrong_token_profile):
    uri = dual_uri_with_profile(databricks_primary, wrong_token_profile)
    env = {**subprocess_env, "DATABRICKS_CONFIG_FILE": os.environ["DATABRICKS_CONFIG_FILE"]}

    completed, elapsed_s = run_doctor(uri, env)

    failed = failed_lines(completed.stdout)
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert len(failed) == 2, completed.stdout
    assert all("rejected the credentials" in line for line in failed)
    assert all("check the token of the Databricks profile" in line for line in failed)
    assert WRONG_TOKEN not in completed.stdout + completed.stderr
    assert elapsed_s < DOCTOR_BOUND_S


# dbfs:/ artifact roots


def test_dbfs_root_artifacts_on_both(
    databricks_primary, dual, primary_server, secondary_server, front_stats, tmp_path
):
    location, folder = dbfs_location(databricks_primary, "artifacts")
    experiment_id = dual.create_experiment(unique_path(), artifact_location=location)
    (tmp_path / "report.txt").write_text("accuracy 0.97\n")
    before = front_stats()

    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_artifact(str(tmp_path / "report.txt"), artifact_path="eval")
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="eval/report.txt", dst_path=str(tmp_path / "out")
    )

    after = front_stats()
    primary_root = primary_server.get_run(run.info.run_id).info.artifact_uri
    assert primary_root == f"{location}/{run.info.run_id}/artifacts"
    stored = folder / run.info.run_id / "artifacts" / "eval" / "report.txt"
    assert stored.read_text() == "accuracy 0.97\n"
    assert Path(downloaded).read_text() == "accuracy 0.97\n"
    assert after["dbfs_requests"].get("POST /dbfs", 0) > before["dbfs_requests"].get("POST /dbfs", 0)
    assert after["dbfs_requests"].get("GET /dbfs", 0) > before["dbfs_requests"].get("GET /dbfs", 0)
    assert after["unauthenticated"] == before["unauthenticated"]
    mirror_id = secondary_run_id(primary_server, run.info.run_id)
    mirror_root = secondary_server.get_run(mirror_id).info.artifact_uri
    assert mirror_root.startswith("wasbs://")
    # MLflow 3's list_artifacts(run_id, path) also searches logged models, which the Azure ML
    # stand-in does not serve, so the mirror's storage is listed directly.
    mirror_files = get_artifact_repository(mirror_root).list_artifacts("eval")
    assert [info.path for info in mirror_files] == ["eval/report.txt"]


def test_dbfs_root_registered_model_loads(
    databricks_primary, dual, primary_server, secondary_server, iris_model
):
    model, features = iris_model
    name = "dbfs-" + uuid.uuid4().hex[:10]
    location, folder = dbfs_location(databricks_primary, "models")
    experiment_id = dual.create_experiment(unique_path(), artifact_location=location)

    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.sklearn.log_model(model, name="model", registered_model_name=name)

    download_uri = dual.get_model_version_download_uri(name, info.registered_model_version)
    assert download_uri.startswith("dbfs://rig@databricks/")
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{info.registered_model_version}")
    assert np.array_equal(loaded.predict(features[:5]), model.predict(features[:5]))
    assert (folder / "models" / info.model_id / "artifacts" / "MLmodel").is_file()
    assert mlflow_azdual.flush(timeout_s=120)
    primary_version = primary_server.get_model_version(name, "1")
    mirrored = secondary_server.get_model_version(name, primary_version.tags[SECONDARY_VERSION_TAG])
    assert mirrored.source.startswith("wasbs://")


def test_dbfs_root_logged_model_search(databricks_primary, dual, iris_model, tmp_path):
    model, _ = iris_model
    location, _ = dbfs_location(databricks_primary, "search")
    experiment_id = dual.create_experiment(unique_path(), artifact_location=location)
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.sklearn.log_model(model, name="model")

    found = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")

    assert [model.model_id for model in found] == [info.model_id]
    assert is_dual_artifact_uri(found[0].artifact_location)
    assert resolve(found[0].artifact_location).primary.startswith(location)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=found[0].artifact_location + "/MLmodel", dst_path=str(tmp_path)
    )
    assert "sklearn" in Path(local).read_text()


def test_rig_env_prints_databricks_settings(databricks_primary, subprocess_env):
    completed = subprocess.run(
        [sys.executable, "-m", "rig", "env", "--state-dir", str(databricks_primary.state_dir)],
        check=True, env=subprocess_env, capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )

    lines = completed.stdout.splitlines()
    for name, value in databricks_primary.databricks_env.items():
        assert f"export {name}={value}" in lines
    assert "unset DATABRICKS_HOST DATABRICKS_TOKEN DATABRICKS_CONFIG_PROFILE" in lines
    assert f"# with databricks://rig as the primary: {databricks_primary.databricks_dual_tracking_uri()}" in lines


def test_token_absent_from_logs_state_and_spool(databricks_primary):
    token = (databricks_primary.databricks_dir / "token").read_text().strip()
    places = [databricks_primary.state_path, *databricks_primary.log_paths.values()]
    spool_dir = os.environ.get("MLFLOW_AZDUAL_SPOOL_DIR")
    if spool_dir:
        places += [path for path in Path(spool_dir).rglob("*") if path.is_file()]

    assert token.startswith("dapi-rig-")
    for path in places:
        assert token.encode() not in path.read_bytes(), f"the token is in {path}"
    assert urllib.parse.quote(token) not in databricks_primary.databricks_dual_tracking_uri()
