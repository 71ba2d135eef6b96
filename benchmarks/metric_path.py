"""Benchmark of the metric path: what `mlflow.log_metric` costs through azdual, against baselines.

Run it from the repository root: `.venv/bin/python benchmarks/metric_path.py [--quick]
[--json PATH] [--work-dir DIR]`. It starts its own rig (two `mlflow server` processes with
SQLite, moto and Azurite) in a temporary folder and puts a latency proxy (`rig.latency_proxy`)
in front of each MLflow server. Each measurement runs in a child process of its own
(metric_path_measurements.py). At the end it prints a table and stops everything. Traffic
goes to 127.0.0.1 only, and each child runs under the rig's loopback guard.

Measurements:
- Caller cost: wall time of a loop of `mlflow.log_metric` calls divided by the number of calls,
  with 0 ms and then 20 ms added by each proxy to each request. The paths are:
    (a) `noop:`, an in-memory store that drops metrics (the floor: MLflow's client overhead),
    (b) azdual to both servers,
    (c) vanilla synchronous MLflow to the primary,
    (d) the retired linked-workspace pattern: synchronous log_metric to primary, then secondary,
    (e) MLflow's async logging (`synchronous=False`, default settings) to the primary.
  Fast paths (a, b, e) log `fast_calls` points `fast_repeats` times in one run and report the
  median of the repeats. The synchronous paths (c, d) time one sample of `sync_sample_calls`
  calls. Path (e) is timed without its drain: its child exits without end_run, dropping its
  queue.
- Drain: `drain_points` points through azdual with no added latency, then `mlflow.end_run()`
  and `mlflow_azdual.flush()`, timed from the first call until both servers hold every point
  (counted with plain MlflowClients). The floor is the same points sent straight to each
  server as 1000-point `MlflowClient.log_batch` calls, both servers at once from two threads.
  The slower server's time counts.
- Memory: peak RSS growth of a child while it logs `memory_points` points through azdual with
  the secondary stalled by its proxy for the first `memory_stall_s` seconds. RSS is sampled
  every 50 ms from psutil if installed, else from /proc/self/status.

Targets are printed with PASS or MISS. They are goals for the buffered metric path, and no
test asserts them, because timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from metric_path_measurements import (  # noqa: E402 - needs the benchmarks folder on sys.path.
    CHILD_MEASUREMENTS,
    FAST_PATHS,
    PATH_LABELS,
    run_child_measurement,
)

LATENCIES_MS = (0, 20)

TARGET_CALLER_COST_RATIO = 1.25  # azdual per call / no-op store per call, at most
TARGET_SPEEDUP_20MS = 100.0  # MLflow sync per call / azdual per call at 20 ms, at least
TARGET_DRAIN_RATIO = 1.5  # azdual drain time / floor, at most
TARGET_RSS_GROWTH_MB = 64.0  # at most


@dataclasses.dataclass(frozen=True)
class Counts:
    """How much work each measurement does."""

    warmup_calls: int
    fast_calls: int
    fast_repeats: int
    sync_sample_calls: int
    drain_points: int
    memory_points: int
    memory_stall_s: float
    child_timeout_s: float


FULL_COUNTS = Counts(
    warmup_calls=500,
    fast_calls=20_000,
    fast_repeats=3,
    sync_sample_calls=300,
    drain_points=100_000,
    memory_points=1_000_000,
    memory_stall_s=30.0,
    child_timeout_s=3600.0,
)
QUICK_COUNTS = Counts(
    warmup_calls=100,
    fast_calls=1_000,
    fast_repeats=3,
    sync_sample_calls=30,
    drain_points=4_000,
    memory_points=20_000,
    memory_stall_s=2.0,
    child_timeout_s=300.0,
)


class Bench:
    """The rig, a latency proxy in front of each MLflow server, and the child runner."""

    def __init__(self, work_dir: Path, counts: Counts, split: bool = True):
        from rig import Rig

        self.work_dir = work_dir
        self.log_dir = work_dir / "logs"
        self.counts = counts
        self.rig = Rig(work_dir / "rig")
        self.proxies = {}
        self._child_number = 0
        self.cpu_split = split_cpus() if split else None

    def start(self) -> Bench:
        from rig.latency_proxy import LatencyProxy

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.rig.start()
        # The latency proxies forward to the MLflow servers themselves: the rig's policy
        # proxies would add a hop of their own to every measurement.
        servers = (("primary", self.rig.primary_server_uri), ("secondary", self.rig.secondary_server_uri))
        for name, uri in servers:
            port = int(uri.rsplit(":", 1)[1])
            proxy = LatencyProxy(port, log_path=self.log_dir / f"proxy-{name}.log")
            self.proxies[name] = proxy.start()
        if self.cpu_split is not None:
            server_cpus = self.cpu_split[1]
            for process in self.rig.processes.values():
                pin_process_tree(process.pid, server_cpus)
            for proxy in self.proxies.values():
                pin_process_tree(proxy.pid, server_cpus)
        return self

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        self.rig.stop()

    def set_latency_ms(self, latency_ms: float) -> None:
        for proxy in self.proxies.values():
            proxy.set_delay_ms(latency_ms)

    def base_params(self) -> dict:
        return {
            "primary_uri": self.rig.primary_server_uri,
            "secondary_uri": self.rig.secondary_server_uri,
            "primary_proxy_uri": self.proxies["primary"].uri,
            "secondary_proxy_uri": self.proxies["secondary"].uri,
            "secondary_control_port": self.proxies["secondary"].control_port,
            "warmup_calls": self.counts.warmup_calls,
        }

    def child_env(self) -> dict:
        from rig.guard import GUARD_PATH

        python_path = os.pathsep.join(
            filter(None, [str(GUARD_PATH), str(REPO_ROOT), os.environ.get("PYTHONPATH")])
        )
        # The spool (on by default) goes to the work dir, not the user's home.
        spool_dir = str(self.work_dir / "spool")
        return {
            **os.environ, **self.rig.env, "PYTHONPATH": python_path,
            "MLFLOW_AZDUAL_SPOOL_DIR": os.environ.get("MLFLOW_AZDUAL_SPOOL_DIR", spool_dir),
        }

    def run_child(self, measurement: str, **params) -> dict:
        """Run one measurement in a child process and return its result.

        The child's output goes to a log file in the work dir. Raises RuntimeError with the
        end of that log if the child fails or runs longer than `child_timeout_s`.
        """
        self._child_number += 1
        label = f"{self._child_number:02d}-{measurement}"
        if "path" in params:
            label += f"-{params['path']}-{params['latency_ms']}ms"
        result_path = self.work_dir / f"{label}.json"
        log_path = self.log_dir / f"{label}.log"
        argv = [
            sys.executable, str(Path(__file__).resolve()),
            "--child", measurement,
            "--child-params", json.dumps({**self.base_params(), **params}),
            "--child-result", str(result_path),
        ]

        print(f"  {label} ...", end="", flush=True)
        started = time.perf_counter()
        with open(log_path, "wb") as log_file:
            try:
                client_cpus = self.cpu_split[0] if self.cpu_split is not None else None
                completed = subprocess.run(
                    argv,
                    env=self.child_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    timeout=self.counts.child_timeout_s,
                    preexec_fn=(lambda: os.sched_setaffinity(0, client_cpus)) if client_cpus else None,
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"{label} timed out after {self.counts.child_timeout_s:g} s. "
                    f"End of {log_path}:\n{_tail(log_path)}"
                ) from None
        print(f" {time.perf_counter() - started:.1f} s", flush=True)

        if completed.returncode != 0 or not result_path.exists():
            raise RuntimeError(
                f"{label} failed with exit code {completed.returncode}. "
                f"End of {log_path}:\n{_tail(log_path)}"
            )
        return json.loads(result_path.read_text())


def split_cpus():
    """Return (client CPUs, server CPUs), or None when the machine has fewer than 2 CPUs.

    In production the two backends run on other machines. Here they share this one, and
    while they ingest they take CPU time from the logging process, which would count as the
    plugin's caller cost. Pinning the servers and proxies to some CPUs and the measured
    process to the others keeps the two apart.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def pin_process_tree(pid: int, cpus: set) -> None:
    """Pin every thread of ``pid`` and of its descendants to ``cpus`` (Linux /proc)."""
    pending = [pid]
    while pending:
        current = pending.pop()
        task_dir = Path(f"/proc/{current}/task")
        try:
            tasks = list(task_dir.iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                os.sched_setaffinity(int(task.name), cpus)
                pending.extend(int(child) for child in (task / "children").read_text().split())
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue


def _tail(path: Path, max_chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-max_chars:]


# One function per measurement, each running its children.


def measure_caller_costs(bench: Bench) -> list[dict]:
    counts = bench.counts
    results = []
    for latency_ms in LATENCIES_MS:
        bench.set_latency_ms(latency_ms)
        for path in PATH_LABELS:
            if path in FAST_PATHS:
                calls, repeats = counts.fast_calls, counts.fast_repeats
            else:
                calls, repeats = counts.sync_sample_calls, 1
            result = bench.run_child(
                "caller_cost", path=path, latency_ms=latency_ms, calls=calls, repeats=repeats
            )
            results.append(result)
    bench.set_latency_ms(0)
    return results


def measure_drain(bench: Bench) -> dict:
    bench.set_latency_ms(0)
    points = bench.counts.drain_points
    drain = bench.run_child("drain", points=points)
    floor = bench.run_child("drain_floor", points=points)
    return {"azdual": drain, "floor": floor, "ratio": drain["elapsed_s"] / floor["floor_s"]}


def measure_memory(bench: Bench) -> dict:
    bench.set_latency_ms(0)
    return bench.run_child(
        "memory", points=bench.counts.memory_points, stall_s=bench.counts.memory_stall_s
    )


# Derived numbers, targets and the printed report.


def _caller_cost(results: list[dict], path: str, latency_ms: int) -> dict:
    for result in results:
        if result["path"] == path and result["latency_ms"] == latency_ms:
            return result
    raise KeyError(f"no caller cost for path {path} at {latency_ms} ms")


def add_derived_numbers(report: dict) -> None:
    """Add the ratios to the no-op floor, the speed-up at 20 ms and the drain's client floor."""
    caller = report["caller_cost"]
    for result in caller:
        floor = _caller_cost(caller, "noop", result["latency_ms"])["per_call_us"]
        result["ratio_to_noop"] = result["per_call_us"] / floor
    report["speedup_at_20ms"] = (
        _caller_cost(caller, "mlflow_sync", 20)["per_call_us"]
        / _caller_cost(caller, "azdual", 20)["per_call_us"]
    )
    # The time MLflow's client alone needs for the drain's log_metric calls (path a at 0 ms).
    drain = report["drain"]["azdual"]
    noop_per_call_us = _caller_cost(caller, "noop", 0)["per_call_us"]
    drain["noop_log_s_estimate"] = drain["points"] * noop_per_call_us / 1e6


def evaluate_targets(report: dict) -> list[dict]:
    caller = report["caller_cost"]
    targets = []
    for latency_ms in LATENCIES_MS:
        ratio = _caller_cost(caller, "azdual", latency_ms)["ratio_to_noop"]
        targets.append({
            "name": f"azdual caller cost at {latency_ms} ms / no-op store",
            "measured": ratio,
            "target": f"<= {TARGET_CALLER_COST_RATIO:g}x",
            "pass": ratio <= TARGET_CALLER_COST_RATIO,
        })
    targets.append({
        "name": "azdual speed-up over MLflow sync to one server at 20 ms",
        "measured": report["speedup_at_20ms"],
        "target": f">= {TARGET_SPEEDUP_20MS:g}x",
        "pass": report["speedup_at_20ms"] >= TARGET_SPEEDUP_20MS,
    })
    drain = report["drain"]
    targets.append({
        "name": "azdual drain time / floor",
        "measured": drain["ratio"],
        "target": f"<= {TARGET_DRAIN_RATIO:g}x",
        "pass": drain["ratio"] <= TARGET_DRAIN_RATIO and drain["azdual"]["complete"],
    })
    growth = report["memory"]["peak_rss_growth_mb"]
    targets.append({
        "name": "peak RSS growth with the secondary stalled",
        "measured": growth,
        "target": f"<= {TARGET_RSS_GROWTH_MB:g} MB",
        "pass": growth <= TARGET_RSS_GROWTH_MB,
    })
    return targets


def list_warnings(report: dict) -> list[str]:
    """Return a line for each result that is not what a correct run produces."""
    warnings = []
    drain, memory = report["drain"]["azdual"], report["memory"]
    for name, result, expected in (
        ("drain", drain, drain["points"]),
        ("memory", memory, memory["expected_points"]),
    ):
        if result["flush_call"] != "mlflow_azdual.flush":
            warnings.append(
                f"{name}: mlflow_azdual.flush does not exist in this plugin version, so the "
                "benchmark called mlflow.flush_async_logging() instead."
            )
        elif not result["flush_completed"]:
            warnings.append(f"{name}: mlflow_azdual.flush timed out.")
        for server in ("primary", "secondary"):
            stored = result[f"{server}_points"]
            if stored != expected:
                warnings.append(
                    f"{name}: the {server} stored {stored:,} of {expected:,} points "
                    f"(run {result[f'{server}_run_id']})."
                )
    return warnings


def _format_us(microseconds: float) -> str:
    if microseconds >= 10_000:
        return f"{microseconds / 1000:,.1f} ms"
    return f"{microseconds:,.1f} us"


def format_caller_costs(report: dict) -> list[str]:
    lines = [
        "Caller cost of one mlflow.log_metric (per call = loop time / calls, median of repeats)",
        f"{'latency':>7}  {'path':<30} {'calls':>14} {'per call':>11} {'p50 call':>11} "
        f"{'p99 call':>11} {'x no-op':>9}",
    ]
    for result in report["caller_cost"]:
        if result["sample"]:
            calls = f"{result['calls_per_repeat']:,} (sample)"
        else:
            calls = f"{result['repeats']} x {result['calls_per_repeat']:,}"
        lines.append(
            f"{result['latency_ms']:>4} ms  {PATH_LABELS[result['path']]:<30} {calls:>14} "
            f"{_format_us(result['per_call_us']):>11} {_format_us(result['p50_call_us']):>11} "
            f"{_format_us(result['p99_call_us']):>11} {result['ratio_to_noop']:>8.2f}x"
        )
    lines.append(
        f"At 20 ms azdual is {report['speedup_at_20ms']:,.0f}x faster per call than MLflow sync "
        "to one server. (e) is the caller loop only: its queued writes were not awaited."
    )
    return lines


def format_drain(report: dict) -> list[str]:
    drain = report["drain"]
    azdual, floor = drain["azdual"], drain["floor"]
    return [
        f"Drain of {azdual['points']:,} points, no added latency",
        f"  azdual: {azdual['log_s']:.1f} s of log_metric calls (MLflow's client alone, the "
        f"no-op store: {azdual['noop_log_s_estimate']:.1f} s) + "
        f"{azdual['end_run_and_flush_s']:.1f} s of end_run and {azdual['flush_call']} = "
        f"{azdual['elapsed_s']:.1f} s until both servers held the points",
        f"  floor: 1000-point log_batch straight to each server, both at once: primary "
        f"{floor['primary_s']:.1f} s, secondary {floor['secondary_s']:.1f} s, slower "
        f"{floor['floor_s']:.1f} s",
        f"  ratio {drain['ratio']:.2f}x",
    ]


def format_memory(report: dict) -> list[str]:
    memory = report["memory"]
    return [
        f"Memory while logging {memory['points']:,} points through azdual, secondary stalled "
        f"for the first {memory['stall_s']:g} s",
        f"  peak RSS growth {memory['peak_rss_growth_mb']:.1f} MB over "
        f"{memory['baseline_rss_mb']:.0f} MB ({memory['rss_source']})",
        f"  logging {memory['log_s']:.1f} s ({_format_us(memory['per_call_us'])} per call), "
        f"slowest call {memory['max_call_s']:.2f} s, end_run and flush "
        f"{memory['end_run_and_flush_s']:.1f} s",
    ]


def format_report(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "",
        f"metric path benchmark, {machine['date']}: {machine['cpus']} CPUs, "
        f"Python {machine['python']}, MLflow {machine['mlflow']}, "
        f"{'--quick' if report['quick'] else 'full'} run",
        "",
        *format_caller_costs(report),
        "",
        *format_drain(report),
        "",
        *format_memory(report),
        "",
        "Targets",
    ]
    for target in report["targets"]:
        unit = " MB" if target["target"].endswith("MB") else "x"
        lines.append(
            f"  {target['name']:<56} {target['measured']:>9.2f}{unit:<3} "
            f"target {target['target']:<9} {'PASS' if target['pass'] else 'MISS'}"
        )
    for warning in report["warnings"]:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def describe_machine() -> dict:
    import mlflow

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlflow": mlflow.__version__,
    }


