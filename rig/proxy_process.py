"""The subprocess side of the rig's proxies: start one, wait until it listens, stop it.

A proxy module of the rig runs as `python -m rig.<module>` in its own session, binds its
ports and prints one JSON line with them (`listen_port`, `control_port`). `ProxyProcess`
starts it, reads that line within `startup_timeout_s`, and stops exactly its process group.
Subclasses give the command line (`_argv`) and take the ports (`_on_ready`).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger(__name__)

HOST = "127.0.0.1"

# urllib reads proxy settings from the environment, so control calls use an opener without them.
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ControlClient:
    """Client of a running proxy's control endpoint (GET, one JSON object per response)."""

    kind = "proxy"

    def __init__(self, control_port: int, timeout_s: float = 5.0):
        self.control_port = control_port
        self.timeout_s = timeout_s

    def stats(self) -> dict:
        return self._get("/stats")

    def _get(self, path: str) -> dict:
        url = f"http://{HOST}:{self.control_port}{path}"
        try:
            with _DIRECT_OPENER.open(url, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise RuntimeError(f"{self.kind} control request {path} failed: {error.code} {detail}")


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


class ProxyProcess:
    """A proxy subprocess. Use as a context manager, or call `start()` and `stop()`.

    Its stderr goes to `log_path`, or to a temporary file when `log_path` is None.
    """

    # Name in messages, for example "latency proxy".
    kind = "proxy"

    def __init__(self, log_path: str | os.PathLike | None, startup_timeout_s: float):
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.pid: int | None = None
        self._popen: subprocess.Popen | None = None
        self._log_file = None

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _on_ready(self, ready: dict) -> None:
        raise NotImplementedError

    def _on_stopped(self) -> None:
        """Forget the ports of the stopped subprocess."""

    def _environment(self) -> dict[str, str] | None:
        """Return the subprocess's environment, or None to inherit this process's."""
        return None

    def start(self):
        """Start the subprocess and wait until both of its listeners are bound."""
        if self._popen is not None and self._popen.poll() is None:
            raise RuntimeError(f"the {self.kind} is already running with PID {self._popen.pid}")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "a+b")
        else:
            self._log_file = tempfile.TemporaryFile()
        self._popen = subprocess.Popen(
            [sys.executable, *self._argv()],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=self._environment(),
            start_new_session=True,
        )
        self.pid = self._popen.pid
        try:
            self._on_ready(self._read_ready_line())
        except BaseException:
            self.stop()
            raise
        return self

    def _read_ready_line(self) -> dict:
        deadline = time.monotonic() + self.startup_timeout_s
        stdout = self._popen.stdout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"timed out after {self.startup_timeout_s:g} s waiting for the {self.kind} "
                    f"(PID {self.pid}) to listen. Its log:\n{self.log_tail()}"
                )
            readable, _, _ = select.select([stdout], [], [], min(remaining, 0.2))
            if readable:
                line = stdout.readline()
                if line:
                    return json.loads(line)
            if self._popen.poll() is not None:
                raise RuntimeError(
                    f"the {self.kind} exited with code {self._popen.returncode} during "
                    f"start-up. Its log:\n{self.log_tail()}"
                )

    def log_tail(self, max_bytes: int = 4000) -> str:
        """Return the end of the subprocess's log."""
        if self._log_file is None:
            return ""
        self._log_file.flush()
        self._log_file.seek(0, os.SEEK_END)
        size = self._log_file.tell()
        self._log_file.seek(max(0, size - max_bytes))
        return self._log_file.read().decode(errors="replace")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send SIGTERM to the subprocess's group, then SIGKILL after `timeout_s` seconds."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:
            signal_group(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s PID %d ignored SIGTERM; sending SIGKILL", self.kind, popen.pid)
                signal_group(popen.pid, signal.SIGKILL)
                popen.wait(timeout=5)
        if popen.stdout is not None:
            popen.stdout.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._popen = None
        self.pid = None
        self._on_stopped()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
