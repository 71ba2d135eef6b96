"""A TCP proxy on 127.0.0.1 that delays client-to-server bytes and injects faults, with an HTTP
control endpoint.

Run it as `python -m rig.latency_proxy --target-port T [--listen-port P] [--delay-ms D]
--control-port C`. Port 0 lets the system pick a free port. Once both listeners are bound,
the proxy prints one JSON line to stdout, `{"listen_port": ..., "control_port": ...}`. It
stops on SIGTERM or SIGINT. Standard library only.

Each chunk read from a client is sent to the server `delay` after it arrived, in arrival order
per connection, so a request is delayed once however many chunks it spans. Chunks are not
delayed one after the other. Responses pass straight through. While stalled, the proxy accepts
connections and reads requests but sends nothing to the server until resumed. Its per-connection
queue is bounded, so a stalled client is eventually held back by TCP flow control.

The proxy finds HTTP/1.x request boundaries on each connection from the request line, the
headers and Content-Length, so the request faults below count requests, not connections. It
supports keep-alive but not pipelining: a client must read a response before it sends the next
request, as MLflow's client (requests) does. A request with Transfer-Encoding, an invalid
Content-Length or a head over MAX_REQUEST_HEAD_BYTES switches its connection to plain byte
forwarding, and the request faults skip that connection from then on.

Control endpoint (GET only, one JSON object per response):
  /delay?ms=N  set the delay for chunks that arrive from now on
  /stall       hold all client-to-server bytes, keeping connections open
  /resume      send the held bytes and forward normally again
  /down?seconds=N
               close the listening socket and every client connection, so new clients get
               "connection refused", then listen on the same port again after N seconds
  /up          end a /down now and listen again at once
  /reject?status=429|503&count=K[&retry_after_s=S]
               respond to the next K requests with that status from the proxy itself, with an
               MLflow-style JSON error body and, when S is given, `Retry-After: S`. The
               requests and their bodies are read but never reach the server, and the
               responses are sent at once, without the delay and even while stalled.
  /reset-after-forward?count=K
               forward the next K requests, and when the server's response begins, reset
               the client connection (SO_LINGER 0) instead of relaying the response
  /stats       connections, requests, bytes forwarded each way, delay, stall, pending faults
               and the number of times each fault was applied

A request that is due for both /reject and /reset-after-forward is rejected, and the reset
stays pending for a later request.

`ProxyState` contains the settings and counters. `Forwarder` moves bytes and reads the state at
five points: when a client connects, when a request head arrives, before each chunk goes to the
server, when a response begins, and when a connection ends. `ControlServer` changes the state through a table of
routes. A new fault mode adds a field to `ProxyState`, a route, and a check at one of those
points.

`LatencyProxy` starts this module as a subprocess in its own session and controls it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import struct
import urllib.error
import urllib.parse
import urllib.request
from typing import NamedTuple

from rig.proxy_process import HOST, ControlClient, ProxyProcess

log = logging.getLogger("rig.latency_proxy")


# Bytes read from a socket at a time.
CHUNK_SIZE = 64 * 1024
# Chunks waiting to go to the server, per connection. When the queue is full, the proxy stops
# reading from that client, so a stalled or slow path buffers at most about 4 MiB per connection.
MAX_QUEUED_CHUNKS = 64
# Maximum size of a control request's request line and headers.
MAX_CONTROL_REQUEST_BYTES = 16 * 1024
# Maximum size of a client request's request line and headers. A larger head switches its
# connection to plain byte forwarding.
MAX_REQUEST_HEAD_BYTES = 64 * 1024
# Seconds between attempts to listen again when the port is taken at the end of /down.
RELISTEN_RETRY_S = 1.0
# Upper limits of the fault parameters that the control endpoint accepts.
MAX_DOWN_S = 3600
MAX_FAULT_COUNT = 1_000_000
MAX_RETRY_AFTER_S = 86_400

# MLflow's error code and the reason phrase for each status that /reject can send.
REJECT_STATUSES = {
    429: ("REQUEST_LIMIT_EXCEEDED", "Too Many Requests"),
    503: ("TEMPORARILY_UNAVAILABLE", "Service Unavailable"),
}



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
        self.requests_total = 0
        # Connections switched to plain byte forwarding because a request could not be framed.
        self.connections_unframed = 0
        # Pending faults. Each request that a fault applies to decrements its count.
        self.reject_status = 0
        self.reject_count = 0
        self.reject_retry_after_s: int | None = None
        self.reset_after_forward_count = 0
        # loop.time() at which a down listener listens again, or None while listening.
        self.down_until: float | None = None
        # Times each fault was applied.
        self.downs = 0
        self.rejected = {status: 0 for status in REJECT_STATUSES}
        self.resets_after_forward = 0

    def take_reject(self) -> tuple[int, int | None] | None:
        """Consume one pending rejection and return (status, retry_after_s), or None."""
        if self.reject_count <= 0:
            return None
        self.reject_count -= 1
        self.rejected[self.reject_status] += 1
        return self.reject_status, self.reject_retry_after_s

    def take_reset_after_forward(self) -> bool:
        """Consume one pending reset-after-forward and return whether there was one."""
        if self.reset_after_forward_count <= 0:
            return False
        self.reset_after_forward_count -= 1
        return True

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
            "requests_total": self.requests_total,
            "connections_unframed": self.connections_unframed,
            "down": self.down_until is not None,
            "down_remaining_s": self._down_remaining_s(),
            "reject_pending": {
                "status": self.reject_status if self.reject_count else None,
                "count": self.reject_count,
                "retry_after_s": self.reject_retry_after_s if self.reject_count else None,
            },
            "reset_after_forward_pending": self.reset_after_forward_count,
            "faults_applied": {
                "down": self.downs,
                "reject_429": self.rejected[429],
                "reject_503": self.rejected[503],
                "reset_after_forward": self.resets_after_forward,
            },
        }

    def _down_remaining_s(self) -> float:
        if self.down_until is None:
            return 0.0
        remaining_s = self.down_until - asyncio.get_running_loop().time()
        return round(max(0.0, remaining_s), 3)


class _ResetAfterForward(Exception):
    """Ends a connection whose client the proxy reset when the server's response began."""


