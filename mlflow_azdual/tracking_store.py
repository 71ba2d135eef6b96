"""The dual tracking store: writes go to the primary and, in the background, to the secondary.

The primary (Databricks) is the source of truth. Metrics are validated at the call site with
MLflow's own validation and queued for the primary. Every other primary write is synchronous,
so its error raises at the call site exactly as with the primary alone, and is not mirrored.
Every secondary (Azure ML) write goes through the secondary's FIFO queue as data (an
operation name and its arguments), so it can be spooled and replayed by another process; the
worker translates its ids through ``IdMapping``. A secondary failure is retried, then logged
and recorded (a dead letter, or a write given up and kept in the spool); it is raised only in
strict mode, at the next flush or end_run.

Order: a run's queued metrics reach the primary before any synchronous primary write to that
run (so a run is never FINISHED before its metrics) and before any read of it
(read-your-writes). In a PySpark task each write returns only once both backends have it
(option ``spark_task_write_through``). Reads go to the primary only. Artifact locations are
returned as dual artifact URIs, so artifacts logged through MLflow reach both backends.

Methods that need no translation are generated from the tables in ``routing``.
"""

import atexit
import copy
import dataclasses
import logging
import os
import threading
import weakref

from mlflow.store.tracking.abstract_store import AbstractStore

from mlflow_azdual import artifact_uri as dual_uri
from mlflow_azdual import compat, mirror_rules, rest_batch, routing
from mlflow_azdual import model_as_run_artifacts as run_artifact_models
from mlflow_azdual.coalesce import Batch, BatchLimits, Write
from mlflow_azdual.forking import renew_after_fork
from mlflow_azdual.id_mapping import (
    PRIMARY_MODEL_ID_TAG,
    SECONDARY_MODEL_ID_TAG,
    IdMapping,
    SecondaryRun,
)
from mlflow_azdual.idempotency import remove_delivered
from mlflow_azdual.job_credentials import (
    tracking_token_belongs_to_secondary,
    without_tracking_token,
)
from mlflow_azdual.logs import get_logger
from mlflow_azdual.mirror import Mirror
from mlflow_azdual.mirror_rules import TRUNCATED_PARAM_TAG_PREFIX  # noqa: F401 - public name
from mlflow_azdual.retry import RateLimitedLogger, RetryPolicy
from mlflow_azdual.single_attempt import make_single_attempt
from mlflow_azdual.spark_tasks import in_spark_task
from mlflow_azdual.uri import parse_tracking_uri
from mlflow_azdual.write_queue import QueueFullError, WriteQueue, next_seq

