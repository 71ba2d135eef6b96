"""Tests of the rig itself: servers, artifact stores, restart and the loopback guard.

The guard tests use only numeric documentation addresses (RFC 5737 TEST-NET), which need no
name lookup, so even a broken guard would send no traffic.
"""

import json
import shlex
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
import uuid

import boto3
import pytest
from azure.storage.blob import BlobServiceClient
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rig.guard import NonLoopbackAddressError, is_loopback_host
from rig.processes import ServerProcess
from rig.servers import REPO_ROOT, find_azurite_blob

_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _health(uri):
    with _DIRECT_OPENER.open(f"{uri}/health", timeout=5) as response:
        return response.status, response.read().decode()


def _log_text_artifact(client, tmp_path, text):
    """Create a run with one artifact `note.txt` and return the run."""
    experiment_id = client.create_experiment(f"/Shared/rig-{uuid.uuid4().hex}")
    run = client.create_run(experiment_id)
    path = tmp_path / "note.txt"
    path.write_text(text)
    client.log_artifact(run.info.run_id, str(path))
    return run


def test_servers_healthy(rig):
    for uri in (rig.primary_uri, rig.secondary_uri):
        assert urllib.parse.urlsplit(uri).hostname == "127.0.0.1"
        assert _health(uri) == (200, "OK")


def test_primary_artifact_lands_in_moto(rig, tmp_path):
    text = f"primary {uuid.uuid4().hex}"
    run = _log_text_artifact(MlflowClient(rig.primary_uri), tmp_path, text)

    artifact_uri = urllib.parse.urlsplit(run.info.artifact_uri)
    assert artifact_uri.scheme == "s3"
    assert artifact_uri.netloc == rig.bucket

    s3 = boto3.client("s3", endpoint_url=rig.s3_endpoint_url)
    key = artifact_uri.path.lstrip("/") + "/note.txt"
    stored = s3.get_object(Bucket=rig.bucket, Key=key)["Body"].read().decode()
    assert stored == text


def test_secondary_artifact_lands_in_azurite(rig, tmp_path):
    text = f"secondary {uuid.uuid4().hex}"
    run = _log_text_artifact(MlflowClient(rig.secondary_uri), tmp_path, text)

    artifact_uri = urllib.parse.urlsplit(run.info.artifact_uri)
    assert artifact_uri.scheme == "wasbs"
    assert artifact_uri.netloc == f"{rig.container}@devstoreaccount1.blob.core.windows.net"

    service = BlobServiceClient.from_connection_string(rig.azure_storage_connection_string)
    blob_name = artifact_uri.path.lstrip("/") + "/note.txt"
    stored = service.get_blob_client(rig.container, blob_name).download_blob().readall().decode()
    assert stored == text


def test_secondary_restart_keeps_data(rig):
    client = MlflowClient(rig.secondary_uri)
    experiment_id = client.create_experiment(f"/Shared/rig-{uuid.uuid4().hex}")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "alpha", "0.5")
    uri_before = rig.secondary_uri

    rig.stop_server("secondary")
    try:
        assert not rig.is_server_running("secondary")

        # The rig's HTTP settings make a call to a stopped server fail within seconds.
        started = time.monotonic()
        with pytest.raises(MlflowException):
            client.get_run(run_id)
        assert time.monotonic() - started < 15
    finally:
        rig.start_server("secondary")

    assert rig.secondary_uri == uri_before
    assert _health(rig.secondary_uri) == (200, "OK")
    assert client.get_run(run_id).data.params == {"alpha": "0.5"}


def test_guard_rejects_non_loopback_address():
    with pytest.raises(NonLoopbackAddressError, match="192.0.2.1"):
        socket.getaddrinfo("192.0.2.1", 80)


def test_guard_allows_loopback(rig):
    assert socket.getaddrinfo("127.0.0.1", 80)

    port = urllib.parse.urlsplit(rig.primary_uri).port
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def test_guard_allows_unix_socket(tmp_path):
    path = str(tmp_path / "guard.sock")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(path)
        server.listen(1)
        client.connect(path)


@pytest.mark.parametrize(
    "host, expected",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        (b"127.0.0.1", True),
        (None, True),
        ("192.0.2.1", False),
        ("198.51.100.7", False),
        ("2001:db8::1", False),
        ("0.0.0.0", False),
        ("", False),
        ("example.invalid", False),
        ("localhost.example.invalid", False),
    ],
)
def test_guard_loopback_host_table(host, expected):
    assert is_loopback_host(host) is expected


def test_guard_active_in_child_process(subprocess_env):
    assert subprocess_env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert subprocess_env["DO_NOT_TRACK"] == "true"

    code = textwrap.dedent(
        """
        import socket
        import sys

        print("guard module loaded:", "loopback_guard" in sys.modules)
        try:
            socket.getaddrinfo("192.0.2.1", 80)
        except Exception as exc:
            print("rejected with", type(exc).__name__)
        else:
            print("not rejected")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert "guard module loaded: True" in result.stdout
    assert "rejected with NonLoopbackAddressError" in result.stdout


def test_child_process_logs_to_azurite(rig, subprocess_env, tmp_path):
    # Without AZURE_STORAGE_CONNECTION_STRING, MLflow's wasbs repository would try real Azure.
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from mlflow import MlflowClient

        client = MlflowClient({rig.secondary_uri!r})
        run = client.create_run(client.create_experiment(f"/Shared/rig-child-{uuid.uuid4().hex}"))
        path = Path({str(tmp_path)!r}) / "child.txt"
        path.write_text("from child")
        client.log_artifact(run.info.run_id, str(path))
        print(run.info.artifact_uri)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr

    artifact_uri = urllib.parse.urlsplit(result.stdout.strip().splitlines()[-1])
    blob_name = artifact_uri.path.lstrip("/") + "/child.txt"
    service = BlobServiceClient.from_connection_string(rig.azure_storage_connection_string)
    stored = service.get_blob_client(rig.container, blob_name).download_blob().readall().decode()
    assert stored == "from child"


def test_azurite_missing_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr("rig.servers.AZURITE_NODE_PREFIX", tmp_path / "node")
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(FileNotFoundError, match="npm install --prefix .* azurite@"):
        find_azurite_blob()


def test_cli_up_env_down(rig, subprocess_env, tmp_path):
    state_dir = tmp_path / "state"

    def run_cli(command):
        return subprocess.run(
            [sys.executable, "-m", "rig", command, "--state-dir", str(state_dir)],
            cwd=REPO_ROOT,
            env=subprocess_env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    up = run_cli("up")
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((state_dir / "state.json").read_text())
        assert _health(state["primary_uri"]) == (200, "OK")
        assert _health(state["secondary_uri"]) == (200, "OK")

        printed_env = run_cli("env")
        assert printed_env.returncode == 0, printed_env.stderr
        exports = dict(
            shlex.split(line)[1].split("=", 1)
            for line in printed_env.stdout.splitlines()
            if line.startswith("export ")
        )
        connection_string = state["env"]["AZURE_STORAGE_CONNECTION_STRING"]
        assert exports["AZURE_STORAGE_CONNECTION_STRING"] == connection_string
        assert exports["AZDUAL_RIG_STATE"] == str(state_dir / "state.json")
    finally:
        down = run_cli("down")

    assert down.returncode == 0, down.stderr
    assert not (state_dir / "state.json").exists()
    for name, process_state in state["processes"].items():
        process = ServerProcess.from_state(name, process_state)
        assert not process.is_running(), f"{name} still running after `down`"
