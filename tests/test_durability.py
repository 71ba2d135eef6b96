"""Durability of the secondary mirror under faults: outages, throttling and connection resets.

Each test puts a LatencyProxy in front of the secondary and injects one kind of fault. It then
checks that the secondary ends up with exactly the primary's data: every metric point once,
the same params and tags, and the same run status.

The secondary here is an MLflow server with a file store, started by this module. The rig's
secondary uses MLflow's SQL store, which (in MLflow 3.17) skips a metric point identical to
one it already has, so a resent batch would leave no trace there. The file store appends
every point it receives, as a backend that keeps duplicates does, so a point sent twice
shows up twice in its metric history, and that history lists points in arrival order.

Figures of the outage test are printed; run with `-s` to see them.
"""

import collections
import os
import time

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, ViewType
from mlflow.tracking._tracking_service.utils import _get_store

import mlflow_azdual
from mlflow_azdual.id_mapping import (
    PRIMARY_RUN_ID_TAG,
    SECONDARY_EXPERIMENT_ID_TAG,
    SECONDARY_RUN_ID_TAG,
)
from mlflow_azdual.uri import explicit_tracking_uri
from rig.guard import GUARD_PATH
from rig.latency_proxy import LatencyProxy
from rig.processes import find_free_ports, mlflow_server_process
from tests.dual_helpers import metric_points, unique_path, user_tags

# Retries that keep the tests fast: the first retry after 0.1 to 0.2 s, none more than 2 s
# apart, so the writer notices a returning backend within about 2 s.
FAST_RETRY = {
    "retry_initial_backoff_s": 0.2,
    "retry_max_backoff_s": 2,
    "retry_attempt_timeout_s": 10,
}
# A safety limit for every outage: the proxy listens again by itself after this long, so a
# test that stops midway cannot leave the secondary unreachable. Tests end outages with up().
OUTAGE_LIMIT_S = 120
FLUSH_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def secondary_server(rig, tmp_path_factory):
    """An MLflow server on 127.0.0.1 with a file store, which keeps duplicate metric points."""
    directory = tmp_path_factory.mktemp("file-store-secondary")
    (port,) = find_free_ports(1)
    server = mlflow_server_process(
        "file-store-secondary",
        port,
        backend_store_uri=(directory / "mlruns").as_uri(),
        artifact_root=str(directory / "artifacts"),
        log_path=directory / "server.log",
        cwd=directory,
        extra_env={
            **rig.env,
            "PYTHONPATH": str(GUARD_PATH),
            # MLflow 3.17 refuses to serve a file store unless this is set.
            "MLFLOW_ALLOW_FILE_STORE": "true",
        },
    )
    server.start()
    try:
        server.wait_ready(timeout=60)
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(secondary_server, tmp_path):
    with LatencyProxy(secondary_server.port, log_path=tmp_path / "proxy.log") as started:
        yield started


@pytest.fixture
def secondary_client(secondary_server):
    uri = f"http://127.0.0.1:{secondary_server.port}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture
def primary_client(rig):
    return MlflowClient(tracking_uri=rig.primary_uri, registry_uri=rig.primary_uri)


@pytest.fixture
def connect(rig, proxy, tmp_path):
    """Return a function that builds a dual store writing through ``proxy``, with fast retries.

    The store's azdual URI becomes MLflow's tracking URI for the test, and its spool is in
    ``tmp_path``. At teardown the proxy's faults are cleared, the store gets 30 s to send what
    is left, and its writers stop, so a failed test does not leave a writer retrying in the
    background.
    """
    previous_tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    stores = []

    def build(**options):
        uri = explicit_tracking_uri(
            rig.primary_uri,
            proxy.uri,
            spool_dir=str(tmp_path / "spool"),
            **{**FAST_RETRY, **options},
        )
        mlflow.set_tracking_uri(uri)
        store = _get_store(uri)
        stores.append(store)
        return MlflowClient(tracking_uri=uri), store

    yield build

    while mlflow.active_run():
        mlflow.end_run()
    # set_tracking_uri keeps MLFLOW_TRACKING_URI in step with the URI it sets, and None unsets both.
    mlflow.set_tracking_uri(previous_tracking_uri)
    proxy.up()
    proxy.reject(429, count=0)
    proxy.reset_after_forward(count=0)
    for store in stores:
        try:
            store.flush(timeout_s=30)
        finally:
            store.primary_queue.stop()
            store.secondary_queue.stop()


