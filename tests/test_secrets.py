"""Secrets never leave the process: not in logs, errors, spool files, CLI output or backend data.

A child process runs a workflow with recognisable fake secrets in the primary URI's user info
and in the environment, through faults that make the plugin log and record errors. Then every
place a secret could end up is searched for each of them.
"""

import base64
import json
import queue
import subprocess
import sys
import threading
import urllib.parse
import uuid
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import ViewType

from mlflow_azdual.id_mapping import (
    PRIMARY_EXPERIMENT_ID_TAG,
    PRIMARY_RUN_ID_TAG,
    SECONDARY_RUN_ID_TAG,
)
from mlflow_azdual.registry_store import PRIMARY_VERSION_TAG
from mlflow_azdual.uri import explicit_tracking_uri
from rig.latency_proxy import LatencyProxy
from rig.servers import AZURITE_ACCOUNT_KEY
from tests.dual_helpers import unique_path

CLI = Path(sys.executable).with_name("mlflow-azdual")
PRIMARY_USER = "azd-user"
PRIMARY_PASSWORD = "FAKE-PRIMARY-SECRET-1111"
TRACKING_TOKEN = "FAKE-ENV-TOKEN-2222"
DATABRICKS_TOKEN = "FAKE-DBX-TOKEN-3333"
# Each secret in every form it could take on its way out: as is, percent-encoded in a URI,
# and as the Basic credentials that requests builds from the URI's user info.
SECRETS = {
    "primary URI password": PRIMARY_PASSWORD,
    "MLFLOW_TRACKING_TOKEN": TRACKING_TOKEN,
    "DATABRICKS_TOKEN": DATABRICKS_TOKEN,
    "Azurite AccountKey": AZURITE_ACCOUNT_KEY,
    "Azurite AccountKey, percent-encoded": urllib.parse.quote(AZURITE_ACCOUNT_KEY, safe=""),
    "primary Basic credentials": base64.b64encode(
        f"{PRIMARY_USER}:{PRIMARY_PASSWORD}".encode()
    ).decode(),
}
# Two group-commit intervals of the spool (spool_commit_interval_s defaults to 0.2 s).
TWO_COMMIT_INTERVALS_S = 0.6


def secrets_in(data) -> list:
    """Return the names of the secrets that ``data`` (text or bytes) contains."""
    if isinstance(data, str):
        data = data.encode("utf-8", errors="replace")
    return [name for name, value in SECRETS.items() if value.encode() in data]


def read_tree(root: Path) -> dict:
    """Return the bytes of every file under ``root``, by path."""
    return {str(path): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def find_leaks(sources: dict) -> list:
    return [f"{name} in {label}" for label, data in sources.items() for name in secrets_in(data)]


class ChildProcess:
    """A child Python process whose stdout lines are read on a thread, so reads can time out."""

    def __init__(self, script: str, env: dict, stderr_path: Path):
        self.stderr_path = stderr_path
        # Closed in __exit__, because the child writes to it for the object's whole life.
        self._stderr_file = open(stderr_path, "w")  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr_file, text=True,
        )
        self.stdout_lines = []
        self._lines = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self):
        for line in self.popen.stdout:
            self.stdout_lines.append(line)
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def stderr(self) -> str:
        self._stderr_file.flush()
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, expected: str, timeout_s: float = 120) -> str:
        """Return the next stdout line, failing the test unless it starts with ``expected``."""
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            line = f"(nothing for {timeout_s:g} s)"
        if line is None:
            line = f"(exit code {self.popen.wait()})"
        assert line.startswith(expected), (
            f"expected {expected!r} from the child, got {line!r}; stderr:\n{self.stderr()[-4000:]}"
        )
        return line

    def send_line(self, text: str) -> None:
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=30)
        self._stderr_file.close()


def run_cli(*arguments: str, env: dict) -> subprocess.CompletedProcess:
    """Run the `mlflow-azdual` console script and return its exit code and output."""
    assert CLI.exists(), f"console script {CLI} is missing; install the package into the venv"
    return subprocess.run(
        [str(CLI), *arguments],
        check=False, env=env, capture_output=True, text=True, timeout=180,
    )


def cli_output(completed: subprocess.CompletedProcess) -> str:
    return f"exit code {completed.returncode}\n{completed.stdout}\n{completed.stderr}"


