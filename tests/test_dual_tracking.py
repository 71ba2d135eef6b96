"""Tracking writes through the azdual URI land on both rig servers; reads come from the primary.

The rig's two `mlflow server` processes stand in for Databricks (primary) and Azure ML
(secondary). Each test reads both servers back with plain MlflowClients.
"""

import logging
import time

import mlflow
import pytest

import mlflow_azdual
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from mlflow_azdual.experiment_names import disambiguate
from mlflow_azdual.id_mapping import (
    COPIED_EXCEPT_ARTIFACTS,
    COPY_STATUS_TAG,
    COPYING,
    PRIMARY_EXPERIMENT_NAME_TAG,
    PRIMARY_RUN_ID_TAG,
    SECONDARY_EXPERIMENT_ID_TAG,
)
from tests.dual_helpers import (
    backend_clients,
    dual_tracking_uri,
    metric_points,
    mirrored_user_tags,
    secondary_experiment,
    secondary_run_id,
    unique_path,
    user_tags,
)
from tests.mlflow_versions import needs_delete_experiment_tag


@pytest.mark.smoke
def test_fluent_run_lands_on_both(rig, dual):
    primary, secondary = backend_clients(rig)
    path = unique_path("baseline")
    experiment = mlflow.set_experiment(path)

    with mlflow.start_run(run_name="fluent") as run:
        mlflow.log_param("alpha", 0.5)
        mlflow.log_params({"depth": 3, "solver": "lbfgs"})
        for epoch in range(20):
            mlflow.log_metric("epoch_loss", 1.0 / (epoch + 1), step=epoch)
        mlflow.set_tag("team", "churn")

    mirror_id = secondary_run_id(primary, run.info.run_id)
    primary_run, secondary_run = primary.get_run(run.info.run_id), secondary.get_run(mirror_id)
    assert secondary_run.data.params == primary_run.data.params
    assert secondary_run.data.params == {"alpha": "0.5", "depth": "3", "solver": "lbfgs"}
    assert metric_points(secondary, mirror_id, "epoch_loss") == metric_points(
        primary, run.info.run_id, "epoch_loss"
    )
    assert len(metric_points(secondary, mirror_id, "epoch_loss")) == 20
    assert user_tags(secondary_run.data.tags) == mirrored_user_tags(primary_run.data.tags)
    assert "mlflow.user" in primary_run.data.tags
    assert "mlflow.user" not in secondary_run.data.tags
    assert secondary_run.data.tags[PRIMARY_RUN_ID_TAG] == run.info.run_id
    assert secondary_run.info.status == primary_run.info.status == "FINISHED"
    assert secondary_run.info.run_name == "fluent"

    mirrored_experiment = secondary_experiment(secondary, experiment.experiment_id)
    assert mirrored_experiment.name == "baseline" or mirrored_experiment.name.startswith("baseline-")
    assert mirrored_experiment.tags[PRIMARY_EXPERIMENT_NAME_TAG] == path
    assert (
        primary.get_experiment(experiment.experiment_id).tags[SECONDARY_EXPERIMENT_ID_TAG]
        == mirrored_experiment.experiment_id
    )


def test_set_experiment_twice_reuses_experiment(rig, dual):
    path = unique_path()
    first = mlflow.set_experiment(path)
    second = mlflow.set_experiment(path)
    assert first.experiment_id == second.experiment_id


@pytest.mark.smoke
def test_client_log_batch_lands_on_both(rig, dual):
    primary, secondary = backend_clients(rig)
    experiment_id = dual.create_experiment(unique_path())
    run = dual.create_run(experiment_id)
    now = int(time.time() * 1000)
    metrics = [Metric("m", float(step), now + step, step) for step in range(150)]
    params = [Param(f"p{index}", str(index)) for index in range(20)]
    tags = [RunTag(f"t{index}", "x") for index in range(5)]

    dual.log_batch(run.info.run_id, metrics=metrics, params=params, tags=tags)

    mirror_id = secondary_run_id(primary, run.info.run_id)
    assert len(metric_points(secondary, mirror_id, "m")) == 150
    assert metric_points(secondary, mirror_id, "m") == metric_points(primary, run.info.run_id, "m")
    assert secondary.get_run(mirror_id).data.params == {f"p{i}": str(i) for i in range(20)}
    assert user_tags(secondary.get_run(mirror_id).data.tags) == mirrored_user_tags(
        primary.get_run(run.info.run_id).data.tags
    )


