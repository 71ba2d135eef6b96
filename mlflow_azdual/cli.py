"""The ``mlflow-azdual`` command: inspect a configuration and the spool of unsent writes.

``mlflow-azdual resolve [URI]`` prints the primary and secondary tracking and registry URIs
and every option value, with secrets redacted.
``mlflow-azdual status [URI] [--json] [--dead-letters]`` prints, per backend, the writes
waiting in the spool, the age of the oldest, the failed attempts and the dead letters, and the
spool files with the process that owns each.
``mlflow-azdual sync [URI]`` replays the spool files of ended processes in the foreground with a
progress bar; exit code 1 when writes are left unsent or a file is unreadable.
``mlflow-azdual mirror [URI] [selection]`` copies runs that have no complete mirror (logged before
the plugin was in use) to the secondary, with a summary; exit code 1 when a run failed.
``mlflow-azdual diff [URI] (--run-id ID | --experiment NAME_OR_ID) [--json]`` lists what differs
between runs and their mirrors; exit code 1 when something differs.
``mlflow-azdual doctor [URI] [--json] [--timeout-s S]`` checks the configuration, the installed
versions and entry points, one read on each backend and the spool directory, one line per
check. Its exit code is 1 when a check failed.
URI defaults to MLFLOW_TRACKING_URI everywhere.
"""

import argparse
import json
import os
import sys
import time

from mlflow_azdual.doctor import DEFAULT_TIMEOUT_S
from mlflow_azdual.options import OPTIONS


def _resolve(uri: str) -> int:
    from mlflow.exceptions import MlflowException

    from mlflow_azdual.uri import parse_tracking_uri, redact_uri

    try:
        config = parse_tracking_uri(uri)
    except MlflowException as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    print(f"primary tracking URI:    {redact_uri(config.primary_uri)}")
    print(f"secondary tracking URI:  {redact_uri(config.secondary_uri)}")
    print(f"primary registry URI:    {redact_uri(config.primary_registry_uri)}")
    print(f"secondary registry URI:  {redact_uri(config.secondary_registry_uri)}")
    for option in OPTIONS:
        print(f"{option.name} = {config.options[option.name]!r}")
    return 0


