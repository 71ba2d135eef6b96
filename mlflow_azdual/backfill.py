"""Copy primary runs that have no complete mirror to the secondary: ``mlflow-azdual mirror``.

For each selected run, oldest first:
1. A mirror tagged ``azdual.copy_status=complete`` is skipped, and so is a mirror created
   through the plugin (no such tag), unless ``recheck`` is set.
2. The mirror is found or created through ``IdMapping``, as on a run's first live write: a
   missing mirror is copied and a copy that stopped midway (``copying``) is completed
   (``run_copy``). With ``recheck``, a mirror marked complete is compared and completed too.
3. Artifacts the mirror lacks (compared by path and size) are copied, in uploads of at most
   the secondary profile's ``max_artifact_files_per_batch`` files. MLflow 3 logged models of
   the run are kept as artifacts of the secondary run, as the live plugin does for Azure ML.
4. Model versions registered from the run are created through the dual registry store.
5. ``azdual.copy_status=complete`` is set on the mirror, as the run's last request.
A run that fails is reported and left without the complete tag, so the next mirror completes
it. Every request goes through the ``RequestGate`` of its backend.
"""

import dataclasses
import os
import shutil
import tempfile
from typing import Callable, List, Optional

from mlflow_azdual import artifact_uri as dual_uri
from mlflow_azdual import compat, model_as_run_artifacts, run_copy
from mlflow_azdual.delivery import describe_error
from mlflow_azdual.id_mapping import COMPLETE, COPIED_EXCEPT_ARTIFACTS, COPYING
from mlflow_azdual.logs import get_logger
from mlflow_azdual.request_gate import RequestGate, gated

_logger = get_logger(__name__)

# Files per secondary upload when the secondary's profile sets no limit.
DEFAULT_FILES_PER_UPLOAD = 100

COPIED = "copied"
COMPLETED = "completed"
SKIPPED = "skipped"
FAILED = "failed"


@dataclasses.dataclass
class RunOutcome:
    """The result of one run's mirror (copied, completed, skipped or failed) and its reason."""

    run_id: str
    result: str
    detail: str = ""
    secondary_run_id: Optional[str] = None
    counts: run_copy.CopyCounts = dataclasses.field(default_factory=run_copy.CopyCounts)


@dataclasses.dataclass
class Summary:
    """The outcomes of one ``mirror`` and what was sent in all."""

    outcomes: List[RunOutcome] = dataclasses.field(default_factory=list)
    counts: run_copy.CopyCounts = dataclasses.field(default_factory=run_copy.CopyCounts)
    requests: dict = dataclasses.field(default_factory=dict)

    def by_result(self, result: str) -> List[RunOutcome]:
        return [outcome for outcome in self.outcomes if outcome.result == result]


@dataclasses.dataclass
class Gates:
    """The request gates of both backends."""

    primary: RequestGate
    secondary: RequestGate

    def requests(self) -> dict:
        return {"primary": self.primary.requests, "secondary": self.secondary.requests}


def gate_store(store, max_requests_per_s) -> Gates:
    """Pace every request of ``store`` (tracking and registry, both backends) to the rate given.

    ``max_requests_per_s`` applies to each backend separately; None sets no pace.
    """
    gates = Gates(
        RequestGate("primary", max_requests_per_s, store.policy),
        RequestGate("secondary", max_requests_per_s, store.policy),
    )
    store.gate_sub_stores(
        lambda target: gated(target, gates.primary), lambda target: gated(target, gates.secondary)
    )
    if store.config.options["mirror_registry"]:
        store.registry_mirror(store.store_uri).gate_sub_stores(
            lambda target: gated(target, gates.primary), lambda target: gated(target, gates.secondary)
        )
    return gates


def primary_repository(store, artifact_uri, gates: Gates):
    primary_uri = store.config.primary_uri
    root = compat.add_databricks_profile(artifact_uri, primary_uri)
    return gated(compat.build_artifact_repository(root, primary_uri), gates.primary)


def secondary_repository(store, artifact_uri, gates: Gates):
    return gated(
        compat.build_artifact_repository(artifact_uri, store.config.secondary_uri), gates.secondary
    )


