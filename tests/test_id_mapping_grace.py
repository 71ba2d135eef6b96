"""A run created through the plugin is copied to the secondary only after its creator had time."""

import time

import pytest
from mlflow.entities import Run, RunData, RunTag

from mlflow_azdual.id_mapping import CREATED_THROUGH_PLUGIN_TAG, MIRROR_CREATION_GRACE_S, IdMapping
from mlflow_azdual.retry import NotReadyError
from tests.mlflow_versions import run_info


def _run(age_s, status="RUNNING", through_plugin=True):
    info = run_info(
        "r1", experiment_id="0", user_id="u", status=status,
        start_time=int((time.time() - age_s) * 1000), end_time=None, lifecycle_stage="active",
    )
    tags = [RunTag(CREATED_THROUGH_PLUGIN_TAG, "true")] if through_plugin else []
    return Run(info, RunData(tags=tags))


def test_young_plugin_run_waits_for_creator():
    with pytest.raises(NotReadyError, match="r1"):
        IdMapping._wait_for_creator(_run(age_s=1))


@pytest.mark.parametrize(
    "run",
    [
        _run(age_s=MIRROR_CREATION_GRACE_S + 5),
        _run(age_s=1, status="FINISHED"),
        _run(age_s=1, through_plugin=False),
    ],
    ids=["old", "finished", "created-without-plugin"],
)
def test_other_runs_are_copied_at_once(run):
    assert IdMapping._wait_for_creator(run) is None
