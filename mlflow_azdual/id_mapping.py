"""Map primary ids (experiments, runs, logged models) to the secondary's own ids.

Each backend creates its own ids. The mapping is stored as tags on both sides (the primary
object carries the secondary id, the secondary object carries the primary id), so any process
can recover it, and cached in memory. A primary run without a mirror, created before the plugin
was in use, is copied to the secondary on first lookup by the ``copy_run`` function the owner
passes in (the dual tracking store, which shapes the copy by the secondary's profile). Lookups
are serialised by one lock, so one process never creates two mirrors.
"""

import dataclasses
import threading
from typing import Callable, Optional

from mlflow_azdual.experiment_names import disambiguate, secondary_experiment_name
from mlflow_azdual.forking import renew_after_fork
from mlflow_azdual.logs import get_logger

_logger = get_logger(__name__)

TAG_PREFIX = "azdual."
# On primary objects: the id of the mirror on the secondary.
SECONDARY_EXPERIMENT_ID_TAG = "azdual.secondary_experiment_id"
SECONDARY_RUN_ID_TAG = "azdual.secondary_run_id"
SECONDARY_MODEL_ID_TAG = "azdual.secondary_model_id"
# On secondary objects: the id (and for experiments the name) of the primary original.
PRIMARY_EXPERIMENT_ID_TAG = "azdual.primary_experiment_id"
PRIMARY_EXPERIMENT_NAME_TAG = "azdual.primary_experiment_name"
PRIMARY_RUN_ID_TAG = "azdual.primary_run_id"
PRIMARY_MODEL_ID_TAG = "azdual.primary_model_id"
# On primary runs created through the plugin: their creating process makes the mirror.
CREATED_THROUGH_PLUGIN_TAG = "azdual.created_through_plugin"
# On secondary runs copied from the primary (not created through the plugin): how far the
# copy got. The copy sets COPYING when it creates the mirror and its last request sets
# COPIED_EXCEPT_ARTIFACTS (params, tags, metrics and status) or, from `mlflow-azdual mirror`,
# COMPLETE (also artifacts, logged models and model versions). A mirror created through the
# plugin has no such tag.
COPY_STATUS_TAG = "azdual.copy_status"
COPYING = "copying"
COPIED_EXCEPT_ARTIFACTS = "copied_except_artifacts"
COMPLETE = "complete"

PARENT_RUN_ID_TAG = "mlflow.parentRunId"

# Seconds after a run's start during which only the creating process makes its mirror.
MIRROR_CREATION_GRACE_S = 30.0


@dataclasses.dataclass(frozen=True)
class SecondaryRun:
    """The mirror of a primary run: its secondary id and artifact URI.

    ``copy_status`` is the mirror's ``azdual.copy_status`` tag when it was looked up (None
    for a mirror created through the plugin). ``copied`` counts what a copy sent, if this
    lookup copied the run.
    """

    run_id: str
    artifact_uri: str
    backfilled: bool = False
    copy_status: Optional[str] = None
    copied: Optional[object] = None


