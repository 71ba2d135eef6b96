"""The dual tracking store: writes go to the primary and, in the background, to the secondary.

The primary (Databricks) is the source of truth. Metrics are validated at the call site with
MLflow's own validation and queued for the primary. Every other primary write is synchronous,
so its error raises at the call site exactly as with the primary alone, and is not mirrored.
Every secondary (Azure ML) write goes through the secondary's FIFO queue, and the worker
translates its ids through ``IdMapping``. A secondary failure is logged, never raised.

Order: a run's queued metrics reach the primary before any synchronous primary write to that
run (so a run is never FINISHED before its metrics) and before any read of it
(read-your-writes). Reads go to the primary only. Artifact locations are returned as dual
artifact URIs, so artifacts logged through MLflow reach both backends.

Methods that need no translation are generated from the tables in ``routing``.
"""

import atexit
import copy
import logging
import threading
import weakref

from mlflow.store.tracking.abstract_store import AbstractStore

from mlflow_azdual import artifact_uri as dual_uri
from mlflow_azdual import compat, rest_batch, routing
from mlflow_azdual.coalesce import BatchLimits, Write
from mlflow_azdual.forking import renew_after_fork
from mlflow_azdual.id_mapping import (
    PRIMARY_MODEL_ID_TAG,
    SECONDARY_MODEL_ID_TAG,
    IdMapping,
    SecondaryRun,
)
from mlflow_azdual.mirror import Mirror
from mlflow_azdual.uri import parse_tracking_uri
from mlflow_azdual.write_queue import QueueFullError, WriteQueue, next_seq

_logger = logging.getLogger(__name__)

_stores = weakref.WeakSet()
_exit_handler_lock = threading.Lock()
_exit_handler_registered = False


def build_tracking_store(store_uri, artifact_uri=None, **_):
    """Build the dual store for an azdual tracking URI (MLflow's ``mlflow.tracking_store`` hook).

    Sub-stores are built on first use, not here: MLflow calls this builder while holding its
    store-building lock, and building a sub-store takes the same lock.
    """
    return DualTrackingStore(store_uri)