def mirror_of(primary_client, run_id: str) -> str:
    return primary_client.get_run(run_id).data.tags[SECONDARY_RUN_ID_TAG]


def point_differences(primary_points, secondary_points):
    """Return (lost, duplicated): points missing on the secondary, and extra ones there."""
    expected = collections.Counter(primary_points)
    found = collections.Counter(secondary_points)
    lost = sum((expected - found).values())
    duplicated = sum((found - expected).values())
    return lost, duplicated


def read_histories(primary_client, run_id, secondary_client, mirror_id):
    """Read every metric key of either run: {key: (primary points, secondary points)}."""
    keys = set(primary_client.get_run(run_id).data.metrics)
    keys |= set(secondary_client.get_run(mirror_id).data.metrics)
    histories = {}
    for key in sorted(keys):
        histories[key] = (
            metric_points(primary_client, run_id, key),
            metric_points(secondary_client, mirror_id, key),
        )
    return histories


def assert_same_histories(histories, expected_counts):
    """Assert that every metric's full history is the same on both backends.

    ``histories`` comes from ``read_histories``. ``expected_counts`` maps each key to the
    number of points logged, so a key missing on both sides also fails.
    """
    assert sorted(histories) == sorted(expected_counts)
    for key, count in expected_counts.items():
        primary_points, secondary_points = histories[key]
        lost, duplicated = point_differences(primary_points, secondary_points)
        assert len(primary_points) == count, f"primary history of {key}"
        assert lost == 0, f"{key}: {lost} points lost, {duplicated} duplicated"
        assert duplicated == 0, f"{key}: {duplicated} points duplicated"
        assert secondary_points == primary_points, key


def assert_spool_drained(store):
    """Assert that the spool contains no write and no dead letter for either backend."""
    spool = store.spool()
    spool.commit()
    counts = spool.counts()
    for backend in ("primary", "secondary"):
        entry = counts.get(backend, {"pending": 0, "dead_letters": 0})
        assert entry["pending"] == 0, f"{backend} writes left in the spool: {entry}"
        assert entry["dead_letters"] == 0, f"{backend} dead letters: {entry}"


def metric_chunks(keys, steps_per_chunk, chunk_count, base_ms):
    """Return ``chunk_count`` lists of metrics, each with ``steps_per_chunk`` steps of every key."""
    chunks = []
    for chunk_index in range(chunk_count):
        chunk = []
        for offset in range(steps_per_chunk):
            step = chunk_index * steps_per_chunk + offset
            for key_index, key in enumerate(keys):
                chunk.append(Metric(key, step * 0.001 + key_index, base_ms + step, step))
        chunks.append(chunk)
    return chunks


def wait_for_outage(started_s: float, minimum_s: float) -> None:
    remaining_s = started_s + minimum_s - time.monotonic()
    if remaining_s > 0:
        time.sleep(remaining_s)


