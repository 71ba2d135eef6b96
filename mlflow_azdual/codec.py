"""Encode a queued ``Write`` as JSON text and decode it back, for the spool.

The payload contains what the spool's columns do not: the metrics, params and tags of a
``log_batch`` write, or the ``args`` of any other operation. ``seq``, ``run_id`` and
``operation`` are stored in their own columns and passed back to ``decode_write``.
Encoding raises TypeError for a value it cannot store, so nothing is silently lost. Decoding
imports entity and enum classes from ``mlflow`` modules only. Pure functions, thread-safe.
"""

from __future__ import annotations

import base64
import enum
import importlib
import inspect
import json
from typing import Any

from mlflow.entities import Metric, Param, RunTag

from mlflow_azdual.coalesce import LOG_BATCH, Write

# Markers of tagged values inside encoded ``args``. A user dict key that starts with "$" is
# stored with one more "$" in front, so a user key can never be read back as a marker.
ENTITY = "$entity"
PROTO = "$proto"
PROTO_TYPE = "$proto_type"
MLFLOW_MODEL = "$mlflow_model"
ENUM = "$enum"
ENUM_VALUE = "$value"
_ESCAPE = "$"

# Optional Metric fields of MLflow 3, in their position after [key, value, timestamp, step].
_METRIC_OPTIONAL_FIELDS = ("model_id", "dataset_name", "dataset_digest")

_metric_keywords: tuple | None = None
# One encoder for every call: json.dumps with arguments builds a new encoder each time.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode_write(write: Write) -> str:
    """Return the JSON payload of ``write``.

    Raises TypeError, naming the type and the operation, for an argument it cannot store.
    """
    if write.operation == LOG_BATCH:
        document = {}
        if write.metrics:
            document["metrics"] = [_encode_metric(metric) for metric in write.metrics]
        if write.params:
            document["params"] = [[param.key, param.value] for param in write.params]
        if write.tags:
            document["tags"] = [[tag.key, tag.value] for tag in write.tags]
        return _ENCODER.encode(document)

    args = {} if write.args is None else write.args
    encoded = _encode_value(args, write.operation, "args")
    return _ENCODER.encode({"args": encoded})


def decode_write(seq: int, run_id: str | None, operation: str, payload: str) -> Write:
    """Build the ``Write`` that ``encode_write`` stored as ``payload``.

    Raises ValueError for a payload that is not valid JSON or names a class outside MLflow.
    """
    # json.loads reads the NaN, Infinity and -Infinity that the encoder writes.
    document = json.loads(payload)
    if operation == LOG_BATCH:
        return Write(
            seq,
            run_id,
            metrics=tuple(_decode_metric(item) for item in document.get("metrics", ())),
            params=tuple(Param(key, value) for key, value in document.get("params", ())),
            tags=tuple(RunTag(key, value) for key, value in document.get("tags", ())),
        )
    return Write(seq, run_id, operation=operation, args=_decode_value(document["args"]))


# Metrics: the hot path, kept to a list per metric.


def _encode_metric(metric) -> list:
    item = [metric.key, float(metric.value), int(metric.timestamp), int(metric.step or 0)]
    optional = [getattr(metric, field, None) for field in _METRIC_OPTIONAL_FIELDS]
    while optional and not optional[-1]:
        optional.pop()
    if optional:
        item.extend(optional)
    return item


def _decode_metric(item: list) -> Metric:
    if len(item) == 4:
        return Metric(item[0], item[1], item[2], item[3])
    keywords = _supported_metric_keywords()
    extra = {
        field: value
        for field, value in zip(_METRIC_OPTIONAL_FIELDS, item[4:])
        if value and field in keywords
    }
    # NOTE: a field that the installed Metric class does not accept (model_id and the dataset
    # fields before MLflow 3) is dropped, because that MLflow version cannot send it anyway.
    return Metric(item[0], item[1], item[2], item[3], **extra)


def _supported_metric_keywords() -> tuple:
    global _metric_keywords
    if _metric_keywords is None:
        parameters = inspect.signature(Metric.__init__).parameters
        _metric_keywords = tuple(field for field in _METRIC_OPTIONAL_FIELDS if field in parameters)
    return _metric_keywords