class _ConnectionFaults:
    """Faults pending on one client connection."""

    def __init__(self):
        # Set when a forwarded request is due for a reset as soon as its response begins.
        self.reset_on_response = False


class _RequestFraming(NamedTuple):
    """Body length of a request and whether the connection closes after its response."""

    content_length: int
    close_after: bool


class Forwarder:
    """Accepts clients on 127.0.0.1 and forwards each connection to the target port."""

    def __init__(self, state: ProxyState, target_port: int, listen_port: int = 0):
        self.state = state
        self.target_port = target_port
        self.listen_port = listen_port
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._relisten_task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind the listener and return its port."""
        self._server = await self._listen()
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    async def _listen(self) -> asyncio.base_events.Server:
        # asyncio sets SO_REUSEADDR on POSIX, so the port can be bound again after /down
        # while closed connections on it are in TIME_WAIT.
        return await asyncio.start_server(
            self._accept, HOST, self.listen_port, limit=MAX_REQUEST_HEAD_BYTES
        )

    async def close(self) -> None:
        """Close the listener and every open connection."""
        if self._relisten_task is not None:
            self._relisten_task.cancel()
            await asyncio.gather(self._relisten_task, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def go_down(self, seconds: float) -> None:
        """Close the listener and every client connection, and listen again after `seconds`.

        Closing the listening socket makes new clients get "connection refused". A call while
        already down moves the time of listening again to `seconds` from now.
        """
        loop = asyncio.get_running_loop()
        if self._server is not None:
            # Server.close() closes the listening sockets before it returns.
            self._server.close()
            self._server = None
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        if self._relisten_task is not None:
            self._relisten_task.cancel()
        self.state.down_until = loop.time() + seconds
        self.state.downs += 1
        self._relisten_task = asyncio.ensure_future(self._relisten_after(seconds))
        log.info(
            "down: closed the listener on port %d and %d client connections for %g s",
            self.listen_port, len(connections), seconds,
        )

    def come_up(self) -> None:
        """End a /down now: listen again at once instead of when its time runs out."""
        if self._relisten_task is None:
            return
        self._relisten_task.cancel()
        self._relisten_task = asyncio.ensure_future(self._relisten_after(0))

    async def _relisten_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        while True:
            try:
                self._server = await self._listen()
                break
            except OSError as error:
                log.error(
                    "listening on port %d again after down failed; retrying in %g s: %s",
                    self.listen_port, RELISTEN_RETRY_S, error,
                )
                await asyncio.sleep(RELISTEN_RETRY_S)
        self.state.down_until = None
        self._relisten_task = None
        log.info("up: listening on port %d again", self.listen_port)

    async def _accept(self, client_reader, client_writer) -> None:
        if self.state.down_until is not None:
            # The connection was accepted just before the listener closed.
            _close_quietly(client_writer)
            return
        # `go_down` and `close` cancel this inner task. When the task that start_server created
        # is cancelled instead, asyncio in Python 3.11 logs the CancelledError as an error.
        connection = asyncio.ensure_future(self._serve_connection(client_reader, client_writer))
        self._connections.add(connection)
        try:
            await asyncio.wait({connection})
        finally:
            self._connections.discard(connection)
        if not connection.cancelled() and connection.exception() is not None:
            log.error(
                "connection to port %d failed: %r", self.target_port, connection.exception()
            )

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
        faults = _ConnectionFaults()
        upstream = asyncio.ensure_future(
            self._forward_upstream(client_reader, client_writer, server_writer, faults)
        )
        downstream = asyncio.ensure_future(
            self._forward_downstream(server_reader, client_writer, faults)
        )
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

    async def _forward_upstream(
        self, client_reader, client_writer, server_writer, faults: _ConnectionFaults
    ) -> None:
        """Copy client bytes to the server, each chunk `delay` after it arrived.

        The proxy responds to requests that /reject applies to here, so they never reach the
        queue.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(MAX_QUEUED_CHUNKS)

        async def send_later(chunk: bytes) -> None:
            due = loop.time() + self.state.delay_ms / 1000.0
            await queue.put((due, chunk))

        async def read_client():
            try:
                await self._read_requests(client_reader, client_writer, send_later, faults)
            except OSError as error:
                # The sender raises it in order, after the bytes that came before it.
                await queue.put((loop.time(), error))

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

    async def _read_requests(
        self, client_reader, client_writer, send, faults: _ConnectionFaults
    ) -> None:
        """Pass each client request to `send`, unless a request fault applies to it.

        `send(b"")` marks the end of the client's stream.
        """
        state = self.state
        while True:
            try:
                head = await client_reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as error:
                # The client closed its side, possibly in the middle of a request head.
                if error.partial:
                    await send(error.partial)
                await send(b"")
                return
            except asyncio.LimitOverrunError:
                # The head stays in the reader's buffer, so plain forwarding sends it.
                self._log_unframed(f"a request head over {MAX_REQUEST_HEAD_BYTES} bytes")
                await _forward_plain(client_reader, send)
                return

            framing = _request_framing(head)
            if framing is None:
                first_line = head.split(b"\r\n", 1)[0][:200]
                self._log_unframed(f"a request without Content-Length framing: {first_line!r}")
                await send(head)
                await _forward_plain(client_reader, send)
                return
            state.requests_total += 1

            rejection = state.take_reject()
            if rejection is not None:
                status, retry_after_s = rejection
                # The body is read and dropped so the next request starts at the right byte.
                # NOTE: a client that sends `Expect: 100-continue` sends no body until it gets
                # a response, so such a rejected request waits for the client's timeout.
                if not await _read_body(client_reader, framing.content_length, None):
                    await send(b"")
                    return
                await _write_rejection(client_writer, status, retry_after_s, framing.close_after)
                log.info(
                    "rejected request %d with %d (%d more pending)",
                    state.requests_total, status, state.reject_count,
                )
                if framing.close_after:
                    await send(b"")
                    return
                continue

            if state.take_reset_after_forward():
                faults.reset_on_response = True
            await send(head)
            if not await _read_body(client_reader, framing.content_length, send):
                await send(b"")
                return

    def _log_unframed(self, reason: str) -> None:
        self.state.connections_unframed += 1
        log.warning(
            "forwarding a connection to port %d as plain bytes, without request faults, "
            "after %s",
            self.target_port, reason,
        )

    async def _forward_downstream(
        self, server_reader, client_writer, faults: _ConnectionFaults
    ) -> None:
        """Copy server bytes to the client as they arrive, or reset the client when due."""
        while True:
            chunk = await server_reader.read(CHUNK_SIZE)
            if chunk and faults.reset_on_response:
                _reset_connection(client_writer)
                self.state.resets_after_forward += 1
                log.info(
                    "reset a client connection after its request reached port %d "
                    "(%d more pending)",
                    self.target_port, self.state.reset_after_forward_count,
                )
                raise _ResetAfterForward("reset the client when the response began")
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


