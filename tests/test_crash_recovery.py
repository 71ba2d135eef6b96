"""Crash recovery: spool files of killed or failed processes, replayed by `mlflow-azdual sync`.

Each test runs training code in a child Python process, as a user's job would run, and the
`mlflow-azdual` command as a subprocess. Every test has a spool directory of its own under
tmp_path, so no other process replays its files.
"""

import json
import os
import queue
import random
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from mlflow.entities import ViewType

from mlflow_azdual.id_mapping import (
    PRIMARY_EXPERIMENT_ID_TAG,
    PRIMARY_RUN_ID_TAG,
    SECONDARY_RUN_ID_TAG,
)
from mlflow_azdual.spool import spool_directory, spool_root
from mlflow_azdual.uri import explicit_tracking_uri
from rig.servers import PLUGIN_PROFILE_OPTIONS
from rig.latency_proxy import LatencyProxy
from tests.dual_helpers import backend_clients, metric_history, unique_path

CLI = Path(sys.executable).with_name("mlflow-azdual")
# Options that keep points queued, so nothing reaches a backend before a flush, end_run or exit.
QUEUED = {
    "flush_interval_s": 60,
    "flush_threshold_points": 1_000_000,
    "buffer_capacity_points": 1_000_000,
}
# Two group-commit intervals of the spool (spool_commit_interval_s defaults to 0.2 s).
TWO_COMMIT_INTERVALS_S = 0.6
# MLflow's own HTTP client retries a refused connection before it raises. The rig sets 2
# retries, and MLflow's default of 7 retries with backoff factor 2 takes about 4 minutes
# (mlflow/environment_variables.py, MLflow 3.17). With retries off, a call fails at once.
NO_MLFLOW_HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
}


class ChildProcess:
    """A child Python process running ``script``, with its stdout lines read on a thread.

    Reads time out instead of blocking forever. stderr goes to ``stderr_path``, so a chatty
    child never blocks on a full pipe. Used as a context manager, it kills the child on exit.
    """

    def __init__(self, script: str, env: dict, stderr_path: Path):
        self.stderr_path = stderr_path
        # Closed in __exit__, because the child writes to it for the object's whole life.
        self._stderr_file = open(stderr_path, "w")  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            text=True,
        )
        self.pid = self.popen.pid
        self._lines = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self):
        for line in self.popen.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def stderr(self) -> str:
        self._stderr_file.flush()
        return self.stderr_path.read_text(errors="replace")

    def read_line(self, timeout_s: float = 120) -> str:
        """Return the next stdout line, and fail the test on a timeout or when the child ended."""
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(
                f"child {self.pid} printed nothing for {timeout_s:g} s; stderr:\n"
                f"{self.stderr()[-3000:]}"
            ) from None
        if line is None:
            raise AssertionError(
                f"child {self.pid} exited with code {self.popen.wait()} before printing the "
                f"expected line; stderr:\n{self.stderr()[-3000:]}"
            )
        return line

    def send_line(self, text: str) -> None:
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def wait(self, timeout_s: float = 120) -> int:
        return self.popen.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.kill()
        self._stderr_file.close()


def run_cli(*arguments: str, env: dict, timeout_s: float = 180) -> subprocess.CompletedProcess:
    """Run the `mlflow-azdual` console script and return its exit code and output."""
    assert CLI.exists(), f"console script {CLI} is missing; install the package into the venv"
    return subprocess.run(
        [str(CLI), *arguments],
        check=False, env=env, capture_output=True, text=True, timeout=timeout_s,
    )