class DualTrackingStore(AbstractStore):
    """Tracking store that writes to two backends and reads from the primary."""

    def __init__(self, store_uri):
        self._config = parse_tracking_uri(store_uri)
        self.store_uri = store_uri
        self._build_lock = threading.Lock()
        renew_after_fork(self, "_build_lock")
        self._order_lock = threading.Lock()
        renew_after_fork(self, "_order_lock")
        self._primary = None
        self._secondary = None
        self._mapping = None
        # Secondary artifact locations by secondary experiment id and by primary model id.
        self._secondary_locations = {}
        self._model_locations = {}
        # Writes of a run copied from the primary with seq up to this value are already there.
        self._copied_through_seq = {}
        self._primary_errors = {}
        self.mirror = Mirror(self._config.secondary_uri)

        options = self._config.options
        limits = BatchLimits(
            max_metrics=options["max_batch_metrics"],
            max_params=options["max_batch_params"],
            max_tags=options["max_batch_tags"],
        )
        queue_options = dict(
            limits=limits,
            capacity_points=options["buffer_capacity_points"],
            flush_interval_s=options["flush_interval_s"],
            flush_threshold_points=options["flush_threshold_points"],
            backpressure_timeout_s=options["backpressure_timeout_s"],
        )
        self.primary_queue = WriteQueue("primary", self._send_primary_batch, **queue_options)
        self.secondary_queue = WriteQueue("secondary", self._send_secondary_batch, **queue_options)
        super().__init__()
        _stores.add(self)
        _register_exit_handler()

    # Sub-stores, built lazily

    @property
    def config(self):
        return self._config

    @property
    def primary(self):
        if self._primary is None:
            self._build_sub_stores()
        return self._primary

    @property
    def secondary(self):
        if self._secondary is None:
            self._build_sub_stores()
        return self._secondary

    @property
    def mapping(self) -> IdMapping:
        if self._mapping is None:
            self._build_sub_stores()
        return self._mapping

    def _build_sub_stores(self):
        with self._build_lock:
            if self._mapping is not None:
                return
            primary = compat.build_tracking_store(self._config.primary_uri)
            secondary = compat.build_tracking_store(self._config.secondary_uri)
            self._primary, self._secondary = primary, secondary
            self._mapping = IdMapping(
                primary, secondary, self._config.options["experiment_name_template"]
            )

    def get_host_creds(self):
        """Return the primary's host credentials (MLflow uses them for links and tracing)."""
        return self.primary.get_host_creds()

    # Queues and flushing

    def _submit(self, queue, write):
        try:
            queue.submit(write)
        except QueueFullError as error:
            from mlflow.exceptions import MlflowException

            raise MlflowException(f"mlflow-azdual: {error}") from None

    def flush_primary(self, run_id=None, timeout_s=None) -> bool:
        """Send the queued primary writes (of ``run_id`` only, if given) and wait for them.

        Raises MlflowException if the primary rejected queued metrics of that run.
        """
        done = self.primary_queue.flush(timeout_s=timeout_s, run_id=run_id)
        self._raise_primary_errors(run_id)
        return done

    def flush(self, timeout_s=None) -> bool:
        """Send everything queued for both backends and wait; False if ``timeout_s`` passed."""
        import time

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        primary_done = self.primary_queue.flush(timeout_s=timeout_s)
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
        secondary_done = self.secondary_queue.flush(timeout_s=remaining)
        self._raise_primary_errors(None)
        return primary_done and secondary_done

    def _raise_primary_errors(self, run_id):
        from mlflow.exceptions import MlflowException

        keys = [run_id] if run_id is not None else list(self._primary_errors)
        for key in keys:
            failure = self._primary_errors.pop(key, None)
            if failure is None:
                continue
            error, points = failure
            code = getattr(error, "error_code", "INTERNAL_ERROR")
            raise MlflowException(
                f"mlflow-azdual: the primary did not accept {points} queued metric points of "
                f"run {key}: {error}",
                error_code=code,
            )

    def _send_primary_batch(self, batch):
        try:
            rest_batch.log_batch(self.primary, batch.run_id, batch.metrics, batch.params, batch.tags)
        except Exception as error:  # noqa: BLE001 - raised to the caller at the next flush.
            _logger.error(
                "mlflow-azdual: primary rejected %d queued metric points of run %s: %s",
                len(batch.metrics), batch.run_id, error,
            )
            previous = self._primary_errors.get(batch.run_id)
            points = len(batch.metrics) + (previous[1] if previous else 0)
            self._primary_errors[batch.run_id] = (previous[0] if previous else error, points)

    def flush_async_logging(self):
        super().flush_async_logging()
        self.flush_primary()
        self.secondary_queue.wake()

    def end_async_logging(self):
        super().end_async_logging()
        self.flush_primary()
        self.secondary_queue.wake()

    def shut_down_async_logging(self):
        super().shut_down_async_logging()
        self.flush_primary()
        self.secondary_queue.wake()

    # Secondary side, run by the secondary worker

    def enqueue_secondary(self, operation, run_id, call, seq=None):
        """Queue ``call()`` for the secondary worker, which logs a failure instead of raising it.

        Raises MlflowException only when the queue stays full (backpressure).
        """
        write = Write(
            seq or next_seq(),
            run_id,
            call=lambda: self.mirror.send(operation, run_id, call),
            operation=operation,
        )
        self._submit(self.secondary_queue, write)

    def _enqueue_run_write(self, operation, run_id, write_to_mirror):
        """Queue ``write_to_mirror(secondary_run_id)`` unless the run's copy already has it."""
        seq = next_seq()

        def call():
            mirror = self._secondary_run(run_id)
            if seq <= self._copied_through_seq.get(run_id, 0):
                return None
            return write_to_mirror(mirror.run_id)

        self.enqueue_secondary(operation, run_id, call, seq)

    def _enqueue_experiment_write(self, operation, experiment_id, write):
        self.enqueue_secondary(
            operation, None, lambda: write(self.mapping.secondary_experiment_id(experiment_id))
        )

    def _secondary_run(self, run_id) -> SecondaryRun:
        """Return the run's mirror, creating it from the primary's state if it has none."""
        cached = self.mapping.cached_secondary_run(run_id)
        if cached is not None:
            return cached
        with self._order_lock:
            horizon = next_seq()
        # The copy is read from the primary, so it must hold every write numbered before it.
        self.primary_queue.flush()
        mirror = self.mapping.secondary_run(run_id)
        if mirror.backfilled:
            self._copied_through_seq[run_id] = horizon
        return mirror

    def _send_secondary_batch(self, batch):
        def send():
            mirror = self._secondary_run(batch.run_id)
            # NOTE: a batch that straddles the point where the run was copied from the primary
            # is sent whole. Its earlier items are then duplicates, which MLflow's stores
            # ignore for identical metrics, params and tags.
            if batch.last_seq <= self._copied_through_seq.get(batch.run_id, 0):
                return None
            return rest_batch.log_batch(
                self.secondary,
                mirror.run_id,
                [self._translate_metric(metric) for metric in batch.metrics],
                batch.params,
                self.mapping.translate_run_tags(batch.tags),
            )

        self.mirror.send("log_batch", batch.run_id, send)

    def secondary_artifact_root(self, mirror_of: str) -> str:
        """Return the secondary artifact location of ``run:<id>``, ``experiment:<id>``, ``model:<id>``."""
        kind, primary_id = mirror_of.split(":", 1)
        if kind == "run":
            return self._secondary_run(primary_id).artifact_uri
        if kind == "experiment":
            return self._secondary_experiment_location(
                self.mapping.secondary_experiment_id(primary_id)
            )
        secondary_id = self.mapping.secondary_model_id(primary_id)
        if secondary_id is None:
            raise LookupError(f"logged model {primary_id} has no mirror on the secondary")
        return self._model_location(primary_id, secondary_id)

    # Artifact locations

    def _dual_run_info(self, run_info):
        if run_info is None:
            return run_info
        mirror = self.mapping.cached_secondary_run(run_info.run_id)
        run_info._artifact_uri = dual_uri.make_dual_artifact_uri(
            run_info.artifact_uri,
            mirror.artifact_uri if mirror is not None else None,
            mirror_of=f"run:{run_info.run_id}",
        )
        return run_info

    def _dual_run(self, run):
        if run is not None:
            self._dual_run_info(run.info)
        return run

    def _dual_experiment(self, experiment):
        if experiment is None or experiment.lifecycle_stage != "active":
            return experiment
        secondary_id = self.mapping.cached_secondary_experiment_id(experiment.experiment_id)
        location = self._secondary_locations.get(secondary_id) if secondary_id else None
        experiment._artifact_location = dual_uri.make_dual_artifact_uri(
            experiment.artifact_location,
            location,
            mirror_of=f"experiment:{experiment.experiment_id}",
        )
        return experiment

    def _secondary_experiment_location(self, secondary_id):
        if secondary_id not in self._secondary_locations:
            experiment = self.secondary.get_experiment(secondary_id)
            self._secondary_locations[secondary_id] = experiment.artifact_location
        return self._secondary_locations[secondary_id]

    def _model_location(self, primary_id, secondary_id):
        if primary_id not in self._model_locations:
            model = self.secondary.get_logged_model(secondary_id)
            self._model_locations[primary_id] = model.artifact_location
        return self._model_locations[primary_id]

    def _dual_logged_model(self, model):
        if model is None:
            return model
        model._artifact_location = dual_uri.make_dual_artifact_uri(
            model.artifact_location,
            self._model_locations.get(model.model_id),
            mirror_of=f"model:{model.model_id}",
        )
        return model

    # Experiments

    def create_experiment(self, name, artifact_location=None, tags=None):
        experiment_id = self.primary.create_experiment(name, artifact_location, tags)
        self.enqueue_secondary(
            "create_experiment",
            None,
            lambda: self._secondary_experiment_location(
                self.mapping.secondary_experiment_id(experiment_id)
            ),
        )
        return experiment_id

    def get_experiment(self, experiment_id):
        return self._dual_experiment(self.primary.get_experiment(experiment_id))

    def get_experiment_by_name(self, experiment_name):
        return self._dual_experiment(self.primary.get_experiment_by_name(experiment_name))

    def search_experiments(self, *args, **kwargs):
        page = self.primary.search_experiments(*args, **kwargs)
        for experiment in page:
            self._dual_experiment(experiment)
        return page

    def delete_experiment(self, experiment_id):
        self.primary.delete_experiment(experiment_id)
        self._enqueue_experiment_write(
            "delete_experiment", experiment_id, lambda sid: self.secondary.delete_experiment(sid)
        )

    def restore_experiment(self, experiment_id):
        self.primary.restore_experiment(experiment_id)
        self._enqueue_experiment_write(
            "restore_experiment", experiment_id, lambda sid: self.secondary.restore_experiment(sid)
        )

    def rename_experiment(self, experiment_id, new_name):
        from mlflow.entities import ExperimentTag

        from mlflow_azdual.experiment_names import secondary_experiment_name
        from mlflow_azdual.id_mapping import PRIMARY_EXPERIMENT_NAME_TAG

        self.primary.rename_experiment(experiment_id, new_name)
        template = self._config.options["experiment_name_template"]

        def rename(secondary_id):
            self.secondary.set_experiment_tag(
                secondary_id, ExperimentTag(PRIMARY_EXPERIMENT_NAME_TAG, new_name)
            )
            self.secondary.rename_experiment(
                secondary_id, secondary_experiment_name(new_name, template)
            )

        self._enqueue_experiment_write("rename_experiment", experiment_id, rename)

    def set_experiment_tag(self, experiment_id, tag):
        self.primary.set_experiment_tag(experiment_id, tag)
        self._enqueue_experiment_write(
            "set_experiment_tag",
            experiment_id,
            lambda sid: self.secondary.set_experiment_tag(sid, tag),
        )

    def delete_experiment_tag(self, experiment_id, key):
        self.primary.delete_experiment_tag(experiment_id, key)
        self._enqueue_experiment_write(
            "delete_experiment_tag",
            experiment_id,
            lambda sid: self.secondary.delete_experiment_tag(sid, key),
        )

    # Runs

    def create_run(self, experiment_id, user_id, start_time, tags, run_name):
        run = self.primary.create_run(experiment_id, user_id, start_time, tags, run_name)
        self.enqueue_secondary(
            "create_run",
            run.info.run_id,
            lambda: self.mapping.create_secondary_run(
                run, experiment_id, user_id, start_time, tags, run_name
            ),
        )
        return self._dual_run(run)

    def get_run(self, run_id):
        self.flush_primary(run_id)
        return self._dual_run(self.primary.get_run(run_id))

    def get_metric_history(self, run_id, metric_key, *args, **kwargs):
        self.flush_primary(run_id)
        return self.primary.get_metric_history(run_id, metric_key, *args, **kwargs)

    def get_metric_history_bulk_interval_from_steps(self, run_id, *args, **kwargs):
        self.flush_primary(run_id)
        return self.primary.get_metric_history_bulk_interval_from_steps(run_id, *args, **kwargs)

    def get_metric_history_bulk_interval(self, run_ids, *args, **kwargs):
        self.flush_primary()
        return self.primary.get_metric_history_bulk_interval(run_ids, *args, **kwargs)

    def search_runs(self, *args, **kwargs):
        self.flush_primary()
        page = self.primary.search_runs(*args, **kwargs)
        for run in page:
            self._dual_run(run)
        return page

    def _search_runs(self, *args, **kwargs):
        self.flush_primary()
        return self.primary._search_runs(*args, **kwargs)

    def update_run_info(self, run_id, run_status, end_time, run_name):
        self.flush_primary(run_id)
        info = self.primary.update_run_info(run_id, run_status, end_time, run_name)
        self._enqueue_run_write(
            "update_run_info",
            run_id,
            lambda sid: self.secondary.update_run_info(sid, run_status, end_time, run_name),
        )
        self.secondary_queue.wake()
        return self._dual_run_info(info)

    def delete_run(self, run_id):
        self.flush_primary(run_id)
        self.primary.delete_run(run_id)
        self._enqueue_run_write("delete_run", run_id, lambda sid: self.secondary.delete_run(sid))

    def restore_run(self, run_id):
        self.primary.restore_run(run_id)
        self._enqueue_run_write("restore_run", run_id, lambda sid: self.secondary.restore_run(sid))

    def log_metric(self, run_id, metric):
        from mlflow.utils.validation import _validate_metric

        # The same check, and so the same message, as the server's LogMetric endpoint.
        _validate_metric(metric.key, metric.value, metric.timestamp, metric.step)
        self._queue_metrics(run_id, (metric,))

    def _queue_metrics(self, run_id, metrics, params=(), tags=()):
        metrics, params, tags = tuple(metrics), tuple(params), tuple(tags)
        # Room is reserved in both queues first, so a call that times out queues nothing.
        self._reserve(self.secondary_queue, len(metrics) + len(params) + len(tags))
        if metrics:
            self._reserve(self.primary_queue, len(metrics))

        # A sequence number is taken and the primary queued under one lock, so that a copy of
        # the run read from the primary (``_secondary_run``) holds every write numbered before
        # its horizon.
        with self._order_lock:
            write = Write(next_seq(), run_id, metrics, params, tags)
            if metrics:
                self.primary_queue.submit(Write(write.seq, run_id, metrics), wait_for_room=False)
        self.secondary_queue.submit(write, wait_for_room=False)

    def _reserve(self, queue, size):
        try:
            queue.reserve(size or 1)
        except QueueFullError as error:
            from mlflow.exceptions import MlflowException

            raise MlflowException(f"mlflow-azdual: {error}") from None

    def log_param(self, run_id, param):
        self.flush_primary(run_id)
        self.primary.log_param(run_id, param)
        self._submit(self.secondary_queue, Write(next_seq(), run_id, params=(param,)))

    def set_tag(self, run_id, tag):
        self.flush_primary(run_id)
        self.primary.set_tag(run_id, tag)
        self._submit(self.secondary_queue, Write(next_seq(), run_id, tags=(tag,)))

    def delete_tag(self, run_id, key):
        self.flush_primary(run_id)
        self.primary.delete_tag(run_id, key)
        self._enqueue_run_write("delete_tag", run_id, lambda sid: self.secondary.delete_tag(sid, key))

    def log_batch(self, run_id, metrics, params, tags):
        from mlflow.utils.validation import _validate_batch_log_data

        metrics, params, tags = list(metrics or ()), list(params or ()), list(tags or ())
        _validate_batch_log_data(metrics, params, tags)
        if params or tags:
            self.flush_primary(run_id)
            self.primary.log_batch(run_id, [], params, tags)
        self._queue_metrics(run_id, metrics, params, tags)

    def log_inputs(self, run_id, datasets=None, models=None):
        # MLflow 2.x stores take no ``models`` argument, so it is passed only when given.
        extra = {} if models is None else {"models": models}
        self.flush_primary(run_id)
        self.primary.log_inputs(run_id, datasets=datasets, **extra)

        def send(secondary_run_id):
            mirrored = dict(extra)
            if models is not None:
                mirrored["models"] = self._translate_model_refs(models)
            return self.secondary.log_inputs(secondary_run_id, datasets=datasets, **mirrored)

        self._enqueue_run_write("log_inputs", run_id, send)

    def log_outputs(self, run_id, models):
        self.flush_primary(run_id)
        self.primary.log_outputs(run_id, models)
        self._enqueue_run_write(
            "log_outputs",
            run_id,
            lambda sid: self.secondary.log_outputs(sid, self._translate_model_refs(models)),
        )

    def record_logged_model(self, run_id, mlflow_model):
        self.flush_primary(run_id)
        self.primary.record_logged_model(run_id, mlflow_model)
        mirrored = copy.deepcopy(mlflow_model)

        def send(secondary_run_id):
            mirrored.run_id = secondary_run_id
            return self.secondary.record_logged_model(secondary_run_id, mirrored)

        self._enqueue_run_write("record_logged_model", run_id, send)

    def _translate_metric(self, metric):
        model_id = getattr(metric, "model_id", None)
        if not model_id:
            return metric
        mirrored = copy.copy(metric)
        mirrored._model_id = self.mapping.cached_secondary_model_id(model_id)
        return mirrored

    def _translate_model_refs(self, references):
        """Return logged-model inputs or outputs with model ids of the secondary; drop unmapped."""
        translated = []
        for reference in references or []:
            secondary_id = self.mapping.cached_secondary_model_id(reference.model_id)
            if secondary_id is None:
                continue
            mirrored = copy.copy(reference)
            mirrored._model_id = secondary_id
            translated.append(mirrored)
        return translated

    # Logged models (MLflow 3)

    def create_logged_model(self, experiment_id, *args, **kwargs):
        from inspect import signature

        model = self.primary.create_logged_model(experiment_id, *args, **kwargs)
        arguments = dict(
            signature(self.primary.create_logged_model).bind(experiment_id, *args, **kwargs).arguments
        )
        self.enqueue_secondary(
            "create_logged_model",
            arguments.get("source_run_id"),
            lambda: self._mirror_logged_model(model, arguments),
        )
        return self._dual_logged_model(model)

    def _mirror_logged_model(self, model, arguments):
        from mlflow.entities import LoggedModelTag

        arguments = dict(arguments)
        arguments["experiment_id"] = self.mapping.secondary_experiment_id(arguments["experiment_id"])
        if arguments.get("source_run_id"):
            arguments["source_run_id"] = self._secondary_run(arguments["source_run_id"]).run_id
        arguments["tags"] = list(arguments.get("tags") or []) + [
            LoggedModelTag(PRIMARY_MODEL_ID_TAG, model.model_id)
        ]
        mirrored = self.secondary.create_logged_model(**arguments)
        self.mapping.remember_model(model.model_id, mirrored.model_id)
        self._model_locations[model.model_id] = mirrored.artifact_location
        self.primary.set_logged_model_tags(
            model.model_id, [LoggedModelTag(SECONDARY_MODEL_ID_TAG, mirrored.model_id)]
        )
        return mirrored

    def get_logged_model(self, model_id, *args, **kwargs):
        return self._dual_logged_model(self.primary.get_logged_model(model_id, *args, **kwargs))

    def _enqueue_model_write(self, operation, model_id, write):
        def call():
            secondary_id = self.mapping.secondary_model_id(model_id)
            if secondary_id is None:
                self.mirror.record_unsupported(
                    operation, "the logged model has no mirror on the secondary"
                )
                return None
            return write(secondary_id)

        self.enqueue_secondary(operation, None, call)

    def finalize_logged_model(self, model_id, status):
        model = self.primary.finalize_logged_model(model_id, status)
        self._enqueue_model_write(
            "finalize_logged_model",
            model_id,
            lambda sid: self.secondary.finalize_logged_model(sid, status),
        )
        return self._dual_logged_model(model)

    def set_logged_model_tags(self, model_id, tags):
        self.primary.set_logged_model_tags(model_id, tags)
        self._enqueue_model_write(
            "set_logged_model_tags",
            model_id,
            lambda sid: self.secondary.set_logged_model_tags(sid, tags),
        )

    def delete_logged_model_tag(self, model_id, key):
        self.primary.delete_logged_model_tag(model_id, key)
        self._enqueue_model_write(
            "delete_logged_model_tag",
            model_id,
            lambda sid: self.secondary.delete_logged_model_tag(sid, key),
        )

    def delete_logged_model(self, model_id):
        self.primary.delete_logged_model(model_id)
        self._enqueue_model_write(
            "delete_logged_model", model_id, lambda sid: self.secondary.delete_logged_model(sid)
        )

    def log_logged_model_params(self, model_id, params):
        self.primary.log_logged_model_params(model_id, params)
        self._enqueue_model_write(
            "log_logged_model_params",
            model_id,
            lambda sid: self.secondary.log_logged_model_params(sid, params),
        )


