"""The metric buffer and the write-behind queues: order, read-your-writes, exit, threads, fork.

Stores here use a 60 s flush interval, so a point reaches a backend only through one of the
flush triggers under test (a read, a synchronous write, end_run, an explicit flush, exit).
"""

import os
import socket
import subprocess
import sys
import threading
import time

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import _get_store

import mlflow_azdual
from mlflow_azdual.uri import explicit_tracking_uri
from tests.dual_helpers import backend_clients, metric_points, secondary_run_id, unique_path

SLOW_FLUSH = {"flush_interval_s": 60, "flush_threshold_points": 40_000}


@pytest.fixture
def slow_dual(rig):
    uri = rig.dual_tracking_uri(**SLOW_FLUSH)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    while mlflow.active_run():
        mlflow.end_run()


@pytest.mark.smoke
def test_run_finished_only_after_its_metrics(rig, slow_dual):
    primary, secondary = backend_clients(rig)
    mlflow.set_experiment(unique_path())
    with mlflow.start_run() as run:
        for step in range(500):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)

    finished = primary.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert len(metric_points(primary, run.info.run_id, "loss")) == 500
    mirror_id = secondary_run_id(primary, run.info.run_id)
    assert secondary.get_run(mirror_id).info.status == "FINISHED"
    assert len(metric_points(secondary, mirror_id, "loss")) == 500


def test_tag_set_and_delete_keep_order(rig, slow_dual):
    primary, secondary = backend_clients(rig)
    run = slow_dual.create_run(slow_dual.create_experiment(unique_path()))
    slow_dual.set_tag(run.info.run_id, "stage", "draft")
    slow_dual.set_tag(run.info.run_id, "stage", "final")
    slow_dual.set_tag(run.info.run_id, "scratch", "1")
    slow_dual.delete_tag(run.info.run_id, "scratch")

    mirror = secondary.get_run(secondary_run_id(primary, run.info.run_id))
    assert mirror.data.tags["stage"] == "final"
    assert "scratch" not in mirror.data.tags


@pytest.mark.smoke
def test_read_your_writes(rig, slow_dual):
    primary, _ = backend_clients(rig)
    run = slow_dual.create_run(slow_dual.create_experiment(unique_path()))
    for step in range(3):
        slow_dual.log_metric(run.info.run_id, "acc", 0.5 + step / 10, step=step)

    assert metric_points(primary, run.info.run_id, "acc") == []
    assert slow_dual.get_run(run.info.run_id).data.metrics["acc"] == pytest.approx(0.7)
    slow_dual.log_metric(run.info.run_id, "acc", 0.9, step=3)
    history = slow_dual.get_metric_history(run.info.run_id, "acc")
    assert [point.step for point in history] == [0, 1, 2, 3]


def test_search_runs_sees_queued_metrics(rig, slow_dual):
    experiment_id = slow_dual.create_experiment(unique_path())
    run = slow_dual.create_run(experiment_id)
    slow_dual.log_metric(run.info.run_id, "score", 3.0)
    found = slow_dual.search_runs([experiment_id], "metrics.score > 2")
    assert [r.info.run_id for r in found] == [run.info.run_id]


# Points that the exit flush must deliver. MLflow 3.0's fluent log_metric reads the run twice
# per call, and a read sends the run's queued points first, so there each call costs about
# three round trips; 3,000 points keep that version's run near a minute.
EXIT_FLUSH_POINTS = 3_000


