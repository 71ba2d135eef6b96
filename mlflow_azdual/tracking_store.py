"""The dual tracking store: every write goes to the primary, then to the secondary.

The primary (Databricks) is the source of truth. A write that the primary rejects raises at the
call site exactly as with the primary alone and is not mirrored. The secondary (Azure ML) gets
the same write with ids translated through ``IdMapping``; a secondary failure is logged, never
raised. Reads go to the primary only. Run, experiment and logged-model artifact locations are
returned as dual artifact URIs, so artifacts logged through MLflow reach both backends.

Methods that need no translation are generated from the tables in ``routing``; the methods
below are the ones whose arguments or results carry ids or artifact locations.
"""

import copy
import logging
import threading

from mlflow.store.tracking.abstract_store import AbstractStore

from mlflow_azdual import artifact_uri as dual_uri
from mlflow_azdual import compat, routing
from mlflow_azdual.id_mapping import (
    PRIMARY_MODEL_ID_TAG,
    SECONDARY_MODEL_ID_TAG,
    IdMapping,
    SecondaryRun,
)
from mlflow_azdual.mirror import Mirror
from mlflow_azdual.uri import parse_tracking_uri

_logger = logging.getLogger(__name__)


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
        self._primary = None
        self._secondary = None
        self._mapping = None
        # Secondary artifact locations by secondary experiment id and by primary model id.
        self._secondary_locations = {}
        self._model_locations = {}
        self.mirror = Mirror(self._config.secondary_uri)
        super().__init__()

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

    # Helpers for mirroring

    def _mirror_run_write(self, operation, run_id, write):
        """Send ``write(secondary_run_id)`` to the secondary unless the run was just copied."""

        def send():
            mirror = self.mapping.secondary_run(run_id)
            if mirror.backfilled:
                return None
            return write(mirror.run_id)

        return self.mirror.send(operation, run_id, send)

    def _mirror_experiment_write(self, operation, experiment_id, write):
        def send():
            return write(self.mapping.secondary_experiment_id(experiment_id))

        return self.mirror.send(operation, None, send)

    def _dual_run(self, run):
        """Return ``run`` with its artifact URI covering both backends where the mirror is known."""
        if run is None:
            return run
        mirror = self.mapping.cached_secondary_run(run.info.run_id)
        if mirror is None:
            mirror = self.mirror.send(
                "resolve_run", run.info.run_id, lambda: self.mapping.secondary_run(run.info.run_id)
            )
        if mirror is not None:
            self._set_run_artifact_uri(run.info, mirror)
        return run

    def _set_run_artifact_uri(self, run_info, mirror: SecondaryRun):
        dual = dual_uri.make_dual_artifact_uri(run_info.artifact_uri, mirror.artifact_uri)
        run_info._artifact_uri = dual

    def _dual_experiment(self, experiment, resolve=True):
        if experiment is None or experiment.lifecycle_stage != "active":
            return experiment
        secondary_id = self.mapping.cached_secondary_experiment_id(experiment.experiment_id)
        if secondary_id is None and resolve:
            secondary_id = self.mirror.send(
                "resolve_experiment",
                None,
                lambda: self.mapping.secondary_experiment_id(experiment.experiment_id),
            )
        if secondary_id is None:
            return experiment
        location = self.mirror.send(
            "get_experiment", None, lambda: self._secondary_experiment_location(secondary_id)
        )
        experiment._artifact_location = dual_uri.make_dual_artifact_uri(
            experiment.artifact_location, location
        )
        return experiment

    def _secondary_experiment_location(self, secondary_id):
        if secondary_id not in self._secondary_locations:
            experiment = self.secondary.get_experiment(secondary_id)
            self._secondary_locations[secondary_id] = experiment.artifact_location
        return self._secondary_locations[secondary_id]

    # Experiments

    def create_experiment(self, name, artifact_location=None, tags=None):
        experiment_id = self.primary.create_experiment(name, artifact_location, tags)
        self.mirror.send(
            "create_experiment", None, lambda: self.mapping.secondary_experiment_id(experiment_id)
        )
        return experiment_id

    def get_experiment(self, experiment_id):
        return self._dual_experiment(self.primary.get_experiment(experiment_id))

    def get_experiment_by_name(self, experiment_name):
        return self._dual_experiment(self.primary.get_experiment_by_name(experiment_name))

    def search_experiments(self, *args, **kwargs):
        page = self.primary.search_experiments(*args, **kwargs)
        for experiment in page:
            self._dual_experiment(experiment, resolve=False)
        return page

    def delete_experiment(self, experiment_id):
        self.primary.delete_experiment(experiment_id)
        self._mirror_experiment_write(
            "delete_experiment", experiment_id, lambda sid: self.secondary.delete_experiment(sid)
        )

    def restore_experiment(self, experiment_id):
        self.primary.restore_experiment(experiment_id)
        self._mirror_experiment_write(
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

        self._mirror_experiment_write("rename_experiment", experiment_id, rename)

    def set_experiment_tag(self, experiment_id, tag):
        self.primary.set_experiment_tag(experiment_id, tag)
        self._mirror_experiment_write(
            "set_experiment_tag",
            experiment_id,
            lambda sid: self.secondary.set_experiment_tag(sid, tag),
        )

    def delete_experiment_tag(self, experiment_id, key):
        self.primary.delete_experiment_tag(experiment_id, key)
        self._mirror_experiment_write(
            "delete_experiment_tag",
            experiment_id,
            lambda sid: self.secondary.delete_experiment_tag(sid, key),
        )

    # Runs

    def create_run(self, experiment_id, user_id, start_time, tags, run_name):
        run = self.primary.create_run(experiment_id, user_id, start_time, tags, run_name)
        mirror = self.mirror.send(
            "create_run",
            run.info.run_id,
            lambda: self.mapping.create_secondary_run(
                run, experiment_id, user_id, start_time, tags, run_name
            ),
        )
        if mirror is not None:
            self._set_run_artifact_uri(run.info, mirror)
        return run

    def get_run(self, run_id):
        return self._dual_run(self.primary.get_run(run_id))

    def search_runs(self, *args, **kwargs):
        page = self.primary.search_runs(*args, **kwargs)
        for run in page:
            mirror = self.mapping.cached_secondary_run(run.info.run_id)
            if mirror is not None:
                self._set_run_artifact_uri(run.info, mirror)
        return page

    def _search_runs(self, *args, **kwargs):
        return self.primary._search_runs(*args, **kwargs)

    def update_run_info(self, run_id, run_status, end_time, run_name):
        info = self.primary.update_run_info(run_id, run_status, end_time, run_name)
        self._mirror_run_write(
            "update_run_info",
            run_id,
            lambda sid: self.secondary.update_run_info(sid, run_status, end_time, run_name),
        )
        mirror = self.mapping.cached_secondary_run(run_id)
        if info is not None and mirror is not None:
            self._set_run_artifact_uri(info, mirror)
        return info

    def delete_run(self, run_id):
        self.primary.delete_run(run_id)
        self._mirror_run_write("delete_run", run_id, lambda sid: self.secondary.delete_run(sid))

    def restore_run(self, run_id):
        self.primary.restore_run(run_id)
        self._mirror_run_write("restore_run", run_id, lambda sid: self.secondary.restore_run(sid))

    def log_metric(self, run_id, metric):
        self.primary.log_metric(run_id, metric)
        self._mirror_run_write(
            "log_metric",
            run_id,
            lambda sid: self.secondary.log_metric(sid, self._translate_metric(metric)),
        )

    def log_param(self, run_id, param):
        self.primary.log_param(run_id, param)
        self._mirror_run_write(
            "log_param", run_id, lambda sid: self.secondary.log_param(sid, param)
        )

    def set_tag(self, run_id, tag):
        self.primary.set_tag(run_id, tag)
        self._mirror_run_write(
            "set_tag",
            run_id,
            lambda sid: self.secondary.set_tag(sid, self.mapping.translate_run_tags([tag])[0]),
        )

    def delete_tag(self, run_id, key):
        self.primary.delete_tag(run_id, key)
        self._mirror_run_write("delete_tag", run_id, lambda sid: self.secondary.delete_tag(sid, key))

    def log_batch(self, run_id, metrics, params, tags):
        self.primary.log_batch(run_id, metrics, params, tags)
        self._mirror_run_write(
            "log_batch",
            run_id,
            lambda sid: self.secondary.log_batch(
                sid,
                [self._translate_metric(metric) for metric in metrics or []],
                params or [],
                self.mapping.translate_run_tags(tags),
            ),
        )

    def log_inputs(self, run_id, datasets=None, models=None):
        # MLflow 2.x stores take no ``models`` argument, so it is passed only when given.
        extra = {} if models is None else {"models": models}
        self.primary.log_inputs(run_id, datasets=datasets, **extra)

        def send(secondary_run_id):
            if models is not None:
                extra["models"] = self._translate_model_refs(models)
            return self.secondary.log_inputs(secondary_run_id, datasets=datasets, **extra)

        self._mirror_run_write("log_inputs", run_id, send)

    def log_outputs(self, run_id, models):
        self.primary.log_outputs(run_id, models)
        self._mirror_run_write(
            "log_outputs",
            run_id,
            lambda sid: self.secondary.log_outputs(sid, self._translate_model_refs(models)),
        )

    def record_logged_model(self, run_id, mlflow_model):
        self.primary.record_logged_model(run_id, mlflow_model)

        def send(secondary_run_id):
            mirrored = copy.deepcopy(mlflow_model)
            mirrored.run_id = secondary_run_id
            return self.secondary.record_logged_model(secondary_run_id, mirrored)

        self._mirror_run_write("record_logged_model", run_id, send)

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
        model = self.primary.create_logged_model(experiment_id, *args, **kwargs)
        self.mirror.send(
            "create_logged_model",
            kwargs.get("source_run_id"),
            lambda: self._mirror_logged_model(model, experiment_id, args, kwargs),
        )
        return self._dual_logged_model(model)

    def _mirror_logged_model(self, model, experiment_id, args, kwargs):
        from inspect import signature

        from mlflow.entities import LoggedModelTag

        bound = signature(self.primary.create_logged_model).bind(experiment_id, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments["experiment_id"] = self.mapping.secondary_experiment_id(experiment_id)
        if arguments.get("source_run_id"):
            arguments["source_run_id"] = self.mapping.secondary_run_id(arguments["source_run_id"])
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

    def _dual_logged_model(self, model):
        if model is None:
            return model
        location = self._model_locations.get(model.model_id)
        if location is None:
            secondary_id = self.mirror.send(
                "resolve_logged_model",
                None,
                lambda: self.mapping.secondary_model_id(model.model_id),
            )
            if secondary_id:
                mirrored = self.mirror.send(
                    "get_logged_model", None, lambda: self.secondary.get_logged_model(secondary_id)
                )
                location = mirrored.artifact_location if mirrored is not None else None
                if location:
                    self._model_locations[model.model_id] = location
        if location:
            model._artifact_location = dual_uri.make_dual_artifact_uri(
                model.artifact_location, location
            )
        return model

    def get_logged_model(self, model_id, *args, **kwargs):
        return self._dual_logged_model(self.primary.get_logged_model(model_id, *args, **kwargs))

    def _mirror_model_write(self, operation, model_id, write):
        def send():
            secondary_id = self.mapping.secondary_model_id(model_id)
            if secondary_id is None:
                self.mirror.record_unsupported(
                    operation, "the logged model has no mirror on the secondary"
                )
                return None
            return write(secondary_id)

        return self.mirror.send(operation, None, send)

    def finalize_logged_model(self, model_id, status):
        model = self.primary.finalize_logged_model(model_id, status)
        self._mirror_model_write(
            "finalize_logged_model",
            model_id,
            lambda sid: self.secondary.finalize_logged_model(sid, status),
        )
        return self._dual_logged_model(model)

    def set_logged_model_tags(self, model_id, tags):
        self.primary.set_logged_model_tags(model_id, tags)
        self._mirror_model_write(
            "set_logged_model_tags",
            model_id,
            lambda sid: self.secondary.set_logged_model_tags(sid, tags),
        )

    def delete_logged_model_tag(self, model_id, key):
        self.primary.delete_logged_model_tag(model_id, key)
        self._mirror_model_write(
            "delete_logged_model_tag",
            model_id,
            lambda sid: self.secondary.delete_logged_model_tag(sid, key),
        )

    def delete_logged_model(self, model_id):
        self.primary.delete_logged_model(model_id)
        self._mirror_model_write(
            "delete_logged_model", model_id, lambda sid: self.secondary.delete_logged_model(sid)
        )

    def log_logged_model_params(self, model_id, params):
        self.primary.log_logged_model_params(model_id, params)
        self._mirror_model_write(
            "log_logged_model_params",
            model_id,
            lambda sid: self.secondary.log_logged_model_params(sid, params),
        )


routing.install_routes(
    DualTrackingStore, routing.TRACKING_READS, routing.TRACKING_PRIMARY_ONLY_WRITES
)
