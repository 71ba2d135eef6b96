"""Dead letters, strict mode and the spool's artifact cap, against the rig's servers.

A secondary-only rejection is made by logging a param on the secondary mirror directly, so
that the same key with another value, accepted by the primary, is rejected by the secondary
(MLflow never lets a param change its value).
"""

import json
import logging
import os
import subprocess
import sys
import urllib.parse

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import _get_store

import mlflow_azdual
from mlflow_azdual.uri import explicit_tracking_uri
from rig.servers import PLUGIN_PROFILE_OPTIONS
from rig.latency_proxy import LatencyProxy
from tests.dual_helpers import backend_clients, metric_points, secondary_run_id, unique_path

FAST_RETRY = {
    "retry_initial_backoff_s": 0.2,
    "retry_max_backoff_s": 1,
    "retry_attempt_timeout_s": 10,
    "flush_interval_s": 0.2,
}


def _uri(rig, tmp_path, secondary_uri=None, **options):
    return explicit_tracking_uri(
        rig.primary_uri,
        secondary_uri or rig.secondary_uri,
        **PLUGIN_PROFILE_OPTIONS,
        spool_dir=str(tmp_path / "spool"),
        **FAST_RETRY,
        **options,
    )


def _status(uri, env):
    completed = subprocess.run(
        [sys.executable, "-m", "mlflow_azdual.cli", "status", uri, "--json", "--dead-letters"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def _start_run_with_conflicting_param(rig, uri):
    """Start a run whose secondary mirror already has param ``lr`` = 0.1."""
    primary, secondary = backend_clients(rig)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(unique_path())
    run = mlflow.start_run()
    mlflow.log_metric("loss", 1.0, step=0)
    mirror_id = secondary_run_id(primary, run.info.run_id)
    secondary.log_param(mirror_id, "lr", "0.1")
    return run, mirror_id


def test_rejected_write_becomes_dead_letter_and_others_arrive(rig, tmp_path, subprocess_env, caplog):
    caplog.set_level(logging.ERROR, logger="mlflow_azdual")
    uri = _uri(rig, tmp_path)
    primary, secondary = backend_clients(rig)
    run, mirror_id = _start_run_with_conflicting_param(rig, uri)
    mlflow.log_param("lr", "0.2")
    for step in range(1, 50):
        mlflow.log_metric("loss", 1.0 / step, step=step)
    mlflow.set_tag("stage", "done")
    mlflow.end_run()
    assert mlflow_azdual.flush(timeout_s=60)

    assert primary.get_run(run.info.run_id).data.params == {"lr": "0.2"}
    mirror = secondary.get_run(mirror_id)
    assert mirror.data.params == {"lr": "0.1"}
    assert mirror.data.tags["stage"] == "done"
    assert [point[0] for point in metric_points(secondary, mirror_id, "loss")] == list(range(50))
    rejected = [r.getMessage() for r in caplog.records if "dead letter" in r.getMessage()]
    assert rejected and "operation=log_batch" in rejected[0]

    status = _status(uri, subprocess_env)
    assert status["backends"]["secondary"]["dead_letters"] == 1
    (letter,) = status["dead_letters"]
    assert letter["run_id"] == run.info.run_id
    assert "INVALID_PARAMETER_VALUE" in letter["reason"]


def test_strict_mode_raises_rejection_at_end_run(rig, tmp_path):
    uri = _uri(rig, tmp_path, strict=True)
    primary, _ = backend_clients(rig)
    run, _ = _start_run_with_conflicting_param(rig, uri)
    mlflow.log_param("lr", "0.2")
    with pytest.raises(MlflowException, match="strict mode") as raised:
        mlflow.end_run()
    assert "log_batch" in raised.value.message
    assert run.info.run_id in raised.value.message
    assert primary.get_run(run.info.run_id).info.status == "FINISHED"


def test_strict_mode_raises_give_up_and_writer_recovers(rig, tmp_path):
    primary, secondary = backend_clients(rig)
    port = urllib.parse.urlsplit(rig.secondary_uri).port
    with LatencyProxy(port, log_path=tmp_path / "proxy.log") as proxy:
        uri = _uri(rig, tmp_path, proxy.uri, strict=True, retry_total_s=2, flush_timeout_s=6)
        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(client.create_experiment(unique_path()))
        assert mlflow_azdual.flush(timeout_s=60)
        proxy.down(60)
        for step in range(20):
            client.log_metric(run.info.run_id, "loss", float(step), step=step)
        with pytest.raises(MlflowException, match="strict mode") as raised:
            client.set_terminated(run.info.run_id)
        assert "not delivered" in raised.value.message
        assert primary.get_run(run.info.run_id).info.status == "FINISHED"

        proxy.up()
        # The writer goes on probing after giving up, so the writes arrive without a restart.
        assert _get_store(uri).secondary_queue.flush(timeout_s=60)
    mirror_id = secondary_run_id(primary, run.info.run_id)
    assert [point[0] for point in metric_points(secondary, mirror_id, "loss")] == list(range(20))
    assert secondary.get_run(mirror_id).info.status == "FINISHED"


@pytest.mark.parametrize("strict", [False, True])
def test_artifact_over_spool_cap(rig, tmp_path, subprocess_env, strict, caplog):
    caplog.set_level(logging.WARNING, logger="mlflow_azdual")
    uri = _uri(rig, tmp_path, spool_max_artifact_bytes=1000, strict=strict)
    primary, _ = backend_clients(rig)
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(5000))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(unique_path())
    with mlflow.start_run() as run:
        if strict:
            with pytest.raises(MlflowException, match="spool_max_artifact_bytes"):
                mlflow.log_artifact(str(big))
        else:
            mlflow.log_artifact(str(big))
    assert [item.path for item in primary.list_artifacts(run.info.run_id)] == ["weights.bin"]
    if not strict:
        assert any("spool_max_artifact_bytes" in r.getMessage() for r in caplog.records)
        status = _status(uri, subprocess_env)
        assert status["backends"]["secondary"]["dead_letters"] == 1
        assert status["dead_letters"][0]["operation"] == "artifact.log_artifact"


def test_rejected_history_check_sends_unchecked(rig, tmp_path, caplog):
    """Before re-sending after a rejection, the writer reads what the secondary has. With the
    mlflow profile it requests history pages larger than the Azure ML stand-in takes, and that
    rejected read must not turn the points into dead letters."""
    caplog.set_level(logging.WARNING, logger="mlflow_azdual")
    uri = explicit_tracking_uri(
        rig.primary_uri, rig.secondary_uri, spool_dir=str(tmp_path / "spool"), **FAST_RETRY
    )
    primary, secondary = backend_clients(rig)
    run, mirror_id = _start_run_with_conflicting_param(rig, uri)
    mlflow.log_param("lr", "0.2")
    for step in range(1, 50):
        mlflow.log_metric("loss", 1.0 / step, step=step)
    mlflow.end_run()
    assert mlflow_azdual.flush(timeout_s=60)

    assert [point[0] for point in metric_points(secondary, mirror_id, "loss")] == list(range(50))
    assert secondary.get_run(mirror_id).data.params == {"lr": "0.1"}
    unchecked = [r.getMessage() for r in caplog.records if "without that check" in r.getMessage()]
    assert unchecked and run.info.run_id not in unchecked[0]
    assert mirror_id in unchecked[0]
    spool = _get_store(uri).spool()
    spool.commit()
    assert spool.counts()["secondary"]["dead_letters"] == 1