def test_delete_tag_on_both(rig, dual):
    primary, secondary = backend_clients(rig)
    run = dual.create_run(dual.create_experiment(unique_path()))
    dual.set_tag(run.info.run_id, "stage", "draft")
    dual.delete_tag(run.info.run_id, "stage")

    mirror_id = secondary_run_id(primary, run.info.run_id)
    assert "stage" not in primary.get_run(run.info.run_id).data.tags
    assert "stage" not in secondary.get_run(mirror_id).data.tags


@pytest.mark.smoke
def test_experiment_tags_on_both(rig, dual):
    primary, secondary = backend_clients(rig)
    experiment_id = dual.create_experiment(unique_path(), tags={"owner": "ana"})
    dual.set_experiment_tag(experiment_id, "stage", "dev")

    mirrored = secondary_experiment(secondary, experiment_id)
    assert mirrored.tags["owner"] == "ana"
    assert mirrored.tags["stage"] == "dev"
    assert primary.get_experiment(experiment_id).tags["stage"] == "dev"


@needs_delete_experiment_tag
@pytest.mark.smoke
def test_delete_experiment_tag_on_both(rig, dual):
    primary, secondary = backend_clients(rig)
    experiment_id = dual.create_experiment(unique_path())
    dual.set_experiment_tag(experiment_id, "temporary", "1")
    dual.delete_experiment_tag(experiment_id, "temporary")

    mirrored = secondary_experiment(secondary, experiment_id)
    assert "temporary" not in mirrored.tags
    assert "temporary" not in primary.get_experiment(experiment_id).tags


def test_delete_and_restore_run_on_both(rig, dual):
    primary, secondary = backend_clients(rig)
    run = dual.create_run(dual.create_experiment(unique_path()))
    mirror_id = secondary_run_id(primary, run.info.run_id)

    dual.delete_run(run.info.run_id)
    assert mlflow_azdual.flush(timeout_s=60)
    assert primary.get_run(run.info.run_id).info.lifecycle_stage == "deleted"
    assert secondary.get_run(mirror_id).info.lifecycle_stage == "deleted"

    dual.restore_run(run.info.run_id)
    assert mlflow_azdual.flush(timeout_s=60)
    assert primary.get_run(run.info.run_id).info.lifecycle_stage == "active"
    assert secondary.get_run(mirror_id).info.lifecycle_stage == "active"


def test_delete_and_restore_experiment_on_both(rig, dual):
    _, secondary = backend_clients(rig)
    experiment_id = dual.create_experiment(unique_path())
    mirrored = secondary_experiment(secondary, experiment_id)

    dual.delete_experiment(experiment_id)
    assert mlflow_azdual.flush(timeout_s=60)
    assert secondary.get_experiment(mirrored.experiment_id).lifecycle_stage == "deleted"
    dual.restore_experiment(experiment_id)
    assert mlflow_azdual.flush(timeout_s=60)
    assert secondary.get_experiment(mirrored.experiment_id).lifecycle_stage == "active"


def test_nested_runs_nest_on_both(rig, dual):
    primary, secondary = backend_clients(rig)
    mlflow.set_experiment(unique_path())
    with mlflow.start_run() as parent:
        with mlflow.start_run(nested=True) as child:
            mlflow.log_metric("inner", 1.0)

    parent_mirror = secondary_run_id(primary, parent.info.run_id)
    child_mirror = secondary_run_id(primary, child.info.run_id)
    child_tags = secondary.get_run(child_mirror).data.tags
    assert primary.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child_tags["mlflow.parentRunId"] == parent_mirror