def backend_documents(client, label, experiment, run_id, model_name) -> dict:
    """Return the tags, params and model version fields of one backend's objects, as JSON."""
    run = client.get_run(run_id)
    model = client.get_registered_model(model_name)
    versions = client.search_model_versions(f"name='{model_name}'")
    return {
        f"{label} experiment tags": json.dumps(experiment.tags),
        f"{label} run tags": json.dumps(run.data.tags),
        f"{label} run params": json.dumps(run.data.params),
        f"{label} registered model tags": json.dumps(model.tags),
        f"{label} model versions": json.dumps([
            {
                "tags": version.tags, "source": version.source, "run_link": version.run_link,
                "description": version.description,
            }
            for version in versions
        ]),
    }


WORKFLOW = """
import json
import logging
import os
import sys
import tempfile
import time

logging.basicConfig(
    stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
)
logging.getLogger("mlflow_azdual").setLevel(logging.DEBUG)

import mlflow
import mlflow_azdual
from mlflow import MlflowClient

caught = []


def attempt(label, call):
    try:
        call()
    except Exception as error:
        caught.append({{"call": label, "type": type(error).__name__, "message": str(error)}})


def flush():
    mlflow_azdual.flush(timeout_s=120)


def wait_for_parent(phase):
    print(phase, flush=True)
    sys.stdin.readline()


mlflow.set_tracking_uri({uri!r})
mlflow.set_registry_uri({uri!r})
mlflow.set_experiment({experiment_name!r})
run = mlflow.start_run()
run_id = run.info.run_id
print("run", run_id, flush=True)
mlflow.log_param("alpha", "1")
for step in range(50):
    mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
attempt("flush", flush)

wait_for_parent("503 burst")
for step in range(50, 100):
    mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
mlflow.set_tag("phase", "after 503 burst")
attempt("flush after the 503 burst", flush)

wait_for_parent("primary outage")
for step in range(100, 150):
    mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
attempt("flush after the primary outage", flush)

# The mirror already has lr with another value, so the secondary rejects the dual write.
mirror_id = MlflowClient().get_run(run_id).data.tags[{secondary_run_id_tag!r}]
MlflowClient({secondary_direct_uri!r}).log_param(mirror_id, "lr", "0.5")

wait_for_parent("secondary outage")
mlflow.log_param("lr", "0.1")
with tempfile.TemporaryDirectory() as folder:
    os.mkdir(os.path.join(folder, "model"))
    with open(os.path.join(folder, "model", "MLmodel"), "w") as file:
        file.write("artifact_path: model\\nflavors: {{}}\\n")
    with open(os.path.join(folder, "model", "weights.txt"), "w") as file:
        file.write("0.1 0.2 0.3\\n")
    mlflow.log_artifacts(os.path.join(folder, "model"), "model")
version = mlflow.register_model(f"runs:/{{run_id}}/model", {model_name!r}, tags={{"team": "test"}})
print("registered version", version.version, flush=True)
time.sleep({commit_wait_s!r})
wait_for_parent("spool committed")
attempt("flush after the secondary outage", flush)
attempt("end_run", mlflow.end_run)
print(json.dumps({{"caught": caught}}), flush=True)
"""