def test_secondary_outage_loses_and_duplicates_nothing(
    rig, proxy, connect, primary_client, secondary_client
):
    outage_min_s = 10
    capacity = 20_000
    batch_keys = [f"m{index}" for index in range(8)]
    # 97 log_batch chunks of 1000 points (125 steps of 8 keys) and 3000 log_metric calls.
    chunks = metric_chunks(batch_keys, 125, 97, base_ms=int(time.time() * 1000))
    single_points = 3_000
    points_logged = sum(len(chunk) for chunk in chunks) + single_points
    params = {f"p{index}": f"value-{index}" for index in range(50)}
    tags = {f"t{index}": f"tag-{index}" for index in range(20)}
    client, store = connect(buffer_capacity_points=capacity, flush_interval_s=0.5)

    mlflow.set_experiment(unique_path("outage"))
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        for chunk in chunks[:20]:
            client.log_batch(run_id, metrics=chunk)

        proxy.down(OUTAGE_LIMIT_S)
        outage_started_s = time.monotonic()
        mlflow.log_params(params)
        for chunk in chunks[20:60]:
            client.log_batch(run_id, metrics=chunk)
        mlflow.set_tags(tags)
        for step in range(single_points):
            mlflow.log_metric("lr", 1.0 / (step + 1), step=step)
        for chunk in chunks[60:]:
            client.log_batch(run_id, metrics=chunk)
    caller_s = time.monotonic() - outage_started_s

    # The caller finished, end_run included, while the secondary was still unreachable.
    assert proxy.stats()["down"], f"the caller took {caller_s:.1f} s, past the outage"
    assert caller_s < OUTAGE_LIMIT_S
    assert store.secondary_queue.pending_points > capacity

    primary_run = primary_client.get_run(run_id)
    assert primary_run.info.status == "FINISHED"
    assert primary_run.data.params == params
    assert {key: primary_run.data.tags.get(key) for key in tags} == tags
    for key in batch_keys:
        assert len(metric_points(primary_client, run_id, key)) == 97 * 125, key
    assert len(metric_points(primary_client, run_id, "lr")) == single_points

    wait_for_outage(outage_started_s, outage_min_s)
    outage_s = time.monotonic() - outage_started_s
    proxy.up()
    back_s = time.monotonic()
    assert mlflow_azdual.flush(timeout_s=FLUSH_TIMEOUT_S)
    catch_up_s = time.monotonic() - back_s

    mirror_id = mirror_of(primary_client, run_id)
    histories = read_histories(primary_client, run_id, secondary_client, mirror_id)
    differences = [point_differences(*points) for points in histories.values()]
    lost = sum(key_lost for key_lost, _ in differences)
    duplicated = sum(key_duplicated for _, key_duplicated in differences)
    print(
        f"\nsecondary outage: {points_logged} points logged, {lost} lost, {duplicated} "
        f"duplicated; caller done {caller_s:.1f} s into a {outage_s:.1f} s outage; secondary "
        f"caught up {catch_up_s:.1f} s after it came back"
    )

    expected_counts = {**{key: 97 * 125 for key in batch_keys}, "lr": single_points}
    assert_same_histories(histories, expected_counts)
    mirror = secondary_client.get_run(mirror_id)
    primary_run = primary_client.get_run(run_id)
    assert mirror.data.tags[PRIMARY_RUN_ID_TAG] == run_id
    assert mirror.data.params == primary_run.data.params
    assert user_tags(mirror.data.tags) == user_tags(primary_run.data.tags)
    assert mirror.info.status == primary_run.info.status == "FINISHED"
    assert_spool_drained(store)


@pytest.mark.parametrize("status", [429, 503])
def test_throttling_honours_retry_after(
    status, rig, proxy, connect, primary_client, secondary_client
):
    rejections = 3
    retry_after_s = 2
    client, store = connect(flush_interval_s=0.5)
    experiment_id = client.create_experiment(unique_path(f"throttle-{status}"))
    # Retries that ignored Retry-After would wait 0.1 to 0.2, 0.2 to 0.4 and 0.4 to 0.8 s.
    proxy.reject(status, count=rejections, retry_after_s=retry_after_s)
    throttled_s = time.monotonic()

    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    for chunk in metric_chunks(["loss", "accuracy"], 500, 3, base_ms=int(time.time() * 1000)):
        client.log_batch(run_id, metrics=chunk)
    client.set_terminated(run_id)
    assert store.flush(timeout_s=FLUSH_TIMEOUT_S)
    elapsed_s = time.monotonic() - throttled_s

    faults = proxy.stats()["faults_applied"]
    assert faults[f"reject_{status}"] == rejections
    assert elapsed_s >= (rejections - 1) * retry_after_s, (
        f"{rejections} responses with Retry-After: {retry_after_s} were retried within "
        f"{elapsed_s:.1f} s"
    )
    assert store.secondary_queue.retries >= rejections
    mirror_id = mirror_of(primary_client, run_id)
    histories = read_histories(primary_client, run_id, secondary_client, mirror_id)
    assert_same_histories(histories, {"loss": 1_500, "accuracy": 1_500})
    assert secondary_client.get_run(mirror_id).info.status == "FINISHED"
    assert_spool_drained(store)