routing.install_routes(
    DualTrackingStore, routing.TRACKING_READS, routing.TRACKING_PRIMARY_ONLY_WRITES
)


def flush(timeout_s=None) -> bool:
    """Send every write queued by this process's dual stores to both backends and wait.

    Returns True when everything was sent, False if ``timeout_s`` passed first. Raises
    MlflowException if the primary rejected queued metrics.
    """
    import time

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    done = True
    for store in list(_stores):
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
        done = store.flush(timeout_s=remaining) and done
    return done


def _register_exit_handler():
    global _exit_handler_registered
    with _exit_handler_lock:
        if not _exit_handler_registered:
            atexit.register(_flush_at_exit)
            _exit_handler_registered = True


def _end_active_run():
    """End the active run as MLflow's own exit hook would, so its last writes are queued too."""
    import mlflow

    if mlflow.active_run() is not None and str(mlflow.get_tracking_uri()).startswith("azdual:"):
        from mlflow.tracking.fluent import _safe_end_run

        _safe_end_run()


def _flush_at_exit():
    """Send queued writes at interpreter exit, for at most ``exit_flush_timeout_s``."""
    import time

    stores = list(_stores)
    if not stores:
        return
    try:
        _end_active_run()
    except Exception as error:  # noqa: BLE001 - exit must go on.
        _logger.warning("mlflow-azdual: ending the active run at exit failed: %s", error)

    timeout_s = max(store.config.options["exit_flush_timeout_s"] for store in stores)
    deadline = time.monotonic() + timeout_s
    for store in stores:
        for queue in (store.primary_queue, store.secondary_queue):
            remaining = max(deadline - time.monotonic(), 0)
            if queue.flush(timeout_s=remaining):
                continue
            _logger.error(
                "mlflow-azdual: exit flush timed out after %.0f s; %d queued entities for the "
                "%s backend were not sent",
                timeout_s, queue.pending_points, queue.backend,
            )
        for run_id, (error, points) in list(store._primary_errors.items()):
            _logger.error(
                "mlflow-azdual: the primary did not accept %d metric points of run %s: %s",
                points, run_id, error,
            )