def test_no_secret_leaks(rig, subprocess_env, tmp_path):
    primary_port = int(urllib.parse.urlsplit(rig.primary_uri).port)
    secondary_port = int(urllib.parse.urlsplit(rig.secondary_uri).port)
    spool_dir = tmp_path / "spool"
    experiment_name = unique_path("secrets")
    model_name = f"secrets-model-{uuid.uuid4().hex[:10]}"
    env = {
        **subprocess_env,
        "MLFLOW_TRACKING_TOKEN": TRACKING_TOKEN,
        "DATABRICKS_TOKEN": DATABRICKS_TOKEN,
    }
    assert AZURITE_ACCOUNT_KEY in env["AZURE_STORAGE_CONNECTION_STRING"]

    primary_proxy = LatencyProxy(primary_port)
    secondary_proxy = LatencyProxy(secondary_port)
    with primary_proxy, secondary_proxy:
        # The MLflow server ignores these credentials. They are here only to be searched for.
        primary_uri = f"http://{PRIMARY_USER}:{PRIMARY_PASSWORD}@127.0.0.1:{primary_proxy.port}"
        uri = explicit_tracking_uri(
            primary_uri, secondary_proxy.uri, spool_dir=str(spool_dir), strict=True,
            retry_initial_backoff_s=0.2, retry_max_backoff_s=1,
        )
        script = WORKFLOW.format(
            uri=uri, experiment_name=experiment_name, model_name=model_name,
            secondary_run_id_tag=SECONDARY_RUN_ID_TAG, secondary_direct_uri=rig.secondary_uri,
            commit_wait_s=TWO_COMMIT_INTERVALS_S,
        )
        with ChildProcess(script, env, tmp_path / "child.stderr") as child:
            run_id = child.wait_for("run ").split()[1]
            child.wait_for("503 burst")
            secondary_proxy.reject(503, count=5)
            child.send_line("go")
            child.wait_for("primary outage")
            primary_proxy.down(2)
            child.send_line("go")
            child.wait_for("secondary outage")
            secondary_proxy.down(120)
            child.send_line("go")
            child.wait_for("registered version")
            child.wait_for("spool committed")
            # The secondary is down, so the registry and artifact writes wait in the spool now.
            spool_while_down = read_tree(spool_dir)
            secondary_proxy.up()
            child.send_line("go")
            caught = json.loads(child.wait_for('{"caught"', timeout_s=180))["caught"]
            assert child.popen.wait(timeout=120) == 0, child.stderr()[-4000:]
            child_output = "".join(child.stdout_lines) + child.stderr()
        secondary_faults = secondary_proxy.stats()["faults_applied"]
        primary_faults = primary_proxy.stats()["faults_applied"]

        resolved = run_cli("resolve", uri, env=env)
        status = run_cli("status", uri, "--json", "--dead-letters", env=env)
        synced = run_cli("sync", uri, env=env)

    # The faults happened, so the error paths ran.
    assert secondary_faults["reject_503"] == 5
    assert secondary_faults["down"] == 1
    assert primary_faults["down"] == 1
    assert "primary write failed" in child_output
    assert "secondary write failed" in child_output
    assert any("Changing param values" in error["message"] for error in caught), caught
    assert status.returncode == 0, cli_output(status)
    assert json.loads(status.stdout)["backends"]["secondary"]["dead_letters"] == 1
    assert resolved.returncode == 0, cli_output(resolved)
    assert synced.returncode == 0, cli_output(synced)
    assert any(path.endswith("-wal") for path in spool_while_down), sorted(spool_while_down)

    primary = MlflowClient(tracking_uri=rig.primary_uri, registry_uri=rig.primary_uri)
    secondary = MlflowClient(tracking_uri=rig.secondary_uri, registry_uri=rig.secondary_uri)
    primary_experiment = primary.get_experiment_by_name(experiment_name)
    (secondary_experiment,) = secondary.search_experiments(
        view_type=ViewType.ALL,
        filter_string=(
            f"tags.`{PRIMARY_EXPERIMENT_ID_TAG}` = '{primary_experiment.experiment_id}'"
        ),
    )
    (mirror,) = secondary.search_runs(
        [secondary_experiment.experiment_id], f"tags.`{PRIMARY_RUN_ID_TAG}` = '{run_id}'"
    )
    secondary_versions = secondary.search_model_versions(f"name='{model_name}'")
    assert [version.tags.get(PRIMARY_VERSION_TAG) for version in secondary_versions] == ["1"]

    sources = {
        "child stdout and stderr": child_output,
        **{
            f"exception caught by the child at {error['call']}": error["message"]
            for error in caught
        },
        "mlflow-azdual resolve": cli_output(resolved),
        "mlflow-azdual status --json --dead-letters": cli_output(status),
        "mlflow-azdual sync": cli_output(synced),
        **{f"spool file {path} (secondary down)": data for path, data in spool_while_down.items()},
        **{f"spool file {path} (after exit)": data for path, data in read_tree(spool_dir).items()},
        **backend_documents(primary, "primary", primary_experiment, run_id, model_name),
        **backend_documents(
            secondary, "secondary", secondary_experiment, mirror.info.run_id, model_name
        ),
    }
    assert find_leaks(sources) == []

    # Positive control: the same search finds every secret in a file written on purpose.
    control = tmp_path / "control"
    control.mkdir()
    (control / "planted.bin").write_bytes(
        b"\x00".join(value.encode() for value in SECRETS.values())
    )
    planted = find_leaks(read_tree(control))
    assert len(planted) == len(SECRETS), planted
