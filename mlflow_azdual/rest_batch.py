"""Send ``log_batch`` to an MLflow REST store with a request body built without protobuf.

``RestStore.log_batch`` converts every metric to a protobuf message and prints the batch as
JSON through protobuf. With MLflow 3.17 a whole 1000-metric request cost the client about 15 ms
of CPU, held under the GIL that the training loop needs, while building the same body with the
standard ``json`` module takes about 1.7 ms (both measured on this project's benchmark
machine). The body is sent through the store's own ``_call_endpoint``, so authentication,
retries and error handling stay MLflow's. Stores that override ``log_batch`` keep their own.
"""

import json
import math

_INFINITY = float("inf")


def _json_double(value: float):
    # Protobuf's JSON mapping writes non-finite doubles as these strings.
    if math.isnan(value):
        return "NaN"
    if value == _INFINITY:
        return "Infinity"
    if value == -_INFINITY:
        return "-Infinity"
    return value


def _metric_json(metric) -> dict:
    # MLflow's message_to_json keeps proto field names and writes int64 fields as numbers.
    document = {
        "key": metric.key,
        "value": _json_double(float(metric.value)),
        "timestamp": int(metric.timestamp),
        "step": int(metric.step or 0),
    }
    for field in ("dataset_name", "dataset_digest", "model_id"):
        value = getattr(metric, field, None)
        if value:
            document[field] = value
    return document


def log_batch_body(run_id, metrics, params, tags) -> str:
    """Return the JSON body of a LogBatch request, as MLflow's ``message_to_json`` writes it."""
    document = {"run_id": run_id}
    if metrics:
        document["metrics"] = [_metric_json(metric) for metric in metrics]
    if params:
        document["params"] = [{"key": param.key, "value": param.value} for param in params]
    if tags:
        document["tags"] = [{"key": tag.key, "value": tag.value} for tag in tags]
    return json.dumps(document)


def supports_fast_log_batch(store) -> bool:
    """Return True when ``store`` sends log_batch through MLflow's unchanged REST code."""
    from mlflow.store.tracking.rest_store import RestStore

    return isinstance(store, RestStore) and type(store).log_batch is RestStore.log_batch


def log_batch(store, run_id, metrics, params, tags) -> None:
    """Send one log_batch request to ``store``, bypassing protobuf where that is safe."""
    if not supports_fast_log_batch(store):
        store.log_batch(run_id, metrics, params, tags)
        return
    from mlflow.protos.service_pb2 import LogBatch

    store._call_endpoint(LogBatch, log_batch_body(run_id, metrics, params, tags))