_logger = get_logger(__name__)
_check_failures = RateLimitedLogger(_logger)

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
        self._spool_lock = threading.Lock()
        renew_after_fork(self, "_spool_lock")
        self._primary = None
        self._primary_writer = None
        self._secondary = None
        self._mapping = None
        self._registry_mirrors = {}
        self._spool_state = None
        # Secondary writes rejected or given up, by primary run id ("" for other writes); raised
        # in strict mode.
        self._secondary_failures = {}
        # Secondary artifact locations by secondary experiment id and by primary model id.
        self._secondary_locations = {}
        self._model_locations = {}
        # Writes of a run copied from the primary with seq up to this value are already there.
        self._copied_through_seq = {}
        self._primary_errors = {}
        self.mirror = Mirror(self._config.secondary_uri)

        options = self._config.options
        from mlflow_azdual.backend_profiles import profile_for

        option_limits = BatchLimits(
            max_metrics=options["max_batch_metrics"],
            max_params=options["max_batch_params"],
            max_tags=options["max_batch_tags"],
        )
        # The primary's profile also sets the rule for experiment names.
        self.primary_profile = profile_for(
            self._config.primary_uri, options["primary_profile"], options["primary_limits"]
        )
        self.secondary_profile = profile_for(
            self._config.secondary_uri, options["secondary_profile"], options["secondary_limits"]
        )
        self.backend_limits = {
            "primary": self.primary_profile.limits.narrowed(option_limits),
            "secondary": self.secondary_profile.limits.narrowed(option_limits),
        }
        # Param keys of each mirror run, by primary run id, for the secondary's per-run cap.
        self._secondary_param_keys = {}
        # max_results of the secondary's metric-history reads: the profile's limit, else the
        # page size of MlflowClient.get_metric_history.
        self.secondary_history_page_size = (
            self.secondary_profile.max_metric_history_page_size or CLIENT_HISTORY_PAGE_SIZE
        )
        self.history_page_sizes = {
            "primary": self.primary_profile.max_metric_history_page_size or CLIENT_HISTORY_PAGE_SIZE,
            "secondary": self.secondary_history_page_size,
        }
        self.policy = RetryPolicy(
            initial_backoff_s=options["retry_initial_backoff_s"],
            max_backoff_s=max(options["retry_max_backoff_s"], options["retry_initial_backoff_s"]),
            attempt_timeout_s=options["retry_attempt_timeout_s"],
            total_s=options["retry_total_s"],
        )
        queue_options = dict(
            capacity_points=options["buffer_capacity_points"],
            flush_interval_s=options["flush_interval_s"],
            flush_threshold_points=options["flush_threshold_points"],
            backpressure_timeout_s=options["backpressure_timeout_s"],
            policy=self.policy,
            spool=self.spool if options["spool"] else None,
        )
        self.primary_queue = WriteQueue(
            "primary", self.send_primary, limits=self.backend_limits["primary"],
            on_failure=self._record_primary_failure, **queue_options,
        )
        self.secondary_queue = WriteQueue(
            "secondary", self.send_secondary, limits=self.backend_limits["secondary"],
            on_failure=self._record_secondary_failure, **queue_options,
        )
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
    def primary_writer(self):
        """The primary store the writer thread uses: each request sent once, retried by policy."""
        if self._primary_writer is None:
            self._build_sub_stores()
        return self._primary_writer

    @property
    def secondary(self):
        """The secondary store, used by writer threads only: each request sent once."""
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
            timeout_s = self.policy.attempt_timeout_s
            primary = self._build_primary_store()
            self._primary_writer = make_single_attempt(self._build_primary_store(), timeout_s)
            secondary = make_single_attempt(
                compat.build_tracking_store(self._config.secondary_uri), timeout_s
            )
            self._primary, self._secondary = primary, secondary
            self._mapping = IdMapping(
                primary, secondary, self._config.options["experiment_name_template"],
                copy_run=self._copy_run,
            )

    def _build_primary_store(self):
        store = compat.build_tracking_store(self._config.primary_uri)
        if tracking_token_belongs_to_secondary(self._config.primary_uri, self._config.secondary_uri):
            store = without_tracking_token(store)
        return store

    def gate_sub_stores(self, wrap_primary, wrap_secondary):
        """Replace the sub-stores with ``wrap_primary(store)`` and ``wrap_secondary(store)``.

        ``mlflow-azdual mirror`` paces its requests this way. Every later request of this store,
        queued writes included, goes through the wrapped stores.
        """
        self.mapping  # Builds the sub-stores.
        with self._build_lock:
            self._primary = wrap_primary(self._primary)
            self._primary_writer = wrap_primary(self._primary_writer)
            self._secondary = wrap_secondary(self._secondary)
            self._mapping._primary = self._primary
            self._mapping._secondary = self._secondary

    def get_host_creds(self):
        """Return the primary's host credentials (MLflow uses them for links and tracing)."""
        return self.primary.get_host_creds()

    # The spool

    def spool(self):
        """Return this process's spool, creating it (and starting replay of orphans) on first use.

        Raises MlflowException naming the directory when the spool cannot be created.
        """
        state = self._spool_state
        if state is not None and state[0] == os.getpid():
            return state[1]
        from mlflow_azdual import replay
        from mlflow_azdual.spool import Spool

        with self._spool_lock:
            state = self._spool_state
            if state is not None and state[0] == os.getpid():
                return state[1]
            directory = self.spool_directory()
            try:
                spool = Spool.create(
                    directory,
                    self._config.primary_uri,
                    self._config.secondary_uri,
                    commit_interval_s=self._config.options["spool_commit_interval_s"],
                )
            except Exception as error:  # noqa: BLE001 - OSError and sqlite3 errors alike.
                from mlflow.exceptions import MlflowException

                raise MlflowException(
                    f"mlflow-azdual: cannot create the spool in {directory}: {error}. Set the "
                    "spool_dir option (MLFLOW_AZDUAL_SPOOL_DIR) to a writable local directory, "
                    "or spool=false to keep queued writes in memory only."
                ) from None
            self._spool_state = (os.getpid(), spool)
            _live_spools.add(spool)
        replay.resume_in_background(self, directory)
        return spool

    def spool_directory(self) -> str:
        """Return the spool directory of this configuration (both backend URIs)."""
        from mlflow_azdual.spool import spool_directory, spool_root

        return spool_directory(
            spool_root(self._config.options["spool_dir"]),
            self._config.primary_uri,
            self._config.secondary_uri,
        )

    # Queues and flushing

    def _submit(self, queue, write):
        try:
            queue.submit(write)
        except QueueFullError as error:
            from mlflow.exceptions import MlflowException

            raise MlflowException(f"mlflow-azdual: {error}") from None
        self._write_through_in_spark_task(write.run_id)

    def _write_through_in_spark_task(self, run_id):
        """In a PySpark task, wait until both backends have every write queued so far.

        A Spark Python worker can end right after its task without running exit handlers, so
        a write left in memory there would wait in the spool for a later process. A backend
        that is failing is not waited for, and one that has not acknowledged the writes within
        ``flush_timeout_s`` is waited for no longer. Their writes are committed to the spool
        instead. Raises MlflowException for metrics of ``run_id`` that the primary rejected,
        as a synchronous write would.
        """
        if not self._config.options["spark_task_write_through"] or not in_spark_task():
            return
        queues = (self.primary_queue, self.secondary_queue)
        if any(queue.is_worker_thread() for queue in queues):
            return  # A writer queueing a follow-up write must not wait for itself.

        timeout_s = self._config.options["flush_timeout_s"]
        delivered = True
        for queue in queues:
            failing = queue.retrying or queue.stalled_since_s is not None
            if failing or not queue.flush(timeout_s=timeout_s):
                delivered = False
        if not delivered and self._config.options["spool"]:
            self.spool().commit()
        self._raise_primary_errors(run_id)

    def flush_primary(self, run_id=None, timeout_s=None) -> bool:
        """Send the queued primary writes (of ``run_id`` only, if given) and wait for them.

        Waits at most ``timeout_s``, by default the ``flush_timeout_s`` option. Raises
        MlflowException if the primary rejected queued metrics of that run.
        """
        if timeout_s is None:
            timeout_s = self._config.options["flush_timeout_s"]
        done = self.primary_queue.flush(timeout_s=timeout_s, run_id=run_id)
        self._raise_primary_errors(run_id)
        return done

    def flush(self, timeout_s=None, skip_stopped=False) -> bool:
        """Send everything queued for both backends and wait; False if ``timeout_s`` passed.

        A stopped writer sends nothing more, so its flush returns False at once, or counts as
        done with ``skip_stopped``. Raises MlflowException for metrics the primary rejected
        and, in strict mode, for secondary writes rejected or given up.
        """
        import time

        def flush_queue(queue, timeout_s):
            if skip_stopped and queue.stopped:
                return True
            return queue.flush(timeout_s=timeout_s)

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        primary_done = flush_queue(self.primary_queue, timeout_s)
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
        secondary_done = flush_queue(self.secondary_queue, remaining)
        self._raise_primary_errors(None)
        if self._config.options["strict"]:
            self._raise_secondary_failures(None, secondary_done)
        return primary_done and secondary_done

    def _record_primary_failure(self, failure):
        if not failure.dead_letter:
            return  # Given up: still in the spool; end_run reports it through its flush timeout.
        previous = self._primary_errors.get(failure.run_id)
        points = failure.points + (previous[1] if previous else 0)
        self._primary_errors[failure.run_id] = (previous[0] if previous else failure.reason, points)

    def record_dead_letter(self, backend, operation, run_id, args, reason):
        """Record a write that is not queued at all (over a cap) as a dead letter of ``backend``."""
        from mlflow_azdual.write_queue import Failure

        write = Write(next_seq(), run_id, operation=operation, args=args)
        if self._config.options["spool"]:
            self.spool().dead_letter(backend, write, reason)
        queue = self.primary_queue if backend == "primary" else self.secondary_queue
        queue.dead_letters += 1
        queue._report(Failure(operation, run_id, reason, 1, True))

    def _record_secondary_failure(self, failure):
        self._secondary_failures.setdefault(failure.run_id or "", []).append(failure)

    def _raise_primary_errors(self, run_id):
        from mlflow.exceptions import MlflowException

        keys = [run_id] if run_id is not None else list(self._primary_errors)
        for key in keys:
            failure = self._primary_errors.pop(key, None)
            if failure is None:
                continue
            reason, points = failure
            raise MlflowException(
                f"mlflow-azdual: the primary rejected {points} queued metric points of run "
                f"{key}: {reason}. They are recorded as dead letters (mlflow-azdual status)."
            )

    def _raise_secondary_failures(self, run_id, delivered=True):
        from mlflow.exceptions import MlflowException

        keys = [run_id, ""] if run_id is not None else list(self._secondary_failures)
        failures = [f for key in keys for f in self._secondary_failures.pop(key, [])]
        if not failures and delivered:
            return
        lines = [repr(failure) for failure in failures[:10]]
        if len(failures) > 10:
            lines.append(f"... and {len(failures) - 10} more")
        if not delivered:
            lines.append(
                f"{self.secondary_queue.pending_points} queued entities were not yet "
                "acknowledged by the secondary"
            )
        where = f" of run {run_id}" if run_id else ""
        raise MlflowException(
            f"mlflow-azdual (strict mode): secondary writes{where} failed:\n  "
            + "\n  ".join(lines)
            + "\nThe primary has them. Undelivered writes stay in the spool: run "
            "`mlflow-azdual status` and `mlflow-azdual sync`."
        )

    def send_primary(self, request, uncertain=False):
        """Send one queued primary request (a metrics batch); raise on failure."""
        metrics, params = request.metrics, request.params
        if uncertain:
            metrics, params = self._without_delivered(
                "primary", self.primary_writer, request.run_id, metrics, params
            )
            if not (metrics or params or request.tags):
                return
        rest_batch.log_batch(self.primary_writer, request.run_id, metrics, params, request.tags)

    def _flush_for_async_logging(self):
        # MLflow calls these hooks from end_run before update_run_info, which waits for the
        # run's metrics itself. While the primary is failing, waiting here as well would
        # double the time end_run takes to report it.
        queue = self.primary_queue
        if queue.retrying or queue.stalled_since_s is not None:
            queue.wake()
        else:
            self.flush_primary()
        self.secondary_queue.wake()

    def flush_async_logging(self):
        super().flush_async_logging()
        self._flush_for_async_logging()

    def end_async_logging(self):
        super().end_async_logging()
        self._flush_for_async_logging()

    def shut_down_async_logging(self):
        super().shut_down_async_logging()
        self._flush_for_async_logging()

    # Secondary side, run by the secondary worker

    def enqueue_secondary(self, operation, run_id=None, /, **args):
        """Queue the secondary write ``operation`` with ``args`` (JSON values and MLflow entities).

        ``run_id`` is the primary run the write belongs to. Raises MlflowException only when
        the queue stays full (backpressure, without a spool).
        """
        write = Write(next_seq(), run_id, operation=operation, args=args)
        self._submit(self.secondary_queue, write)
        return write

    def send_secondary(self, request, uncertain=False):
        """Send one queued secondary request (a batch or an operation); raise on failure."""
        if isinstance(request, Batch):
            return self._mirror_log_batch(request, uncertain)
        operation = request.operation
        if operation.startswith(_REGISTRY_PREFIX):
            from mlflow_azdual import registry_store

            return registry_store.apply_secondary(self, request, uncertain)
        if operation.startswith(_ARTIFACT_PREFIX):
            from mlflow_azdual import artifact_repository

            return artifact_repository.apply_secondary(self, request)
        handler = getattr(self, f"_mirror_{operation}", None)
        if handler is None:
            raise LookupError(f"mlflow-azdual cannot send the unknown operation {operation!r}")
        return handler(request, uncertain, **request.args)

    def registry_mirror(self, registry_uri):
        """Return the dual registry store that sends registry writes of ``registry_uri``."""
        from mlflow_azdual.registry_store import DualRegistryStore

        if registry_uri not in self._registry_mirrors:
            self._registry_mirrors[registry_uri] = DualRegistryStore(registry_uri, self.store_uri)
        return self._registry_mirrors[registry_uri]

    def _mirror_run_id(self, write):
        """Return the secondary run id for a run write, or None if the run's copy has it."""
        mirror = self._secondary_run(write.run_id)
        if write.seq <= self._copied_through_seq.get(write.run_id, 0):
            return None
        return mirror.run_id

    def _secondary_run(self, run_id) -> SecondaryRun:
        """Return the run's mirror, creating it from the primary's state if it has none."""
        cached = self.mapping.cached_secondary_run(run_id)
        if cached is not None:
            return cached
        with self._order_lock:
            horizon = next_seq()
        # The copy is read from the primary, so it must hold every write numbered before it.
        self.primary_queue.flush(timeout_s=self._config.options["flush_timeout_s"])
        mirror = self.mapping.secondary_run(run_id)
        if mirror.backfilled:
            self._copied_through_seq[run_id] = horizon
        return mirror

    def _mirror_log_batch(self, batch, uncertain):
        mirror = self._secondary_run(batch.run_id)
        # NOTE: a batch that straddles the point where the run was copied from the primary
        # is sent whole. Its earlier items are then duplicates, which MLflow's stores
        # ignore for identical metrics, params and tags.
        if batch.last_seq <= self._copied_through_seq.get(batch.run_id, 0):
            return None
        metrics = [self._translate_metric(metric) for metric in batch.metrics]
        params = batch.params
        if uncertain:
            metrics, params = self._without_delivered(
                "secondary", self.secondary, mirror.run_id, metrics, params,
                self.secondary_history_page_size,
            )
        params, marker_tags = self._fit_params(batch.run_id, mirror.run_id, params)
        tags = self._without_refused_tags(self.mapping.translate_run_tags(batch.tags))
        tags += marker_tags
        if not (metrics or params or tags):
            return None
        return rest_batch.log_batch(self.secondary, mirror.run_id, metrics, params, tags)

    def _without_delivered(self, backend, store, run_id, metrics, params, page_size=None):
        """Return ``metrics`` and ``params`` without those ``store`` already has for the run.

        A retryable error of the check is raised, so the write is retried. When the backend
        rejects the check itself (a read it does not take), the write is sent unchecked: it
        may repeat points the backend has, which MLflow's stores keep once, but loses none.
        """
        from mlflow_azdual.retry import classify

        try:
            return remove_delivered(store, run_id, metrics, params, page_size)
        except Exception as error:
            if classify(error).retry:
                raise
            _check_failures.log(
                logging.WARNING, backend,
                "mlflow-azdual: reading what the %s backend already has for run %s failed, so the "
                "write is sent without that check and may repeat points it has: %s: %s",
                backend, run_id, type(error).__name__, str(error).splitlines()[0][:300],
            )
            return metrics, params

    def _fit_params(self, run_id, secondary_run_id, params):
        """Return the params the secondary's profile allows, and tags marking truncated ones.

        A value over the length limit is truncated (and tagged) or recorded as a dead letter,
        depending on the ``param_overflow`` option. A param over the per-run cap is recorded as
        a dead letter. The primary has every param whole either way.
        """
        profile = self.secondary_profile
        if not params or (profile.max_params_per_run is None and profile.max_param_value_chars is None):
            return params, []
        known = None
        if profile.max_params_per_run is not None:
            known = self._secondary_param_keys.get(run_id)
            if known is None:
                known = set(self.secondary.get_run(secondary_run_id).data.params)
                self._secondary_param_keys[run_id] = known
        kept, markers, rejected = mirror_rules.fit_params(
            profile, self._config.options["param_overflow"], params, known
        )
        for param, reason in rejected:
            self.record_dead_letter(
                "secondary", "log_param", run_id, {"key": param.key, "value": param.value},
                f"param {param.key!r} not mirrored: {reason}",
            )
        if rejected:
            _logger.warning(
                "mlflow-azdual: %d params of run %s are on the primary only and recorded as dead "
                "letters, because the secondary (%s profile) does not take them (first: param %r, "
                "%s). `mlflow-azdual status --dead-letters` lists them.",
                len(rejected), run_id, profile.name, rejected[0][0].key, rejected[0][1],
            )
        return kept, markers

    def _without_refused_tags(self, tags, operation="set_tag"):
        refused = self.secondary_profile.refused_tags
        if not refused:
            return list(tags)
        kept = mirror_rules.without_refused_tags(self.secondary_profile, tags)
        if len(kept) != len(tags):
            left_out = sorted({tag.key for tag in tags if tag.key in refused})
            self.mirror.record_unsupported(
                operation, f"the secondary ({self.secondary_profile.name} profile) rejects the "
                f"tags {', '.join(sorted(refused))}, and the rest of the write is mirrored",
                part=f"the tag {', '.join(left_out)}",
            )
        return kept

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

    def secondary_model_version_source(self, primary_model_id):
        """Return ``(location, model id, run id)`` of a logged model's mirror on the secondary.

        A model kept as run artifacts has no model id there, and its run id is the run that
        keeps it. A logged-model mirror has no run id here. Raises LookupError when the model
        has no mirror.
        """
        secondary_id = self.mapping.secondary_model_id(primary_model_id)
        if secondary_id is None:
            raise LookupError(f"logged model {primary_model_id} has no mirror on the secondary")
        location = self._model_location(primary_model_id, secondary_id)
        as_artifacts = run_artifact_models.parse(secondary_id)
        if as_artifacts is not None:
            return location, None, as_artifacts.run_id
        return location, secondary_id, None

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
            as_artifacts = run_artifact_models.parse(secondary_id)
            if as_artifacts is not None:
                run_root = self.secondary.get_run(as_artifacts.run_id).info.artifact_uri
                location = dual_uri.join(run_root, as_artifacts.artifact_path)
            else:
                location = self.secondary.get_logged_model(secondary_id).artifact_location
            self._model_locations[primary_id] = location
        return self._model_locations[primary_id]

    def _dual_logged_model(self, model):
        if model is None:
            return model
        location = self._model_locations.get(model.model_id)
        if self.run_artifact_model(model.model_id, cached=True) is not None:
            # Uploads name the model, so that its MLmodel file is rewritten for the secondary.
            location = None
        model._artifact_location = dual_uri.make_dual_artifact_uri(
            model.artifact_location, location, mirror_of=f"model:{model.model_id}",
        )
        return model

    def run_artifact_model(self, primary_model_id, cached=False):
        """Return where the secondary keeps a logged model as run artifacts, or None.

        None also when the model has a logged model on the secondary or no mirror yet.
        ``cached`` looks only at this process's mapping, without a request.
        """
        if cached:
            secondary_id = self.mapping.cached_secondary_model_id(primary_model_id)
        else:
            secondary_id = self.mapping.secondary_model_id(primary_model_id)
        return run_artifact_models.parse(secondary_id)

    # Experiments

    def create_experiment(self, name, artifact_location=None, tags=None):
        from mlflow_azdual.experiment_names import validate_experiment_name

        # Checked before any request, so an invalid name reaches neither backend.
        name = validate_experiment_name(name, self.primary_profile)
        experiment_id = self.primary.create_experiment(name, artifact_location, tags)
        self.enqueue_secondary("create_experiment", experiment_id=experiment_id)
        return experiment_id

    def _mirror_create_experiment(self, write, uncertain, experiment_id):
        # Names are unique, so a create that was applied before a failure is adopted by name.
        return self._secondary_experiment_location(
            self.mapping.secondary_experiment_id(experiment_id)
        )

    def get_experiment(self, experiment_id):
        return self._dual_experiment(self.primary.get_experiment(experiment_id))

    def get_experiment_by_name(self, experiment_name):
        from mlflow_azdual.experiment_names import normalise_experiment_name

        # Normalised like a created name, so both find the same experiment. An invalid name is
        # still looked up, and Databricks is reported to return no experiment for it, so
        # mlflow.set_experiment goes on to create_experiment, which raises the invalid-name error.
        name = normalise_experiment_name(experiment_name, self.primary_profile)
        return self._dual_experiment(self.primary.get_experiment_by_name(name))

    def search_experiments(self, *args, **kwargs):
        page = self.primary.search_experiments(*args, **kwargs)
        for experiment in page:
            self._dual_experiment(experiment)
        return page

    def delete_experiment(self, experiment_id):
        self.primary.delete_experiment(experiment_id)
        self.enqueue_secondary("delete_experiment", experiment_id=experiment_id)

    def _mirror_delete_experiment(self, write, uncertain, experiment_id):
        self.secondary.delete_experiment(self.mapping.secondary_experiment_id(experiment_id))

    def restore_experiment(self, experiment_id):
        self.primary.restore_experiment(experiment_id)
        self.enqueue_secondary("restore_experiment", experiment_id=experiment_id)

    def _mirror_restore_experiment(self, write, uncertain, experiment_id):
        self.secondary.restore_experiment(self.mapping.secondary_experiment_id(experiment_id))

    def rename_experiment(self, experiment_id, new_name):
        from mlflow_azdual.experiment_names import validate_experiment_name

        new_name = validate_experiment_name(new_name, self.primary_profile)
        self.primary.rename_experiment(experiment_id, new_name)
        self.enqueue_secondary("rename_experiment", experiment_id=experiment_id, new_name=new_name)

    def _mirror_rename_experiment(self, write, uncertain, experiment_id, new_name):
        from mlflow.entities import ExperimentTag

        from mlflow_azdual.experiment_names import secondary_experiment_name
        from mlflow_azdual.id_mapping import PRIMARY_EXPERIMENT_NAME_TAG

        secondary_id = self.mapping.secondary_experiment_id(experiment_id)
        template = self._config.options["experiment_name_template"]
        self.secondary.set_experiment_tag(
            secondary_id, ExperimentTag(PRIMARY_EXPERIMENT_NAME_TAG, new_name)
        )
        if not self.secondary_profile.experiment_rename:
            self.mirror.record_unsupported(
                write.operation,
                f"the secondary ({self.secondary_profile.name} profile) cannot rename "
                f"experiments; the mirror keeps its name, and its tag {PRIMARY_EXPERIMENT_NAME_TAG} "
                "holds the new primary name",
            )
            return
        self.secondary.rename_experiment(secondary_id, secondary_experiment_name(new_name, template))

    def set_experiment_tag(self, experiment_id, tag):
        self.primary.set_experiment_tag(experiment_id, tag)
        self.enqueue_secondary("set_experiment_tag", experiment_id=experiment_id, tag=tag)

    def _mirror_set_experiment_tag(self, write, uncertain, experiment_id, tag):
        self.secondary.set_experiment_tag(self.mapping.secondary_experiment_id(experiment_id), tag)

    def delete_experiment_tag(self, experiment_id, key):
        self.primary.delete_experiment_tag(experiment_id, key)
        self.enqueue_secondary("delete_experiment_tag", experiment_id=experiment_id, key=key)

    def _mirror_delete_experiment_tag(self, write, uncertain, experiment_id, key):
        self.secondary.delete_experiment_tag(
            self.mapping.secondary_experiment_id(experiment_id), key
        )

    # Runs

    def create_run(self, experiment_id, user_id, start_time, tags, run_name):
        from mlflow.entities import RunTag

        from mlflow_azdual.id_mapping import CREATED_THROUGH_PLUGIN_TAG

        primary_tags = list(tags or []) + [RunTag(CREATED_THROUGH_PLUGIN_TAG, "true")]
        run = self.primary.create_run(experiment_id, user_id, start_time, primary_tags, run_name)
        self.enqueue_secondary(
            "create_run",
            run.info.run_id,
            experiment_id=experiment_id,
            user_id=user_id,
            start_time=start_time,
            tags=list(tags or []),
            # The primary names an unnamed run; the mirror must not get a name of its own.
            run_name=run.info.run_name or run_name,
        )
        return self._dual_run(run)

    def _mirror_create_run(
        self, write, uncertain, experiment_id, user_id, start_time, tags, run_name
    ):
        # A replayed or uncertain create looks for a mirror tagged with the primary id first,
        # so a create applied before a crash or a reset never makes a second run.
        tags = self._without_refused_tags(tags, write.operation)
        mirror = self.mapping.create_secondary_run(
            write.run_id, experiment_id, user_id, start_time, tags, run_name,
            look_first=uncertain or write.uncertain,
        )
        # Tags the secondary drops at create_run are set again once the run exists.
        again = [tag for tag in tags if tag.key in self.secondary_profile.dropped_at_create_run]
        if again:
            rest_batch.log_batch(self.secondary, mirror.run_id, [], [], again)
        return mirror

    def _copy_run(self, primary_run, secondary_experiment_id, partial=None) -> SecondaryRun:
        """Create the mirror of a primary run that has none, or complete a partial copy.

        Called by ``IdMapping`` for a run created before the plugin was in use, on its first
        write through the plugin. Params, tags, metric histories and status are copied
        (``run_copy``). Artifacts are not: ``mlflow-azdual mirror`` copies them, so the mirror
        is tagged ``azdual.copy_status=copied_except_artifacts`` as the copy's last request.
        """
        from mlflow_azdual import run_copy
        from mlflow_azdual.id_mapping import COPIED_EXCEPT_ARTIFACTS

        mirror, _ = run_copy.copy_run_data(self, primary_run, secondary_experiment_id, partial)
        run_copy.mark_copy(self, mirror.run_id, COPIED_EXCEPT_ARTIFACTS)
        return dataclasses.replace(mirror, copy_status=COPIED_EXCEPT_ARTIFACTS)

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
        compat.drain_mlflow_async_queue(self)
        self._flush_before_end(run_id)
        info = self.primary.update_run_info(run_id, run_status, end_time, run_name)
        self.enqueue_secondary(
            "update_run_info", run_id, run_status=run_status, end_time=end_time, run_name=run_name
        )
        self.secondary_queue.wake()
        if self._config.options["strict"]:
            delivered = self.secondary_queue.flush(
                timeout_s=self._config.options["flush_timeout_s"], run_id=run_id
            )
            self._raise_secondary_failures(run_id, delivered)
        return self._dual_run_info(info)

    def _flush_before_end(self, run_id):
        """Wait for the run's queued primary metrics; raise with counts if they are not delivered.

        The run is then not updated on the primary, so it is never FINISHED without its metrics.
        """
        timeout_s = self._config.options["flush_timeout_s"]
        if self.flush_primary(run_id, timeout_s=timeout_s):
            return
        from mlflow.exceptions import MlflowException

        pending = self.primary_queue.pending_points
        spool = self._spool_state[1] if self._spool_state else None
        where = (
            f"They stay in the spool ({spool.path}) and are sent when the primary answers again, "
            "by this process or by `mlflow-azdual sync`."
            if spool is not None
            else "The spool is off, so they are lost if this process ends first."
        )
        raise MlflowException(
            f"mlflow-azdual: the primary did not acknowledge the queued metrics of run {run_id} "
            f"within flush_timeout_s={timeout_s:g} s ({pending} entities queued for the primary "
            f"in all). The run was not marked finished on the primary. {where}"
        )

    def _mirror_update_run_info(self, write, uncertain, run_status, end_time, run_name):
        run_id = self._mirror_run_id(write)
        if run_id is not None:
            self.secondary.update_run_info(run_id, run_status, end_time, run_name)

    def delete_run(self, run_id):
        self.flush_primary(run_id)
        self.primary.delete_run(run_id)
        self.enqueue_secondary("delete_run", run_id)

    def _mirror_delete_run(self, write, uncertain):
        run_id = self._mirror_run_id(write)
        if run_id is not None:
            self.secondary.delete_run(run_id)

    def restore_run(self, run_id):
        self.primary.restore_run(run_id)
        self.enqueue_secondary("restore_run", run_id)

    def _mirror_restore_run(self, write, uncertain):
        run_id = self._mirror_run_id(write)
        if run_id is not None:
            self.secondary.restore_run(run_id)

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
        self._write_through_in_spark_task(run_id)

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
        self.enqueue_secondary("delete_tag", run_id, key=key)

    def _mirror_delete_tag(self, write, uncertain, key):
        from mlflow.exceptions import MlflowException

        run_id = self._mirror_run_id(write)
        if run_id is None:
            return
        try:
            self.secondary.delete_tag(run_id, key)
        except MlflowException as error:
            # Deleting a tag twice (a replay) finds it gone, which is the intended state.
            if not (uncertain and error.error_code == "RESOURCE_DOES_NOT_EXIST"):
                raise

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
        self.enqueue_secondary(
            "log_inputs", run_id, datasets=list(datasets or []),
            models=None if models is None else list(models),
        )

    def _mirror_log_inputs(self, write, uncertain, datasets, models):
        run_id = self._mirror_run_id(write)
        if run_id is None:
            return
        extra = {}
        if models:
            translated = self._translate_model_refs(models)
            if translated:
                extra["models"] = translated
            elif not datasets:
                return
        self.secondary.log_inputs(run_id, datasets=datasets, **extra)

    def log_outputs(self, run_id, models):
        self.flush_primary(run_id)
        self.primary.log_outputs(run_id, models)
        self.enqueue_secondary("log_outputs", run_id, models=list(models))

    def _mirror_log_outputs(self, write, uncertain, models):
        run_id = self._mirror_run_id(write)
        translated = self._translate_model_refs(models)
        # Models kept as run artifacts on the secondary are not logged-model outputs there.
        if run_id is not None and translated:
            self.secondary.log_outputs(run_id, translated)

    def record_logged_model(self, run_id, mlflow_model):
        self.flush_primary(run_id)
        self.primary.record_logged_model(run_id, mlflow_model)
        self.enqueue_secondary("record_logged_model", run_id, mlflow_model=copy.deepcopy(mlflow_model))

    def _mirror_record_logged_model(self, write, uncertain, mlflow_model):
        run_id = self._mirror_run_id(write)
        if run_id is None:
            return
        mirrored = copy.deepcopy(mlflow_model)
        mirrored.run_id = run_id
        self.secondary.record_logged_model(run_id, mirrored)

    def _translate_metric(self, metric):
        model_id = getattr(metric, "model_id", None)
        if not model_id:
            return metric
        mirrored = copy.copy(metric)
        secondary_id = self.mapping.cached_secondary_model_id(model_id)
        if run_artifact_models.parse(secondary_id) is not None:
            secondary_id = None
        mirrored._model_id = secondary_id
        return mirrored

    def _translate_model_refs(self, references):
        """Return logged-model inputs or outputs with model ids of the secondary.

        References to models without a mirror, or kept as run artifacts, are left out.
        """
        translated = []
        for reference in references or []:
            secondary_id = self.mapping.secondary_model_id(reference.model_id)
            if secondary_id is None or run_artifact_models.parse(secondary_id) is not None:
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
        # The primary names a model created without a name; the mirror gets the same name.
        if not arguments.get("name"):
            arguments["name"] = model.name
        self.enqueue_secondary(
            "create_logged_model",
            arguments.get("source_run_id"),
            model_id=model.model_id,
            arguments={key: list(value) if isinstance(value, tuple) else value
                       for key, value in arguments.items()},
        )
        return self._dual_logged_model(model)

    def _mirror_create_logged_model(self, write, uncertain, model_id, arguments):
        from mlflow.entities import LoggedModelTag

        if not self.secondary_profile.logged_models:
            return self._mirror_model_as_run_artifacts(write, model_id, arguments)
        arguments = dict(arguments)
        arguments["experiment_id"] = self.mapping.secondary_experiment_id(arguments["experiment_id"])
        if uncertain or write.uncertain:
            found = self.mapping.find_secondary_model(model_id, arguments["experiment_id"])
            if found is not None:
                return self._remember_model_mirror(model_id, found)
        if arguments.get("source_run_id"):
            arguments["source_run_id"] = self._secondary_run(arguments["source_run_id"]).run_id
        arguments["tags"] = list(arguments.get("tags") or []) + [
            LoggedModelTag(PRIMARY_MODEL_ID_TAG, model_id)
        ]
        return self._remember_model_mirror(model_id, self.secondary.create_logged_model(**arguments))

    def _remember_model_mirror(self, model_id, mirrored):
        self._record_model_mirror(model_id, mirrored.model_id, mirrored.artifact_location)
        return mirrored

    def _record_model_mirror(self, model_id, secondary_id, location):
        from mlflow.entities import LoggedModelTag

        self.mapping.remember_model(model_id, secondary_id)
        self._model_locations[model_id] = location
        self.primary.set_logged_model_tags(
            model_id, [LoggedModelTag(SECONDARY_MODEL_ID_TAG, secondary_id)]
        )

    def _mirror_model_as_run_artifacts(self, write, model_id, arguments):
        """Record the secondary run folder that keeps a logged model, for a secondary without
        the logged-model API; the model's artifact uploads then go there.
        """
        source_run_id = arguments.get("source_run_id")
        if not source_run_id:
            self.mirror.record_unsupported(
                write.operation,
                f"the secondary ({self.secondary_profile.name} profile) has no logged-model API, "
                "and a logged model without a source run has no run to keep its artifacts",
            )
            return None
        secondary_run = self._secondary_run(source_run_id)
        as_artifacts = run_artifact_models.RunArtifactModel(
            secondary_run.run_id,
            run_artifact_models.artifact_path_for(arguments.get("name"), model_id),
        )
        location = dual_uri.join(secondary_run.artifact_uri, as_artifacts.artifact_path)
        self._record_model_mirror(model_id, as_artifacts.location, location)
        return as_artifacts

    def get_logged_model(self, model_id, *args, **kwargs):
        return self._dual_logged_model(self.primary.get_logged_model(model_id, *args, **kwargs))

    def search_logged_models(self, *args, **kwargs):
        page = self.primary.search_logged_models(*args, **kwargs)
        for model in page:
            self._dual_logged_model(model)
        return page

    def _secondary_model_id(self, operation, model_id):
        """Return the secondary logged-model id of ``model_id``, or None when there is none.

        A model kept as run artifacts has no logged model on the secondary, so its status,
        tags and params stay on the primary.
        """
        secondary_id = self.mapping.secondary_model_id(model_id)
        if secondary_id is None:
            self.mirror.record_unsupported(operation, "the logged model has no mirror on the secondary")
            return None
        if run_artifact_models.parse(secondary_id) is not None:
            _logger.debug(
                "mlflow-azdual: %s of logged model %s stays on the primary, because the "
                "secondary keeps the model as run artifacts (%s)", operation, model_id, secondary_id,
            )
            return None
        return secondary_id

    def finalize_logged_model(self, model_id, status):
        model = self.primary.finalize_logged_model(model_id, status)
        self.enqueue_secondary("finalize_logged_model", model_id=model_id, status=status)
        return self._dual_logged_model(model)

    def _mirror_finalize_logged_model(self, write, uncertain, model_id, status):
        secondary_id = self._secondary_model_id(write.operation, model_id)
        if secondary_id is not None:
            self.secondary.finalize_logged_model(secondary_id, status)

    def set_logged_model_tags(self, model_id, tags):
        self.primary.set_logged_model_tags(model_id, tags)
        self.enqueue_secondary("set_logged_model_tags", model_id=model_id, tags=list(tags))

    def _mirror_set_logged_model_tags(self, write, uncertain, model_id, tags):
        secondary_id = self._secondary_model_id(write.operation, model_id)
        if secondary_id is not None:
            self.secondary.set_logged_model_tags(secondary_id, tags)

    def delete_logged_model_tag(self, model_id, key):
        self.primary.delete_logged_model_tag(model_id, key)
        self.enqueue_secondary("delete_logged_model_tag", model_id=model_id, key=key)

    def _mirror_delete_logged_model_tag(self, write, uncertain, model_id, key):
        secondary_id = self._secondary_model_id(write.operation, model_id)
        if secondary_id is not None:
            self.secondary.delete_logged_model_tag(secondary_id, key)

    def delete_logged_model(self, model_id):
        self.primary.delete_logged_model(model_id)
        self.enqueue_secondary("delete_logged_model", model_id=model_id)

    def _mirror_delete_logged_model(self, write, uncertain, model_id):
        secondary_id = self._secondary_model_id(write.operation, model_id)
        if secondary_id is not None:
            self.secondary.delete_logged_model(secondary_id)

    def log_logged_model_params(self, model_id, params):
        self.primary.log_logged_model_params(model_id, params)
        self.enqueue_secondary("log_logged_model_params", model_id=model_id, params=list(params))

    def _mirror_log_logged_model_params(self, write, uncertain, model_id, params):
        secondary_id = self._secondary_model_id(write.operation, model_id)
        if secondary_id is not None:
            self.secondary.log_logged_model_params(secondary_id, params)