class IdMapping:
    """Resolves and caches secondary ids for primary experiments, runs and logged models.

    ``copy_run(primary_run, secondary_experiment_id, partial)`` creates the mirror of a primary
    run that has none (``partial`` None), or completes a copy that stopped midway (``partial``
    is that mirror, tagged ``azdual.copy_status=copying``), and returns its ``SecondaryRun``
    with ``backfilled=True``.
    """

    def __init__(
        self,
        primary,
        secondary,
        experiment_name_template: str = "{leaf}",
        *,
        copy_run: Callable[..., SecondaryRun],
    ):
        self._primary = primary
        self._secondary = secondary
        self._template = experiment_name_template
        self._copy_run = copy_run
        self._lock = threading.RLock()
        renew_after_fork(self, "_lock", threading.RLock)
        self._experiments = {}
        self._runs = {}
        # Runs whose mirror exists but whose primary tag could not be written yet.
        self._unrecorded_runs = set()
        self._models = {}

    # Experiments

    def secondary_experiment_id(self, primary_experiment_id: str) -> str:
        """Return the secondary id of a primary experiment, creating the mirror if needed."""
        with self._lock:
            cached = self._experiments.get(primary_experiment_id)
            if cached is not None:
                return cached
            secondary_id = self._resolve_experiment(primary_experiment_id)
            self._experiments[primary_experiment_id] = secondary_id
            return secondary_id

    def cached_secondary_experiment_id(self, primary_experiment_id: str) -> Optional[str]:
        return self._experiments.get(primary_experiment_id)

    def _resolve_experiment(self, primary_id: str) -> str:
        primary_experiment = self._primary.get_experiment(primary_id)
        tags = primary_experiment.tags or {}

        recorded_id = tags.get(SECONDARY_EXPERIMENT_ID_TAG)
        if recorded_id and self._secondary_experiment_matches(recorded_id, primary_id):
            return recorded_id

        secondary_id = self._find_or_create_experiment(primary_experiment)
        if recorded_id != secondary_id:
            from mlflow.entities import ExperimentTag

            self._primary.set_experiment_tag(
                primary_id, ExperimentTag(SECONDARY_EXPERIMENT_ID_TAG, secondary_id)
            )
        return secondary_id

    def _secondary_experiment_matches(self, secondary_id: str, primary_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            experiment = self._secondary.get_experiment(secondary_id)
        except MlflowException:
            return False
        return (experiment.tags or {}).get(PRIMARY_EXPERIMENT_ID_TAG) == primary_id

    def _find_or_create_experiment(self, primary_experiment) -> str:
        from mlflow.entities import ExperimentTag
        from mlflow.exceptions import MlflowException

        primary_id = primary_experiment.experiment_id
        primary_name = primary_experiment.name
        name = secondary_experiment_name(primary_name, self._template)
        own_tags = [
            ExperimentTag(PRIMARY_EXPERIMENT_ID_TAG, primary_id),
            ExperimentTag(PRIMARY_EXPERIMENT_NAME_TAG, primary_name),
        ]

        for candidate in (name, disambiguate(name, primary_name)):
            existing = self._secondary.get_experiment_by_name(candidate)
            if existing is None:
                user_tags = [
                    ExperimentTag(key, value)
                    for key, value in (primary_experiment.tags or {}).items()
                    if not key.startswith(TAG_PREFIX)
                ]
                try:
                    return self._secondary.create_experiment(candidate, None, user_tags + own_tags)
                except MlflowException:
                    # Another process may have created it in the meantime.
                    existing = self._secondary.get_experiment_by_name(candidate)
                    if existing is None:
                        raise
            owner = (existing.tags or {}).get(PRIMARY_EXPERIMENT_ID_TAG)
            if owner == primary_id:
                return existing.experiment_id
            if owner is None and existing.lifecycle_stage == "active":
                # An experiment made on the secondary by hand (or its Default) is adopted.
                for tag in own_tags:
                    self._secondary.set_experiment_tag(existing.experiment_id, tag)
                return existing.experiment_id
            _logger.info(
                "mlflow-azdual: secondary experiment name %r is taken by another primary "
                "experiment; trying the next name", candidate,
            )
        raise RuntimeError(
            f"no free secondary experiment name for primary experiment {primary_name!r}: "
            f"{name!r} and its hashed variant are taken"
        )

    # Runs

    def cached_secondary_run(self, primary_run_id: str) -> Optional[SecondaryRun]:
        return self._runs.get(primary_run_id)

    def remember_run(self, primary_run_id: str, secondary_run: SecondaryRun) -> None:
        with self._lock:
            self._runs[primary_run_id] = secondary_run

    def secondary_run(self, primary_run_id: str) -> SecondaryRun:
        """Return the mirror of a primary run, copying the run over if it has none yet.

        The result has ``backfilled=True`` only when this call copied the run: the copy was
        read from the primary after the caller's primary write, so the caller must not send
        that write to the secondary again.
        """
        with self._lock:
            cached = self._runs.get(primary_run_id)
            if cached is not None:
                return cached
            secondary_run = self._resolve_run(primary_run_id)
            self._runs[primary_run_id] = dataclasses.replace(
                secondary_run, backfilled=False, copied=None
            )
            return secondary_run

    def secondary_run_id(self, primary_run_id: str) -> str:
        return self.secondary_run(primary_run_id).run_id

    def translate_run_tags(self, tags):
        """Return ``tags`` with ``mlflow.parentRunId`` pointing at the secondary parent."""
        from mlflow.entities import RunTag

        translated = []
        for tag in tags or []:
            if tag.key == PARENT_RUN_ID_TAG and tag.value:
                tag = RunTag(tag.key, self.secondary_run_id(tag.value))
            translated.append(tag)
        return translated

    def _resolve_run(self, primary_id: str) -> SecondaryRun:
        primary_run = self._primary.get_run(primary_id)
        mirror = self._recorded_mirror(primary_run)
        if mirror is not None:
            if mirror.copy_status != COPYING:
                return mirror
            experiment_id = self.secondary_experiment_id(primary_run.info.experiment_id)
            return self._copy_run(primary_run, experiment_id, mirror)

        mirror = self._find_secondary_run(primary_id, primary_run.info.experiment_id)
        if mirror is None:
            self._wait_for_creator(primary_run)
            experiment_id = self.secondary_experiment_id(primary_run.info.experiment_id)
            mirror = self._copy_run(primary_run, experiment_id, None)
        elif mirror.copy_status == COPYING:
            # A copy that stopped midway (a killed process, a failed request) is completed.
            experiment_id = self.secondary_experiment_id(primary_run.info.experiment_id)
            mirror = self._copy_run(primary_run, experiment_id, mirror)
        self._record_run_mapping(primary_id, mirror.run_id)
        return mirror

    def _recorded_mirror(self, primary_run) -> Optional[SecondaryRun]:
        """Return the mirror that the ``azdual.secondary_run_id`` tag names, if it points back."""
        from mlflow.exceptions import MlflowException

        recorded_id = primary_run.data.tags.get(SECONDARY_RUN_ID_TAG)
        if not recorded_id:
            return None
        try:
            candidate = self._secondary.get_run(recorded_id)
        except MlflowException:
            return None
        if candidate.data.tags.get(PRIMARY_RUN_ID_TAG) != primary_run.info.run_id:
            return None
        return _secondary_run_of(candidate)

    def find_secondary_run(self, primary_run) -> Optional[SecondaryRun]:
        """Return the mirror of ``primary_run`` (a Run) without creating or completing it.

        Looks at the run's ``azdual.secondary_run_id`` tag first, then searches the
        secondary experiment; None when the experiment or the run has no mirror there.
        """
        mirror = self._recorded_mirror(primary_run)
        if mirror is not None:
            return mirror
        experiment_id = self.find_secondary_experiment_id(primary_run.info.experiment_id)
        if experiment_id is None:
            return None
        return self._search_secondary_run(primary_run.info.run_id, experiment_id)

    def find_secondary_experiment_id(self, primary_experiment_id: str) -> Optional[str]:
        """Return the secondary id of a primary experiment, or None if it has no mirror.

        Never creates an experiment. Looks at the ``azdual.secondary_experiment_id`` tag, then
        at the names the mirror could have.
        """
        cached = self._experiments.get(primary_experiment_id)
        if cached is not None:
            return cached
        primary_experiment = self._primary.get_experiment(primary_experiment_id)
        recorded_id = (primary_experiment.tags or {}).get(SECONDARY_EXPERIMENT_ID_TAG)
        if recorded_id and self._secondary_experiment_matches(recorded_id, primary_experiment_id):
            return recorded_id
        name = secondary_experiment_name(primary_experiment.name, self._template)
        for candidate in (name, disambiguate(name, primary_experiment.name)):
            existing = self._secondary.get_experiment_by_name(candidate)
            if existing is not None and (
                (existing.tags or {}).get(PRIMARY_EXPERIMENT_ID_TAG) == primary_experiment_id
            ):
                return existing.experiment_id
        return None

    def create_secondary_run(
        self, primary_run_id, experiment_id, user_id, start_time, tags, run_name, look_first=False
    ):
        """Create the mirror of a just-created primary run and record the mapping.

        Returns the existing mirror instead if another lookup created it first. With
        ``look_first`` (an earlier attempt may have created the mirror before failing), the
        secondary is searched for a run tagged with ``primary_run_id`` before creating one.
        """
        with self._lock:
            cached = self._runs.get(primary_run_id)
            if cached is not None:
                if primary_run_id in self._unrecorded_runs:
                    self._record_run_mapping(primary_run_id, cached.run_id)
                return cached
            if look_first:
                found = self._find_secondary_run(primary_run_id, experiment_id)
                if found is not None:
                    self.remember_run(primary_run_id, found)
                    self._record_run_mapping(primary_run_id, found.run_id)
                    return found
            return self._create_secondary_run(
                primary_run_id, experiment_id, user_id, start_time, tags, run_name
            )

    @staticmethod
    def _wait_for_creator(primary_run) -> None:
        """Raise NotReadyError while a young running run may still get its mirror elsewhere.

        The process that created a run through the plugin (tag ``azdual.created_through_plugin``)
        creates its mirror from its own queue. Another process
        writing to the run meanwhile (a forked worker, a Spark executor) would otherwise copy
        the run and make a second mirror. For ``MIRROR_CREATION_GRACE_S`` after the run
        started, it retries the lookup instead; after that the run is copied.
        """
        import time

        from mlflow_azdual.retry import NotReadyError

        info = primary_run.info
        if primary_run.data.tags.get(CREATED_THROUGH_PLUGIN_TAG) != "true":
            return  # Created without the plugin: no other process makes its mirror.
        age_s = time.time() - (info.start_time or 0) / 1000
        if info.status == "RUNNING" and 0 <= age_s < MIRROR_CREATION_GRACE_S:
            raise NotReadyError(
                f"primary run {info.run_id} started {age_s:.0f} s ago and has no mirror yet; "
                "waiting for the process that created it to create the mirror"
            )

    def _find_secondary_run(self, primary_run_id, primary_experiment_id) -> Optional[SecondaryRun]:
        return self._search_secondary_run(
            primary_run_id, self.secondary_experiment_id(primary_experiment_id)
        )

    def _search_secondary_run(self, primary_run_id, secondary_experiment_id):
        from mlflow.entities import ViewType

        found = self._secondary.search_runs(
            [secondary_experiment_id],
            f"tags.`{PRIMARY_RUN_ID_TAG}` = '{primary_run_id}'",
            ViewType.ALL,
            max_results=1,
        )
        if not found:
            return None
        return _secondary_run_of(found[0])

    def _record_run_mapping(self, primary_run_id, secondary_run_id):
        """Tag the primary run with its mirror; on failure, remember to tag it on the retry."""
        from mlflow.entities import RunTag

        self._unrecorded_runs.add(primary_run_id)
        self._primary.set_tag(primary_run_id, RunTag(SECONDARY_RUN_ID_TAG, secondary_run_id))
        self._unrecorded_runs.discard(primary_run_id)

    def _create_secondary_run(
        self, primary_run_id, experiment_id, user_id, start_time, tags, run_name
    ):
        from mlflow.entities import RunTag

        secondary_experiment_id = self.secondary_experiment_id(experiment_id)
        own_tags = [RunTag(PRIMARY_RUN_ID_TAG, primary_run_id)]
        created = self._secondary.create_run(
            secondary_experiment_id,
            user_id,
            start_time,
            self.translate_run_tags(_without_own_tags(tags)) + own_tags,
            run_name,
        )
        mirror = SecondaryRun(created.info.run_id, created.info.artifact_uri)
        self.remember_run(primary_run_id, mirror)
        self._record_run_mapping(primary_run_id, mirror.run_id)
        return mirror

    # Logged models (MLflow 3)

    def cached_secondary_model_id(self, primary_model_id: str) -> Optional[str]:
        return self._models.get(primary_model_id)

    def remember_model(self, primary_model_id: str, secondary_model_id: str) -> None:
        with self._lock:
            self._models[primary_model_id] = secondary_model_id

    def find_secondary_model(self, primary_model_id: str, secondary_experiment_id: str):
        """Return the secondary logged model tagged with ``primary_model_id``, or None."""
        found = self._secondary.search_logged_models(
            experiment_ids=[secondary_experiment_id],
            filter_string=f"tags.`{PRIMARY_MODEL_ID_TAG}` = '{primary_model_id}'",
            max_results=1,
        )
        return found[0] if found else None

    def secondary_model_id(self, primary_model_id: str) -> Optional[str]:
        """Return the secondary id of a primary logged model, or None if it has no mirror."""
        with self._lock:
            cached = self._models.get(primary_model_id)
            if cached is not None:
                return cached
            model = self._primary.get_logged_model(primary_model_id)
            secondary_id = (model.tags or {}).get(SECONDARY_MODEL_ID_TAG)
            if secondary_id:
                self._models[primary_model_id] = secondary_id
            return secondary_id


def _secondary_run_of(run) -> SecondaryRun:
    return SecondaryRun(
        run.info.run_id, run.info.artifact_uri, copy_status=run.data.tags.get(COPY_STATUS_TAG)
    )


def _without_own_tags(tags):
    return [tag for tag in tags or [] if not tag.key.startswith(TAG_PREFIX)]