def test_colliding_paths_get_distinct_names(rig, dual):
    _, secondary = backend_clients(rig)
    leaf = unique_path().split("/")[-2]
    first_path = f"/Users/ana@example.com/{leaf}"
    second_path = f"/Users/ben@example.com/{leaf}"

    first_id = dual.create_experiment(first_path)
    second_id = dual.create_experiment(second_path)

    first = secondary_experiment(secondary, first_id)
    second = secondary_experiment(secondary, second_id)
    assert first.name == leaf
    assert second.name == disambiguate(leaf, second_path)
    assert second.tags[PRIMARY_EXPERIMENT_NAME_TAG] == second_path


def test_search_runs_passes_paging_and_order(rig, dual):
    primary, _ = backend_clients(rig)
    experiment_id = dual.create_experiment(unique_path())
    for index in range(5):
        run = dual.create_run(experiment_id)
        dual.log_metric(run.info.run_id, "score", float(index))

    dual_page = dual.search_runs([experiment_id], order_by=["metrics.score DESC"], max_results=2)
    plain_page = primary.search_runs([experiment_id], order_by=["metrics.score DESC"], max_results=2)
    assert [r.info.run_id for r in dual_page] == [r.info.run_id for r in plain_page]
    assert [r.data.metrics["score"] for r in dual_page] == [4.0, 3.0]

    next_page = dual.search_runs(
        [experiment_id], order_by=["metrics.score DESC"], max_results=2,
        page_token=dual_page.token,
    )
    assert [r.data.metrics["score"] for r in next_page] == [2.0, 1.0]


def test_primary_error_raises_and_is_not_mirrored(rig, dual):
    primary, secondary = backend_clients(rig)
    run = dual.create_run(dual.create_experiment(unique_path()))
    dual.log_param(run.info.run_id, "alpha", "1")

    with pytest.raises(MlflowException) as dual_error:
        dual.log_param(run.info.run_id, "alpha", "2")
    with pytest.raises(MlflowException) as plain_error:
        primary.log_param(run.info.run_id, "alpha", "2")

    assert dual_error.value.error_code == plain_error.value.error_code
    mirror_id = secondary_run_id(primary, run.info.run_id)
    assert secondary.get_run(mirror_id).data.params == {"alpha": "1"}


