"""`mlflow-azdual mirror` and `mlflow-azdual diff` on runs logged with plain MLflow.

The runs are written straight to the rig's primary server (the Databricks stand-in) without
the plugin, as months of runs logged before a team adopted it would be. The commands run as
child processes, as a user runs them. The rig's policy proxies emulate the published limits of
Databricks and Azure ML (250 values of one metric key per request, metric-history pages under
1,000 points, params of at most 500 characters), not the services themselves.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from mlflow_azdual.id_mapping import (
    COMPLETE,
    COPY_STATUS_TAG,
    COPYING,
    PRIMARY_RUN_ID_TAG,
    SECONDARY_EXPERIMENT_ID_TAG,
)
from tests.dual_helpers import backend_clients, metric_points, unique_path

LONG_PARAM = "x" * 700
HISTORY_POINTS = 1_500
ARTIFACT_FILES = 105
# Routes of the secondary's tracking API that write.
WRITE_ROUTES = ("runs/create", "runs/log-batch", "runs/set-tag", "runs/update", "runs/delete",
                "experiments/create", "registered-models/create", "model-versions/create",
                "model-versions/set-tag", "runs/log-model")


def run_command(rig, env, *arguments, timeout_s=600):
    """Run `mlflow-azdual` in a child process; return the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "mlflow_azdual.cli", *arguments, rig.dual_tracking_uri()],
        env=env, capture_output=True, text=True, timeout=timeout_s,
    )


def log_plain_run(client, experiment_id, tmp_path, name="plain", model_name=None,
                  artifact_files=ARTIFACT_FILES):
    """Log a run with plain MLflow straight to the primary; return its id."""
    run = client.create_run(experiment_id, run_name=name, tags={"team": "vision"})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param("alpha", "0.5"), Param("long", LONG_PARAM)])
    now_ms = int(time.time() * 1000)
    points = [Metric("loss", 1.0 / (step + 1), now_ms + step, step) for step in range(HISTORY_POINTS)]
    for start in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[start : start + 1000])
    client.log_metric(run_id, "accuracy", 0.93, step=0)

    folder = tmp_path / f"{name}-artifacts"
    (folder / "shards").mkdir(parents=True)
    for index in range(artifact_files):
        (folder / "shards" / f"part-{index:03d}.txt").write_text(f"shard {index}\n" * (index + 1))
    (folder / "README.txt").write_text("plain run\n")
    client.log_artifacts(run_id, str(folder))

    if model_name is not None:
        model_folder = tmp_path / f"{name}-model"
        model_folder.mkdir()
        (model_folder / "MLmodel").write_text("artifact_path: model\nflavors: {}\n")
        (model_folder / "weights.bin").write_bytes(b"\x00" * 2048)
        client.log_artifacts(run_id, str(model_folder), "model")
        client.create_registered_model(model_name)
        client.create_model_version(
            model_name, f"{run.info.artifact_uri}/model", run_id=run_id, tags={"stage": "candidate"}
        )
    client.set_terminated(run_id)
    return run_id


def secondary_mirror(secondary, primary, run_id):
    """Return the secondary run tagged as the mirror of `run_id`, or None."""
    from mlflow.entities import ViewType

    experiment_id = primary.get_run(run_id).info.experiment_id
    mirror_experiment_id = primary.get_experiment(experiment_id).tags.get(
        SECONDARY_EXPERIMENT_ID_TAG
    )
    if mirror_experiment_id is None:
        return None
    found = secondary.search_runs(
        [mirror_experiment_id], f"tags.`{PRIMARY_RUN_ID_TAG}` = '{run_id}'", ViewType.ALL
    )
    return found[0] if found else None


def write_requests(stats) -> int:
    return sum(count for route, count in stats["routes"].items() if route in WRITE_ROUTES)


@pytest.fixture
def plain_experiment(rig):
    primary, _ = backend_clients(rig)
    path = unique_path("backfill")
    return primary, primary.create_experiment(path), path


