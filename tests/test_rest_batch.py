"""The hand-built LogBatch body equals the one MLflow builds through protobuf."""

import json

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.protos.service_pb2 import LogBatch
from mlflow.utils.proto_json_utils import message_to_json

from mlflow_azdual.rest_batch import log_batch_body


def mlflow_body(run_id, metrics, params, tags):
    request = LogBatch(
        run_id=run_id,
        metrics=[metric.to_proto() for metric in metrics],
        params=[param.to_proto() for param in params],
        tags=[tag.to_proto() for tag in tags],
    )
    return json.loads(message_to_json(request))


METRICS = [
    Metric("loss", 1.5, 1_700_000_000_000, 3),
    Metric("nan", float("nan"), 1, 0),
    Metric("up", float("inf"), 2, -1),
    Metric("down", -float("inf"), 3, 2**40),
    Metric("int", 7, 4, 0),
]


@pytest.mark.parametrize(
    ("metrics", "params", "tags"),
    [
        (METRICS, [Param("alpha", "0.5")], [RunTag("team", "churn")]),
        (METRICS, [], []),
        ([], [Param("alpha", "0.5")], []),
        ([], [], [RunTag("mlflow.note.content", "ünïcode ✓")]),
    ],
)
def test_body_matches_mlflow(metrics, params, tags):
    assert json.loads(log_batch_body("run-1", metrics, params, tags)) == mlflow_body(
        "run-1", metrics, params, tags
    )


def test_body_carries_model_and_dataset_fields():
    metric = Metric("acc", 0.9, 5, 1, model_id="m-1", dataset_name="train", dataset_digest="d1")
    assert json.loads(log_batch_body("run-1", [metric], [], [])) == mlflow_body(
        "run-1", [metric], [], []
    )