# GET_METRIC_HISTORY_MAX_RESULTS of MLflow 3.17: the page size MlflowClient.get_metric_history
# reads with.
CLIENT_HISTORY_PAGE_SIZE = 25_000
_REGISTRY_PREFIX = "registry."
_ARTIFACT_PREFIX = "artifact."
_live_spools = weakref.WeakSet()


routing.install_routes(
    DualTrackingStore, routing.TRACKING_READS, routing.TRACKING_PRIMARY_ONLY_WRITES
)


def flush(timeout_s=None) -> bool:
    """Send every write queued by this process's dual stores to both backends and wait.

    Returns True when everything was sent, False if ``timeout_s`` passed first. A writer that
    was stopped (at exit) is skipped: what it holds stays in the spool. Raises MlflowException
    if the primary rejected queued metrics.
    """
    import time

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    done = True
    for store in list(_stores):
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
        done = store.flush(timeout_s=remaining, skip_stopped=True) and done
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
    """Send queued writes at interpreter exit, for at most ``exit_flush_timeout_s``.

    A queue whose backend is failing is not waited for: its writes are already in the spool,
    which is committed and closed here, for the next process or ``mlflow-azdual sync``.
    """
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
        spool = store._spool_state[1] if store._spool_state else None
        for queue in (store.primary_queue, store.secondary_queue):
            if queue.stopped:
                continue  # Stopped on purpose (mlflow-azdual's own shutdown, or a test).
            failing = queue.retrying or queue.stalled_since_s is not None
            remaining = 0 if failing else max(deadline - time.monotonic(), 0)
            if queue.flush(timeout_s=remaining):
                continue
            left = (
                f"they stay in the spool {spool.path} for the next process or `mlflow-azdual sync`"
                if spool is not None
                else "they are lost, because the spool is off"
            )
            reason = "the backend is failing" if failing else f"timed out after {timeout_s:.0f} s"
            _logger.error(
                "mlflow-azdual: exit flush of the %s backend stopped (%s); %d queued entities "
                "were not sent and %s",
                queue.backend, reason, queue.pending_points, left,
            )
        for queue in (store.primary_queue, store.secondary_queue):
            queue.stop()
        if spool is not None:
            spool.close(remove_if_empty=True)
        for run_id, (reason, points) in list(store._primary_errors.items()):
            _logger.error(
                "mlflow-azdual: the primary rejected %d metric points of run %s: %s",
                points, run_id, reason,
            )
