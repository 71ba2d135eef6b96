"""The plugin through azureml-mlflow's own client, against the rig's Azure ML stand-in.

These tests need azureml-mlflow, which declares mlflow-skinny<=3.15.0, so they run in the
environment of the nox session `azureml` (MLflow 3.15.0; `make test-azureml`) and are skipped
elsewhere. The secondary is an `azureml://127.0.0.1:<port>/mlflow/v1.0/subscriptions/...`
URI. azureml-mlflow turns it into `https://127.0.0.1:<port>/mlflow/v2.0/subscriptions/...`
requests with a bearer token, so an https policy proxy with the azureml profile replaces
the workspace's front door. It checks the token, strips the workspace path prefix and
forwards to the rig's secondary MLflow server. The token comes from the Azure CLI stand-in
in rig/azure_cli, which azure-identity's AzureCliCredential runs as `az`. Nothing here
reaches Azure: the loopback guard is active in this process and in every child process.

What this proves and what it does not: azureml-mlflow's tracking and registry stores, its
credential chain and its URI handling work with the plugin. The stand-in is a plain MLflow
server, so run artifacts live under its `wasbs://` root and go through MLflow's Azure Blob
repository. The exceptions are the experiments that a test creates on the secondary with an
`azureml://` artifact location, the form a workspace returns: their runs' artifacts go
through azureml-mlflow's artifact repository to the front door's emulation of Azure ML's run
artifact routes (rig.azureml_artifacts), with the files in Azurite.
"""

import base64
import json
import os
import secrets
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip(
    "azureml.mlflow",
    reason="azureml-mlflow is not installed here; `make test-azureml` runs these tests in the "
    "nox session azureml, pinned to MLflow 3.15.0, the newest that azureml-mlflow supports",
)

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

import mlflow_azdual  # noqa: E402
from mlflow_azdual.id_mapping import SECONDARY_RUN_ID_TAG  # noqa: E402
from mlflow_azdual.uri import explicit_tracking_uri, parse_tracking_uri, tracking_uri  # noqa: E402
from rig.guard import GUARD_PATH  # noqa: E402
from rig.guard import loopback_guard  # noqa: E402
from rig.policy_proxy import PolicyProxy  # noqa: E402
from rig.tls import write_certificates  # noqa: E402

AZURE_CLI_STAND_IN = Path(__file__).resolve().parent.parent / "rig" / "azure_cli"
SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "rg-azdual"
WORKSPACE = "ws-azdual"
WORKSPACE_PATH = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
    f"Microsoft.MachineLearningServices/workspaces/{WORKSPACE}"
)
# azureml-mlflow sends every MLflow request under this prefix (v2.0 with MLflow 2 and 3,
# whatever version the tracking URI names); the stand-in strips it.
AZUREML_PREFIX = (
    r"/mlflow/v2\.0/subscriptions/[^/]+/resourceGroups/[^/]+/providers/"
    r"Microsoft\.MachineLearningServices/workspaces/[^/]+"
)
FLUSH_TIMEOUT_S = 120


