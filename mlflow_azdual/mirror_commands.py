"""The ``mlflow-azdual mirror`` and ``mlflow-azdual diff`` commands: options, progress, output.

``mirror`` copies selected primary runs that have no complete mirror (``backfill``) and prints
a summary on stdout, with progress on stderr: a redrawn bar on a terminal, one line per run
otherwise. ``diff`` compares runs with their mirrors (``drift``). Both pace their requests to
each backend with ``--max-requests-per-s``.
"""

import argparse
import json
import sys
import time

DEFAULT_MAX_REQUESTS_PER_S = 10.0

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _rate(text: str):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid rate {text!r}: expected a number of requests per second greater than 0, "
            "or 0 for no limit"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"invalid rate {text!r}: expected a number of requests per second greater than 0, "
            "or 0 for no limit"
        )
    return value or None


def _time(text: str) -> int:
    from mlflow_azdual.run_selection import parse_time_ms

    try:
        return parse_time_ms(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_rate_option(parser) -> None:
    parser.add_argument(
        "--max-requests-per-s", type=_rate, default=DEFAULT_MAX_REQUESTS_PER_S, metavar="N",
        help="maximum requests per second sent to each backend; one store or artifact call "
        "counts as one request (default: %(default)s; 0: no limit)",
    )


def add_mirror_parser(commands):
    mirror = commands.add_parser(
        "mirror",
        help="copy runs that have no complete mirror (such as runs logged before the plugin was "
        "in use) to the secondary",
    )
    mirror.add_argument(
        "--experiment", action="append", default=[], metavar="NAME_OR_ID",
        help="an experiment path or id whose runs are copied; repeat for more (default: every "
        "active experiment)",
    )
    mirror.add_argument(
        "--run-id", action="append", default=[], metavar="ID",
        help="a primary run id to copy; repeat for more",
    )
    mirror.add_argument(
        "--since", type=_time, metavar="TIME",
        help="copy only runs that started at or after TIME (ISO 8601, UTC unless it has an offset)",
    )
    mirror.add_argument(
        "--until", type=_time, metavar="TIME",
        help="copy only runs that started before TIME (ISO 8601, UTC unless it has an offset)",
    )
    mirror.add_argument(
        "--recheck", action="store_true",
        help="also compare runs whose mirror is complete or was made live, and copy what they lack",
    )
    add_rate_option(mirror)
    return mirror


def add_diff_parser(commands):
    diff = commands.add_parser(
        "diff", help="list what differs between primary runs and their mirrors on the secondary"
    )
    target = diff.add_mutually_exclusive_group(required=True)
    target.add_argument("--run-id", metavar="ID", help="the primary run to compare")
    target.add_argument(
        "--experiment", metavar="NAME_OR_ID",
        help="an experiment path or id: every active run of it is compared",
    )
    diff.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_rate_option(diff)
    return diff


class _RunProgress:
    """Progress of ``mirror`` on stderr: a redrawn bar on a terminal, else one line per run."""

    def __init__(self, stream=sys.stderr):
        from mlflow_azdual.cli import _ProgressBar

        self._stream = stream
        self._bar = _ProgressBar(stream, label="mirror", unit="runs") if stream.isatty() else None

    def __call__(self, done, total, outcome) -> None:
        if self._bar is not None:
            self._bar(done, total)
            return
        self._stream.write(
            f"mirror {done}/{total} run {outcome.run_id}: {outcome.result} ({outcome.detail})\n"
        )
        self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _print_summary(summary, runs, elapsed_s) -> None:
    from mlflow_azdual.backfill import COMPLETED, COPIED, FAILED, SKIPPED

    counts = summary.counts
    print(
        f"{_count(len(runs), 'run')} selected: {len(summary.by_result(COPIED))} copied, "
        f"{len(summary.by_result(COMPLETED))} completed, {len(summary.by_result(SKIPPED))} "
        f"skipped, {len(summary.by_result(FAILED))} failed, in {elapsed_s:.1f} s"
    )
    print(
        f"sent: {counts.params} params, {counts.tags} tags, {counts.metric_points} metric points, "
        f"{counts.artifact_files} artifact files ({counts.artifact_bytes} bytes), "
        f"{counts.logged_models} logged models, {counts.model_versions} model versions"
    )
    print(
        f"requests: {summary.requests.get('primary', 0)} to the primary, "
        f"{summary.requests.get('secondary', 0)} to the secondary"
    )
    for outcome in summary.by_result(FAILED):
        print(f"failed: run {outcome.run_id}: {outcome.detail}")
    if summary.by_result(FAILED):
        print(
            "runs that failed keep an incomplete mirror; fix the cause and run mlflow-azdual "
            "mirror again to complete them",
            file=sys.stderr,
        )


def run_mirror(store, arguments) -> int:
    from mlflow_azdual.backfill import FAILED, Backfill, gate_store
    from mlflow_azdual.run_selection import Selection, selected_runs

    if arguments.since is not None and arguments.until is not None and arguments.since >= arguments.until:
        print(
            f"error: --since ({arguments.since} ms) is not earlier than --until ({arguments.until} "
            "ms); pass a time window whose start is before its end",
            file=sys.stderr,
        )
        return EXIT_USAGE
    gates = gate_store(store, arguments.max_requests_per_s)
    selection = Selection(arguments.experiment, arguments.run_id, arguments.since, arguments.until)
    started_s = time.monotonic()
    try:
        runs = selected_runs(store, selection)
    except LookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    progress = _RunProgress()
    try:
        summary = Backfill(store, gates, recheck=arguments.recheck).run(runs, progress)
    finally:
        progress.close()
    _print_summary(summary, runs, time.monotonic() - started_s)
    return EXIT_FAILED if summary.by_result(FAILED) else EXIT_OK


def run_diff(store, arguments) -> int:
    from mlflow_azdual.backfill import gate_store
    from mlflow_azdual.drift import Drift, summary_document
    from mlflow_azdual.run_selection import Selection, resolve_experiment, selected_runs

    gates = gate_store(store, arguments.max_requests_per_s)
    drift = Drift(store, gates)
    try:
        if arguments.run_id:
            runs = selected_runs(store, Selection(run_ids=[arguments.run_id]))
            differences = drift.diff_runs(runs)
        else:
            experiment = resolve_experiment(store, arguments.experiment)
            runs = selected_runs(store, Selection(experiments=[experiment.experiment_id]))
            differences = drift.diff_experiment(experiment, runs)
    except LookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if arguments.json:
        print(json.dumps(summary_document(differences, len(runs)), indent=2, default=str))
    else:
        for difference in differences:
            print(difference.line())
        print(f"{_count(len(differences), 'difference')} in {_count(len(runs), 'run')}"
              if differences else f"no differences in {_count(len(runs), 'run')}")
    return EXIT_FAILED if differences else EXIT_OK
