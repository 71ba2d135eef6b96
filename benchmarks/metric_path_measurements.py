"""The measurements of benchmarks/metric_path.py, each run in a child process of its own.

`python benchmarks/metric_path.py --child NAME --child-params JSON --child-result PATH` calls
`run_child_measurement`, which runs one function of `CHILD_MEASUREMENTS`, writes its result
dict as JSON to PATH and exits. A fresh process per measurement means MLflow's cached stores,
azdual's queues, MLflow's async queue and the RSS baseline never carry over.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
import uuid
from array import array
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_DIR = Path(__file__).resolve().parent

# Each logged point i is METRIC_KEYS[i % 4] at step i // 4, as in a training loop that logs
# 4 metrics per step.
METRIC_KEYS = ("loss", "accuracy", "learning_rate", "grad_norm")
PATH_LABELS = {
    "noop": "(a) no-op store (floor)",
    "azdual": "(b) azdual, both servers",
    "mlflow_sync": "(c) MLflow sync, one server",
    "sequential_dual": "(d) old pattern, sync x2",
    "mlflow_async": "(e) MLflow async, one server",
}
# Paths whose caller does not wait for the network, so they get many calls and repeats.
FAST_PATHS = ("noop", "azdual", "mlflow_async")
# Paths that wait for every request, so they get one sample of fewer calls.
SYNC_PATHS = ("mlflow_sync", "sequential_dual")

LOG_BATCH_MAX_METRICS = 1000  # MLflow's limit of metrics per log_batch request
FLUSH_TIMEOUT_S = 600
# How long the drain keeps counting points on the servers after flush returned with some missing.
COUNT_WAIT_TIMEOUT_S = 120
RSS_SAMPLE_INTERVAL_S = 0.05


def _log_point(mlflow, index: int, synchronous: bool = True) -> None:
    key = METRIC_KEYS[index % len(METRIC_KEYS)]
    step = index // len(METRIC_KEYS)
    if synchronous:
        mlflow.log_metric(key, index * 0.001, step=step)
    else:
        mlflow.log_metric(key, index * 0.001, step=step, synchronous=False)


def _flush_azdual(mlflow) -> dict:
    """Wait until azdual has sent every queued write; return the call used and its outcome."""
    import mlflow_azdual

    flush = getattr(mlflow_azdual, "flush", None)
    if flush is not None:
        completed = flush(timeout_s=FLUSH_TIMEOUT_S)
        return {"flush_call": "mlflow_azdual.flush", "flush_completed": bool(completed)}
    # A plugin version without mlflow_azdual.flush writes synchronously, as before its write
    # queues existed, so MLflow's own flush is enough: it returns once MLflow's queue is empty.
    mlflow.flush_async_logging()
    return {"flush_call": "mlflow.flush_async_logging", "flush_completed": True}


def _tracking_uri_for(path: str, params: dict) -> str:
    from benchmark_stores import NOOP_SCHEME, register_benchmark_stores, sequential_dual_uri

    from mlflow_azdual.uri import explicit_tracking_uri

    register_benchmark_stores()
    if path == "noop":
        return f"{NOOP_SCHEME}:"
    if path == "azdual":
        return explicit_tracking_uri(params["primary_proxy_uri"], params["secondary_proxy_uri"])
    if path == "sequential_dual":
        return sequential_dual_uri(params["primary_proxy_uri"], params["secondary_proxy_uri"])
    if path in ("mlflow_sync", "mlflow_async"):
        return params["primary_proxy_uri"]
    raise ValueError(f"unknown path {path!r}; expected one of {', '.join(PATH_LABELS)}")


def _start_run(mlflow, tracking_uri: str, experiment_prefix: str) -> str:
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(f"{experiment_prefix}-{uuid.uuid4().hex[:8]}")
    return mlflow.start_run().info.run_id


# Caller cost


def measure_caller_cost(params: dict) -> dict:
    """Time `calls` log_metric calls `repeats` times in one run of the given path.

    The result's per_call_us is the median over repeats of (loop time / calls). Path (e)
    returns before its queued writes are sent, and its child exits without waiting for them.
    """
    import mlflow

    path, calls, repeats = params["path"], params["calls"], params["repeats"]
    synchronous = path != "mlflow_async"
    _start_run(
        mlflow, _tracking_uri_for(path, params), f"metric-path-{path}-{params['latency_ms']}ms"
    )
    for index in range(params["warmup_calls"]):
        _log_point(mlflow, index, synchronous)

    index = params["warmup_calls"]
    repeat_means_ns = []
    durations_ns = array("q")
    clock = time.perf_counter_ns
    for _ in range(repeats):
        started = clock()
        for _ in range(calls):
            call_started = clock()
            _log_point(mlflow, index, synchronous)
            durations_ns.append(clock() - call_started)
            index += 1
        repeat_means_ns.append((clock() - started) / calls)

    result = {
        "path": path,
        "latency_ms": params["latency_ms"],
        "calls_per_repeat": calls,
        "repeats": repeats,
        "sample": path in SYNC_PATHS,
        "per_call_us": statistics.median(repeat_means_ns) / 1000,
        "repeat_means_us": [mean / 1000 for mean in repeat_means_ns],
        "p50_call_us": statistics.median(durations_ns) / 1000,
        "p99_call_us": statistics.quantiles(durations_ns, n=100)[98] / 1000,
        "max_call_us": max(durations_ns) / 1000,
    }
    if path == "mlflow_async":
        result["note"] = "caller loop only; queued writes were not awaited"
        return result

    ended = time.perf_counter()
    mlflow.end_run()
    if path == "azdual":
        result.update(_flush_azdual(mlflow))
    result["end_run_s"] = time.perf_counter() - ended
    return result


# Counting points on the servers


def _count_points(client, run_id: str) -> int:
    return sum(len(client.get_metric_history(run_id, key)) for key in METRIC_KEYS)


def _backend_run_ids(primary_client, primary_run_id: str) -> tuple[str, str]:
    """Return the run's id on the primary and, read from the primary run's tag, on the secondary."""
    from mlflow_azdual.id_mapping import SECONDARY_RUN_ID_TAG

    tags = primary_client.get_run(primary_run_id).data.tags
    return primary_run_id, tags[SECONDARY_RUN_ID_TAG]


def _count_on_servers(clients, run_ids) -> list[int]:
    return [_count_points(client, run_id) for client, run_id in zip(clients, run_ids)]


def _wait_for_points(clients, run_ids, expected: int, timeout_s: float) -> tuple[list[int], float]:
    """Count points on both servers every 0.5 s until each has `expected` or `timeout_s` passes.

    Returns the last counts and the perf_counter time at which they were read.
    """
    deadline = time.perf_counter() + timeout_s
    while True:
        counts = _count_on_servers(clients, run_ids)
        counted_at = time.perf_counter()
        if min(counts) >= expected or counted_at > deadline:
            return counts, counted_at
        time.sleep(0.5)


# Drain


def measure_drain(params: dict) -> dict:
    """Log `points` through azdual, end the run and flush, then count points on both servers.

    elapsed_s runs from the first log_metric call to flush's return when both servers hold
    every point by then, else to the count that found them all.
    """
    import mlflow
    from mlflow import MlflowClient

    points = params["points"]
    run_id = _start_run(mlflow, _tracking_uri_for("azdual", params), "metric-path-drain")

    started = time.perf_counter()
    for index in range(points):
        _log_point(mlflow, index)
    logged = time.perf_counter()
    mlflow.end_run()
    flush_outcome = _flush_azdual(mlflow)
    flushed = time.perf_counter()

    clients = [MlflowClient(params["primary_uri"]), MlflowClient(params["secondary_uri"])]
    run_ids = _backend_run_ids(clients[0], run_id)
    counts = _count_on_servers(clients, run_ids)
    complete_at_flush = min(counts) >= points
    finished = flushed
    if not complete_at_flush:
        counts, finished = _wait_for_points(clients, run_ids, points, COUNT_WAIT_TIMEOUT_S)

    return {
        "points": points,
        "log_s": logged - started,
        "end_run_and_flush_s": flushed - logged,
        "elapsed_s": finished - started,
        "complete_at_flush": complete_at_flush,
        "complete": min(counts) >= points,
        "primary_points": counts[0],
        "secondary_points": counts[1],
        "primary_run_id": run_ids[0],
        "secondary_run_id": run_ids[1],
        **flush_outcome,
    }


def measure_drain_floor(params: dict) -> dict:
    """Send `points` to each server as 1000-point log_batch calls, both servers at once."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    points = params["points"]
    timestamp_ms = int(time.time() * 1000)
    metrics = [
        Metric(METRIC_KEYS[i % len(METRIC_KEYS)], i * 0.001, timestamp_ms, i // len(METRIC_KEYS))
        for i in range(points)
    ]
    batches = [
        metrics[start : start + LOG_BATCH_MAX_METRICS]
        for start in range(0, points, LOG_BATCH_MAX_METRICS)
    ]

    servers = {"primary": params["primary_uri"], "secondary": params["secondary_uri"]}
    clients, run_ids = {}, {}
    for name, uri in servers.items():
        clients[name] = MlflowClient(uri)
        experiment_id = clients[name].create_experiment(f"metric-path-floor-{uuid.uuid4().hex[:8]}")
        run_ids[name] = clients[name].create_run(experiment_id).info.run_id

    barrier = threading.Barrier(len(servers))
    elapsed_s, errors = {}, {}

    def send_all(name):
        try:
            barrier.wait()
            started = time.perf_counter()
            for batch in batches:
                clients[name].log_batch(run_ids[name], metrics=batch)
            elapsed_s[name] = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - raised again by the main thread below.
            errors[name] = error

    threads = [threading.Thread(target=send_all, args=(name,)) for name in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"log_batch to the servers failed: {errors}")

    return {
        "points": points,
        "primary_s": elapsed_s["primary"],
        "secondary_s": elapsed_s["secondary"],
        "floor_s": max(elapsed_s.values()),
        "primary_points": _count_points(clients["primary"], run_ids["primary"]),
        "secondary_points": _count_points(clients["secondary"], run_ids["secondary"]),
    }


# Memory


def _rss_reader():
    """Return a function that reads this process's RSS in bytes, and the name of its source."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        process = psutil.Process()
        return (lambda: process.memory_info().rss), "psutil"

    def read_vm_rss():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line in /proc/self/status")

    return read_vm_rss, "/proc/self/status VmRSS"


class RssSampler(threading.Thread):
    """Background thread that records the peak RSS of this process every 50 ms."""

    def __init__(self, read_rss):
        super().__init__(daemon=True)
        self.read_rss = read_rss
        self.peak = read_rss()
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(RSS_SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, self.read_rss())

    def stop(self) -> int:
        """Stop sampling and return the peak RSS in bytes."""
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self.read_rss())
        return self.peak


def measure_memory(params: dict) -> dict:
    """Log `points` through azdual with the secondary stalled at first; record peak RSS growth.

    The baseline is the RSS after the warm-up calls. The secondary's proxy holds every request
    for the first `stall_s` seconds of the logging loop, so azdual's secondary queue fills up
    and the caller blocks until the stall ends.
    """
    import gc

    import mlflow
    from mlflow import MlflowClient

    from rig.latency_proxy import ProxyControl

    points, stall_s, warmup_calls = params["points"], params["stall_s"], params["warmup_calls"]
    secondary_proxy = ProxyControl(params["secondary_control_port"])
    read_rss, rss_source = _rss_reader()

    run_id = _start_run(mlflow, _tracking_uri_for("azdual", params), "metric-path-memory")
    for index in range(warmup_calls):
        _log_point(mlflow, index)
    gc.collect()
    baseline_rss = read_rss()
    sampler = RssSampler(read_rss)
    sampler.start()

    secondary_proxy.stall()
    resume_timer = threading.Timer(stall_s, secondary_proxy.resume)
    resume_timer.start()
    try:
        clock = time.perf_counter
        max_call_s = 0.0
        started = clock()
        for index in range(warmup_calls, warmup_calls + points):
            call_started = clock()
            _log_point(mlflow, index)
            call_s = clock() - call_started
            if call_s > max_call_s:
                max_call_s = call_s
        logged = clock()
        mlflow.end_run()
        flush_outcome = _flush_azdual(mlflow)
        flushed = clock()
    finally:
        resume_timer.cancel()
        secondary_proxy.resume()
    peak_rss = sampler.stop()

    expected = warmup_calls + points
    clients = [MlflowClient(params["primary_uri"]), MlflowClient(params["secondary_uri"])]
    run_ids = _backend_run_ids(clients[0], run_id)
    counts = _count_on_servers(clients, run_ids)
    return {
        "points": points,
        "stall_s": stall_s,
        "baseline_rss_mb": baseline_rss / 2**20,
        "peak_rss_growth_mb": (peak_rss - baseline_rss) / 2**20,
        "rss_source": rss_source,
        "log_s": logged - started,
        "per_call_us": (logged - started) / points * 1e6,
        "max_call_s": max_call_s,
        "end_run_and_flush_s": flushed - logged,
        **flush_outcome,
        "expected_points": expected,
        "primary_points": counts[0],
        "secondary_points": counts[1],
        "primary_run_id": run_ids[0],
        "secondary_run_id": run_ids[1],
    }


CHILD_MEASUREMENTS = {
    "caller_cost": measure_caller_cost,
    "drain": measure_drain,
    "drain_floor": measure_drain_floor,
    "memory": measure_memory,
}


def run_child_measurement(name: str, params_json: str, result_path: str) -> None:
    """Run one measurement, write its result to `result_path` and exit the process.

    The exit skips interpreter shutdown on purpose. MLflow's async queue of path (e) may still
    contain thousands of writes, which it sends one request per metric by default.
    """
    for folder in (str(REPO_ROOT), str(BENCHMARKS_DIR)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    result = CHILD_MEASUREMENTS[name](json.loads(params_json))
    Path(result_path).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