def test_mirror_then_diff_reports_nothing(rig, subprocess_env, plain_experiment, tmp_path):
    primary, experiment_id, path = plain_experiment
    _, secondary = backend_clients(rig)
    model_name = "backfill-" + path.split("/")[-2]
    run_id = log_plain_run(primary, experiment_id, tmp_path, model_name=model_name)

    before = rig.policy_control("secondary").stats()
    started_s = time.monotonic()
    mirrored = run_command(rig, subprocess_env, "mirror", "--experiment", path,
                           "--max-requests-per-s", "0")
    elapsed_s = time.monotonic() - started_s
    assert mirrored.returncode == 0, mirrored.stderr
    assert "1 copied" in mirrored.stdout, mirrored.stdout
    assert "0 failed" in mirrored.stdout
    print(f"mirror of 1 run took {elapsed_s:.1f} s")

    mirror = secondary_mirror(secondary, primary, run_id)
    assert mirror is not None
    assert mirror.data.tags[COPY_STATUS_TAG] == COMPLETE
    assert mirror.data.params["alpha"] == "0.5"
    assert mirror.data.params["long"] == LONG_PARAM[:500]
    assert mirror.data.tags["azdual.truncated_param.long"] == str(len(LONG_PARAM))
    assert len(metric_points(secondary, mirror.info.run_id, "loss")) == HISTORY_POINTS
    # The direct server, because MLflow 3's listing also searches logged models, which the
    # Azure ML stand-in rejects.
    direct = MlflowClient(rig.secondary_server_uri)
    secondary_files = {info.path for info in direct.list_artifacts(mirror.info.run_id, "shards")}
    assert len(secondary_files) == ARTIFACT_FILES
    versions = secondary.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == 1
    assert versions[0].run_id == mirror.info.run_id
    assert versions[0].tags["stage"] == "candidate"
    after = rig.policy_control("secondary").stats()
    assert after["rejected"] == before["rejected"]

    compared = run_command(rig, subprocess_env, "diff", "--experiment", path)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "no differences in 1 run" in compared.stdout
    by_run = run_command(rig, subprocess_env, "diff", "--run-id", run_id, "--json")
    assert by_run.returncode == 0, by_run.stdout + by_run.stderr
    assert json.loads(by_run.stdout)["differences"] == []


def test_second_mirror_copies_nothing(rig, subprocess_env, plain_experiment, tmp_path):
    primary, experiment_id, path = plain_experiment
    log_plain_run(primary, experiment_id, tmp_path, "first", artifact_files=3)
    log_plain_run(primary, experiment_id, tmp_path, "second", artifact_files=3)
    first = run_command(rig, subprocess_env, "mirror", "--experiment", path,
                        "--max-requests-per-s", "0")
    assert first.returncode == 0, first.stderr
    assert "2 copied" in first.stdout
    # Without a terminal, progress is one line per run on stderr.
    assert "mirror 1/2 run " in first.stderr
    assert "mirror 2/2 run " in first.stderr

    control = rig.policy_control("secondary")
    before = control.stats()
    second = run_command(rig, subprocess_env, "mirror", "--experiment", path)
    after = control.stats()

    assert second.returncode == 0, second.stderr
    assert "0 copied, 0 completed, 2 skipped, 0 failed" in second.stdout
    assert "sent: 0 params, 0 tags, 0 metric points, 0 artifact files" in second.stdout
    assert write_requests(after) == write_requests(before)


