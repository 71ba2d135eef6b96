"""A TCP proxy on 127.0.0.1 that delays client-to-server bytes, with an HTTP control endpoint.

Run it as `python -m rig.latency_proxy --target-port T [--listen-port P] [--delay-ms D]
--control-port C`. Port 0 lets the system pick a free port. Once both listeners are bound,
the proxy prints one JSON line to stdout, `{"listen_port": ..., "control_port": ...}`. It
stops on SIGTERM or SIGINT. Standard library only.

Each chunk read from a client is sent to the server `delay` after it arrived, in arrival order
per connection, so a request is delayed once however many chunks it spans. Chunks are not
delayed one after the other. Responses pass straight through. While stalled, the proxy accepts
connections and reads requests but sends nothing to the server until resumed. Its per-connection
queue is bounded, so a stalled client is eventually held back by TCP flow control.

Control endpoint (GET only, one JSON object per response):
  /delay?ms=N  set the delay for chunks that arrive from now on
  /stall       hold all client-to-server bytes, keeping connections open
  /resume      send the held bytes and forward normally again
  /stats       connections, bytes forwarded each way, delay and stall state

`ProxyState` contains the settings and counters. `Forwarder` moves bytes and reads the state at
three points: when a client connects, before each chunk goes to the server, and when a
connection ends. `ControlServer` changes the state through a table of routes. A new fault mode
adds a field to `ProxyState`, a route, and a check at one of those points.

`LatencyProxy` starts this module as a subprocess in its own session and controls it.
"""

from __future__ import annotations

import argparse
import asyncio
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
import urllib.parse
import urllib.request
from pathlib import Path

log = logging.getLogger("rig.latency_proxy")

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Bytes read from a socket at a time.
CHUNK_SIZE = 64 * 1024
# Chunks waiting to go to the server, per connection. When the queue is full, the proxy stops
# reading from that client, so a stalled or slow path buffers at most about 4 MiB per connection.
MAX_QUEUED_CHUNKS = 64
# Maximum size of a control request's request line and headers.
MAX_CONTROL_REQUEST_BYTES = 16 * 1024

# urllib reads proxy settings from the environment, so control calls use an opener without them.
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ProxyState:
    """Settings and counters of one proxy, shared by the forwarder and the control endpoint."""

    def __init__(self, delay_ms: float = 0.0):
        self.delay_ms = float(delay_ms)
        # Set while bytes flow and cleared while stalled. Senders wait on it before each write.
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.connections_total = 0
        self.connections_active = 0
        self.connect_failures = 0
        self.bytes_client_to_server = 0
        self.bytes_server_to_client = 0

    @property
    def stalled(self) -> bool:
        return not self.flowing.is_set()

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def snapshot(self) -> dict:
        return {
            "connections_total": self.connections_total,
            "connections_active": self.connections_active,
            "connect_failures": self.connect_failures,
            "bytes_client_to_server": self.bytes_client_to_server,
            "bytes_server_to_client": self.bytes_server_to_client,
            "delay_ms": self.delay_ms,
            "stalled": self.stalled,
        }