def _reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset (RST) instead of a FIN, dropping unsent bytes."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # With SO_LINGER on and a linger time of 0, close() sends RST.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _request_framing(head: bytes) -> _RequestFraming | None:
    """Parse an HTTP/1.x request head, or return None when Content-Length does not frame its body.

    A request with no Content-Length and no Transfer-Encoding has no body (RFC 9112, 6.3).
    """
    lines = head.decode("latin-1").split("\r\n")
    request_line = lines[0].split()
    if len(request_line) != 3 or request_line[2] not in ("HTTP/1.1", "HTTP/1.0"):
        return None
    close_after = request_line[2] == "HTTP/1.0"
    lengths = set()
    for line in lines[1:]:
        if not line:
            continue
        name, separator, value = line.partition(":")
        if not separator:
            return None
        name = name.strip().lower()
        value = value.strip()
        if name == "transfer-encoding":
            return None
        if name == "content-length":
            lengths.add(value)
        if name == "connection":
            options = {option.strip().lower() for option in value.split(",")}
            if "close" in options:
                close_after = True
            elif "keep-alive" in options:
                close_after = False
    if not lengths:
        return _RequestFraming(0, close_after)
    if len(lengths) > 1:
        return None
    value = lengths.pop()
    if not (value.isascii() and value.isdigit()):
        return None
    return _RequestFraming(int(value), close_after)


