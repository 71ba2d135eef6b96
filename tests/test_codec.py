"""Encoding queued writes as JSON text for the spool, and decoding them back."""

import enum
import json
import math

import mlflow.entities
import pytest
from mlflow.entities import ExperimentTag, Metric, Param, RunTag

from mlflow_azdual.coalesce import LOG_BATCH, Write
from mlflow_azdual.codec import decode_write, encode_write

pytestmark = pytest.mark.smoke

# MLflow 3 added logged models, and the model_id and dataset fields of Metric.
needs_mlflow_3 = pytest.mark.skipif(
    not hasattr(mlflow.entities, "LoggedModelInput"), reason="needs MLflow 3 logged models"
)


def round_trip(write: Write) -> Write:
    payload = encode_write(write)
    return decode_write(write.seq, write.run_id, write.operation, payload)


def call_write(operation, **args):
    return Write(7, "run-1", operation=operation, args=args)


def test_metrics_round_trip():
    metrics = (Metric("loss", 0.5, 1_700_000_000_000, 3), Metric("acc", 1, 1_700_000_000_001, 0))
    decoded = round_trip(Write(1, "run-1", metrics=metrics))

    assert decoded.seq == 1
    assert decoded.run_id == "run-1"
    assert decoded.operation == LOG_BATCH
    assert [(m.key, m.value, m.timestamp, m.step) for m in decoded.metrics] == [
        ("loss", 0.5, 1_700_000_000_000, 3),
        ("acc", 1.0, 1_700_000_000_001, 0),
    ]
    assert all(isinstance(m, Metric) for m in decoded.metrics)


def test_metric_encoding_is_compact_list():
    payload = encode_write(Write(1, "run-1", metrics=(Metric("loss", 0.5, 10, 3),)))
    assert json.loads(payload) == {"metrics": [["loss", 0.5, 10, 3]]}


def test_non_finite_metrics_round_trip():
    values = [math.nan, math.inf, -math.inf]
    metrics = tuple(Metric("x", value, 10, step) for step, value in enumerate(values))
    decoded = round_trip(Write(1, "run-1", metrics=metrics)).metrics

    assert math.isnan(decoded[0].value)
    assert decoded[1].value == math.inf
    assert decoded[2].value == -math.inf


@needs_mlflow_3
def test_metric_model_id_round_trip():
    metric = Metric("loss", 0.5, 10, 1, model_id="m-123")
    decoded = round_trip(Write(1, "run-1", metrics=(metric,))).metrics[0]
    assert decoded.model_id == "m-123"
    assert decoded.dataset_name is None


@needs_mlflow_3
def test_metric_dataset_fields_round_trip():
    metric = Metric("loss", 0.5, 10, 1, dataset_name="train", dataset_digest="abc")
    payload = encode_write(Write(1, "run-1", metrics=(metric,)))
    decoded = decode_write(1, "run-1", LOG_BATCH, payload).metrics[0]

    assert json.loads(payload)["metrics"][0] == ["loss", 0.5, 10, 1, None, "train", "abc"]
    assert decoded.model_id is None
    assert decoded.dataset_name == "train"
    assert decoded.dataset_digest == "abc"


def test_params_and_tags_round_trip():
    write = Write(2, "run-1", params=(Param("lr", "0.1"),), tags=(RunTag("team", "ml"),))
    decoded = round_trip(write)

    assert [(p.key, p.value) for p in decoded.params] == [("lr", "0.1")]
    assert isinstance(decoded.params[0], Param)
    assert [(t.key, t.value) for t in decoded.tags] == [("team", "ml")]
    assert isinstance(decoded.tags[0], RunTag)
    assert decoded.metrics == ()


def test_json_args_round_trip():
    args = {
        "run_id": "run-1", "end_time": 1_700_000_000_000, "ratio": 0.25, "flag": True,
        "missing": None, "keys": ("a", "b"), "nested": {"inner": [1, 2.5, "x"]},
    }
    decoded = round_trip(call_write("update_run_info", **args))

    assert decoded.operation == "update_run_info"
    assert decoded.args["keys"] == ["a", "b"]
    assert decoded.args == {**args, "keys": ["a", "b"]}


def test_dollar_keys_are_escaped():
    args = {"data": {"$entity": "user", "$$double": 1, "$": 2, "plain": {"$mlflow_model": 3}}}
    write = call_write("set_tag", **args)
    decoded = round_trip(write)

    assert decoded.args == args
    stored = json.loads(encode_write(write))["args"]["data"]
    assert "$entity" not in stored
    assert stored["$$entity"] == "user"


def test_experiment_tag_round_trip():
    decoded = round_trip(call_write("set_experiment_tag", tag=ExperimentTag("owner", "me")))
    tag = decoded.args["tag"]

    assert isinstance(tag, ExperimentTag)
    assert (tag.key, tag.value) == ("owner", "me")


