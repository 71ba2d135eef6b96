"""Copy a primary run's params, tags, metric histories and status to its mirror on the secondary.

A copy is shaped as live writes are (``mirror_rules``): refused tags are left out, tags the
secondary drops at create_run are set again, params are fitted to the secondary's limits, and
requests are split by the secondary's batch limits. The same function completes a copy that
stopped midway: it reads the mirror, compares it with the primary run and sends only what the
mirror lacks, so running it twice sends nothing the second time.

A new mirror is created with ``azdual.copy_status=copying``. The caller sets the final status
with ``mark_copy`` as its last request, so a copy cut short is recognised by that tag.
"""

import collections
import dataclasses
import math

from mlflow_azdual import mirror_rules, rest_batch
from mlflow_azdual.coalesce import Write, coalesce
from mlflow_azdual.id_mapping import (
    COPY_STATUS_TAG,
    COPYING,
    PRIMARY_RUN_ID_TAG,
    SecondaryRun,
)
from mlflow_azdual.idempotency import read_metric_history
from mlflow_azdual.logs import get_logger

_logger = get_logger(__name__)


@dataclasses.dataclass
class CopyCounts:
    """Counts of the entities one copy sent to the secondary."""

    created: bool = False
    params: int = 0
    tags: int = 0
    metric_points: int = 0
    artifact_files: int = 0
    artifact_bytes: int = 0
    logged_models: int = 0
    model_versions: int = 0

    def add(self, other: "CopyCounts") -> None:
        for field in dataclasses.fields(self):
            if field.name != "created":
                setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    @property
    def sent_anything(self) -> bool:
        return self.created or any(
            getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "created"
        )


def point_key(metric):
    """Return the identity of a metric point: key, step, timestamp and value (NaN by name)."""
    value = float(metric.value)
    return (metric.key, int(metric.step or 0), int(metric.timestamp), "nan" if math.isnan(value) else value)


def metric_history(store, run_id, key, page_size):
    """Return every point of ``key`` in ``run_id``, read in pages of ``page_size`` points."""
    return read_metric_history(store, run_id, key, page_size)


def missing_points(primary_points, secondary_points):
    """Return the points of ``primary_points`` that ``secondary_points`` lacks, repeats counted."""
    present = collections.Counter(point_key(point) for point in secondary_points)
    missing = []
    for point in primary_points:
        key = point_key(point)
        if present[key] > 0:
            present[key] -= 1
        else:
            missing.append(point)
    return missing


def expected_tags(store, primary_run, translate_parent) -> dict:
    """Return the user tags (key to value) the mirror of ``primary_run`` should have.

    Those are the primary's tags without the plugin's own and those the secondary refuses,
    with ``mlflow.parentRunId`` translated by ``translate_parent`` (a function of the RunTag
    list), plus the markers of truncated params.
    """
    from mlflow.entities import RunTag

    profile = store.secondary_profile
    tags = [RunTag(key, value) for key, value in mirror_rules.user_tags(primary_run.data.tags).items()]
    tags = mirror_rules.without_refused_tags(profile, translate_parent(tags))
    expected = {tag.key: tag.value for tag in tags}
    expected.update(mirror_rules.truncation_markers(
        profile, store.config.options["param_overflow"], primary_run.data.params
    ))
    return expected


def copy_run_data(store, primary_run, secondary_experiment_id, partial=None):
    """Create or complete the mirror of ``primary_run``; return ``(SecondaryRun, CopyCounts)``.

    ``partial`` is the existing mirror (a ``SecondaryRun``) to complete, or None to create one.
    Params the secondary does not take (over its per-run cap, or too long with
    ``param_overflow=dead_letter``) are recorded as dead letters by ``store._fit_params``. A
    param whose value differs on the mirror is left as it is, because MLflow rejects changing a
    param; ``mlflow-azdual diff`` lists it. The copy status tag is not changed here.
    """
    from mlflow.entities import Metric, Param, RunTag

    info = primary_run.info
    counts = CopyCounts()
    mapping = store.mapping
    tags = expected_tags(store, primary_run, mapping.translate_run_tags)
    if partial is None:
        _logger.info(
            "mlflow-azdual: primary run %s has no mirror yet; copying it to the secondary",
            info.run_id,
        )
        markers = {key for key in tags if key.startswith(mirror_rules.TRUNCATED_PARAM_TAG_PREFIX)}
        create_tags = [RunTag(key, value) for key, value in tags.items() if key not in markers]
        created = store.secondary.create_run(
            secondary_experiment_id,
            info.user_id,
            info.start_time,
            create_tags + [RunTag(PRIMARY_RUN_ID_TAG, info.run_id), RunTag(COPY_STATUS_TAG, COPYING)],
            info.run_name,
        )
        counts.created = True
        mirror = SecondaryRun(created.info.run_id, created.info.artifact_uri, copy_status=COPYING)
        dropped = store.secondary_profile.dropped_at_create_run
        present_tags = {tag.key: tag.value for tag in create_tags if tag.key not in dropped}
        present_params, present_metrics = {}, set()
        secondary_info = created.info
    else:
        _logger.info(
            "mlflow-azdual: completing the copy of primary run %s on secondary run %s",
            info.run_id, partial.run_id,
        )
        mirror = partial
        create_tags = []
        existing = store.secondary.get_run(partial.run_id)
        present_tags = existing.data.tags
        present_params = existing.data.params
        present_metrics = set(existing.data.metrics)
        secondary_info = existing.info

    # In key order, so that a run over the per-run cap mirrors its first keys.
    store._secondary_param_keys[info.run_id] = set(present_params)
    missing_params = [
        Param(key, primary_run.data.params[key])
        for key in sorted(primary_run.data.params)
        if key not in present_params
    ]
    params, _ = store._fit_params(info.run_id, mirror.run_id, missing_params)
    send_tags = [RunTag(key, value) for key, value in tags.items() if present_tags.get(key) != value]

    page_sizes = store.history_page_sizes
    metrics = []
    for key in sorted(primary_run.data.metrics):
        points = metric_history(store.primary, info.run_id, key, page_sizes["primary"])
        if key in present_metrics:
            points = missing_points(
                points, metric_history(store.secondary, mirror.run_id, key, page_sizes["secondary"])
            )
        metrics.extend(Metric(point.key, point.value, point.timestamp, point.step) for point in points)

    backfill = Write(0, info.run_id, metrics, params, send_tags)
    for batch in coalesce([backfill], store.backend_limits["secondary"]):
        rest_batch.log_batch(store.secondary, mirror.run_id, batch.metrics, batch.params, batch.tags)
    counts.params, counts.metric_points = len(params), len(metrics)
    counts.tags = len(create_tags) + len(send_tags)

    if (info.status != "RUNNING" or info.end_time) and (
        secondary_info.status != info.status or secondary_info.end_time != info.end_time
    ):
        store.secondary.update_run_info(mirror.run_id, info.status, info.end_time, info.run_name)
    if info.lifecycle_stage == "deleted" and secondary_info.lifecycle_stage != "deleted":
        store.secondary.delete_run(mirror.run_id)
    return dataclasses.replace(mirror, backfilled=True, copied=counts), counts


def mark_copy(store, secondary_run_id, status) -> None:
    """Set the mirror's ``azdual.copy_status`` tag: the last request of a copy."""
    from mlflow.entities import RunTag

    store.secondary.set_tag(secondary_run_id, RunTag(COPY_STATUS_TAG, status))
