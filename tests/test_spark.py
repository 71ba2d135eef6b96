"""PySpark on this machine: batch scoring with spark_udf and metrics logged from Spark tasks.

One SparkSession (local[2], so two Python worker processes) serves every test of this module.
It is started after the rig's environment is applied, so the JVM and the Python workers it
forks inherit the storage settings and telemetry switches. The workers also get the loopback
guard through spark.executorEnv.PYTHONPATH. Spark listens on 127.0.0.1 only, its UI is off,
and no package is fetched (no spark.jars.packages).
"""

import os
import socket
import sys
import time
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from rig.guard import GUARD_PATH
from tests.dual_helpers import (
    backend_clients,
    metric_history,
    secondary_run_id,
    unique_path,
)

# Variables of the pytest process that would change how PySpark launches the JVM: another
# Spark installation, or spark-submit arguments such as --packages (an Ivy download).
_LAUNCH_VARIABLES = ("SPARK_HOME", "PYSPARK_SUBMIT_ARGS", "SPARK_CONF_DIR")

PARTITIONS = 8
POINTS_PER_PARTITION = 130  # 8 x 130 = 1,040 points of one key, more than one history page


@pytest.fixture(scope="session")
def spark(rig, tmp_path_factory):
    """A local[2] SparkSession bound to 127.0.0.1, with the rig's environment in its workers."""
    from pyspark.sql import SparkSession

    for name in _LAUNCH_VARIABLES:
        os.environ.pop(name, None)
    # Spark reads the first two in the JVM it starts; SparkContext starts workers with the third.
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    os.environ["SPARK_LOCAL_HOSTNAME"] = "localhost"
    os.environ["PYSPARK_PYTHON"] = sys.executable
    work_dir = tmp_path_factory.mktemp("spark")

    builder = (
        SparkSession.builder.master("local[2]")
        .appName("mlflow-azdual-tests")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.local.dir", str(work_dir / "local"))
        .config("spark.sql.warehouse.dir", str(work_dir / "warehouse"))
        # The C1 compiler only and the serial collector: the session starts in about 7 s instead
        # of 11-14 s (2-core machine, PySpark 4.0.5, Java 17).
        .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
        .config("spark.executorEnv.PYTHONPATH", str(GUARD_PATH))
    )
    for name, value in rig.env.items():
        builder = builder.config(f"spark.executorEnv.{name}", value)
    spool_dir = os.environ["MLFLOW_AZDUAL_SPOOL_DIR"]
    builder = builder.config("spark.executorEnv.MLFLOW_AZDUAL_SPOOL_DIR", spool_dir)

    session = builder.getOrCreate()
    # The workers cannot import this test module, so its task functions travel by value.
    from pyspark import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield session
    finally:
        session.stop()