def test_entity_encoding_names_classes():
    payload = json.loads(encode_write(call_write("set_tag", tag=RunTag("k", "v"))))
    tag = payload["args"]["tag"]
    assert tag["$entity"] == "mlflow.entities.run_tag:RunTag"
    assert tag["$proto_type"] == "mlflow.RunTag"


def test_entity_list_round_trip():
    tags = [RunTag("a", "1"), RunTag("b", "2")]
    decoded = round_trip(call_write("create_run", experiment_id="1", tags=tags))
    assert [(t.key, t.value) for t in decoded.args["tags"]] == [("a", "1"), ("b", "2")]


def test_metric_and_param_entities_in_args():
    decoded = round_trip(
        call_write("log_metric", metric=Metric("m", math.nan, 5, 2), param=Param("p", "v"))
    )
    assert math.isnan(decoded.args["metric"].value)
    assert decoded.args["metric"].step == 2
    assert decoded.args["param"].value == "v"


@needs_mlflow_3
def test_logged_model_entities_round_trip():
    entities = mlflow.entities
    decoded = round_trip(
        call_write(
            "log_inputs",
            models=[entities.LoggedModelInput("m-1")],
            outputs=[entities.LoggedModelOutput("m-2", 4)],
            tags=[entities.LoggedModelTag("k", "v")],
            params=[entities.LoggedModelParameter("p", "1")],
        )
    )
    assert decoded.args["models"][0].model_id == "m-1"
    assert (decoded.args["outputs"][0].model_id, decoded.args["outputs"][0].step) == ("m-2", 4)
    assert decoded.args["tags"][0].value == "v"
    assert decoded.args["params"][0].value == "1"


def test_dataset_input_round_trip():
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset("train", "d1", "local", '{"uri": "/data"}', schema="{}")
    decoded = round_trip(
        call_write("log_inputs", datasets=[DatasetInput(dataset, [InputTag("context", "train")])])
    )
    result = decoded.args["datasets"][0]

    assert isinstance(result, DatasetInput)
    assert (result.dataset.name, result.dataset.digest) == ("train", "d1")
    assert result.dataset.source == '{"uri": "/data"}'
    assert result.tags[0].value == "train"


def test_registry_tags_round_trip():
    from mlflow.entities.model_registry import ModelVersionTag, RegisteredModelTag

    decoded = round_trip(
        call_write("tags", version=ModelVersionTag("a", "1"), model=RegisteredModelTag("b", "2"))
    )
    assert isinstance(decoded.args["version"], ModelVersionTag)
    assert decoded.args["model"].value == "2"


@needs_mlflow_3
def test_mlflow_enum_round_trip():
    status = mlflow.entities.LoggedModelStatus.READY
    decoded = round_trip(call_write("finalize_logged_model", status=status))
    assert decoded.args["status"] is status


def test_model_round_trip():
    from mlflow.models import Model

    model = Model(artifact_path="model", run_id="run-1")
    model.add_flavor("python_function", loader_module="mlflow.sklearn", python_version="3.11")
    model.add_flavor("sklearn", sklearn_version="1.5.0", pickled_model="model.pkl")
    decoded = round_trip(call_write("record_logged_model", mlflow_model=model))
    result = decoded.args["mlflow_model"]

    assert isinstance(result, Model)
    assert result.flavors == model.flavors
    assert result.run_id == "run-1"
    assert result.to_dict() == model.to_dict()


def test_empty_args_round_trip():
    decoded = round_trip(Write(3, None, operation="delete_experiment", args=None))
    assert decoded.args == {}
    assert decoded.run_id is None


def test_unsupported_type_raises():
    with pytest.raises(TypeError, match=r"args\['blob'\] of operation 'log_artifact'.*bytes"):
        encode_write(call_write("log_artifact", blob=b"data"))


def test_unsupported_nested_type_raises():
    with pytest.raises(TypeError, match=r"args\['items'\]\[1\].*builtins:set"):
        encode_write(call_write("custom", items=[1, {2}]))


def test_non_str_key_raises():
    with pytest.raises(TypeError, match="dict key 1 has type int"):
        encode_write(call_write("custom", mapping={1: "a"}))


def test_foreign_enum_raises():
    class Color(str, enum.Enum):
        RED = "red"

    with pytest.raises(TypeError, match="Color"):
        encode_write(call_write("custom", color=Color.RED))


def test_decode_rejects_non_mlflow_class():
    payload = json.dumps({"args": {"x": {"$enum": "os:system", "$value": "true"}}})
    with pytest.raises(ValueError, match="only classes of mlflow modules"):
        decode_write(1, None, "custom", payload)
