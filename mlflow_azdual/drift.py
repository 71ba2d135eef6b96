"""Compare runs across the two backends: ``mlflow-azdual diff``.

A run's mirror is expected to contain what ``run_copy`` and live mirroring send. That is the
primary's params fitted by ``mirror_rules`` (values over the secondary's length limit
truncated, params over its per-run cap left on the primary) and the tags that
``mirror_rules.compared_tags`` keeps. It is also every metric point, the run's artifacts with
their sizes, its MLflow 3 logged models as artifacts of the mirror, and a mirror of each model
version registered from the run. Anything else is a ``Difference``. The comparison only reads; it creates and changes nothing.
"""

import dataclasses
import posixpath
from typing import List, Optional

from mlflow_azdual import backfill, mirror_rules, model_as_run_artifacts, run_copy
from mlflow_azdual.id_mapping import PRIMARY_RUN_ID_TAG, TAG_PREFIX

# Points of one metric key listed in a difference; the count covers all of them.
MAX_LISTED_POINTS = 5


@dataclasses.dataclass
class Difference:
    """One thing that differs between a primary run and its mirror.

    ``kind`` names what differs (such as ``param_missing``), ``key`` the param, tag, metric,
    artifact path or model version, and ``primary`` / ``secondary`` the value on each side
    (None where it is absent).
    """

    kind: str
    run_id: Optional[str]
    secondary_run_id: Optional[str] = None
    key: Optional[str] = None
    primary: object = None
    secondary: object = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        run = f"run {self.run_id}" if self.run_id else f"secondary run {self.secondary_run_id}"
        key = f" {self.key!r}" if self.key is not None else ""
        values = f"primary: {_show(self.primary)}, secondary: {_show(self.secondary)}"
        return f"{run}: {self.kind.replace('_', ' ')}{key} ({values})"


def _show(value) -> str:
    text = repr(value) if value is not None else "-"
    return text if len(text) <= 200 else text[:197] + "..."


def _points(points) -> list:
    return [[point.step, point.timestamp, point.value] for point in points[:MAX_LISTED_POINTS]]