def test_run_resumed_in_second_process(rig, dual, subprocess_env):
    import subprocess
    import sys

    primary, secondary = backend_clients(rig)
    experiment_id = dual.create_experiment(unique_path())
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("loss", 1.0, step=0)

    script = "import mlflow\nwith mlflow.start_run():\n    mlflow.log_metric('loss', 0.5, step=1)\n"
    environ = {**subprocess_env, "MLFLOW_TRACKING_URI": dual_tracking_uri(rig),
               "MLFLOW_RUN_ID": run.info.run_id}
    completed = subprocess.run(
        [sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]

    mirror_id = secondary_run_id(primary, run.info.run_id)
    assert [point[:2] for point in metric_points(secondary, mirror_id, "loss")] == [
        (0, 1.0), (1, 0.5)
    ]
    mirrored_experiment = secondary_experiment(secondary, experiment_id)
    assert len(secondary.search_runs([mirrored_experiment.experiment_id])) == 1


def test_plain_run_copied_on_first_write(rig, dual):
    primary, secondary = backend_clients(rig)
    experiment_id = primary.create_experiment(unique_path())
    run = primary.create_run(experiment_id, tags={"origin": "plain"})
    primary.log_param(run.info.run_id, "alpha", "0.1")
    for step in range(3):
        primary.log_metric(run.info.run_id, "loss", 1.0 - step / 10, step=step)

    dual.log_metric(run.info.run_id, "loss", 0.5, step=3)

    mirror_id = secondary_run_id(primary, run.info.run_id)
    mirrored = secondary.get_run(mirror_id)
    assert mirrored.data.params == {"alpha": "0.1"}
    assert mirrored.data.tags["origin"] == "plain"
    assert metric_points(secondary, mirror_id, "loss") == metric_points(
        primary, run.info.run_id, "loss"
    )
    assert len(metric_points(secondary, mirror_id, "loss")) == 4
    assert mirrored.data.tags[COPY_STATUS_TAG] == COPIED_EXCEPT_ARTIFACTS


def test_partial_copy_completed_on_first_write(rig, dual):
    """A copy cut short (its process killed) is completed, not used as if it were whole."""
    primary, secondary = backend_clients(rig)
    experiment_id = primary.create_experiment(unique_path())
    run = primary.create_run(experiment_id, tags={"origin": "plain"})
    run_id = run.info.run_id
    primary.log_batch(run_id, params=[Param("alpha", "0.1"), Param("beta", "2")])
    for step in range(5):
        primary.log_metric(run_id, "loss", 1.0 - step / 10, step=step)
    # What a copy killed after its first request leaves: the mirror, one param, two points.
    mirror_experiment_id = secondary.create_experiment(
        "partial-" + unique_path().split("/")[-2],
        tags={"azdual.primary_experiment_id": experiment_id},
    )
    primary.set_experiment_tag(experiment_id, SECONDARY_EXPERIMENT_ID_TAG, mirror_experiment_id)
    partial = secondary.create_run(
        mirror_experiment_id, tags={PRIMARY_RUN_ID_TAG: run_id, COPY_STATUS_TAG: COPYING}
    )
    secondary.log_param(partial.info.run_id, "alpha", "0.1")
    history = primary.get_metric_history(run_id, "loss")
    secondary.log_batch(partial.info.run_id, metrics=sorted(history, key=lambda m: m.step)[:2])

    dual.log_metric(run_id, "loss", 0.5, step=5)

    assert secondary_run_id(primary, run_id) == partial.info.run_id
    completed = secondary.get_run(partial.info.run_id)
    assert completed.data.params == {"alpha": "0.1", "beta": "2"}
    assert completed.data.tags["origin"] == "plain"
    assert completed.data.tags[COPY_STATUS_TAG] == COPIED_EXCEPT_ARTIFACTS
    assert metric_points(secondary, partial.info.run_id, "loss") == metric_points(
        primary, run_id, "loss"
    )
    assert len(metric_points(secondary, partial.info.run_id, "loss")) == 6


@pytest.mark.smoke
def test_secondary_down_mid_run(rig, dual, caplog):
    primary, secondary = backend_clients(rig)
    mlflow.set_experiment(unique_path())
    caplog.set_level(logging.WARNING, logger="mlflow_azdual")
    try:
        with mlflow.start_run() as run:
            mlflow.log_metric("loss", 1.0, step=0)
            assert mlflow_azdual.flush(timeout_s=60)
            rig.stop_server("secondary")
            started = time.monotonic()
            for step in range(1, 4):
                mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            mlflow.log_param("after_outage", "yes")
            caller_s = time.monotonic() - started
        # The writes wait for the secondary instead of being dropped.
        assert not mlflow_azdual.flush(timeout_s=3)
    finally:
        rig.start_server("secondary")
    assert mlflow_azdual.flush(timeout_s=120)

    assert len(metric_points(primary, run.info.run_id, "loss")) == 4
    assert primary.get_run(run.info.run_id).data.params == {"after_outage": "yes"}
    assert primary.get_run(run.info.run_id).info.status == "FINISHED"
    retries = [r.getMessage() for r in caplog.records if "write failed, retrying" in r.getMessage()]
    assert retries, "expected a WARNING for the retried secondary write"
    assert f"run_id={run.info.run_id}" in retries[0]
    assert "operation=log_batch" in retries[0]
    # The caller never waits for the secondary: its writes are queued.
    assert caller_s < 5
    mirror_id = secondary_run_id(primary, run.info.run_id)
    assert [point[0] for point in metric_points(secondary, mirror_id, "loss")] == [0, 1, 2, 3]
    mirror = secondary.get_run(mirror_id)
    assert mirror.data.params == {"after_outage": "yes"}
    assert mirror.info.status == "FINISHED"
