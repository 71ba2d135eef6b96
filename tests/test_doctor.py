"""`mlflow-azdual doctor`: one line per check, exit code 1 on any failure, never a secret.

The command runs as a subprocess against the rig's two servers. Each test gives the URI its
own spool directory under tmp_path.
"""

import http.server
import importlib.metadata
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mlflow_azdual.doctor import mlflow_requirements
from mlflow_azdual.uri import explicit_tracking_uri

CLI = Path(sys.executable).with_name("mlflow-azdual")
# A stopped backend refuses the connection at once, so this bound leaves room for a slow machine.
STOPPED_BACKEND_BOUND_S = 30
SECRET = "SECRET-do-not-print-4242"


def run_doctor(*arguments: str, env: dict, timeout_s: float = 120) -> subprocess.CompletedProcess:
    assert CLI.exists(), f"console script {CLI} is missing; install the package into the venv"
    return subprocess.run(
        [str(CLI), "doctor", *arguments],
        check=False, env=env, capture_output=True, text=True, timeout=timeout_s,
    )


def output_of(completed: subprocess.CompletedProcess) -> str:
    return (
        f"exit code {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )


def lines_starting(stdout: str, prefix: str) -> list:
    return [line for line in stdout.splitlines() if line.startswith(prefix)]


def closed_port() -> int:
    """Return a loopback port that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RejectingBackend:
    """An HTTP server on 127.0.0.1 that responds to every request with 401 UNAUTHENTICATED."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def _reject(self):
                body = b'{"error_code": "UNAUTHENTICATED", "message": "Invalid credentials"}'
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _reject

            def log_message(self, *arguments):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()


def test_doctor_passes_on_rig(rig, subprocess_env, tmp_path):
    uri = rig.dual_tracking_uri(spool_dir=str(tmp_path / "spool"))

    completed = run_doctor(uri, env=subprocess_env)

    assert completed.returncode == 0, output_of(completed)
    stdout = completed.stdout
    assert lines_starting(stdout, "FAILED") == [], output_of(completed)
    assert f"tracking URI {rig.primary_uri}" in stdout
    assert f"tracking URI {rig.secondary_uri}" in stdout
    assert "profile databricks" in stdout
    assert "profile azureml" in stdout
    for role in ("primary", "secondary"):
        for kind in ("tracking", "registry"):
            assert lines_starting(stdout, f"ok       {role} {kind} read:"), output_of(completed)
    assert platform.python_version() in stdout
    assert f"mlflow {importlib.metadata.version('mlflow')}" in stdout
    assert f"mlflow-azdual: {importlib.metadata.version('mlflow-azdual')}" in stdout
    assert "azureml-mlflow:" in stdout
    assert len(lines_starting(stdout, "ok       entry point")) == 3, output_of(completed)
    assert f"spool: directory {tmp_path / 'spool'}" in stdout


def test_doctor_json_output(rig, subprocess_env, tmp_path):
    uri = rig.dual_tracking_uri(spool_dir=str(tmp_path / "spool"))

    completed = run_doctor(uri, "--json", env=subprocess_env)

    assert completed.returncode == 0, output_of(completed)
    document = json.loads(completed.stdout)
    assert document["ok"] is True
    names = [check["name"] for check in document["checks"]]
    assert "secondary tracking read" in names
    assert "spool" in names
    assert {check["status"] for check in document["checks"]} <= {"ok", "warning"}


def test_doctor_secondary_stopped_fails_fast(rig, subprocess_env, tmp_path):
    uri = rig.dual_tracking_uri(spool_dir=str(tmp_path / "spool"))

    rig.stop_server("secondary")
    try:
        started = time.monotonic()
        completed = run_doctor(uri, env=subprocess_env)
        elapsed_s = time.monotonic() - started
    finally:
        rig.start_server("secondary")

    assert completed.returncode == 1, output_of(completed)
    assert elapsed_s < STOPPED_BACKEND_BOUND_S, f"doctor took {elapsed_s:.1f} s"
    failed = lines_starting(completed.stdout, "FAILED")
    assert failed, output_of(completed)
    assert all(line.startswith("FAILED   secondary ") for line in failed), output_of(completed)
    assert rig.secondary_uri in failed[0]
    assert "connection refused" in failed[0]
    assert "Fix: start the secondary backend" in failed[0]
    assert lines_starting(completed.stdout, "ok       primary tracking read:"), output_of(completed)


def test_doctor_unwritable_spool_dir(rig, subprocess_env, tmp_path):
    # A path under a regular file cannot be created, even by root.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    uri = rig.dual_tracking_uri(spool_dir=str(blocker / "spool"))

    completed = run_doctor(uri, env=subprocess_env)

    assert completed.returncode == 1, output_of(completed)
    failed = lines_starting(completed.stdout, "FAILED")
    assert len(failed) == 1, output_of(completed)
    assert failed[0].startswith(f"FAILED   spool: directory {blocker / 'spool'}")
    assert "is not writable" in failed[0]
    assert "Fix: set the spool_dir option (MLFLOW_AZDUAL_SPOOL_DIR)" in failed[0]


def test_doctor_spool_off_warns(rig, subprocess_env):
    uri = rig.dual_tracking_uri(spool="false")

    completed = run_doctor(uri, env=subprocess_env)

    assert completed.returncode == 0, output_of(completed)
    warnings = lines_starting(completed.stdout, "warning  spool:")
    assert len(warnings) == 1, output_of(completed)
    assert "spool=false" in warnings[0]


@pytest.mark.parametrize("secondary_reachable", [True, False], ids=["reachable", "refused"])
def test_doctor_never_prints_secret(rig, subprocess_env, tmp_path, secondary_reachable):
    secondary_port = rig.secondary_uri.rsplit(":", 1)[1] if secondary_reachable else closed_port()
    primary = rig.primary_uri.replace("http://", f"http://user:{SECRET}@")
    secondary = f"http://user:{SECRET}@127.0.0.1:{secondary_port}"
    uri = explicit_tracking_uri(primary, secondary, spool_dir=str(tmp_path / "spool"))

    for arguments in ((uri,), (uri, "--json")):
        completed = run_doctor(*arguments, env=subprocess_env)
        assert SECRET not in completed.stdout, output_of(completed)
        assert SECRET not in completed.stderr, output_of(completed)
        assert "***@127.0.0.1" in completed.stdout, output_of(completed)
        assert completed.returncode == (0 if secondary_reachable else 1), output_of(completed)


def test_doctor_authentication_error_fix(rig, subprocess_env, tmp_path):
    with RejectingBackend() as backend:
        uri = explicit_tracking_uri(
            rig.primary_uri, backend.uri, spool_dir=str(tmp_path / "spool")
        )
        completed = run_doctor(uri, env=subprocess_env)

    assert completed.returncode == 1, output_of(completed)
    failed = lines_starting(completed.stdout, "FAILED   secondary tracking read:")
    assert len(failed) == 1, output_of(completed)
    assert "rejected the credentials" in failed[0]
    assert "HTTP 401" in failed[0]
    assert "Fix: check MLFLOW_TRACKING_TOKEN" in failed[0]


def test_doctor_invalid_uri(subprocess_env):
    completed = run_doctor("azdual:?primary=http%3A%2F%2F127.0.0.1%3A5000", env=subprocess_env)

    assert completed.returncode == 1, output_of(completed)
    failed = lines_starting(completed.stdout, "FAILED   tracking URI:")
    assert len(failed) == 1, output_of(completed)
    assert "the secondary backend is missing" in failed[0]
    assert "read:" not in completed.stdout, "backends were checked for an invalid URI"


def test_doctor_uri_from_environment(rig, subprocess_env, tmp_path):
    uri = rig.dual_tracking_uri(spool_dir=str(tmp_path / "spool"))

    completed = run_doctor(env={**subprocess_env, "MLFLOW_TRACKING_URI": uri})

    assert completed.returncode == 0, output_of(completed)
    assert f"tracking URI {rig.secondary_uri}" in completed.stdout


def test_mlflow_requirements_outside_ceiling():
    requires = [
        "azureml-core",
        "mlflow-skinny<=3.15.0",
        "pytest; extra == 'test'",
    ]
    installed = {"mlflow": "3.17.2", "mlflow-skinny": "3.17.2"}

    applicable, unmet = mlflow_requirements(requires, installed)

    assert applicable == ["mlflow-skinny<=3.15.0"]
    assert unmet == ["mlflow-skinny<=3.15.0"]


def test_mlflow_requirements_inside_range():
    installed = {"mlflow": "3.15.0", "mlflow-skinny": "3.15.0"}

    _, unmet = mlflow_requirements(["mlflow-skinny<=3.15.0"], installed)

    assert unmet == []


def test_mlflow_requirements_other_distribution():
    # mlflow installed without mlflow-skinny (as MLflow 2.x allows): its version is used.
    installed = {"mlflow": "2.22.5", "mlflow-skinny": None}

    _, unmet = mlflow_requirements(["mlflow-skinny>=2.9,<2.20"], installed)

    assert unmet == ["mlflow-skinny<2.20,>=2.9"]


def test_mlflow_requirements_extra_only_skipped():
    installed = {"mlflow": "3.17.2", "mlflow-skinny": "3.17.2"}

    applicable, unmet = mlflow_requirements(["mlflow<3; extra == 'old'"], installed)

    assert applicable == []
    assert unmet == []
