"""Smoke run of benchmarks/metric_path.py --quick: every measurement is present in its JSON.

Timing targets are not checked here, because timings depend on the machine and its load.
The benchmark starts and stops its own rig, so this test does not use the session rig.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from rig.guard import GUARD_PATH
from rig.servers import REPO_ROOT

BENCHMARK = REPO_ROOT / "benchmarks" / "metric_path.py"
PATHS = ("noop", "azdual", "mlflow_sync", "sequential_dual", "mlflow_async")
LATENCIES_MS = (0, 20)
RUN_TIMEOUT_S = 540


def _is_positive_number(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("benchmark") / "metric_path.json"
    python_path = os.pathsep.join(filter(None, [str(GUARD_PATH), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "PYTHONPATH": python_path,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", str(json_path)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(json_path.read_text())


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_caller_cost_covers_paths_and_latencies(report):
    measured = {(result["path"], result["latency_ms"]) for result in report["caller_cost"]}
    assert measured == {(path, latency) for path in PATHS for latency in LATENCIES_MS}
    for result in report["caller_cost"]:
        label = f"{result['path']} at {result['latency_ms']} ms"
        assert _is_positive_number(result["per_call_us"]), label
        assert _is_positive_number(result["p50_call_us"]), label
        assert _is_positive_number(result["p99_call_us"]), label
        assert _is_positive_number(result["ratio_to_noop"]), label
        assert len(result["repeat_means_us"]) == result["repeats"], label
    assert _is_positive_number(report["speedup_at_20ms"])


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_drain_stores_every_point(report):
    drain, floor = report["drain"]["azdual"], report["drain"]["floor"]
    assert _is_positive_number(drain["elapsed_s"])
    assert _is_positive_number(floor["floor_s"])
    assert _is_positive_number(report["drain"]["ratio"])
    assert drain["flush_call"] == "mlflow_azdual.flush"
    assert drain["flush_completed"] is True
    assert drain["primary_points"] == drain["points"]
    assert drain["secondary_points"] == drain["points"]
    assert floor["primary_points"] == floor["points"]
    assert floor["secondary_points"] == floor["points"]


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_memory_run_completes_after_stall(report):
    memory = report["memory"]
    assert isinstance(memory["peak_rss_growth_mb"], float)
    assert memory["peak_rss_growth_mb"] >= 0
    assert memory["flush_completed"] is True
    assert memory["primary_points"] == memory["expected_points"]
    assert memory["secondary_points"] == memory["expected_points"]


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_report_lists_targets(report):
    names = [target["name"] for target in report["targets"]]
    assert len(names) == 5
    for target in report["targets"]:
        assert isinstance(target["measured"], float), target["name"]
        assert isinstance(target["pass"], bool), target["name"]