def cli_output(completed: subprocess.CompletedProcess) -> str:
    return (
        f"exit code {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )


def mirror_runs(secondary, primary_experiment_id: str, primary_run_id: str) -> list:
    """Return every secondary run tagged as the mirror of ``primary_run_id``, deleted ones too."""
    experiments = secondary.search_experiments(
        view_type=ViewType.ALL,
        filter_string=f"tags.`{PRIMARY_EXPERIMENT_ID_TAG}` = '{primary_experiment_id}'",
    )
    assert len(experiments) == 1, f"expected one mirror experiment, found {len(experiments)}"
    return secondary.search_runs(
        [experiments[0].experiment_id],
        f"tags.`{PRIMARY_RUN_ID_TAG}` = '{primary_run_id}'",
        run_view_type=ViewType.ALL,
    )


def assert_points(client, run_id: str, expected_steps: int, where: str) -> list:
    """Assert that metric x has each step below ``expected_steps`` once, with value == step.

    Returns the sorted steps found, which may include later steps as well.
    """
    history = metric_history(client, run_id, "x")
    steps = sorted(point.step for point in history)
    assert len(steps) == len(set(steps)), f"duplicate points of x on {where}"
    missing = sorted(set(range(expected_steps)) - set(steps))
    assert missing == [], f"{len(missing)} steps missing on {where}, first {missing[:10]}"
    wrong = [(point.step, point.value) for point in history if point.value != point.step]
    assert wrong == [], f"points whose value is not their step on {where}: {wrong[:10]}"
    return steps


def pending_by_backend(status_json: str) -> dict:
    backends = json.loads(status_json)["backends"]
    return {name: backends.get(name, {}).get("pending", 0) for name in ("primary", "secondary")}


def test_killed_training_process_is_replayed_by_sync(rig, subprocess_env, tmp_path):
    primary, secondary = backend_clients(rig)
    experiment_id = primary.create_experiment(unique_path())
    uri = rig.dual_tracking_uri(
        spool_dir=str(tmp_path / "spool"), **QUEUED
    )
    script = textwrap.dedent(f"""
        import mlflow
        mlflow.set_tracking_uri({uri!r})
        run = mlflow.start_run(experiment_id={experiment_id!r})
        print("run", run.info.run_id, flush=True)
        for step in range(5_000_000):
            mlflow.log_metric("x", float(step), step=step)
            if (step + 1) % 500 == 0:
                print("accepted", step + 1, flush=True)
    """)

    with ChildProcess(script, subprocess_env, tmp_path / "child.stderr") as child:
        run_id = child.read_line().split()[1]
        accepted = 0
        while accepted < 3000:
            accepted = int(child.read_line().split()[1])
        # Every point accepted so far is committed to the spool after two commit intervals.
        time.sleep(TWO_COMMIT_INTERVALS_S)
        assert child.popen.poll() is None, "the child stopped logging before it was killed"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL

    # The flush interval is 60 s, so no point reached the primary before the kill.
    assert primary.get_metric_history(run_id, "x") == []

    synced = run_cli("sync", uri, env=subprocess_env)
    assert synced.returncode == 0, cli_output(synced)

    primary_steps = assert_points(primary, run_id, accepted, "the primary")
    mirrors = mirror_runs(secondary, experiment_id, run_id)
    assert len(mirrors) == 1, f"expected one secondary run, found {len(mirrors)}"
    mirror_id = mirrors[0].info.run_id
    recorded_mirror_id = primary.get_run(run_id).data.tags.get(SECONDARY_RUN_ID_TAG)
    assert recorded_mirror_id in (None, mirror_id)
    secondary_steps = assert_points(secondary, mirror_id, accepted, "the secondary")
    # Group commits keep order, so what survived the kill is a prefix of the steps.
    assert primary_steps == list(range(len(primary_steps)))
    assert secondary_steps == list(range(len(secondary_steps)))

    status = run_cli("status", uri, "--json", env=subprocess_env)
    assert status.returncode == 0, cli_output(status)
    assert pending_by_backend(status.stdout) == {"primary": 0, "secondary": 0}
    assert json.loads(status.stdout)["files"] == [], "sync left a replayed spool file behind"


def test_primary_outage_fails_fast_and_sync_delivers(rig, subprocess_env, tmp_path):
    primary, secondary = backend_clients(rig)
    experiment_id = primary.create_experiment(unique_path())
    child_env = {**subprocess_env, **NO_MLFLOW_HTTP_RETRIES}
    primary_port = int(urllib.parse.urlsplit(rig.primary_uri).port)

    with LatencyProxy(primary_port) as proxy:
        uri = explicit_tracking_uri(
            proxy.uri, rig.secondary_uri, **PLUGIN_PROFILE_OPTIONS, spool_dir=str(tmp_path / "spool"),
            flush_timeout_s=5, **QUEUED,
        )
        script = textwrap.dedent(f"""
            import json
            import sys
            import time

            import mlflow
            from mlflow.exceptions import MlflowException

            def observe(call):
                started = time.monotonic()
                try:
                    call()
                except MlflowException as error:
                    return {{"raised": type(error).__name__, "message": error.message,
                             "elapsed_s": time.monotonic() - started}}
                return {{"raised": None, "elapsed_s": time.monotonic() - started}}

            mlflow.set_tracking_uri({uri!r})
            run = mlflow.start_run(experiment_id={experiment_id!r})
            for step in range(2000):
                mlflow.log_metric("x", float(step), step=step)
            print("queued", run.info.run_id, flush=True)
            sys.stdin.readline()  # The parent has taken the primary down.
            observed = {{
                "log_param": observe(lambda: mlflow.log_param("lr", "0.1")),
                "end_run": observe(mlflow.end_run),
            }}
            print(json.dumps(observed), flush=True)
        """)
        with ChildProcess(script, child_env, tmp_path / "child.stderr") as child:
            run_id = child.read_line().split()[1]
            proxy.down(120)
            child.send_line("primary is down")
            observed = json.loads(child.read_line(timeout_s=180))
            assert child.wait(timeout_s=180) == 0, child.stderr()[-3000:]

        log_param = observed["log_param"]
        assert log_param["raised"] == "MlflowException", log_param
        assert "log-parameter" in log_param["message"]
        assert "Connection refused" in log_param["message"]
        # flush_timeout_s=5 for the queued points, then one refused request.
        assert log_param["elapsed_s"] < 15
        end_run = observed["end_run"]
        assert end_run["raised"] == "MlflowException", end_run
        assert re.search(r"\b2000\b", end_run["message"]), end_run["message"]
        assert run_id in end_run["message"]
        assert "mlflow-azdual sync" in end_run["message"]
        assert end_run["elapsed_s"] < 30

        sync_env = {**child_env, "MLFLOW_AZDUAL_RETRY_TOTAL_S": "2"}
        failed_sync = run_cli("sync", uri, env=sync_env)
        assert failed_sync.returncode != 0, cli_output(failed_sync)
        assert "2000 left" in failed_sync.stdout, cli_output(failed_sync)

        proxy.up()
        synced = run_cli("sync", uri, env=child_env)
        assert synced.returncode == 0, cli_output(synced)

    assert_points(primary, run_id, 2000, "the primary")
    finished = primary.get_run(run_id)
    # end_run failed, so the run was never marked finished, and the failed param is not there.
    assert finished.info.status == "RUNNING"
    assert finished.data.params == {}
    mirrors = mirror_runs(secondary, experiment_id, run_id)
    assert len(mirrors) == 1, f"expected one secondary run, found {len(mirrors)}"
    assert_points(secondary, mirrors[0].info.run_id, 2000, "the secondary")


def write_corrupt_spool_file(directory: str, name: str) -> Path:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = Path(directory) / name
    path.write_bytes(random.Random(name).randbytes(16_384))
    return path


def set_aside_copies(path: Path) -> list:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


def test_corrupt_spool_file_is_set_aside(rig, subprocess_env, tmp_path):
    primary, secondary = backend_clients(rig)
    spool_dir = str(tmp_path / "spool")
    uri = rig.dual_tracking_uri(spool_dir=spool_dir)
    directory = spool_directory(spool_root(spool_dir), rig.primary_uri, rig.secondary_uri)
    corrupt = write_corrupt_spool_file(directory, "spool-otherhost-1-deadbeef.sqlite")
    corrupt_bytes = corrupt.read_bytes()

    synced = run_cli("sync", uri, env=subprocess_env)
    assert synced.returncode != 0, cli_output(synced)
    assert str(corrupt) in synced.stdout + synced.stderr, cli_output(synced)
    assert "corrupt" in synced.stderr, cli_output(synced)
    assert not corrupt.exists()
    moved = set_aside_copies(corrupt)
    assert len(moved) == 1, f"expected one set-aside copy, found {moved}"
    assert moved[0].read_bytes() == corrupt_bytes
    synced_again = run_cli("sync", uri, env=subprocess_env)
    assert synced_again.returncode == 0, cli_output(synced_again)

    # A training process replays orphans in the background when it creates its spool.
    corrupt = write_corrupt_spool_file(directory, "spool-otherhost-2-cafebabe.sqlite")
    experiment_id = primary.create_experiment(unique_path())
    script = textwrap.dedent(f"""
        import logging
        import threading

        import mlflow

        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        mlflow.set_tracking_uri({uri!r})
        with mlflow.start_run(experiment_id={experiment_id!r}) as run:
            print("run", run.info.run_id, flush=True)
            mlflow.log_param("lr", "0.1")
            for step in range(100):
                mlflow.log_metric("x", float(step), step=step)
        # A script this short can end before the background replay has run, so it waits for
        # the replay thread. A training job runs far longer.
        for thread in threading.enumerate():
            if thread.name == "mlflow-azdual-replay":
                thread.join(timeout=60)
    """)
    with ChildProcess(script, subprocess_env, tmp_path / "child.stderr") as child:
        run_id = child.read_line().split()[1]
        assert child.wait() == 0, child.stderr()[-3000:]
        stderr = child.stderr()

    error_lines = [line for line in stderr.splitlines() if line.startswith("ERROR")]
    assert any(str(corrupt) in line for line in error_lines), stderr[-3000:]
    assert not corrupt.exists()
    assert len(set_aside_copies(corrupt)) == 1

    run = primary.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1"}
    assert_points(primary, run_id, 100, "the primary")
    mirrors = mirror_runs(secondary, experiment_id, run_id)
    assert len(mirrors) == 1, f"expected one secondary run, found {len(mirrors)}"
    assert mirrors[0].info.status == "FINISHED"
    assert_points(secondary, mirrors[0].info.run_id, 100, "the secondary")


def permission_problems(root: Path) -> list:
    """Return ``root`` and the paths under it that are not directories 0700 or files 0600."""
    problems = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        expected = 0o700 if path.is_dir() else 0o600
        if mode != expected:
            problems.append(f"{path}: {mode:o}, expected {expected:o}")
    return problems


@pytest.mark.parametrize("moment", ["alive", "killed"])
def test_spool_permissions(rig, subprocess_env, tmp_path, moment):
    spool_dir = tmp_path / "spool"
    primary, _ = backend_clients(rig)
    experiment_id = primary.create_experiment(unique_path())
    uri = rig.dual_tracking_uri(
        spool_dir=str(spool_dir), **QUEUED
    )
    directory = Path(spool_directory(str(spool_dir), rig.primary_uri, rig.secondary_uri))
    # With umask 0, a mode that the plugin does not set itself shows as world-readable.
    script = textwrap.dedent(f"""
        import os
        import time

        os.umask(0)
        import mlflow

        mlflow.set_tracking_uri({uri!r})
        mlflow.start_run(experiment_id={experiment_id!r})
        for step in range(100):
            mlflow.log_metric("x", float(step), step=step)
        print("logged", flush=True)
        time.sleep(600)
    """)
    with ChildProcess(script, subprocess_env, tmp_path / "child.stderr") as child:
        assert child.read_line() == "logged"
        time.sleep(TWO_COMMIT_INTERVALS_S)
        if moment == "killed":
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        else:
            assert child.popen.poll() is None

        names = sorted(path.name for path in directory.iterdir())
        suffixes = {re.sub(r"^spool-.*?\.sqlite", ".sqlite", name) for name in names}
        assert suffixes >= {".sqlite", ".sqlite-wal", ".sqlite-shm", ".sqlite.lock"}, names
        assert permission_problems(spool_dir) == []


def test_registry_write_is_replayed_by_sync(rig, subprocess_env, tmp_path):
    primary, secondary = backend_clients(rig)
    experiment_id = primary.create_experiment(unique_path())
    model_name = f"replayed-model-{os.getpid()}-{time.monotonic_ns()}"
    secondary_port = int(urllib.parse.urlsplit(rig.secondary_uri).port)

    with LatencyProxy(secondary_port) as proxy:
        uri = explicit_tracking_uri(
            rig.primary_uri, proxy.uri, spool_dir=str(tmp_path / "spool"), exit_flush_timeout_s=2
        )
        script = textwrap.dedent(f"""
            import os
            import tempfile

            import mlflow

            mlflow.set_tracking_uri({uri!r})
            mlflow.set_registry_uri({uri!r})
            with mlflow.start_run(experiment_id={experiment_id!r}) as run:
                with tempfile.TemporaryDirectory() as folder:
                    with open(os.path.join(folder, "MLmodel"), "w") as file:
                        file.write("artifact_path: model\\nflavors: {{}}\\n")
                    mlflow.log_artifacts(folder, "model")
                print("run", run.info.run_id, flush=True)
                version = mlflow.register_model(f"runs:/{{run.info.run_id}}/model", {model_name!r})
                print("version", version.version, flush=True)
        """)
        # The secondary is down for the child's whole life, so every secondary write of the
        # child, registry writes included, stays in its spool file.
        proxy.down(600)
        with ChildProcess(script, subprocess_env, tmp_path / "child.stderr") as child:
            run_id = child.read_line().split()[1]
            assert child.read_line() == "version 1"
            assert child.wait() == 0, child.stderr()[-3000:]

        pending = run_cli("status", uri, "--json", env=subprocess_env)
        assert pending_by_backend(pending.stdout)["secondary"] > 0, cli_output(pending)
        proxy.up()
        synced = run_cli("sync", uri, env=subprocess_env)
        assert synced.returncode == 0, cli_output(synced)

    (mirror,) = mirror_runs(secondary, experiment_id, run_id)
    versions = secondary.search_model_versions(f"name='{model_name}'")
    assert len(versions) == 1, f"expected one secondary model version, found {len(versions)}"
    assert versions[0].run_id == mirror.info.run_id
    assert primary.get_model_version(model_name, "1").tags.get("azdual.secondary_version") == (
        versions[0].version
    )