def test_killed_mirror_resumes(rig, subprocess_env, plain_experiment, tmp_path):
    primary, experiment_id, path = plain_experiment
    _, secondary = backend_clients(rig)
    run_id = log_plain_run(primary, experiment_id, tmp_path, artifact_files=10)

    # Two requests per second make the copy take several seconds, so it is killed midway.
    command = [sys.executable, "-m", "mlflow_azdual.cli", "mirror", "--run-id", run_id,
               "--max-requests-per-s", "2", rig.dual_tracking_uri()]
    process = subprocess.Popen(command, env=subprocess_env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        mirror = None
        while time.monotonic() < deadline and process.poll() is None:
            mirror = secondary_mirror(secondary, primary, run_id)
            if mirror is not None and mirror.data.metrics:
                break
            time.sleep(0.2)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert mirror is not None, "the mirror was not created before the deadline"
    partial = secondary.get_run(mirror.info.run_id)
    assert partial.data.tags[COPY_STATUS_TAG] == COPYING
    assert len(metric_points(secondary, mirror.info.run_id, "loss")) < HISTORY_POINTS

    interrupted = run_command(rig, subprocess_env, "diff", "--run-id", run_id)
    assert interrupted.returncode == 1

    resumed = run_command(rig, subprocess_env, "mirror", "--run-id", run_id,
                          "--max-requests-per-s", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert "1 completed" in resumed.stdout, resumed.stdout
    completed = secondary.get_run(mirror.info.run_id)
    assert completed.data.tags[COPY_STATUS_TAG] == COMPLETE
    assert metric_points(secondary, mirror.info.run_id, "loss") == metric_points(
        primary, run_id, "loss"
    )
    compared = run_command(rig, subprocess_env, "diff", "--run-id", run_id)
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_diff_finds_primary_edits(rig, subprocess_env, plain_experiment, tmp_path):
    primary, experiment_id, path = plain_experiment
    run_id = log_plain_run(primary, experiment_id, tmp_path, artifact_files=3)
    mirrored = run_command(rig, subprocess_env, "mirror", "--run-id", run_id,
                           "--max-requests-per-s", "0")
    assert mirrored.returncode == 0, mirrored.stderr

    primary.log_param(run_id, "added", "1")
    primary.set_tag(run_id, "reviewed", "yes")
    primary.log_metric(run_id, "accuracy", 0.95, step=1)

    compared = run_command(rig, subprocess_env, "diff", "--run-id", run_id)
    assert compared.returncode == 1, compared.stdout + compared.stderr
    assert "param missing 'added'" in compared.stdout
    assert "tag missing 'reviewed'" in compared.stdout
    assert "metric points missing 'accuracy'" in compared.stdout

    as_json = run_command(rig, subprocess_env, "diff", "--experiment", path, "--json")
    assert as_json.returncode == 1
    document = json.loads(as_json.stdout)
    kinds = {(item["kind"], item["key"]) for item in document["differences"]}
    assert kinds == {("param_missing", "added"), ("tag_missing", "reviewed"),
                     ("metric_points_missing", "accuracy")}
    assert document["runs_compared"] == 1

    recheck = run_command(rig, subprocess_env, "mirror", "--run-id", run_id, "--recheck",
                          "--max-requests-per-s", "0")
    assert recheck.returncode == 0, recheck.stderr
    assert "1 completed" in recheck.stdout
    again = run_command(rig, subprocess_env, "diff", "--run-id", run_id)
    assert again.returncode == 0, again.stdout


def test_mirror_selects_runs(rig, subprocess_env, tmp_path):
    primary, secondary = backend_clients(rig)
    paths = [unique_path("chosen"), unique_path("other")]
    chosen_id, other_id = (primary.create_experiment(path) for path in paths)
    old = primary.create_run(chosen_id, start_time=1_600_000_000_000, run_name="old")
    recent = primary.create_run(chosen_id, run_name="recent")
    named = primary.create_run(other_id, run_name="named")
    left = primary.create_run(other_id, run_name="left")
    for run in (old, recent, named, left):
        primary.log_metric(run.info.run_id, "score", 1.0)
        primary.set_terminated(run.info.run_id)

    by_window = run_command(rig, subprocess_env, "mirror", "--experiment", chosen_id,
                            "--since", "2021-01-01", "--max-requests-per-s", "0")
    assert by_window.returncode == 0, by_window.stderr
    assert "1 run selected: 1 copied" in by_window.stdout
    by_id = run_command(rig, subprocess_env, "mirror", "--run-id", named.info.run_id,
                        "--max-requests-per-s", "0")
    assert by_id.returncode == 0, by_id.stderr
    assert "1 run selected: 1 copied" in by_id.stdout

    assert secondary_mirror(secondary, primary, recent.info.run_id) is not None
    assert secondary_mirror(secondary, primary, named.info.run_id) is not None
    assert secondary_mirror(secondary, primary, old.info.run_id) is None
    assert secondary_mirror(secondary, primary, left.info.run_id) is None


def test_mirror_rejects_bad_input(rig, subprocess_env):
    bad_time = run_command(rig, subprocess_env, "mirror", "--since", "yesterday")
    assert bad_time.returncode == 2
    assert "invalid time 'yesterday'" in bad_time.stderr
    bad_rate = run_command(rig, subprocess_env, "mirror", "--max-requests-per-s", "-1")
    assert bad_rate.returncode == 2
    assert "invalid rate '-1'" in bad_rate.stderr
    missing = run_command(rig, subprocess_env, "mirror", "--experiment", "/Shared/no-such-experiment")
    assert missing.returncode == 2
    assert "experiment '/Shared/no-such-experiment' not found on the primary" in missing.stderr


def test_request_gate_paces_calls():
    from mlflow_azdual.request_gate import RequestGate

    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    gate = RequestGate("secondary", 4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        gate.wait()
    assert gate.requests == 5
    assert now[0] == pytest.approx(1.0)
    assert slept == [pytest.approx(0.25)] * 4



def test_diff_of_live_run_is_clean(rig, dual, subprocess_env, iris_model):
    """A run logged through the plugin, with a model, matches by the same rules as a copy."""
    import mlflow

    import mlflow_azdual

    model, _ = iris_model
    name = "live-" + unique_path().split("/")[-2]
    mlflow.set_experiment(unique_path("live"))
    with mlflow.start_run() as run:
        mlflow.log_params({"alpha": "0.5", "long": LONG_PARAM})
        for step in range(20):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.sklearn.log_model(model, name="model", registered_model_name=name)
    assert mlflow_azdual.flush(timeout_s=120)

    compared = run_command(rig, subprocess_env, "diff", "--run-id", run.info.run_id)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "no differences in 1 run" in compared.stdout