def _listening_addresses(pid: int) -> set:
    """Return the local addresses of the TCP sockets that process ``pid`` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])

    addresses = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/{pid}/net/{table}") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: TCP_LISTEN
                    continue
                address_hex = local.split(":")[0]
                raw = bytes.fromhex(address_hex)
                # /proc prints each 32-bit word of the address in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.add(socket.inet_ntop(family, raw))
    return addresses


def _worker_facts(_):
    import os
    import sys

    guard = sys.modules.get("loopback_guard")
    names = (
        "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "MLFLOW_S3_ENDPOINT_URL",
        "AZURE_STORAGE_CONNECTION_STRING", "MLFLOW_AZDUAL_SPOOL_DIR",
    )
    yield {
        "pid": os.getpid(),
        "daemon_pid": os.getppid(),
        "guard_installed": bool(guard is not None and guard._installed),
        "env": {name: os.environ.get(name) for name in names},
    }


def test_spark_listens_on_loopback_only(spark):
    facts = spark.sparkContext.parallelize(range(2), 2).mapPartitions(_worker_facts).collect()
    jvm_pid = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()

    jvm_addresses = _listening_addresses(jvm_pid)
    assert jvm_addresses, "the JVM listens on no TCP socket, so the check found nothing"
    assert jvm_addresses <= {"127.0.0.1", "::ffff:127.0.0.1"}
    for daemon_pid in {fact["daemon_pid"] for fact in facts}:
        assert _listening_addresses(daemon_pid) <= {"127.0.0.1"}


def test_spark_workers_get_guard_and_rig_env(rig, spark):
    facts = spark.sparkContext.parallelize(range(2), 2).mapPartitions(_worker_facts).collect()

    for fact in facts:
        assert fact["pid"] != os.getpid()
        assert fact["guard_installed"] is True
        assert fact["env"] == {
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "MLFLOW_S3_ENDPOINT_URL": rig.s3_endpoint_url,
            "AZURE_STORAGE_CONNECTION_STRING": rig.azure_storage_connection_string,
            "MLFLOW_AZDUAL_SPOOL_DIR": os.environ["MLFLOW_AZDUAL_SPOOL_DIR"],
        }


def test_spark_udf_scores_runs_and_models_uris(rig, dual, spark, iris_model):
    model, features = iris_model
    mlflow.set_experiment(unique_path("spark-scoring"))
    name = f"spark-iris-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run() as run:
        # Positional "model": artifact_path in MLflow 2.x, and still accepted by MLflow 3.x.
        mlflow.sklearn.log_model(model, "model", registered_model_name=name)

    columns = [f"feature_{index}" for index in range(features.shape[1])]
    frame = pd.DataFrame(features, columns=columns)
    frame.insert(0, "row", np.arange(len(frame)))
    data = spark.createDataFrame(frame)
    expected = [float(label) for label in model.predict(features)]

    for model_uri in (f"runs:/{run.info.run_id}/model", f"models:/{name}/1"):
        predict = mlflow.pyfunc.spark_udf(spark, model_uri)
        scored = data.withColumn("prediction", predict(*columns)).orderBy("row")
        predictions = [row.prediction for row in scored.select("prediction").collect()]

        assert predictions == expected, model_uri


def _log_partition_points(uri, run_id, per_point_calls, flush_at_end):
    """Return a mapPartitionsWithIndex function that logs one partition's points to ``run_id``.

    Steps are the partition's row values, so each point of ``loss`` has a distinct step. The
    first ``per_point_calls`` points of a partition go through log_metric, the rest through
    one log_batch; each partition also logs ``rows_<index>`` once.
    """

    def log_points(index, rows):
        import os

        from mlflow import MlflowClient
        from mlflow.entities import Metric

        import mlflow_azdual

        client = MlflowClient(tracking_uri=uri)
        steps = list(rows)
        for step in steps[:per_point_calls]:
            client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step, timestamp=1_000 + step)
        batch = [Metric("loss", 1.0 / (step + 1), 1_000 + step, step) for step in steps[per_point_calls:]]
        client.log_batch(run_id, metrics=batch + [Metric(f"rows_{index}", len(steps), 2_000, 0)])
        if flush_at_end:
            mlflow_azdual.flush()
        yield os.getpid(), len(steps)

    return log_points


def _expected_points():
    loss = [(step, 1.0 / (step + 1), 1_000 + step) for step in range(PARTITIONS * POINTS_PER_PARTITION)]
    rows = {f"rows_{index}": [(0, float(POINTS_PER_PARTITION), 2_000)] for index in range(PARTITIONS)}
    return {"loss": loss, **rows}


def _points_on(client, run_id, key, paged):
    if paged:
        history = metric_history(client, run_id, key)
    else:
        history = client.get_metric_history(run_id, key)
    return sorted((point.step, point.value, point.timestamp) for point in history)


def _run_logging_job(spark, uri, per_point_calls, flush_at_end):
    """Log the points of ``_expected_points`` from Spark tasks; return run id and worker pids."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(unique_path("spark-metrics"))
    run_id = mlflow.start_run().info.run_id
    steps = spark.sparkContext.parallelize(range(PARTITIONS * POINTS_PER_PARTITION), PARTITIONS)
    log_points = _log_partition_points(uri, run_id, per_point_calls, flush_at_end)
    results = steps.mapPartitionsWithIndex(log_points).collect()
    return run_id, results


def _assert_points_on_both_backends(rig, run_id):
    primary = MlflowClient(tracking_uri=rig.primary_server_uri)
    secondary = MlflowClient(tracking_uri=rig.secondary_server_uri)
    expected = _expected_points()

    # Read before anything of the driver is flushed: the tasks' own writes must be there.
    for key, points in expected.items():
        assert _points_on(primary, run_id, key, paged=False) == points, f"primary {key}"
    mirror_id = secondary_run_id(backend_clients(rig)[0], run_id)
    for key, points in expected.items():
        assert _points_on(secondary, mirror_id, key, paged=True) == points, f"secondary {key}"


def test_spark_tasks_log_to_one_run(rig, spark):
    # flush_interval_s=60: nothing is sent by the timer while the test runs, so only the
    # task-end flush can have sent the points when the job returns.
    uri = rig.dual_tracking_uri(flush_interval_s=60, spark_task_write_through="false")
    run_id, results = _run_logging_job(
        spark, uri, per_point_calls=POINTS_PER_PARTITION, flush_at_end=True
    )
    try:
        worker_pids = {pid for pid, _ in results}
        assert [count for _, count in results] == [POINTS_PER_PARTITION] * PARTITIONS
        assert 1 < len(worker_pids) < PARTITIONS, "expected two reused worker processes"
        _assert_points_on_both_backends(rig, run_id)
    finally:
        mlflow.end_run()


def test_spark_tasks_without_flush_lose_nothing(rig, spark):
    # Vanilla MLflow code in the task, with no flush: each write returns once both backends
    # have it, so the points are there when the job returns, before any timer or exit.
    uri = rig.dual_tracking_uri(flush_interval_s=60)
    started_s = time.monotonic()
    run_id, results = _run_logging_job(spark, uri, per_point_calls=5, flush_at_end=False)
    try:
        assert time.monotonic() - started_s < 60, "the job outlasted flush_interval_s"
        assert [count for _, count in results] == [POINTS_PER_PARTITION] * PARTITIONS
        _assert_points_on_both_backends(rig, run_id)
    finally:
        mlflow.end_run()