def unsigned_jwt(lifetime_s: int = 3600) -> str:
    """Return an unsigned JWT with an `exp` claim, the shape of an Azure ML access token."""

    def encode(document: dict) -> str:
        raw = json.dumps(document, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = encode({"alg": "none", "typ": "JWT"})
    payload = encode({
        "aud": "https://ml.azure.com",
        "exp": int(time.time()) + lifetime_s,
        "jti": secrets.token_hex(8),
    })
    return f"{header}.{payload}."


def azureml_uri(port: int) -> str:
    return f"azureml://127.0.0.1:{port}/mlflow/v1.0{WORKSPACE_PATH}"


class FrontDoor:
    """An https Azure ML front door on 127.0.0.1 in front of the rig's secondary server."""

    def __init__(self, rig, certificates, token: str):
        server_port = int(rig.secondary_server_uri.rsplit(":", 1)[1])
        self.token = token
        self.proxy = PolicyProxy(
            server_port, "azureml", tls=certificates, bearer_token=token,
            strip_path_prefix=AZUREML_PREFIX, emulate_run_artifacts=True,
        )

    def start(self):
        self.proxy.start()
        return self

    def stop(self):
        self.proxy.stop()

    @property
    def uri(self) -> str:
        return azureml_uri(self.proxy.port)

    def routes(self) -> dict:
        return self.proxy.stats()["routes"]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return write_certificates(tmp_path_factory.mktemp("azureml-tls"))


@pytest.fixture(scope="module")
def azure_token():
    return unsigned_jwt()


@pytest.fixture(scope="module")
def azure_env(rig, certificates, azure_token):
    """The offline recipe for azureml-mlflow, applied to os.environ for this module.

    AZUREML_CURRENT_CLOUD keeps azureml-mlflow from fetching cloud metadata from Azure, and
    AZURE_TOKEN_CREDENTIALS limits azure-identity's DefaultAzureCredential to the Azure CLI,
    which is the stand-in first on PATH. REQUESTS_CA_BUNDLE replaces the machine's bundle
    with the rig's certificate authority for these requests.
    """
    settings = {
        "AZUREML_CURRENT_CLOUD": "AzureCloud",
        "AZURE_TOKEN_CREDENTIALS": "AzureCliCredential",
        "PATH": os.pathsep.join([str(AZURE_CLI_STAND_IN), os.environ.get("PATH", "")]),
        "RIG_AZ_ACCESS_TOKEN": azure_token,
        "REQUESTS_CA_BUNDLE": str(certificates.authority),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    removed = (
        "MLFLOW_TRACKING_TOKEN", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI", "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
    )
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        for name in removed:
            patch.delenv(name, raising=False)
        yield dict(os.environ)


@pytest.fixture(scope="module")
def front_door(rig, certificates, azure_token, azure_env):
    door = FrontDoor(rig, certificates, azure_token).start()
    yield door
    door.stop()


@pytest.fixture(autouse=True)
def no_outbound_attempt():
    """Fail a test in which this process tried to reach a host other than 127.0.0.1."""
    yield
    assert not loopback_guard._reported_hosts, (
        f"the loopback guard blocked {sorted(map(str, loopback_guard._reported_hosts))}"
    )


@pytest.fixture
def dual_uri(rig, front_door):
    """An explicit azdual URI: the rig's primary, and the front door as azureml://."""
    uri = explicit_tracking_uri(
        rig.primary_uri, front_door.uri, primary_profile="databricks",
        flush_interval_s=0.2, retry_initial_backoff_s=0.1,
    )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def secondary_server(rig):
    """A client of the secondary MLflow server itself, behind no front door."""
    return MlflowClient(tracking_uri=rig.secondary_server_uri, registry_uri=rig.secondary_server_uri)


def dual_store(uri):
    from mlflow.tracking._tracking_service.utils import _get_store

    return _get_store(uri)


def unique_experiment_path() -> str:
    return f"/Users/tester@example.com/azureml-{uuid.uuid4().hex[:10]}/train"


def mirror_run_id(run_id: str) -> str:
    assert mlflow_azdual.flush(timeout_s=FLUSH_TIMEOUT_S)
    return MlflowClient().get_run(run_id).data.tags[SECONDARY_RUN_ID_TAG]


# The URI forms


def test_linked_form_resolves_to_azureml_uri(front_door):
    port = front_door.proxy.port
    linked = f"azdual://127.0.0.1:{port}/mlflow/v1.0{WORKSPACE_PATH}?databricks_profile=prod"

    config = parse_tracking_uri(linked)

    assert config.secondary_uri == azureml_uri(port)
    assert config.primary_uri == "databricks://prod"


def test_tracking_uri_helper_builds_linked_form(front_door):
    uri = tracking_uri(front_door.uri, databricks_profile="prod")

    assert uri == f"azdual://127.0.0.1:{front_door.proxy.port}/mlflow/v1.0{WORKSPACE_PATH}" \
        "?databricks_profile=prod"
    assert parse_tracking_uri(uri).secondary_uri == front_door.uri


def test_secondary_store_is_azureml_client(dual_uri, front_door):
    from azureml.mlflow._store.tracking.store import AzureMLRestStore

    secondary = dual_store(dual_uri).secondary
    host = secondary.get_host_creds().host

    assert isinstance(secondary, AzureMLRestStore)
    assert host == f"https://127.0.0.1:{front_door.proxy.port}/mlflow/v2.0{WORKSPACE_PATH}"


# Writes


def test_run_lands_on_secondary(dual_uri, front_door, secondary_server, tmp_path):
    from mlflow.entities import Metric

    routes_before = front_door.routes()
    mlflow.set_experiment(unique_experiment_path())
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        mlflow.log_param("alpha", "0.5")
        mlflow.log_params({"depth": "3", "solver": "lbfgs"})
        mlflow.set_tag("team", "churn")
        mlflow.log_metric("accuracy", 0.9, step=1)
        # 600 values of one key in one call: Azure ML takes at most 250 per request.
        now = int(time.time() * 1000)
        MlflowClient().log_batch(
            run_id, metrics=[Metric("loss", 1.0 / (step + 1), now, step) for step in range(600)]
        )
        (tmp_path / "notes.txt").write_text("trained on iris\n")
        (tmp_path / "plots").mkdir()
        (tmp_path / "plots" / "curve.csv").write_text("step,loss\n0,1.0\n")
        mlflow.log_artifact(str(tmp_path / "notes.txt"))
        mlflow.log_artifacts(str(tmp_path / "plots"), artifact_path="plots")
    mirror_id = mirror_run_id(run_id)

    mirror = secondary_server.get_run(mirror_id)
    history = secondary_server.get_metric_history(mirror_id, "loss")
    artifacts = {info.path for info in secondary_server.list_artifacts(mirror_id)}
    plots = {info.path for info in secondary_server.list_artifacts(mirror_id, "plots")}
    routes = front_door.routes()

    assert mirror.data.params == {"alpha": "0.5", "depth": "3", "solver": "lbfgs"}
    assert mirror.data.tags["team"] == "churn"
    assert mirror.data.metrics["accuracy"] == 0.9
    assert sorted(point.step for point in history) == list(range(600))
    assert mirror.info.status == "FINISHED"
    assert artifacts == {"notes.txt", "plots"}
    assert plots == {"plots/curve.csv"}
    assert routes.get("runs/log-batch", 0) - routes_before.get("runs/log-batch", 0) >= 3
    assert front_door.proxy.stats()["rejected"] == {}
    assert front_door.proxy.stats()["unauthenticated"] == 0


def test_async_metrics_reach_secondary(dual_uri, front_door, secondary_server):
    mlflow.set_experiment(unique_experiment_path())
    with mlflow.start_run() as run:
        for step in range(50):
            mlflow.log_metric("epoch_loss", 1.0 / (step + 1), step=step, synchronous=False)
    mirror_id = mirror_run_id(run.info.run_id)

    history = secondary_server.get_metric_history(mirror_id, "epoch_loss")

    assert sorted(point.step for point in history) == list(range(50))
    # azureml-mlflow's own log_batch_async calls an Azure-only route; the plugin never does.
    assert "runs/log-batch-async" not in front_door.routes()


def test_registered_version_through_azureml_registry(dual_uri, front_door, secondary_server,
                                                      iris_model):
    from azureml.mlflow._store.model_registry.model_registry import AzureMLflowModelRegistry
    from mlflow.tracking._model_registry.utils import _get_store as get_registry_store

    model, features = iris_model
    name = f"iris-{uuid.uuid4().hex[:10]}"
    mlflow.set_experiment(unique_experiment_path())
    with mlflow.start_run() as run:
        mlflow.sklearn.log_model(model, name="model", registered_model_name=name)
    mirror_id = mirror_run_id(run.info.run_id)

    versions = secondary_server.search_model_versions(f"name='{name}'")
    loaded = mlflow.pyfunc.load_model(versions[0].source)
    registry_routes = {route for route in front_door.routes() if route.startswith("registered-models")
                       or route.startswith("model-versions")}

    assert isinstance(get_registry_store(dual_uri).secondary, AzureMLflowModelRegistry)
    assert len(versions) == 1
    assert versions[0].run_id == mirror_id
    assert versions[0].source.startswith("wasbs://")
    assert (loaded.predict(features[:5]) == model.predict(features[:5])).all()
    assert "model-versions/create" in registry_routes


# Artifacts under an azureml:// root


@pytest.fixture
def azureml_root_experiment(front_door, secondary_server):
    """A primary experiment path whose secondary experiment has an azureml:// artifact root.

    The secondary experiment is made first, under the name the plugin maps the path to, so
    the plugin adopts it. Its runs get `<root>/<run id>/artifacts`, the form of a workspace's
    run artifact URI, which azureml-mlflow's artifact repository handles.
    """
    from mlflow_azdual.experiment_names import secondary_experiment_name

    path = f"/Users/tester@example.com/azureml-artifacts-{uuid.uuid4().hex[:10]}"
    name = secondary_experiment_name(path)
    root = (
        f"azureml://127.0.0.1:{front_door.proxy.port}/mlflow/v2.0{WORKSPACE_PATH}"
        f"/experiments/{name}/runs"
    )
    secondary_server.create_experiment(name, artifact_location=root)
    return path


def azureml_artifact_repository(artifact_uri, front_door):
    """Build azureml-mlflow's repository for ``artifact_uri`` the way a user of the workspace
    does: with the workspace as MLflow's tracking URI, so it has the workspace's credentials."""
    from azureml.mlflow._store.artifact.artifact_repo import AzureMLflowArtifactRepository

    mlflow.set_tracking_uri(front_door.uri)
    return AzureMLflowArtifactRepository(artifact_uri)


def artifact_text(repository, path) -> str:
    """Read an artifact through the content URI that azureml-mlflow's REST client returns.

    NOTE: azureml-mlflow's download writes nothing for a content URI outside
    `https://<account>.blob.<cloud storage suffix>/`, which a loopback Azurite URL is, so
    the bytes are read with azure-storage-blob from the same URI.
    """
    from azure.storage.blob import BlobClient

    client = repository.artifacts
    information = client._client.run_artifacts.get_content_information(
        subscription_id=SUBSCRIPTION, resource_group_name=RESOURCE_GROUP,
        workspace_name=WORKSPACE, experiment_name=client._experiment_name,
        run_id=client._run_id, path=path,
    )
    return BlobClient.from_blob_url(information.content_uri).download_blob().readall().decode()


def test_artifacts_reach_azureml_root(dual_uri, front_door, secondary_server,
                                      azureml_root_experiment, iris_model, tmp_path):
    model, _ = iris_model
    mlflow.set_experiment(azureml_root_experiment)
    with mlflow.start_run() as run:
        (tmp_path / "notes.txt").write_text("trained on iris\n")
        (tmp_path / "plots").mkdir()
        (tmp_path / "plots" / "curve.csv").write_text("step,loss\n0,1.0\n")
        mlflow.log_artifact(str(tmp_path / "notes.txt"))
        mlflow.log_artifacts(str(tmp_path / "plots"), artifact_path="plots")
        mlflow.sklearn.log_model(model, name="model")
    mirror_id = mirror_run_id(run.info.run_id)

    mirror_root = secondary_server.get_run(mirror_id).info.artifact_uri
    repository = azureml_artifact_repository(mirror_root, front_door)
    top = {info.path for info in repository.list_artifacts(None)}
    plots = {info.path for info in repository.list_artifacts("plots")}
    model_files = {info.path for info in repository.list_artifacts("model")}

    assert mirror_root.startswith(f"azureml://127.0.0.1:{front_door.proxy.port}/")
    assert top == {"notes.txt", "plots", "model"}
    assert plots == {"plots/curve.csv"}
    assert "model/MLmodel" in model_files
    assert artifact_text(repository, "notes.txt") == "trained on iris\n"
    assert artifact_text(repository, "plots/curve.csv") == "step,loss\n0,1.0\n"
    assert front_door.routes().get("history/run-artifacts", 0) >= 3
    assert front_door.proxy.stats()["unauthenticated"] == 0


def test_service_context_pinned_to_one_thread(dual_uri, front_door):
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlparse

    from azureml.mlflow._store.artifact import utils

    from mlflow_azdual import azureml_service_context

    secondary = dual_store(dual_uri).secondary
    artifact_uri = (
        f"azureml://127.0.0.1:{front_door.proxy.port}/mlflow/v2.0{WORKSPACE_PATH}"
        "/experiments/train/runs/0123/artifacts"
    )
    parsed = urlparse(artifact_uri)
    with azureml_service_context.pinned(artifact_uri, secondary):
        in_block = utils.get_service_context(parsed)
        with ThreadPoolExecutor(max_workers=1) as pool:
            other_thread_error = pool.submit(utils.get_service_context, parsed).exception()
    with pytest.raises(mlflow.exceptions.MlflowException) as after_block:
        utils.get_service_context(parsed)

    assert in_block is secondary.service_context
    assert "authorization token was not set" in str(other_thread_error)
    assert "authorization token was not set" in str(after_block.value)


# Azure ML job credentials


@pytest.fixture
def job_front_door(rig, certificates, azure_token, azure_env):
    """A front door of its own, so azureml-mlflow builds a new (job) service context for it."""
    door = FrontDoor(rig, certificates, azure_token).start()
    yield door
    door.stop()


@pytest.fixture
def job_env(monkeypatch, rig, job_front_door, secondary_server, azure_token):
    """Set the variables an Azure ML job sets for MLflow; return the job's (run id, token).

    The job's token is the only credential: the Azure CLI stand-in has none.
    """
    experiment_id = secondary_server.create_experiment(f"job-{uuid.uuid4().hex[:10]}")
    run_id = secondary_server.create_run(experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", job_front_door.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", azure_token)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    monkeypatch.delenv("RIG_AZ_ACCESS_TOKEN")
    return run_id, azure_token


def test_job_token_not_sent_to_http_primary(rig, job_front_door, job_env):
    from mlflow.tracking._model_registry.utils import _get_store as get_registry_store

    _, job_token = job_env
    # A primary that accepts only the job's token: any request it lets through carried it.
    primary_port = int(rig.primary_server_uri.rsplit(":", 1)[1])
    with PolicyProxy(primary_port, "databricks", bearer_token=job_token) as primary:
        uri = explicit_tracking_uri(primary.uri, job_front_door.uri, primary_profile="databricks")
        store = dual_store(uri)
        with pytest.raises(Exception, match="UNAUTHENTICATED|401"):
            store.search_experiments(max_results=1)
        tokens = {
            "primary": store.primary.get_host_creds().token,
            "primary writer": store.primary_writer.get_host_creds().token,
            "primary registry": get_registry_store(uri).primary.get_host_creds().token,
            "dual store": store.get_host_creds().token,
        }
        secondary_token = store.secondary.get_host_creds().token
        rejected = primary.stats()["unauthenticated"]

    assert tokens == dict.fromkeys(tokens)
    assert secondary_token == job_token
    assert rejected >= 1


def test_job_run_id_resumed_on_primary_fails(rig, job_front_door, job_env):
    # MLflow's start_run resumes MLFLOW_RUN_ID, here an Azure ML run, and the dual store reads
    # runs from the primary, which has no such run.
    job_run_id, _ = job_env
    mlflow.set_tracking_uri(explicit_tracking_uri(
        rig.primary_uri, job_front_door.uri, primary_profile="databricks"
    ))

    with pytest.raises(mlflow.exceptions.MlflowException, match=job_run_id):
        mlflow.start_run()

    assert mlflow.active_run() is None


# mlflow-azdual doctor


def run_doctor(uri: str, env: dict):
    import subprocess
    import sys

    cli = Path(sys.executable).with_name("mlflow-azdual")
    python_path = os.pathsep.join([str(GUARD_PATH), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [str(cli), "doctor", uri, "--timeout-s", "10"],
        env={**env, "PYTHONPATH": python_path}, capture_output=True, text=True, timeout=180,
    )


def test_doctor_passes_and_fails_with_front_stopped(rig, certificates, azure_token, azure_env):
    door = FrontDoor(rig, certificates, azure_token).start()
    uri = explicit_tracking_uri(rig.primary_uri, door.uri, primary_profile="databricks")
    try:
        healthy = run_doctor(uri, dict(os.environ))
    finally:
        door.stop()
    stopped = run_doctor(uri, dict(os.environ))

    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "ok       azureml-mlflow: 1.62.0.post6 (declares mlflow-skinny<=3.15.0)" in healthy.stdout
    assert "ok       secondary tracking read" in healthy.stdout
    assert "ok       secondary registry read" in healthy.stdout
    assert stopped.returncode == 1
    assert "FAILED   secondary tracking read" in stopped.stdout
    assert "loopback guard rejected" not in healthy.stderr + stopped.stderr
    assert azure_token not in healthy.stdout + healthy.stderr + stopped.stdout + stopped.stderr
