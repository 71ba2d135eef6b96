"""Tests of the latency proxy in front of the rig's primary MLflow server."""

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
from mlflow import MlflowClient

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