def list_files(repository, path=None) -> dict:
    """Return every file under ``path`` of ``repository``: its artifact path to its size in bytes."""
    files = {}
    for info in repository.list_artifacts(path):
        if info.is_dir:
            files.update(list_files(repository, info.path))
        else:
            files[info.path] = info.file_size
    return files


def logged_models_of_run(store, primary_run) -> list:
    """Return the MLflow 3 logged models whose source run is ``primary_run`` (none before 3.0)."""
    if not hasattr(store.primary, "search_logged_models"):
        return []
    models, page_token = [], None
    while True:
        page = store.primary.search_logged_models(
            experiment_ids=[primary_run.info.experiment_id],
            filter_string=f"source_run_id = '{primary_run.info.run_id}'",
            max_results=100,
            page_token=page_token,
        )
        models.extend(page)
        page_token = page.token
        if not page_token:
            return models


def model_versions_of_run(store, run_id) -> list:
    """Return the primary's model versions registered from run ``run_id``."""
    if not store.config.options["mirror_registry"]:
        return []
    registry = store.registry_mirror(store.store_uri)
    return list(registry.primary.search_model_versions(f"run_id = '{run_id}'"))


def _copy_files(source, destination, paths, artifact_path, files_per_upload, rewrite=None):
    """Download ``paths`` from ``source`` and upload them to ``destination`` under ``artifact_path``.

    Files go in uploads of at most ``files_per_upload``, each through a temporary folder that
    is removed afterwards. ``rewrite(folder)`` may change a chunk's files before the upload.
    Returns the number of bytes sent.
    """
    sent_bytes = 0
    with tempfile.TemporaryDirectory(prefix="mlflow-azdual-mirror-") as scratch:
        for start in range(0, len(paths), files_per_upload):
            chunk = os.path.join(scratch, str(start))
            os.makedirs(chunk)
            for path in paths[start : start + files_per_upload]:
                source.download_artifacts(path, dst_path=chunk)
            if rewrite is not None:
                rewrite(chunk)
            for folder, _, names in os.walk(chunk):
                sent_bytes += sum(os.path.getsize(os.path.join(folder, name)) for name in names)
            destination.log_artifacts(chunk, artifact_path)
            shutil.rmtree(chunk)
    return sent_bytes