@pytest.mark.smoke
def test_exit_without_end_run_sends_everything(rig, subprocess_env):
    primary, secondary = backend_clients(rig)
    experiment_id = primary.create_experiment(unique_path())
    uri = rig.dual_tracking_uri(**SLOW_FLUSH)
    script = (
        "import mlflow\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        f"run = mlflow.start_run(experiment_id={experiment_id!r})\n"
        "print(run.info.run_id, flush=True)\n"
        f"for step in range({EXIT_FLUSH_POINTS}):\n"
        "    mlflow.log_metric('loss', 1.0 / (step + 1), step=step)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env, capture_output=True, text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    run_id = completed.stdout.split()[0]

    assert len(metric_points(primary, run_id, "loss")) == EXIT_FLUSH_POINTS
    assert primary.get_run(run_id).info.status == "FINISHED"
    mirror_id = primary.get_run(run_id).data.tags["azdual.secondary_run_id"]
    assert len(metric_points(secondary, mirror_id, "loss")) == EXIT_FLUSH_POINTS
    assert secondary.get_run(mirror_id).info.status == "FINISHED"


def test_threads_log_to_one_run(rig, slow_dual):
    primary, secondary = backend_clients(rig)
    run = slow_dual.create_run(slow_dual.create_experiment(unique_path()))
    errors = []

    def log_points(thread_index):
        try:
            for step in range(5_000):
                slow_dual.log_metric(run.info.run_id, f"t{thread_index}", float(step), step=step)
        except Exception as error:  # noqa: BLE001 - reported by the assert below.
            errors.append(error)

    threads = [threading.Thread(target=log_points, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert mlflow_azdual.flush(timeout_s=300)

    mirror_id = secondary_run_id(primary, run.info.run_id)
    for index in range(8):
        for client, run_id in ((primary, run.info.run_id), (secondary, mirror_id)):
            steps = [point[0] for point in metric_points(client, run_id, f"t{index}")]
            assert steps == list(range(5_000)), f"t{index} on {client.tracking_uri}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available")
def test_forked_child_logs_only_its_points(rig, slow_dual):
    primary, secondary = backend_clients(rig)
    run = slow_dual.create_run(slow_dual.create_experiment(unique_path()))
    # The mirror exists before the fork, as when a training script forks its workers after
    # starting the run. NOTE: two processes that find no mirror at the same moment can still
    # create two (see docs/operations.md).
    mirror_id = secondary_run_id(primary, run.info.run_id)
    for step in range(50):
        slow_dual.log_metric(run.info.run_id, "parent", float(step), step=step)

    pid = os.fork()
    if pid == 0:
        exit_code = 1
        try:
            for step in range(30):
                slow_dual.log_metric(run.info.run_id, "child", float(step), step=step)
            exit_code = 0 if mlflow_azdual.flush(timeout_s=60) else 2
        finally:
            os._exit(exit_code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    # The parent's points are still queued in the parent: the child did not send them.
    assert metric_points(primary, run.info.run_id, "parent") == []
    assert len(metric_points(primary, run.info.run_id, "child")) == 30
    assert mlflow_azdual.flush(timeout_s=60)
    assert secondary_run_id(primary, run.info.run_id) == mirror_id
    for client, run_id in ((primary, run.info.run_id), (secondary, mirror_id)):
        assert len(metric_points(client, run_id, "parent")) == 50
        assert len(metric_points(client, run_id, "child")) == 30


def test_bad_metric_raises_at_call_site(rig, slow_dual):
    primary, secondary = backend_clients(rig)
    run = slow_dual.create_run(slow_dual.create_experiment(unique_path()))
    slow_dual.log_metric(run.info.run_id, "loss", 1.0, step=0)

    with pytest.raises(MlflowException) as dual_error:
        slow_dual.log_metric(run.info.run_id, "loss!", 2.0, step=1)
    with pytest.raises(MlflowException) as plain_error:
        primary.log_metric(run.info.run_id, "loss!", 2.0, step=1)

    assert dual_error.value.error_code == plain_error.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "Invalid value \"loss!\" for parameter 'name'" in dual_error.value.message
    assert dual_error.value.message in plain_error.value.message
    assert mlflow_azdual.flush(timeout_s=60)
    mirror_id = secondary_run_id(primary, run.info.run_id)
    assert [point[:2] for point in metric_points(primary, run.info.run_id, "loss")] == [(0, 1.0)]
    assert [point[:2] for point in metric_points(secondary, mirror_id, "loss")] == [(0, 1.0)]


@pytest.mark.smoke
def test_mlflow_async_logging_ends_in_buffer(rig, slow_dual, monkeypatch):
    primary, secondary = backend_clients(rig)
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "true")
    mlflow.set_experiment(unique_path())
    with mlflow.start_run() as run:
        for step in range(100):
            mlflow.log_metric("loss", float(step), step=step, synchronous=False)
        mlflow.log_param("mode", "async")

    assert len(metric_points(primary, run.info.run_id, "loss")) == 100
    mirror_id = secondary_run_id(primary, run.info.run_id)
    assert len(metric_points(secondary, mirror_id, "loss")) == 100
    assert secondary.get_run(mirror_id).data.params == {"mode": "async"}


class Blackhole:
    """A loopback TCP listener that accepts connections and never responds: a stalled backend."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self):
        self.listener.close()
        for connection in self.connections:
            connection.close()


def test_backpressure_with_stalled_secondary_and_no_spool(rig):
    primary, _ = backend_clients(rig)
    blackhole = Blackhole()
    uri = explicit_tracking_uri(
        rig.primary_uri,
        f"http://127.0.0.1:{blackhole.port}",
        spool=False,
        buffer_capacity_points=200,
        backpressure_timeout_s=2,
        exit_flush_timeout_s=1,
        retry_attempt_timeout_s=1,
    )
    client = MlflowClient(tracking_uri=uri)
    store = _get_store(uri)
    run = client.create_run(client.create_experiment(unique_path()))
    highest_pending = 0
    accepted = 0
    try:
        with pytest.raises(MlflowException, match="write queue stayed full") as raised:
            for step in range(10_000):
                client.log_metric(run.info.run_id, "loss", float(step), step=step)
                accepted += 1
                highest_pending = max(highest_pending, store.secondary_queue.pending_points)
        assert "Nothing queued was dropped" in raised.value.message
        assert highest_pending <= 200
        assert 100 <= accepted < 10_000
        store.flush_primary()
        assert len(metric_points(primary, run.info.run_id, "loss")) == accepted
    finally:
        blackhole.close()
        store.secondary_queue.stop()


def test_flush_reports_timeout(rig):
    blackhole = Blackhole()
    uri = explicit_tracking_uri(
        rig.primary_uri, f"http://127.0.0.1:{blackhole.port}", exit_flush_timeout_s=1
    )
    client = MlflowClient(tracking_uri=uri)
    store = _get_store(uri)
    try:
        run = client.create_run(client.create_experiment(unique_path()))
        client.log_metric(run.info.run_id, "loss", 1.0)
        started = time.monotonic()
        assert store.flush(timeout_s=1) is False
        assert time.monotonic() - started < 5
    finally:
        blackhole.close()
        store.secondary_queue.stop()


def test_exit_with_stalled_secondary_is_bounded(rig, subprocess_env):
    blackhole = Blackhole()
    uri = explicit_tracking_uri(
        rig.primary_uri, f"http://127.0.0.1:{blackhole.port}", exit_flush_timeout_s=2
    )
    script = (
        "import mlflow\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        "mlflow.start_run()\n"
        "for step in range(500):\n"
        "    mlflow.log_metric('loss', float(step), step=step)\n"
    )
    try:
        started = time.monotonic()
        completed = subprocess.run(
            [sys.executable, "-c", script], env=subprocess_env, capture_output=True, text=True,
            timeout=120,
        )
        elapsed_s = time.monotonic() - started
    finally:
        blackhole.close()

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "exit flush of the secondary backend stopped (timed out after 2 s)" in completed.stderr
    assert "queued entities were not sent and they stay in the spool" in completed.stderr
    # Interpreter start-up and imports take most of this; the flush itself waits 2 s.
    assert elapsed_s < 30


def test_copy_during_concurrent_logging_loses_nothing(rig):
    primary, secondary = backend_clients(rig)
    experiment_id = primary.create_experiment(unique_path())
    run = primary.create_run(experiment_id)
    for step in range(100):
        primary.log_metric(run.info.run_id, "before", float(step), step=step)
    # A small queue makes callers block while the worker copies the run from the primary.
    uri = rig.dual_tracking_uri(
        buffer_capacity_points=64, flush_threshold_points=32
    )
    client = MlflowClient(tracking_uri=uri)

    def log_points(key):
        for step in range(1_000):
            client.log_metric(run.info.run_id, key, float(step), step=step)

    threads = [threading.Thread(target=log_points, args=(f"k{index}",)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _get_store(uri).flush(timeout_s=300)

    mirror_id = primary.get_run(run.info.run_id).data.tags["azdual.secondary_run_id"]
    for key in ["before", "k0", "k1", "k2", "k3"]:
        expected = metric_points(primary, run.info.run_id, key)
        assert metric_points(secondary, mirror_id, key) == expected, key
        assert len(expected) == (100 if key == "before" else 1_000)
