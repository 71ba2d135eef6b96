"""Merging queued writes into log_batch requests within a backend's limits."""

from mlflow.entities import Metric, Param, RunTag

from mlflow_azdual.coalesce import Batch, BatchLimits, Write, coalesce


def metric(step, key="loss"):
    return Metric(key, float(step), 1_700_000_000_000 + step, step)


def metric_write(seq, run_id, count=1, key="loss"):
    return Write(seq, run_id, metrics=tuple(metric(seq * 1000 + i, key) for i in range(count)))


def call_write(seq, run_id="a"):
    return Write(seq, run_id, operation="update_run_info", args={})


def test_consecutive_metrics_merge_into_one_batch():
    requests = coalesce([metric_write(seq, "a") for seq in range(1, 11)])
    assert len(requests) == 1
    assert len(requests[0].metrics) == 10
    assert (requests[0].first_seq, requests[0].last_seq) == (1, 10)


def test_metric_limit_splits_batches_in_order():
    requests = coalesce([metric_write(1, "a", count=2500)], BatchLimits(max_metrics=1000))
    assert [len(request.metrics) for request in requests] == [1000, 1000, 500]
    steps = [m.step for request in requests for m in request.metrics]
    assert steps == sorted(steps)


def test_entity_limit_counts_all_kinds():
    write = Write(
        1, "a",
        metrics=tuple(metric(i) for i in range(950)),
        params=tuple(Param(f"p{i}", "v") for i in range(60)),
    )
    requests = coalesce([write], BatchLimits(max_entities=1000))
    assert [request.entities for request in requests] == [1000, 10]


def test_param_and_tag_limits():
    params = tuple(Param(f"p{i}", "v") for i in range(150))
    tags = tuple(RunTag(f"t{i}", "v") for i in range(150))
    requests = coalesce([Write(1, "a", params=params, tags=tags)])
    assert all(len(request.params) <= 100 for request in requests)
    assert all(len(request.tags) <= 100 for request in requests)
    assert sum(len(request.params) for request in requests) == 150
    assert sum(len(request.tags) for request in requests) == 150


def test_interleaved_runs_merge_per_run():
    writes = [metric_write(seq, "a" if seq % 2 else "b") for seq in range(1, 9)]
    requests = coalesce(writes)
    assert [request.run_id for request in requests] == ["a", "b"]
    assert [len(request.metrics) for request in requests] == [4, 4]


def test_call_is_a_barrier():
    writes = [metric_write(1, "a"), metric_write(2, "b"), call_write(3), metric_write(4, "a")]
    requests = coalesce(writes)
    kinds = [(type(request).__name__, request.run_id) for request in requests]
    assert kinds == [("Batch", "a"), ("Batch", "b"), ("Write", "a"), ("Batch", "a")]


def test_repeated_tag_key_starts_new_batch():
    writes = [
        Write(1, "a", tags=(RunTag("stage", "draft"),)),
        Write(2, "a", tags=(RunTag("stage", "final"),)),
    ]
    requests = coalesce(writes)
    assert [request.tags[0].value for request in requests] == ["draft", "final"]


def test_repeated_param_key_starts_new_batch():
    writes = [Write(1, "a", params=(Param("alpha", "1"),)), Write(2, "a", params=(Param("alpha", "1"),))]
    assert len(coalesce(writes)) == 2


def test_empty_window():
    assert coalesce([]) == []


def test_write_size_counts_entities_or_one_for_calls():
    assert metric_write(1, "a", count=7).size == 7
    assert call_write(2).size == 1
    assert isinstance(coalesce([metric_write(1, "a")])[0], Batch)


def test_values_per_metric_key_capped():
    limits = BatchLimits(max_values_per_metric_key=250)
    metrics = [Metric("loss", float(step), 0, step) for step in range(700)]
    metrics += [Metric("acc", 1.0, 0, step) for step in range(10)]
    requests = coalesce([Write(1, "run", metrics=metrics)], limits)
    per_request = [
        {key: sum(1 for m in request.metrics if m.key == key) for key in ("loss", "acc")}
        for request in requests
    ]
    assert [counts["loss"] for counts in per_request] == [250, 250, 200]
    assert sum(counts["acc"] for counts in per_request) == 10
    assert [m.step for request in requests for m in request.metrics if m.key == "loss"] == list(
        range(700)
    )


def test_limits_narrowed_to_stricter():
    narrowed = BatchLimits(max_values_per_metric_key=250).narrowed(BatchLimits(max_metrics=500))
    assert narrowed.max_metrics == 500
    assert narrowed.max_values_per_metric_key == 250
    assert narrowed.max_params == 100


def test_split_write_numbers_every_batch():
    # A write split over several batches: each batch carries the write's sequence number, which
    # the secondary compares with the point up to which a run was copied.
    metrics = [Metric("loss", float(step), 0, step) for step in range(700)]
    requests = coalesce([Write(7, "run", metrics=metrics)], BatchLimits(max_values_per_metric_key=250))
    assert len(requests) == 3
    assert all(request.first_seq == 7 and request.last_seq == 7 for request in requests)