class Backfill:
    """Mirrors selected primary runs through one dual tracking store (see the module doc)."""

    def __init__(self, store, gates: Gates, recheck: bool = False):
        self.store = store
        self.gates = gates
        self.recheck = recheck
        profile_limit = store.secondary_profile.max_artifact_files_per_batch
        self.files_per_upload = profile_limit or DEFAULT_FILES_PER_UPLOAD

    def run(self, runs, progress: Optional[Callable] = None) -> Summary:
        """Mirror ``runs`` (primary Run entities) one by one; return the summary."""
        summary = Summary()
        for index, run in enumerate(runs):
            outcome = self.mirror_run(run)
            summary.outcomes.append(outcome)
            summary.counts.add(outcome.counts)
            if progress is not None:
                progress(index + 1, len(runs), outcome)
        summary.requests = self.gates.requests()
        return summary

    def mirror_run(self, run) -> RunOutcome:
        """Mirror one primary run. An Exception is logged and returned as a FAILED outcome."""
        from mlflow_azdual.retry import NotReadyError

        run_id = run.info.run_id
        try:
            return self._mirror_run(run)
        except NotReadyError as error:
            return RunOutcome(run_id, SKIPPED, f"{error}; run mirror again later")
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the others.
            _logger.error("mlflow-azdual: mirroring run %s failed: %s", run_id, describe_error(error))
            return RunOutcome(run_id, FAILED, describe_error(error))

    def _mirror_run(self, run) -> RunOutcome:
        store = self.store
        run_id = run.info.run_id
        existing = store.mapping.find_secondary_run(run)
        status = existing.copy_status if existing is not None else None
        if existing is not None and not self.recheck:
            if status == COMPLETE:
                return RunOutcome(run_id, SKIPPED, "mirror complete", existing.run_id)
            if status is None:
                return RunOutcome(run_id, SKIPPED, "mirrored live by the plugin", existing.run_id)

        mirror = store.mapping.secondary_run(run_id)
        counts = run_copy.CopyCounts()
        if mirror.copied is not None:
            counts.add(mirror.copied)
            counts.created = mirror.copied.created
        elif self.recheck and status != COPIED_EXCEPT_ARTIFACTS:
            experiment_id = store.mapping.secondary_experiment_id(run.info.experiment_id)
            _, copied = run_copy.copy_run_data(store, run, experiment_id, mirror)
            counts.add(copied)

        self._copy_artifacts(run, mirror, counts)
        self._copy_logged_models(run, mirror, counts)
        self._copy_model_versions(run_id, counts)
        run_copy.mark_copy(store, mirror.run_id, COMPLETE)

        if existing is None:
            result = COPIED
        elif status in (COPYING, COPIED_EXCEPT_ARTIFACTS) or counts.sent_anything:
            result = COMPLETED
        else:
            result = SKIPPED
        detail = {COPIED: "new mirror", COMPLETED: f"mirror was {status or 'mirrored live'}",
                  SKIPPED: "nothing missing"}[result]
        return RunOutcome(run_id, result, detail, mirror.run_id, counts)

    def _copy_artifacts(self, run, mirror, counts) -> None:
        source = primary_repository(self.store, run.info.artifact_uri, self.gates)
        destination = secondary_repository(self.store, mirror.artifact_uri, self.gates)
        primary_files = list_files(source)
        present = {} if counts.created else list_files(destination)
        missing = sorted(path for path, size in primary_files.items() if present.get(path) != size)
        if not missing:
            return
        counts.artifact_bytes += _copy_files(source, destination, missing, None, self.files_per_upload)
        counts.artifact_files += len(missing)

    def _copy_logged_models(self, run, mirror, counts) -> None:
        """Keep the run's MLflow 3 logged models as artifacts of the secondary run.

        NOTE: this is also done for a secondary whose profile has the logged-model API, where
        the live plugin would create a logged model instead.
        """
        from mlflow_azdual import artifact_repository

        store = self.store
        for model in logged_models_of_run(store, run):
            if store.mapping.secondary_model_id(model.model_id):
                continue
            as_artifacts = model_as_run_artifacts.RunArtifactModel(
                mirror.run_id,
                model_as_run_artifacts.artifact_path_for(model.name, model.model_id),
            )
            source = primary_repository(store, model.artifact_location, self.gates)
            destination = secondary_repository(store, mirror.artifact_uri, self.gates)
            files = sorted(list_files(source))
            with tempfile.TemporaryDirectory(prefix="mlflow-azdual-model-") as scratch:
                for path in files:
                    source.download_artifacts(path, dst_path=scratch)
                model_as_run_artifacts.rewrite_mlmodel(scratch, as_artifacts)
                artifact_repository._upload(
                    destination, "log_artifacts", scratch, as_artifacts.artifact_path,
                    self.files_per_upload,
                )
                artifact_repository._record_model_on_secondary_run(store, as_artifacts, scratch)
            location = dual_uri.join(mirror.artifact_uri, as_artifacts.artifact_path)
            store._record_model_mirror(model.model_id, as_artifacts.location, location)
            counts.logged_models += 1
            counts.artifact_files += len(files)

    def _copy_model_versions(self, run_id, counts) -> None:
        from mlflow.entities.model_registry import ModelVersionTag

        from mlflow_azdual.id_mapping import TAG_PREFIX
        from mlflow_azdual.registry_store import SECONDARY_VERSION_TAG

        versions = model_versions_of_run(self.store, run_id)
        if not versions:
            return
        registry = self.store.registry_mirror(self.store.store_uri)
        for version in versions:
            if (version.tags or {}).get(SECONDARY_VERSION_TAG):
                continue
            tags = [
                ModelVersionTag(key, value)
                for key, value in (version.tags or {}).items()
                if not key.startswith(TAG_PREFIX)
            ]
            # Uncertain: a version created before an interruption is found by its tag.
            registry._mirror_create_model_version(
                True, version.name, str(version.version), version.source, version.run_id, tags,
                version.description, getattr(version, "model_id", None),
            )
            counts.model_versions += 1
