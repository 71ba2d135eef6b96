"""Tracking stores that exist only for the benchmarks, registered under their own URI schemes.

`NoopStore` (`noop:`) keeps experiments and runs in memory and discards metrics, so the cost
of `mlflow.log_metric` against it is MLflow's own client overhead: the floor.

`SequentialDualStore` (`sequential-dual:?primary=<uri>&secondary=<uri>`) copies the write path
of azureml-mlflow's `AdbAzuremlRestStore`, the `adbazureml://` linked-workspace mode. It
mirrors log_metric, log_param, set_tag and update_run_info by calling the primary's REST store
and then the secondary's, synchronously, on the caller's thread. Like that store it sends
log_batch to the primary only, and reads go to the primary. That store gave the Azure ML run
the Databricks run id, but an MLflow server assigns its own, so this one maps the ids.
"""

import threading
import time
import urllib.parse
import uuid

from mlflow.entities import Experiment, Run, RunData, RunInfo, RunStatus
from mlflow.entities.lifecycle_stage import LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.store.tracking.abstract_store import AbstractStore

NOOP_SCHEME = "noop"
SEQUENTIAL_DUAL_SCHEME = "sequential-dual"


def register_benchmark_stores() -> None:
    """Register both stores in MLflow's tracking store registry of this process."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    _tracking_store_registry.register(NOOP_SCHEME, lambda store_uri=None, **_: NoopStore())
    _tracking_store_registry.register(
        SEQUENTIAL_DUAL_SCHEME, lambda store_uri=None, **_: SequentialDualStore(store_uri)
    )


def sequential_dual_uri(primary_uri: str, secondary_uri: str) -> str:
    query = urllib.parse.urlencode({"primary": primary_uri, "secondary": secondary_uri})
    return f"{SEQUENTIAL_DUAL_SCHEME}:?{query}"


class NoopStore(AbstractStore):
    """In-memory store with the methods that `start_run`, `log_metric` and `end_run` call.

    Experiments and runs are kept. Metrics, params and tags are dropped.
    """

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self._experiments = {
            "0": Experiment("0", "Default", "noop:/0", LifecycleStage.ACTIVE, tags={})
        }
        self._runs = {}

    def create_experiment(self, name, artifact_location=None, tags=None):
        with self._lock:
            experiment_id = str(len(self._experiments))
            tag_map = {tag.key: tag.value for tag in tags or []}
            self._experiments[experiment_id] = Experiment(
                experiment_id,
                name,
                artifact_location or f"noop:/{experiment_id}",
                LifecycleStage.ACTIVE,
                tags=tag_map,
            )
            return experiment_id

    def get_experiment(self, experiment_id):
        experiment = self._experiments.get(str(experiment_id))
        if experiment is None:
            raise MlflowException(
                f"Experiment {experiment_id} not found", error_code=RESOURCE_DOES_NOT_EXIST
            )
        return experiment

    def get_experiment_by_name(self, experiment_name):
        for experiment in self._experiments.values():
            if experiment.name == experiment_name:
                return experiment
        return None

    def create_run(self, experiment_id, user_id, start_time, tags, run_name):
        run_id = uuid.uuid4().hex
        info = RunInfo(
            run_id=run_id,
            experiment_id=str(experiment_id),
            user_id=user_id,
            status=RunStatus.to_string(RunStatus.RUNNING),
            start_time=start_time,
            end_time=None,
            lifecycle_stage=LifecycleStage.ACTIVE,
            artifact_uri=f"noop:/{experiment_id}/{run_id}/artifacts",
            run_name=run_name or run_id[:8],
        )
        run = Run(info, RunData(tags=list(tags or [])))
        with self._lock:
            self._runs[run_id] = run
        return run

    def get_run(self, run_id):
        run = self._runs.get(run_id)
        if run is None:
            raise MlflowException(f"Run {run_id} not found", error_code=RESOURCE_DOES_NOT_EXIST)
        return run

    def update_run_info(self, run_id, run_status, end_time, run_name):
        info = self.get_run(run_id).info
        info._status = RunStatus.to_string(run_status)
        info._end_time = end_time
        if run_name:
            info._run_name = run_name
        return info

    def log_metric(self, run_id, metric):
        pass

    def log_param(self, run_id, param):
        pass

    def set_tag(self, run_id, tag):
        pass

    def log_batch(self, run_id, metrics, params, tags):
        pass


class SequentialDualStore(AbstractStore):
    """Primary REST store, then secondary REST store, one synchronous call after the other."""

    def __init__(self, store_uri):
        super().__init__()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(store_uri).query)
        self._primary_uri = query["primary"][0]
        self._secondary_uri = query["secondary"][0]
        self._build_lock = threading.Lock()
        self._stores = None
        self._secondary_run_ids = {}

    # MLflow builds stores under a non-re-entrant lock, so the REST stores are built on first use.
    def _backends(self):
        with self._build_lock:
            if self._stores is None:
                from mlflow.tracking._tracking_service.utils import _tracking_store_registry

                builder = _tracking_store_registry.get_store_builder
                self._stores = tuple(
                    builder(uri)(store_uri=uri, artifact_uri=None)
                    for uri in (self._primary_uri, self._secondary_uri)
                )
            return self._stores

    @property
    def primary(self):
        return self._backends()[0]

    @property
    def secondary(self):
        return self._backends()[1]

    def get_host_creds(self):
        return self.primary.get_host_creds()

    def create_experiment(self, name, artifact_location=None, tags=None):
        return self.primary.create_experiment(name, artifact_location, tags)

    def get_experiment(self, experiment_id):
        return self.primary.get_experiment(experiment_id)

    def get_experiment_by_name(self, experiment_name):
        return self.primary.get_experiment_by_name(experiment_name)

    def create_run(self, experiment_id, user_id, start_time, tags, run_name):
        run = self.primary.create_run(experiment_id, user_id, start_time, tags, run_name)
        name = self.primary.get_experiment(experiment_id).name
        secondary_experiment = self.secondary.get_experiment_by_name(name)
        if secondary_experiment is None:
            secondary_experiment_id = self.secondary.create_experiment(name)
        else:
            secondary_experiment_id = secondary_experiment.experiment_id
        secondary_run = self.secondary.create_run(
            secondary_experiment_id, user_id, start_time or int(time.time() * 1000), tags, run_name
        )
        self._secondary_run_ids[run.info.run_id] = secondary_run.info.run_id
        return run

    def secondary_run_id(self, run_id):
        return self._secondary_run_ids[run_id]

    def get_run(self, run_id):
        return self.primary.get_run(run_id)

    def update_run_info(self, run_id, run_status, end_time, run_name):
        info = self.primary.update_run_info(run_id, run_status, end_time, run_name)
        self.secondary.update_run_info(
            self._secondary_run_ids[run_id], run_status, end_time, run_name
        )
        return info

    def log_metric(self, run_id, metric):
        self.primary.log_metric(run_id, metric)
        self.secondary.log_metric(self._secondary_run_ids[run_id], metric)

    def log_param(self, run_id, param):
        self.primary.log_param(run_id, param)
        self.secondary.log_param(self._secondary_run_ids[run_id], param)

    def set_tag(self, run_id, tag):
        self.primary.set_tag(run_id, tag)
        self.secondary.set_tag(self._secondary_run_ids[run_id], tag)

    def log_batch(self, run_id, metrics, params, tags):
        self.primary.log_batch(run_id, metrics, params, tags)
