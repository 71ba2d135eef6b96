"""Tests of the latency proxy in front of the rig's primary MLflow server."""

import http.client
import json
import os
import socket
import statistics
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rig.latency_proxy import LatencyProxy

_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
REQUESTS_PER_SAMPLE = 9


def _server_port(uri):
    return urllib.parse.urlsplit(uri).port


def _get_experiment(uri, timeout_s):
    """Send one MLflow REST request without retries and return the HTTP status."""
    url = f"{uri}/api/2.0/mlflow/experiments/get?experiment_id=0"
    with _DIRECT_OPENER.open(url, timeout=timeout_s) as response:
        response.read()
        return response.status


def _search_experiments(connection, padding_bytes=0):
    """Send one POST with a JSON body on a keep-alive connection and return the response.

    `padding_bytes` adds a field of that many bytes, which MLflow's server does not accept.
    Returns (status, headers, parsed JSON body).
    """
    payload = {"max_results": 1}
    if padding_bytes:
        payload["padding"] = "x" * padding_bytes
    body = json.dumps(payload)
    connection.request(
        "POST",
        "/api/2.0/mlflow/experiments/search",
        body=body,
        headers={"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    return response.status, response.headers, json.loads(response.read())


def _connect_refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _median_request_s(client):
    durations = []
    for _ in range(REQUESTS_PER_SAMPLE):
        started = time.perf_counter()
        client.get_experiment("0")
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


@pytest.fixture
def proxy(rig, tmp_path):
    with LatencyProxy(_server_port(rig.primary_uri), log_path=tmp_path / "proxy.log") as started:
        yield started


def test_delay_adds_to_median_request(proxy):
    client = MlflowClient(proxy.uri)
    client.get_experiment("0")  # opens the keep-alive connection

    baseline_s = _median_request_s(client)
    proxy.set_delay_ms(200)
    delayed_s = _median_request_s(client)

    added_ms = (delayed_s - baseline_s) * 1000
    assert added_ms >= 150, f"median {baseline_s * 1000:.1f} ms -> {delayed_s * 1000:.1f} ms"
    assert added_ms < 1000, f"median {baseline_s * 1000:.1f} ms -> {delayed_s * 1000:.1f} ms"


def test_initial_delay_from_constructor(rig, tmp_path):
    with LatencyProxy(_server_port(rig.primary_uri), delay_ms=200) as delayed:
        assert delayed.stats()["delay_ms"] == 200
        started = time.perf_counter()
        assert _get_experiment(delayed.uri, timeout_s=5) == 200
        assert time.perf_counter() - started >= 0.15


def test_stall_times_out_then_resume(proxy):
    assert _get_experiment(proxy.uri, timeout_s=5) == 200

    stats = proxy.stall()
    assert stats["stalled"] is True
    with pytest.raises((TimeoutError, urllib.error.URLError)) as raised:
        _get_experiment(proxy.uri, timeout_s=1)
    if isinstance(raised.value, urllib.error.URLError):
        assert isinstance(raised.value.reason, TimeoutError)
    assert proxy.stats()["connections_active"] >= 1

    stats = proxy.resume()
    assert stats["stalled"] is False
    assert _get_experiment(proxy.uri, timeout_s=5) == 200


def test_stats_count_connections_and_bytes(proxy):
    before = proxy.stats()
    for _ in range(3):
        _get_experiment(proxy.uri, timeout_s=5)
    after = proxy.stats()

    assert after["connections_total"] - before["connections_total"] == 3
    assert after["bytes_client_to_server"] > before["bytes_client_to_server"]
    assert after["bytes_server_to_client"] > before["bytes_server_to_client"]
    assert after["connect_failures"] == 0


def test_control_rejects_invalid_delay(proxy):
    for query in ("ms=-1", "ms=abc", ""):
        url = f"http://127.0.0.1:{proxy.control_port}/delay?{query}"
        with pytest.raises(urllib.error.HTTPError) as raised:
            _DIRECT_OPENER.open(url, timeout=5)
        assert raised.value.code == 400
    assert proxy.stats()["delay_ms"] == 0


def test_control_unknown_route_is_404(proxy):
    with pytest.raises(urllib.error.HTTPError) as raised:
        _DIRECT_OPENER.open(f"http://127.0.0.1:{proxy.control_port}/nope", timeout=5)
    assert raised.value.code == 404


def test_unreachable_target_closes_client(tmp_path):
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        closed_port = placeholder.getsockname()[1]
    with LatencyProxy(closed_port) as proxy:
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            _get_experiment(proxy.uri, timeout_s=5)
        assert proxy.stats()["connect_failures"] == 1


def _listening_sockets():
    """Return {socket inode: (local address hex, port)} for TCP sockets in LISTEN state."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(table).read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local_address, state, inode = fields[1], fields[3], fields[9]
            if state == "0A":  # TCP_LISTEN
                address_hex, port_hex = local_address.split(":")
                listening[inode] = (address_hex, int(port_hex, 16))
    return listening


def _socket_inodes(pid):
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_binds_loopback_only(proxy):
    listening = _listening_sockets()
    proxy_listeners = {
        listening[inode] for inode in _socket_inodes(proxy.pid) if inode in listening
    }

    # /proc/net/tcp prints an IPv4 address as one 32-bit word in host byte order.
    loopback_hex = "%08X" % struct.unpack("=I", socket.inet_aton("127.0.0.1"))[0]
    assert proxy_listeners == {
        (loopback_hex, proxy.port),
        (loopback_hex, proxy.control_port),
    }


def test_stop_ends_process(rig):
    proxy = LatencyProxy(_server_port(rig.primary_uri)).start()
    pid = proxy.pid
    proxy.stop()

    assert proxy.pid is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_down_refuses_then_listens_again(proxy):
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    status, _, _ = _search_experiments(connection)
    assert status == 200

    started = time.monotonic()
    stats = proxy.down(2)
    assert stats["down"] is True
    assert stats["faults_applied"]["down"] == 1
    assert _connect_refused(proxy.port)
    # The keep-alive connection was closed too, so its next request fails.
    with pytest.raises(ConnectionError):
        _search_experiments(connection)
    connection.close()

    while _connect_refused(proxy.port):
        assert time.monotonic() - started < 5, "the proxy did not listen again within 5 s"
        time.sleep(0.05)
    assert time.monotonic() - started >= 1.5
    assert _get_experiment(proxy.uri, timeout_s=5) == 200
    assert proxy.stats()["down"] is False


def test_down_rejects_invalid_seconds(proxy):
    for query in ("seconds=0", "seconds=-1", "seconds=abc", "seconds=nan", ""):
        url = f"http://127.0.0.1:{proxy.control_port}/down?{query}"
        with pytest.raises(urllib.error.HTTPError) as raised:
            _DIRECT_OPENER.open(url, timeout=5)
        assert raised.value.code == 400, query
    assert proxy.stats()["faults_applied"]["down"] == 0
    assert _get_experiment(proxy.uri, timeout_s=5) == 200


@pytest.mark.parametrize(
    ("status", "error_code", "retry_after_s"),
    [
        (429, "REQUEST_LIMIT_EXCEEDED", 3),
        (503, "TEMPORARILY_UNAVAILABLE", 1),
        (503, "TEMPORARILY_UNAVAILABLE", None),
    ],
)
def test_reject_then_normal_service(proxy, status, error_code, retry_after_s):
    rejected_requests = 3
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    stats = proxy.reject(status, count=rejected_requests, retry_after_s=retry_after_s)
    assert stats["reject_pending"] == {
        "status": status,
        "count": rejected_requests,
        "retry_after_s": retry_after_s,
    }
    bytes_to_server_before = stats["bytes_client_to_server"]

    for _ in range(rejected_requests):
        # Bodies larger than one 64 KiB read must be consumed in full.
        response_status, headers, body = _search_experiments(connection, padding_bytes=200_000)
        assert response_status == status
        assert headers["Content-Type"] == "application/json"
        if retry_after_s is None:
            assert "Retry-After" not in headers
        else:
            assert headers["Retry-After"] == str(retry_after_s)
        assert body["error_code"] == error_code
        assert str(status) in body["message"]

    stats = proxy.stats()
    assert stats["bytes_client_to_server"] == bytes_to_server_before
    assert stats["faults_applied"][f"reject_{status}"] == rejected_requests
    assert stats["reject_pending"]["count"] == 0

    # The rejected bodies were consumed, so the same connection serves the next request.
    response_status, _, body = _search_experiments(connection)
    assert response_status == 200
    assert "experiments" in body
    connection.close()
    stats = proxy.stats()
    assert stats["connections_total"] == 1
    assert stats["requests_total"] == rejected_requests + 1
    assert stats["connections_unframed"] == 0


def test_reject_over_connection_close(proxy):
    proxy.reject(429, count=1, retry_after_s=2)
    with pytest.raises(urllib.error.HTTPError) as raised:
        _get_experiment(proxy.uri, timeout_s=5)
    assert raised.value.code == 429
    assert raised.value.headers["Retry-After"] == "2"
    assert json.loads(raised.value.read())["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert _get_experiment(proxy.uri, timeout_s=5) == 200


def test_reject_rejects_invalid_parameters(proxy):
    queries = (
        "status=500&count=1",
        "status=429",
        "status=429&count=-1",
        "status=429&count=1.5",
        "status=429&count=1&retry_after_s=-1",
        "status=429&count=1&retry_after_s=1.5",
    )
    for query in queries:
        url = f"http://127.0.0.1:{proxy.control_port}/reject?{query}"
        with pytest.raises(urllib.error.HTTPError) as raised:
            _DIRECT_OPENER.open(url, timeout=5)
        assert raised.value.code == 400, query
    assert proxy.stats()["reject_pending"]["count"] == 0


def test_reset_after_forward_commits_on_server(rig, proxy, monkeypatch):
    # One attempt, so the client sees the reset instead of a retry's "already exists".
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    name = f"/Shared/reset-after-forward-{time.time_ns()}"
    stats = proxy.reset_after_forward(1)
    assert stats["reset_after_forward_pending"] == 1

    with pytest.raises(MlflowException) as raised:
        MlflowClient(proxy.uri).create_experiment(name)
    assert isinstance(raised.value.__context__, requests.exceptions.ConnectionError)

    stats = proxy.stats()
    assert stats["faults_applied"]["reset_after_forward"] == 1
    assert stats["reset_after_forward_pending"] == 0
    # The server committed the request even though the client saw an error.
    experiment = MlflowClient(rig.primary_uri).get_experiment_by_name(name)
    assert experiment is not None
    assert MlflowClient(proxy.uri).get_experiment_by_name(name).experiment_id == (
        experiment.experiment_id
    )


def test_reset_after_forward_sends_rst(proxy):
    proxy.reset_after_forward(1)
    request = (
        "GET /api/2.0/mlflow/experiments/get?experiment_id=0 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{proxy.port}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        client.sendall(request.encode())
        # A TCP reset makes recv raise, where a plain close would return b"".
        with pytest.raises(ConnectionResetError):
            client.recv(65536)
    assert proxy.stats()["faults_applied"]["reset_after_forward"] == 1
    assert _get_experiment(proxy.uri, timeout_s=5) == 200
