"""Start, probe and stop one long-running server process of the rig.

Each server runs in its own session, so its process group ID equals its PID and one signal
to the group reaches every worker it forks. A ServerProcess can also be rebuilt from the
dict that `to_state()` returns, to stop or restart a server that another process started.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

log = logging.getLogger("rig")

# urllib reads proxy settings from the environment, so the probes use an opener without proxies.
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    The sockets are closed before return, so another process may take a port before the
    server binds it. The chance is small on a machine that is not allocating many ports.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _read_proc_stat(pid: int) -> list[str] | None:
    """Return the fields of /proc/<pid>/stat after the command name, or None if there is none.

    Index 0 is the state letter, 2 the process group ID and 19 the start time in clock ticks
    after boot (fields 3, 5 and 22 in proc(5)).
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def _process_start_time(pid: int) -> int | None:
    fields = _read_proc_stat(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


def _group_has_live_members(pgid: int) -> bool:
    """Return True while a process that is not a zombie is in process group `pgid`."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _read_proc_stat(int(entry.name))
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


class ServerProcess:
    """One server of the rig: its command, environment, log file, port and readiness probe.

    The server's environment is that of the process calling `start()`, plus `extra_env`.
    Only `extra_env` is stored in the state, so the caller's own environment is never
    written to disk. The server counts as ready when `health_url` returns 200, or any HTTP
    response at all if `accept_any_status` is true.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        port: int,
        health_url: str,
        log_path: Path,
        cwd: Path,
        extra_env: dict[str, str],
        accept_any_status: bool = False,
    ):
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.health_url = health_url
        self.log_path = Path(log_path)
        self.cwd = Path(cwd)
        self.extra_env = dict(extra_env)
        self.accept_any_status = accept_any_status
        self.pid: int | None = None
        self.start_time: int | None = None
        self._popen: subprocess.Popen | None = None

    def to_state(self) -> dict:
        return {
            "argv": self.argv,
            "port": self.port,
            "health_url": self.health_url,
            "log_path": str(self.log_path),
            "cwd": str(self.cwd),
            "extra_env": self.extra_env,
            "accept_any_status": self.accept_any_status,
            "pid": self.pid,
            "pgid": self.pid,
            "start_time": self.start_time,
        }

    @classmethod
    def from_state(cls, name: str, state: dict) -> ServerProcess:
        process = cls(
            name,
            state["argv"],
            port=state["port"],
            health_url=state["health_url"],
            log_path=Path(state["log_path"]),
            cwd=Path(state["cwd"]),
            extra_env=state["extra_env"],
            accept_any_status=state["accept_any_status"],
        )
        process.pid = state["pid"]
        process.start_time = state["start_time"]
        return process

    def start(self, *, truncate_log: bool = False) -> None:
        """Start the server in a new session, with output appended to its log file."""
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running with PID {self.pid}")

        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.extra_env}

        with open(self.log_path, "wb" if truncate_log else "ab") as log_file:
            log_file.write(f"=== rig: starting {self.name}: {' '.join(self.argv)}\n".encode())
            log_file.flush()
            self._popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self._popen.pid
        self.start_time = _process_start_time(self.pid)
        log.info(
            "started %s on port %d (PID %d, log %s)", self.name, self.port, self.pid, self.log_path
        )

    def is_running(self) -> bool:
        """Return True if the process this object started or was rebuilt for is still alive.

        A PID whose start time differs from the recorded one belongs to another process.
        NOTE: the start time comes from /proc, so without it (macOS) a rebuilt object
        always reports False.
        """
        if self.pid is None:
            return False
        if self._popen is not None:
            return self._popen.poll() is None
        return self.start_time is not None and _process_start_time(self.pid) == self.start_time

    def probe(self) -> bool:
        """Send one request to the health URL and return True if the server is ready."""
        try:
            with _DIRECT_OPENER.open(self.health_url, timeout=2) as response:
                return response.status == 200 or self.accept_any_status
        except urllib.error.HTTPError:
            return self.accept_any_status
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        """Poll the health URL until the server is ready.

        Raises RuntimeError with the end of the log if the process exits or `timeout`
        seconds pass first.
        """
        deadline = time.monotonic() + timeout
        while not self.probe():
            if not self.is_running():
                raise RuntimeError(
                    f"{self.name} exited during start-up. Last lines of {self.log_path}:\n"
                    + self.log_tail(30)
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"timed out after {timeout:.0f} s waiting for {self.name} to respond at "
                    f"{self.health_url}. Last lines of {self.log_path}:\n" + self.log_tail(30)
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """Send SIGTERM to the server's process group, then SIGKILL after `timeout` seconds.

        Does nothing if the group has no members left or the recorded PID now belongs to
        another process.
        """
        if self.pid is None:
            return
        pgid = self.pid
        if not self._owns_live_group():
            self._reap()
            return

        log.info("stopping %s (process group %d)", self.name, pgid)
        self._signal_group(pgid, signal.SIGTERM)
        if not self._wait_group_exit(pgid, timeout):
            log.warning("%s did not exit %.0f s after SIGTERM; sending SIGKILL", self.name, timeout)
            self._signal_group(pgid, signal.SIGKILL)
            self._wait_group_exit(pgid, 5.0)
        self._reap()

    def log_tail(self, lines: int) -> str:
        try:
            with open(self.log_path, errors="replace") as log_file:
                return "".join(deque(log_file, maxlen=lines))
        except FileNotFoundError:
            return f"(no log file at {self.log_path})\n"

    def _owns_live_group(self) -> bool:
        """Return True if the recorded process group is this server's and still has members.

        Linux does not reuse a PID while a process group of that ID has members, so a group
        whose leader has exited is still this server's.
        """
        fields = _read_proc_stat(self.pid)
        if fields is not None and int(fields[19]) != self.start_time:
            return False
        return self.is_running() or _group_has_live_members(self.pid)

    def _signal_group(self, pgid: int, signum: int) -> None:
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            pass

    def _wait_group_exit(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # A child of this process stays a zombie until reaped, so reap it while waiting.
            if self._popen is not None:
                self._popen.poll()
            if not _group_has_live_members(pgid):
                return True
            time.sleep(0.05)
        return False

    def _reap(self) -> None:
        if self._popen is not None:
            self._popen.wait(timeout=5)
            self._popen = None
        self.pid = None
        self.start_time = None


def mlflow_server_process(
    name: str,
    port: int,
    *,
    backend_store_uri: str,
    artifact_root: str,
    log_path: Path,
    cwd: Path,
    extra_env: dict[str, str],
) -> ServerProcess:
    """Return a ServerProcess for one `mlflow server` worker on 127.0.0.1 that serves no
    artifacts (clients write them to storage themselves) and runs no jobs."""
    return ServerProcess(
        name,
        [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",
            "--backend-store-uri", backend_store_uri,
            "--default-artifact-root", artifact_root,
            "--no-serve-artifacts",
        ],
        port=port,
        health_url=f"http://127.0.0.1:{port}/health",
        log_path=log_path,
        cwd=cwd,
        extra_env={**extra_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
