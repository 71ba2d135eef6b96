"""Searches go to the primary, and the secondary's throttling costs no writes.

The plugin sends the secondary only its id-mapping lookups.

The rig's secondary runs behind a policy proxy that emulates the search restrictions reported
for Azure ML (no OR, no `!=` or LIKE on tags, no ordering by metrics, params or tags,
Azure/azure-sdk-for-python#41453). These are emulations of public reports, not Azure ML. The
proxy records the filter of each search request, so the test can list what reached it.
"""

import re

import mlflow

import mlflow_azdual
from tests.dual_helpers import backend_clients, metric_points, secondary_run_id, unique_path

# Filters of the plugin's lookups on the secondary: one equality on one of its own tags, or on
# a registered model's name.
ID_MAPPING_FILTER = re.compile(r"^tags\.`azdual\.[a-z_]+` = '[^']*'$")
MODEL_NAME_FILTER = re.compile(r"^name ?= ?'[^']*'$")
SEARCH_RULES = ("search_rejects_or", "search_rejects_tag_not_equal", "search_rejects_tag_like",
                "search_rejected_order_by_prefixes")


def new_search_filters(before: dict, after: dict) -> list:
    """Return the search requests recorded between two stats snapshots of one proxy."""
    count = sum(n for route, n in after["routes"].items() if route.endswith("/search")) - sum(
        n for route, n in before["routes"].items() if route.endswith("/search")
    )
    assert count <= len(after["search_filters"]), "more searches than the proxy keeps"
    return after["search_filters"][len(after["search_filters"]) - count:] if count else []


def test_searches_stay_on_primary(rig, dual, iris_model):
    primary, secondary = backend_clients(rig)
    model, _ = iris_model
    control = rig.policy_control("secondary")
    before = control.stats()
    name = "search-" + unique_path().split("/")[-2]
    experiment = mlflow.set_experiment(unique_path())
    mlflow.set_experiment_tag("team", "vision")

    with mlflow.start_run() as parent:
        mlflow.set_tag("team", "vision")
        with mlflow.start_run(nested=True) as child:
            mlflow.log_metric("acc", 0.9)
            mlflow.log_param("depth", 3)
            mlflow.sklearn.log_model(model, name="model", registered_model_name=name)
    # A second process that finds an existing mirror looks it up by tag.
    mlflow_azdual.flush(timeout_s=120)

    runs = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string="tags.team != 'audio' and tags.`mlflow.runName` LIKE '%'",
        order_by=["metrics.acc DESC", "params.depth ASC", "tags.team"],
        output_format="list",
    )
    assert {run.info.run_id for run in runs} == {parent.info.run_id}
    ordered = mlflow.search_runs(
        [experiment.experiment_id], order_by=["metrics.acc DESC"], output_format="list"
    )
    assert ordered[0].info.run_id == child.info.run_id
    experiments = mlflow.search_experiments(filter_string="tags.team != 'audio'")
    assert experiment.experiment_id in {found.experiment_id for found in experiments}
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    assert [version.version for version in versions] == ["1"]
    assert mlflow_azdual.flush(timeout_s=120)

    after = control.stats()
    for rule in SEARCH_RULES:
        assert after["rejected"].get(rule, 0) == before["rejected"].get(rule, 0), rule
    for search in new_search_filters(before, after):
        allowed = ID_MAPPING_FILTER if search["route"] != "model-versions/search" else (
            MODEL_NAME_FILTER
        )
        assert allowed.match(search["filter"]), search

    child_mirror = secondary.get_run(secondary_run_id(primary, child.info.run_id))
    parent_mirror_id = secondary_run_id(primary, parent.info.run_id)
    assert child_mirror.data.tags["mlflow.parentRunId"] == parent_mirror_id


def test_throttled_secondary_gets_every_point(rig, dual):
    """The Azure ML stand-in returns 429 with Retry-After for log-batch; nothing is lost."""
    primary, secondary = backend_clients(rig)
    control = rig.policy_control("secondary")
    mlflow.set_experiment(unique_path())
    with mlflow.start_run() as run:
        mlflow.log_metric("warmup", 1.0)
        assert mlflow_azdual.flush(timeout_s=120)
        throttled_before = control.stats()["throttled"]
        control.throttle(2, 1)
        for step in range(300):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    assert mlflow_azdual.flush(timeout_s=120)

    assert control.stats()["throttled"] == throttled_before + 2
    mirror_id = secondary_run_id(primary, run.info.run_id)
    assert metric_points(secondary, mirror_id, "loss") == metric_points(
        primary, run.info.run_id, "loss"
    )
    assert len(metric_points(secondary, mirror_id, "loss")) == 300