def run_benchmark(counts: Counts, quick: bool, work_dir: Path, split: bool = True) -> dict:
    """Start the rig and the proxies in `work_dir`, run every measurement and stop them."""
    from rig.guard import install as install_loopback_guard

    install_loopback_guard()
    report = {"quick": quick, "counts": dataclasses.asdict(counts), "machine": describe_machine()}
    bench = Bench(work_dir, counts, split=split)
    if bench.cpu_split is not None:
        client_cpus, server_cpus = bench.cpu_split
        report["machine"]["cpu_split"] = {
            "measured_process": sorted(client_cpus),
            "servers_and_proxies": sorted(server_cpus),
        }
        print(
            f"measured processes on CPUs {sorted(client_cpus)}, servers and proxies on CPUs "
            f"{sorted(server_cpus)}",
            flush=True,
        )
    print(f"starting the rig and the proxies in {work_dir}", flush=True)
    try:
        bench.start()
        print("caller cost", flush=True)
        report["caller_cost"] = measure_caller_costs(bench)
        print("drain", flush=True)
        report["drain"] = measure_drain(bench)
        print("memory", flush=True)
        report["memory"] = measure_memory(bench)
    finally:
        bench.stop()

    add_derived_numbers(report)
    report["targets"] = evaluate_targets(report)
    report["warnings"] = list_warnings(report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller counts, for a smoke run (about 1 minute on 2 cores)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument(
        "--work-dir",
        metavar="DIR",
        help="keep the rig's data, the logs and the child results in DIR (default: a temporary "
        "folder, removed at the end)",
    )
    parser.add_argument(
        "--no-cpu-split",
        action="store_true",
        help="let the servers share every CPU with the measured process (by default they are "
        "pinned to separate CPUs, as remote backends would be)",
    )
    parser.add_argument("--child", choices=sorted(CHILD_MEASUREMENTS), help=argparse.SUPPRESS)
    parser.add_argument("--child-params", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "true"
    if args.child:
        try:
            run_child_measurement(args.child, args.child_params, args.child_result)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)

    counts = QUICK_COUNTS if args.quick else FULL_COUNTS
    if args.work_dir:
        report = run_benchmark(
            counts, args.quick, Path(args.work_dir).resolve(), split=not args.no_cpu_split
        )
    else:
        with tempfile.TemporaryDirectory(prefix="metric-path-") as temporary:
            report = run_benchmark(counts, args.quick, Path(temporary), split=not args.no_cpu_split)

    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