class Drift:
    """Compares primary runs with their mirrors through one dual tracking store."""

    def __init__(self, store, gates):
        self.store = store
        self.gates = gates

    def diff_runs(self, runs) -> List[Difference]:
        differences = []
        for run in runs:
            differences.extend(self.diff_run(run))
        return differences

    def diff_experiment(self, experiment, runs) -> List[Difference]:
        """Compare ``runs`` of a primary experiment, and list mirror runs with no primary run."""
        from mlflow.entities import ViewType

        secondary_id = self.store.mapping.find_secondary_experiment_id(experiment.experiment_id)
        if secondary_id is None:
            return [Difference("experiment_missing", None, key=experiment.name,
                               primary=experiment.experiment_id)]
        differences = self.diff_runs(runs)
        primary_ids = {run.info.run_id for run in runs}
        page_token = None
        while True:
            page = self.store.secondary.search_runs(
                [secondary_id], "", ViewType.ACTIVE_ONLY, max_results=1000, page_token=page_token
            )
            for mirror in page:
                primary_id = mirror.data.tags.get(PRIMARY_RUN_ID_TAG)
                if primary_id not in primary_ids:
                    differences.append(Difference(
                        "run_extra", primary_id, mirror.info.run_id, primary=None,
                        secondary=mirror.info.run_name,
                    ))
            page_token = page.token
            if not page_token:
                return differences

    def diff_run(self, run) -> List[Difference]:
        store = self.store
        run_id = run.info.run_id
        mirror = store.mapping.find_secondary_run(run)
        if mirror is None:
            return [Difference("run_missing", run_id, primary=run.info.run_name)]
        secondary = store.secondary.get_run(mirror.run_id)
        differences = []

        def add(kind, key=None, primary=None, secondary_value=None):
            differences.append(Difference(kind, run_id, mirror.run_id, key, primary, secondary_value))

        self._diff_params(run, secondary, add)
        self._diff_tags(run, secondary, add)
        self._diff_metrics(run, secondary, add)
        for field in ("status", "lifecycle_stage"):
            if getattr(run.info, field) != getattr(secondary.info, field):
                add(f"{field}_differs", field, getattr(run.info, field), getattr(secondary.info, field))
        self._diff_artifacts(run, mirror, add)
        self._diff_model_versions(run_id, add)
        return differences

    def _diff_params(self, run, secondary, add):
        from mlflow.entities import Param

        profile = self.store.secondary_profile
        present = secondary.data.params
        known = set(present) if profile.max_params_per_run is not None else None
        params = [Param(key, run.data.params[key]) for key in sorted(run.data.params)]
        fitted = mirror_rules.fit_params(
            profile, self.store.config.options["param_overflow"], params, known
        )
        for param in fitted.kept:
            if param.key not in present:
                add("param_missing", param.key, run.data.params[param.key], None)
            elif present[param.key] != param.value:
                add("param_differs", param.key, run.data.params[param.key], present[param.key])
        for key in sorted(set(present) - set(run.data.params)):
            add("param_extra", key, None, present[key])

    def _diff_tags(self, run, secondary, add):
        profile = self.store.secondary_profile
        expected = mirror_rules.compared_tags(
            profile, run_copy.expected_tags(self.store, run, self._translate_parent)
        )
        present = mirror_rules.compared_tags(profile, secondary.data.tags)
        for key in sorted(expected):
            if key not in present:
                add("tag_missing", key, expected[key], None)
            elif present[key] != expected[key]:
                add("tag_differs", key, expected[key], present[key])
        for key in sorted(set(present) - set(expected)):
            add("tag_extra", key, None, present[key])

    def _translate_parent(self, tags):
        """Return ``tags`` with the parent run id the mirror should have, looked up, not created."""
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        from mlflow_azdual.id_mapping import PARENT_RUN_ID_TAG

        translated = []
        for tag in tags:
            if tag.key == PARENT_RUN_ID_TAG and tag.value:
                try:
                    parent = self.store.primary.get_run(tag.value)
                except MlflowException:
                    parent = None
                parent_mirror = self.store.mapping.find_secondary_run(parent) if parent else None
                value = parent_mirror.run_id if parent_mirror else f"<no mirror of {tag.value}>"
                tag = RunTag(tag.key, value)
            translated.append(tag)
        return translated

    def _diff_metrics(self, run, secondary, add):
        sizes = self.store.history_page_sizes
        for key in sorted(set(run.data.metrics) | set(secondary.data.metrics)):
            primary_points = []
            if key in run.data.metrics:
                primary_points = run_copy.metric_history(
                    self.store.primary, run.info.run_id, key, sizes["primary"]
                )
            secondary_points = []
            if key in secondary.data.metrics:
                secondary_points = run_copy.metric_history(
                    self.store.secondary, secondary.info.run_id, key, sizes["secondary"]
                )
            missing = run_copy.missing_points(primary_points, secondary_points)
            extra = run_copy.missing_points(secondary_points, primary_points)
            if missing:
                add("metric_points_missing", key, {"count": len(missing), "first": _points(missing)}, None)
            if extra:
                add("metric_points_extra", key, None, {"count": len(extra), "first": _points(extra)})

    def _expected_artifacts(self, run):
        """Return the files the mirror should have (path to size) and paths whose size may differ.

        The MLmodel file of a logged model kept as run artifacts is rewritten for the
        secondary run, so its size is not compared.
        """
        store = self.store
        expected = backfill.list_files(
            backfill.primary_repository(store, run.info.artifact_uri, self.gates)
        )
        resized = set()
        for model in backfill.logged_models_of_run(store, run):
            as_artifacts = model_as_run_artifacts.parse(store.mapping.secondary_model_id(model.model_id))
            folder = (
                as_artifacts.artifact_path if as_artifacts is not None
                else model_as_run_artifacts.artifact_path_for(model.name, model.model_id)
            )
            source = backfill.primary_repository(store, model.artifact_location, self.gates)
            for path, size in backfill.list_files(source).items():
                expected[posixpath.join(folder, path)] = size
            resized.add(posixpath.join(folder, model_as_run_artifacts.MLMODEL_FILE_NAME))
        return expected, resized

    def _diff_artifacts(self, run, mirror, add):
        expected, resized = self._expected_artifacts(run)
        present = backfill.list_files(
            backfill.secondary_repository(self.store, mirror.artifact_uri, self.gates)
        )
        for path in sorted(expected):
            if path not in present:
                add("artifact_missing", path, expected[path], None)
            elif present[path] != expected[path] and path not in resized:
                add("artifact_size_differs", path, expected[path], present[path])
        for path in sorted(set(present) - set(expected)):
            add("artifact_extra", path, None, present[path])

    def _diff_model_versions(self, run_id, add):
        from mlflow.exceptions import MlflowException

        from mlflow_azdual.registry_store import PRIMARY_VERSION_TAG, SECONDARY_VERSION_TAG

        versions = backfill.model_versions_of_run(self.store, run_id)
        if not versions:
            return
        registry = self.store.registry_mirror(self.store.store_uri)
        for version in versions:
            key = f"{version.name} version {version.version}"
            recorded = (version.tags or {}).get(SECONDARY_VERSION_TAG)
            mirrored = None
            if recorded:
                try:
                    mirrored = registry.secondary.get_model_version(version.name, recorded)
                except MlflowException:
                    mirrored = None
            if mirrored is None or (mirrored.tags or {}).get(PRIMARY_VERSION_TAG) != str(version.version):
                add("model_version_missing", key, version.source, None)
                continue
            expected = {k: v for k, v in (version.tags or {}).items() if not k.startswith(TAG_PREFIX)}
            present = {k: v for k, v in (mirrored.tags or {}).items() if not k.startswith(TAG_PREFIX)}
            if expected != present:
                add("model_version_tags_differ", key, expected, present)
            if version.description != mirrored.description and (version.description or mirrored.description):
                add("model_version_description_differs", key, version.description, mirrored.description)


def summary_document(differences, runs_compared) -> dict:
    """Return the JSON document of ``mlflow-azdual diff --json``."""
    return {
        "runs_compared": runs_compared,
        "differences": [difference.as_dict() for difference in differences],
    }