async def _read_body(reader: asyncio.StreamReader, length: int, send) -> bool:
    """Read `length` bytes and pass them to `send` in chunks, or drop them when `send` is None.

    Returns False when the client closed its side before the whole body arrived.
    """
    remaining = length
    while remaining > 0:
        chunk = await reader.read(min(CHUNK_SIZE, remaining))
        if not chunk:
            return False
        remaining -= len(chunk)
        if send is not None:
            await send(chunk)
    return True


async def _forward_plain(reader: asyncio.StreamReader, send) -> None:
    """Pass every remaining client byte to `send`, ending with b"" at the end of the stream."""
    while True:
        chunk = await reader.read(CHUNK_SIZE)
        await send(chunk)
        if not chunk:
            return


async def _write_rejection(
    writer: asyncio.StreamWriter, status: int, retry_after_s: int | None, close_after: bool
) -> None:
    """Send an HTTP error response with an MLflow-style JSON body from the proxy itself."""
    error_code, reason = REJECT_STATUSES[status]
    message = f"The latency proxy rejected this request with HTTP {status} as an injected fault."
    if retry_after_s is not None:
        message += f" Retry after {retry_after_s} s."
    body = json.dumps({"error_code": error_code, "message": message}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if retry_after_s is not None:
        head.append(f"Retry-After: {retry_after_s}")
    if close_after:
        head.append("Connection: close")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
    await writer.drain()


class ControlServer:
    """Minimal HTTP control endpoint on 127.0.0.1: one GET per connection, JSON responses."""

    def __init__(self, state: ProxyState, port: int = 0, forwarder: Forwarder | None = None):
        self.state = state
        self.port = port
        # The forwarder whose listener /down closes. Without one, /down returns 409.
        self.forwarder = forwarder
        self._server: asyncio.base_events.Server | None = None
        self.routes = {
            "/delay": self._set_delay,
            "/stall": self._stall,
            "/resume": self._resume,
            "/down": self._down,
            "/up": self._up,
            "/reject": self._reject,
            "/reset-after-forward": self._reset_after_forward,
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
        reason = {
            200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict",
        }
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

    def _down(self, query: dict) -> tuple[int, dict]:
        seconds = _query_number(query, "seconds", float)
        if seconds is None or not 0 < seconds <= MAX_DOWN_S:
            return 400, {
                "error": f"invalid or missing seconds; give one number over 0 and up to {MAX_DOWN_S}"
            }
        if self.forwarder is None:
            return 409, {"error": "this control endpoint has no forwarder to take down"}
        self.forwarder.go_down(seconds)
        return 200, self.state.snapshot()

    def _up(self, query: dict) -> tuple[int, dict]:
        if self.forwarder is None:
            return 409, {"error": "this control endpoint has no forwarder to bring up"}
        self.forwarder.come_up()
        return 200, self.state.snapshot()

    def _reject(self, query: dict) -> tuple[int, dict]:
        status = _query_number(query, "status", int)
        if status not in REJECT_STATUSES:
            statuses = " or ".join(str(code) for code in REJECT_STATUSES)
            return 400, {"error": f"invalid or missing status; give {statuses}"}
        count = _query_number(query, "count", int)
        if count is None or not 0 <= count <= MAX_FAULT_COUNT:
            return 400, {
                "error": f"invalid or missing count; give one integer from 0 to {MAX_FAULT_COUNT}"
            }
        retry_after_s = None
        if "retry_after_s" in query:
            retry_after_s = _query_number(query, "retry_after_s", int)
            if retry_after_s is None or not 0 <= retry_after_s <= MAX_RETRY_AFTER_S:
                return 400, {
                    "error": "invalid retry_after_s; give one integer number of seconds "
                    f"from 0 to {MAX_RETRY_AFTER_S}, or leave it out to send no Retry-After"
                }
        # A new /reject replaces the pending one, and count=0 cancels it.
        self.state.reject_status = status
        self.state.reject_count = count
        self.state.reject_retry_after_s = retry_after_s
        log.info(
            "the next %d requests get %d, Retry-After %s", count, status,
            "none" if retry_after_s is None else f"{retry_after_s} s",
        )
        return 200, self.state.snapshot()

    def _reset_after_forward(self, query: dict) -> tuple[int, dict]:
        count = _query_number(query, "count", int)
        if count is None or not 0 <= count <= MAX_FAULT_COUNT:
            return 400, {
                "error": f"invalid or missing count; give one integer from 0 to {MAX_FAULT_COUNT}"
            }
        # A new request replaces the pending count, and count=0 cancels it.
        self.state.reset_after_forward_count = count
        log.info("the next %d forwarded requests get a reset when their response begins", count)
        return 200, self.state.snapshot()

    def _stats(self, query: dict) -> tuple[int, dict]:
        return 200, self.state.snapshot()


def _query_number(query: dict, name: str, parse):
    """Return the single value of `name` in a parsed query string, parsed by `parse`, or None."""
    values = query.get(name, [])
    if len(values) != 1:
        return None
    try:
        return parse(values[0])
    except ValueError:
        return None


async def run_proxy(target_port: int, listen_port: int, control_port: int, delay_ms: float):
    """Serve until SIGTERM or SIGINT, after printing the ready line to stdout."""
    state = ProxyState(delay_ms)
    forwarder = Forwarder(state, target_port, listen_port)
    control = ControlServer(state, control_port, forwarder)
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
        description="TCP proxy on 127.0.0.1 that delays client-to-server bytes and injects faults.",
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


class ProxyControl(ControlClient):
    """Client of a running latency proxy's control endpoint; works from any process."""

    def set_delay_ms(self, delay_ms: float) -> dict:
        return self._get(f"/delay?ms={delay_ms:g}")

    def stall(self) -> dict:
        return self._get("/stall")

    def resume(self) -> dict:
        return self._get("/resume")

    def down(self, seconds: float) -> dict:
        """Close the proxy's listener and connections, and listen again after `seconds`."""
        return self._get(f"/down?seconds={seconds:g}")

    def up(self) -> dict:
        """End a down period now: the proxy listens again at once."""
        return self._get("/up")

    def reject(self, status: int, count: int, retry_after_s: int | None = None) -> dict:
        """Respond to the next `count` requests with `status` (429 or 503) from the proxy."""
        query = {"status": status, "count": count}
        if retry_after_s is not None:
            query["retry_after_s"] = retry_after_s
        return self._get(f"/reject?{urllib.parse.urlencode(query)}")

    def reset_after_forward(self, count: int) -> dict:
        """Reset the client connection of each of the next `count` requests once the server
        has begun its response."""
        return self._get(f"/reset-after-forward?count={count}")


class LatencyProxy(ProxyProcess):
    """A latency proxy subprocess in front of `target_port` on 127.0.0.1.

    Use as a context manager, or call `start()` and `stop()`. The subprocess runs in its own
    session, so `stop()` signals exactly its process group. Its stderr goes to `log_path`,
    or to a temporary file when `log_path` is None.
    """

    kind = "latency proxy"

    def __init__(
        self,
        target_port: int,
        delay_ms: float = 0,
        *,
        log_path: str | os.PathLike | None = None,
        startup_timeout_s: float = 10.0,
    ):
        super().__init__(log_path, startup_timeout_s)
        self.target_port = target_port
        self.initial_delay_ms = delay_ms
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

    def _argv(self) -> list[str]:
        return [
            "-m", "rig.latency_proxy",
            "--target-port", str(self.target_port),
            "--listen-port", "0",
            "--control-port", "0",
            "--delay-ms", str(self.initial_delay_ms),
        ]

    def _on_ready(self, ready: dict) -> None:
        self._port = ready["listen_port"]
        self._control = ProxyControl(ready["control_port"])
        log.info(
            "latency proxy on port %d for port %d (PID %d)", self._port, self.target_port, self.pid
        )

    def _on_stopped(self) -> None:
        self._port = None
        self._control = None

    def set_delay_ms(self, delay_ms: float) -> dict:
        return self._require_control().set_delay_ms(delay_ms)

    def stall(self) -> dict:
        return self._require_control().stall()

    def resume(self) -> dict:
        return self._require_control().resume()

    def down(self, seconds: float) -> dict:
        return self._require_control().down(seconds)

    def up(self) -> dict:
        return self._require_control().up()

    def reject(self, status: int, count: int, retry_after_s: int | None = None) -> dict:
        return self._require_control().reject(status, count, retry_after_s)

    def reset_after_forward(self, count: int) -> dict:
        return self._require_control().reset_after_forward(count)

    def stats(self) -> dict:
        return self._require_control().stats()

    def _require_control(self) -> ProxyControl:
        if self._control is None:
            raise RuntimeError("the proxy is not running; call start() first")
        return self._control



if __name__ == "__main__":
    main()