class Forwarder:
    """Accepts clients on 127.0.0.1 and forwards each connection to the target port."""

    def __init__(self, state: ProxyState, target_port: int, listen_port: int = 0):
        self.state = state
        self.target_port = target_port
        self.listen_port = listen_port
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> int:
        """Bind the listener and return its port."""
        self._server = await asyncio.start_server(self._accept, HOST, self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    async def close(self) -> None:
        """Close the listener and every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, client_reader, client_writer) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._serve_connection(client_reader, client_writer)
        finally:
            self._connections.discard(task)

    async def _serve_connection(self, client_reader, client_writer) -> None:
        state = self.state
        state.connections_total += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError as error:
            state.connect_failures += 1
            log.warning(
                "connect to target port %d failed (%d failures so far): %s",
                self.target_port,
                state.connect_failures,
                error,
            )
            client_writer.close()
            return

        state.connections_active += 1
        upstream = asyncio.ensure_future(self._forward_upstream(client_reader, server_writer))
        downstream = asyncio.ensure_future(self._forward_downstream(server_reader, client_writer))
        try:
            # When one direction fails, the connection is over, so the other is cancelled.
            done, pending = await asyncio.wait(
                {upstream, downstream}, return_when=asyncio.FIRST_EXCEPTION
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                if task.exception() is not None:
                    log.debug("connection to port %d ended: %r", self.target_port, task.exception())
        finally:
            for task in (upstream, downstream):
                task.cancel()
            state.connections_active -= 1
            _close_quietly(client_writer)
            _close_quietly(server_writer)

    async def _forward_upstream(self, client_reader, server_writer) -> None:
        """Copy client bytes to the server, each chunk `delay` after it arrived."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(MAX_QUEUED_CHUNKS)

        async def read_client():
            while True:
                try:
                    chunk = await client_reader.read(CHUNK_SIZE)
                except OSError as error:
                    # The sender raises it in order, after the bytes that came before it.
                    await queue.put((loop.time(), error))
                    return
                due = loop.time() + self.state.delay_ms / 1000.0
                await queue.put((due, chunk))
                if not chunk:
                    return

        reader = asyncio.ensure_future(read_client())
        try:
            while True:
                due, chunk = await queue.get()
                wait_s = due - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                await self.state.flowing.wait()
                if isinstance(chunk, OSError):
                    raise chunk
                if not chunk:
                    if server_writer.can_write_eof():
                        server_writer.write_eof()
                    return
                server_writer.write(chunk)
                await server_writer.drain()
                self.state.bytes_client_to_server += len(chunk)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _forward_downstream(self, server_reader, client_writer) -> None:
        """Copy server bytes to the client as they arrive."""
        while True:
            chunk = await server_reader.read(CHUNK_SIZE)
            if not chunk:
                if client_writer.can_write_eof():
                    client_writer.write_eof()
                return
            client_writer.write(chunk)
            await client_writer.drain()
            self.state.bytes_server_to_client += len(chunk)


def _close_quietly(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except (OSError, RuntimeError):
        pass


class ControlServer:
    """Minimal HTTP control endpoint on 127.0.0.1: one GET per connection, JSON responses."""

    def __init__(self, state: ProxyState, port: int = 0):
        self.state = state
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self.routes = {
            "/delay": self._set_delay,
            "/stall": self._stall,
            "/resume": self._resume,
            "/stats": self._stats,
        }

    async def start(self) -> int:
        """Bind the control listener and return its port."""
        self._server = await asyncio.start_server(
            self._handle, HOST, self.port, limit=MAX_CONTROL_REQUEST_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader, writer) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            _close_quietly(writer)
            return
        try:
            status, body = self._dispatch(head)
        except Exception as error:  # noqa: BLE001 - a control request must not stop the proxy.
            log.exception("control request failed")
            status, body = 500, {"error": f"internal error: {error}"}
        payload = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        writer.write(
            f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + payload
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass
        _close_quietly(writer)

    def _dispatch(self, head: bytes) -> tuple[int, dict]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3:
            return 400, {"error": f"invalid request line {request_line!r}"}
        method, target, _ = parts
        if method != "GET":
            return 405, {"error": f"method {method} not allowed; use GET"}
        url = urllib.parse.urlsplit(target)
        handler = self.routes.get(url.path)
        if handler is None:
            return 404, {"error": f"no route {url.path!r}; routes: {', '.join(self.routes)}"}
        return handler(urllib.parse.parse_qs(url.query))

    def _set_delay(self, query: dict) -> tuple[int, dict]:
        values = query.get("ms", [])
        try:
            delay_ms = float(values[0]) if len(values) == 1 else None
        except ValueError:
            delay_ms = None
        if delay_ms is None or not 0 <= delay_ms <= 600_000:
            return 400, {"error": "invalid or missing ms; give one number from 0 to 600000"}
        self.state.delay_ms = delay_ms
        log.info("delay set to %g ms", delay_ms)
        return 200, self.state.snapshot()

    def _stall(self, query: dict) -> tuple[int, dict]:
        self.state.stall()
        log.info("stalled: holding client-to-server bytes")
        return 200, self.state.snapshot()

    def _resume(self, query: dict) -> tuple[int, dict]:
        self.state.resume()
        log.info("resumed")
        return 200, self.state.snapshot()

    def _stats(self, query: dict) -> tuple[int, dict]:
        return 200, self.state.snapshot()


async def run_proxy(target_port: int, listen_port: int, control_port: int, delay_ms: float):
    """Serve until SIGTERM or SIGINT, after printing the ready line to stdout."""
    state = ProxyState(delay_ms)
    forwarder = Forwarder(state, target_port, listen_port)
    control = ControlServer(state, control_port)
    listen_port = await forwarder.start()
    control_port = await control.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    log.info(
        "proxy on %s:%d to port %d, control on port %d, delay %g ms (PID %d)",
        HOST, listen_port, target_port, control_port, delay_ms, os.getpid(),
    )
    print(json.dumps({"listen_port": listen_port, "control_port": control_port}), flush=True)

    await stop.wait()
    log.info("stopping proxy on port %d: %s", listen_port, json.dumps(state.snapshot()))
    await control.close()
    await forwarder.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rig.latency_proxy",
        description="TCP proxy on 127.0.0.1 that delays client-to-server bytes.",
    )
    parser.add_argument("--target-port", type=int, required=True, help="backend port on 127.0.0.1")
    parser.add_argument(
        "--listen-port", type=int, default=0, help="port to accept clients on (0: any free port)"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="delay added to each request, in milliseconds"
    )
    parser.add_argument(
        "--control-port", type=int, required=True, help="port of the HTTP control endpoint (0: any)"
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level of messages on stderr (default INFO)"
    )
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error(f"--delay-ms must be 0 or more, got {args.delay_ms}")

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    asyncio.run(run_proxy(args.target_port, args.listen_port, args.control_port, args.delay_ms))


# The parent side: start, control and stop the proxy subprocess.


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


class ProxyControl:
    """Client of a running proxy's control endpoint; works from any process."""

    def __init__(self, control_port: int, timeout_s: float = 5.0):
        self.control_port = control_port
        self.timeout_s = timeout_s

    def set_delay_ms(self, delay_ms: float) -> dict:
        return self._get(f"/delay?ms={delay_ms:g}")

    def stall(self) -> dict:
        return self._get("/stall")

    def resume(self) -> dict:
        return self._get("/resume")

    def stats(self) -> dict:
        return self._get("/stats")

    def _get(self, path: str) -> dict:
        url = f"http://{HOST}:{self.control_port}{path}"
        try:
            with _DIRECT_OPENER.open(url, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise RuntimeError(f"proxy control request {path} failed: {error.code} {detail}")


class LatencyProxy:
    """A latency proxy subprocess in front of `target_port` on 127.0.0.1.

    Use as a context manager, or call `start()` and `stop()`. The subprocess runs in its own
    session, so `stop()` signals exactly its process group. Its stderr goes to `log_path`,
    or to a temporary file when `log_path` is None.
    """

    def __init__(
        self,
        target_port: int,
        delay_ms: float = 0,
        *,
        log_path: str | os.PathLike | None = None,
        startup_timeout_s: float = 10.0,
    ):
        self.target_port = target_port
        self.initial_delay_ms = delay_ms
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.pid: int | None = None
        self._popen: subprocess.Popen | None = None
        self._log_file = None
        self._port: int | None = None
        self._control: ProxyControl | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy is not running; call start() first")
        return self._port

    @property
    def control_port(self) -> int:
        return self._require_control().control_port

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> LatencyProxy:
        """Start the subprocess and wait until both of its listeners are bound."""
        if self._popen is not None and self._popen.poll() is None:
            raise RuntimeError(f"the proxy is already running with PID {self._popen.pid}")

        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "a+b")
        else:
            self._log_file = tempfile.TemporaryFile()
        argv = [
            sys.executable, "-m", "rig.latency_proxy",
            "--target-port", str(self.target_port),
            "--listen-port", "0",
            "--control-port", "0",
            "--delay-ms", str(self.initial_delay_ms),
        ]
        self._popen = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            start_new_session=True,
        )
        self.pid = self._popen.pid
        try:
            ready = self._read_ready_line()
        except BaseException:
            self.stop()
            raise
        self._port = ready["listen_port"]
        self._control = ProxyControl(ready["control_port"])
        log.info(
            "latency proxy on port %d for port %d (PID %d)", self._port, self.target_port, self.pid
        )
        return self

    def _read_ready_line(self) -> dict:
        deadline = time.monotonic() + self.startup_timeout_s
        stdout = self._popen.stdout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"timed out after {self.startup_timeout_s:g} s waiting for the latency proxy "
                    f"(PID {self.pid}) to listen. Its log:\n{self._log_tail()}"
                )
            readable, _, _ = select.select([stdout], [], [], min(remaining, 0.2))
            if readable:
                line = stdout.readline()
                if line:
                    return json.loads(line)
            if self._popen.poll() is not None:
                raise RuntimeError(
                    f"the latency proxy exited with code {self._popen.returncode} during "
                    f"start-up. Its log:\n{self._log_tail()}"
                )

    def _log_tail(self, max_bytes: int = 4000) -> str:
        if self._log_file is None:
            return ""
        self._log_file.flush()
        self._log_file.seek(0, os.SEEK_END)
        size = self._log_file.tell()
        self._log_file.seek(max(0, size - max_bytes))
        return self._log_file.read().decode(errors="replace")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send SIGTERM to the proxy's process group, then SIGKILL after `timeout_s` seconds."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:
            _signal_group(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("latency proxy PID %d ignored SIGTERM; sending SIGKILL", popen.pid)
                _signal_group(popen.pid, signal.SIGKILL)
                popen.wait(timeout=5)
        popen.stdout.close()
        self._log_file.close()
        self._popen = None
        self._log_file = None
        self._port = None
        self._control = None
        self.pid = None

    def set_delay_ms(self, delay_ms: float) -> dict:
        return self._require_control().set_delay_ms(delay_ms)

    def stall(self) -> dict:
        return self._require_control().stall()

    def resume(self) -> dict:
        return self._require_control().resume()

    def stats(self) -> dict:
        return self._require_control().stats()

    def _require_control(self) -> ProxyControl:
        if self._control is None:
            raise RuntimeError("the proxy is not running; call start() first")
        return self._control

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


if __name__ == "__main__":
    main()