def test_reset_after_forward_creates_no_duplicates(
    rig, proxy, connect, primary_client, secondary_client
):
    # Writes reach the secondary only through the explicit flushes below.
    client, store = connect(flush_interval_s=60)
    experiment_id = client.create_experiment(unique_path("reset"))
    first_run = client.create_run(experiment_id)
    client.log_metric(first_run.info.run_id, "loss", 1.0, step=0)
    client.set_terminated(first_run.info.run_id)
    assert store.flush(timeout_s=FLUSH_TIMEOUT_S)
    secondary_experiment_id = primary_client.get_experiment(experiment_id).tags[
        SECONDARY_EXPERIMENT_ID_TAG
    ]

    # The server creates the run, but the client sees the connection reset.
    proxy.reset_after_forward(count=1)
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    assert store.secondary_queue.flush(timeout_s=FLUSH_TIMEOUT_S)
    assert proxy.stats()["faults_applied"]["reset_after_forward"] == 1

    # The server stores the first log_batch, but the client sees the connection reset.
    for chunk in metric_chunks(["loss", "accuracy"], 500, 4, base_ms=int(time.time() * 1000)):
        client.log_batch(run_id, metrics=chunk)
    proxy.reset_after_forward(count=1)
    assert store.secondary_queue.flush(timeout_s=FLUSH_TIMEOUT_S)
    assert proxy.stats()["faults_applied"]["reset_after_forward"] == 2
    client.set_terminated(run_id)
    assert store.flush(timeout_s=FLUSH_TIMEOUT_S)

    mirrors = secondary_client.search_runs(
        [secondary_experiment_id],
        f"tags.`{PRIMARY_RUN_ID_TAG}` = '{run_id}'",
        run_view_type=ViewType.ALL,
    )
    assert [mirror.info.run_id for mirror in mirrors] == [mirror_of(primary_client, run_id)], (
        f"secondary runs tagged with primary run {run_id}"
    )
    all_runs = secondary_client.search_runs([secondary_experiment_id], run_view_type=ViewType.ALL)
    assert len(all_runs) == 2, "runs in the secondary experiment"
    histories = read_histories(primary_client, run_id, secondary_client, mirrors[0].info.run_id)
    assert_same_histories(histories, {"loss": 2_000, "accuracy": 2_000})
    assert secondary_client.get_run(mirrors[0].info.run_id).info.status == "FINISHED"
    assert_spool_drained(store)


def test_spilled_writes_keep_order(rig, proxy, connect, primary_client, secondary_client):
    outage_min_s = 5
    capacity = 200
    points = 3_000
    _, store = connect(buffer_capacity_points=capacity, flush_interval_s=0.5)
    mlflow.set_experiment(unique_path("spill"))

    proxy.down(OUTAGE_LIMIT_S)
    outage_started_s = time.monotonic()
    highest_pending = 0
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        for step in range(points):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            if step == 1_000:
                mlflow.set_tag("stage", "a")
            if step == 2_000:
                mlflow.set_tag("stage", "b")
            highest_pending = max(highest_pending, store.secondary_queue.pending_points)
    caller_s = time.monotonic() - outage_started_s

    assert proxy.stats()["down"], f"the caller took {caller_s:.1f} s, past the outage"
    assert highest_pending > capacity
    assert primary_client.get_run(run_id).data.tags["stage"] == "b"

    wait_for_outage(outage_started_s, outage_min_s)
    proxy.up()
    assert store.flush(timeout_s=FLUSH_TIMEOUT_S)

    mirror_id = mirror_of(primary_client, run_id)
    # The file store lists points in the order they arrived.
    arrived = secondary_client.get_metric_history(mirror_id, "loss")
    assert [point.step for point in arrived] == list(range(points))
    histories = read_histories(primary_client, run_id, secondary_client, mirror_id)
    assert_same_histories(histories, {"loss": points})
    mirror = secondary_client.get_run(mirror_id)
    assert mirror.data.tags["stage"] == "b"
    assert mirror.info.status == "FINISHED"
    assert_spool_drained(store)