def _dual_store(uri: str):
    """Return the dual tracking store of ``uri``, or raise MlflowException for a non-azdual URI."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _get_store

    from mlflow_azdual.uri import SCHEME, redact_uri

    if not uri.startswith(SCHEME + ":"):
        raise MlflowException(
            f"{redact_uri(uri)} is not an azdual tracking URI; pass one, or set "
            "MLFLOW_TRACKING_URI to the azdual URI your training uses."
        )
    return _get_store(uri)


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _status(uri: str, as_json: bool, dead_letters: bool) -> int:
    from mlflow_azdual.spool import directory_status, list_dead_letters

    store = _dual_store(uri)
    directory = store.spool_directory()
    status = directory_status(directory) if os.path.isdir(directory) else {"backends": {}, "files": []}
    empty = {"pending": 0, "oldest_age_s": None, "attempts": 0, "dead_letters": 0}
    status["backends"] = {
        backend: {**empty, **status["backends"].get(backend, {})}
        for backend in ("primary", "secondary")
    }
    letters = list_dead_letters(directory) if dead_letters and os.path.isdir(directory) else []
    if as_json:
        document = {"spool_directory": directory, **status}
        if dead_letters:
            document["dead_letters"] = letters
        print(json.dumps(document, indent=2, default=str))
        return 0
    print(f"spool directory: {directory}")
    print(f"{'backend':<10} {'pending':>9} {'oldest':>8} {'retries':>8} {'dead letters':>13}")
    for backend in ("primary", "secondary"):
        row = status["backends"].get(backend, {})
        print(
            f"{backend:<10} {row.get('pending', 0):>9} {_age(row.get('oldest_age_s')):>8} "
            f"{row.get('attempts', 0):>8} {row.get('dead_letters', 0):>13}"
        )
    for entry in status["files"]:
        if entry.get("error"):
            print(f"  {entry['path']} (unreadable: {entry['error']}; mlflow-azdual sync moves it aside)")
            continue
        holder = "held by a running process" if entry.get("alive") else "left by an ended process"
        print(f"  {entry['path']} (pid {entry.get('pid')} on {entry.get('hostname')}, {holder})")
    for letter in letters:
        print(
            f"dead letter: backend={letter['backend']} operation={letter['operation']} "
            f"run_id={letter.get('run_id') or '-'} reason={letter['reason']}"
        )
    return 0


class _ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, stream=sys.stderr, width=30, label="sync", unit="writes"):
        self._stream = stream
        self._width = width
        self._label = label
        self._unit = unit
        self._drawn_s = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._drawn_s < 0.1:
            return
        self._drawn_s = now
        filled = self._width if not total else int(self._width * done / total)
        bar = "#" * filled + "." * (self._width - filled)
        self._stream.write(f"\r{self._label} [{bar}] {done}/{total} {self._unit}")
        self._stream.flush()

    def close(self) -> None:
        self._stream.write("\n")
        self._stream.flush()


def _sync(uri: str) -> int:
    from mlflow_azdual.replay import BACKENDS, replay_directory
    from mlflow_azdual.spool import directory_status

    store = _dual_store(uri)
    directory = store.spool_directory()
    if not os.path.isdir(directory):
        print(f"nothing to replay: no spool directory {directory}")
        return 0
    progress = _ProgressBar()
    try:
        result = replay_directory(store, directory, progress=progress)
    finally:
        progress.close()
    for backend in BACKENDS:
        print(
            f"{backend}: {result.delivered[backend]} delivered, {result.rejected[backend]} "
            f"rejected (dead letters), {result.left[backend]} left"
        )
    live = [entry for entry in directory_status(directory)["files"] if entry.get("alive")]
    for entry in live:
        print(f"held by running process {entry.get('pid')}, replayed by that process: {entry['path']}")
    if any(result.left.values()):
        print(
            "writes are left unsent: check the backends, then run mlflow-azdual sync again "
            "(mlflow-azdual status shows what is waiting)",
            file=sys.stderr,
        )
    for path in result.bad_files:
        print(
            f"unreadable spool file {path} was moved aside to {result.moved_to.get(path)}. Its "
            "writes cannot be replayed; delete the moved file once you have looked at it.",
            file=sys.stderr,
        )
    return 0 if result.complete else 1


def _doctor(uri: str, as_json: bool, timeout_s: float) -> int:
    from mlflow_azdual.doctor import FAILED, run_checks

    results = run_checks(uri, timeout_s=timeout_s)
    failed = [result for result in results if result.status == FAILED]
    if as_json:
        document = {"ok": not failed, "checks": [result.as_dict() for result in results]}
        print(json.dumps(document, indent=2))
    else:
        for result in results:
            print(result.line())
        print(f"{len(failed)} of {len(results)} checks failed" if failed else "all checks passed")
    return 1 if failed else 0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}, expected a number greater than 0")
    return value


def main(argv=None) -> int:
    """Run the ``mlflow-azdual`` command line and return its exit code."""
    parser = argparse.ArgumentParser(prog="mlflow-azdual", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    resolve = commands.add_parser("resolve", help="show the backends an azdual URI resolves to")
    resolve.add_argument(
        "uri", nargs="?", default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="azdual tracking URI (default: MLFLOW_TRACKING_URI)",
    )
    status = commands.add_parser(
        "status", help="show the writes waiting in the spool and the dead letters"
    )
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    status.add_argument("--dead-letters", action="store_true", help="list every dead letter")
    sync = commands.add_parser(
        "sync", help="send the writes that ended processes left in the spool, in the foreground"
    )
    doctor = commands.add_parser(
        "doctor",
        help="check the configuration, installed versions, entry points, both backends and "
        "the spool directory",
    )
    doctor.add_argument("--json", action="store_true", help="print machine-readable JSON")
    doctor.add_argument(
        "--timeout-s", type=_positive_seconds, default=DEFAULT_TIMEOUT_S,
        help="timeout in seconds of each backend request (default: %(default)s). The whole read of one "
        "store, set-up included, gets twice that",
    )
    from mlflow_azdual import mirror_commands

    mirror = mirror_commands.add_mirror_parser(commands)
    diff = mirror_commands.add_diff_parser(commands)
    for command in (status, sync, doctor, mirror, diff):
        command.add_argument(
            "uri", nargs="?", default=os.environ.get("MLFLOW_TRACKING_URI"),
            help="azdual tracking URI (default: MLFLOW_TRACKING_URI)",
        )
    arguments = parser.parse_args(argv)
    try:
        return _run(parser, arguments)
    except BrokenPipeError:
        # The output was piped into a command that stopped reading (``| head``).
        sys.stderr.close()
        return 0


def _run(parser, arguments) -> int:
    if not arguments.uri:
        parser.error(
            "no URI given and MLFLOW_TRACKING_URI is not set: pass the azdual tracking URI as "
            "the last argument, or set MLFLOW_TRACKING_URI"
        )
    if arguments.command == "resolve":
        return _resolve(arguments.uri)
    if arguments.command == "doctor":
        return _doctor(arguments.uri, arguments.json, arguments.timeout_s)
    from mlflow.exceptions import MlflowException

    try:
        if arguments.command == "status":
            return _status(arguments.uri, arguments.json, arguments.dead_letters)
        if arguments.command in ("mirror", "diff"):
            from mlflow_azdual import mirror_commands

            run = mirror_commands.run_mirror if arguments.command == "mirror" else mirror_commands.run_diff
            return run(_dual_store(arguments.uri), arguments)
        return _sync(arguments.uri)
    except MlflowException as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