# Arguments of other operations: JSON values, MLflow entities, enums and Model objects.


def _encode_value(value: Any, operation: str, where: str):
    # Enum comes first, because a str enum such as LoggedModelStatus is also a str.
    if isinstance(value, enum.Enum):
        if not _is_mlflow_class(type(value)):
            raise _unsupported(value, operation, where)
        return {ENUM: _qualified_name(type(value)), ENUM_VALUE: value.value}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [
            _encode_value(item, operation, f"{where}[{index}]") for index, item in enumerate(value)
        ]
    if isinstance(value, dict):
        return _encode_dict(value, operation, where)
    if _is_proto_entity(value) and _is_mlflow_class(type(value)):
        proto = value.to_proto()
        return {
            ENTITY: _qualified_name(type(value)),
            PROTO: base64.b64encode(proto.SerializeToString()).decode("ascii"),
            PROTO_TYPE: proto.DESCRIPTOR.full_name,
        }
    if _is_mlflow_model(value):
        return {MLFLOW_MODEL: value.to_dict()}
    raise _unsupported(value, operation, where)


def _unsupported(value, operation: str, where: str) -> TypeError:
    return TypeError(
        f"Cannot spool {where} of operation {operation!r}: type "
        f"{_qualified_name(type(value))} is not a JSON value, an MLflow entity with "
        "to_proto/from_proto, an MLflow enum or an mlflow.models.Model."
    )


def _encode_dict(value: dict, operation: str, where: str) -> dict:
    encoded = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(
                f"Cannot spool {where} of operation {operation!r}: dict key {key!r} has type "
                f"{type(key).__name__}, but only str keys can be stored as JSON."
            )
        stored_key = _ESCAPE + key if key.startswith(_ESCAPE) else key
        encoded[stored_key] = _encode_value(item, operation, f"{where}[{key!r}]")
    return encoded


def _is_proto_entity(value) -> bool:
    return callable(getattr(value, "to_proto", None)) and callable(
        getattr(type(value), "from_proto", None)
    )


def _is_mlflow_model(value) -> bool:
    from mlflow.models import Model

    return isinstance(value, Model)


def _decode_value(value):
    if isinstance(value, list):
        return [_decode_value(item) for item in value]
    if not isinstance(value, dict):
        return value
    if ENTITY in value:
        return _decode_entity(value)
    if MLFLOW_MODEL in value:
        from mlflow.models import Model

        return Model.from_dict(value[MLFLOW_MODEL])
    if ENUM in value:
        return _import_mlflow_class(value[ENUM])(value[ENUM_VALUE])
    return {
        (key[1:] if key.startswith(_ESCAPE) else key): _decode_value(item)
        for key, item in value.items()
    }


def _decode_entity(value: dict):
    entity_class = _import_mlflow_class(value[ENTITY])
    proto_class = _proto_class(value[PROTO_TYPE])
    proto = proto_class.FromString(base64.b64decode(value[PROTO]))
    return entity_class.from_proto(proto)


def _proto_class(full_name: str):
    # The generated MLflow classes report modules such as "service_pb2", which cannot be
    # imported by that name, so the message is found by its protobuf full name instead. The
    # entity's module is imported first, and it registers the message in the default pool.
    from google.protobuf import descriptor_pool, message_factory

    descriptor = descriptor_pool.Default().FindMessageTypeByName(full_name)
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(descriptor)
    # protobuf before 4.22 has no GetMessageClass.
    return message_factory.MessageFactory().GetPrototype(descriptor)


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_mlflow_module(module_name: str) -> bool:
    return module_name == "mlflow" or module_name.startswith("mlflow.")


def _is_mlflow_class(cls: type) -> bool:
    return _is_mlflow_module(cls.__module__) and "<locals>" not in cls.__qualname__


def _import_mlflow_class(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    if not qualname or not _is_mlflow_module(module_name):
        raise ValueError(
            f"Invalid class {name!r} in a spooled write: only classes of mlflow modules are "
            "decoded, in the form 'module:QualName'."
        )
    found = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found
