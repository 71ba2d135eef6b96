"""Drop the parts of a log_batch that a backend already has, before sending it again.

A batch whose earlier attempt may have been applied (a timeout, a reset after the request was
sent, a 5xx) or that is replayed from a spool is ``uncertain``. MLflow's SQL store ignores an
identical metric point sent twice, but other backends may keep both. So before an uncertain
batch is sent, the run is read: a metric point (key, step, timestamp, value) that is already in
the run's history and a param with the same value are left out. Tags are sent again, because
setting a tag twice leaves one value.

The history of a key is read in one request or, when the caller gives a page size, in pages of
that size, following the page tokens. The dual store reads the secondary in pages within its
profile's ``max_metric_history_page_size``.
"""

import contextlib
import math
import threading

_local = threading.local()


@contextlib.contextmanager
def history_cache():
    """Reuse each metric history read by ``remove_delivered`` on this thread until exit.

    A replay checks many batches of one run; without the cache each batch would read the
    whole history of its keys again.
    """
    _local.cache = {}
    try:
        yield
    finally:
        _local.cache = None


def read_metric_history(store, run_id, key, page_size=None):
    """Return every point of ``key`` in the run, read in pages of ``page_size`` points.

    With ``page_size`` None it is one request without ``max_results``, for which MLflow's
    stores return the whole history.
    """
    if page_size is None:
        return list(store.get_metric_history(run_id, key))
    points = []
    page_token = None
    while True:
        page = store.get_metric_history(run_id, key, max_results=page_size, page_token=page_token)
        points.extend(page)
        # A store that does not page returns a plain list, which has no token.
        page_token = getattr(page, "token", None)
        if not page_token:
            return points


def _present_points(store, run_id, key, page_size):
    cache = getattr(_local, "cache", None)
    cache_key = (id(store), run_id, key)
    if cache is not None and cache_key in cache:
        return cache[cache_key]
    points = {
        _point_key(point.key, point.step, point.timestamp, point.value)
        for point in read_metric_history(store, run_id, key, page_size)
    }
    if cache is not None:
        cache[cache_key] = points
    return points


def _point_key(key, step, timestamp, value):
    number = float(value)
    # NaN never equals itself, so it is compared by name.
    return (key, int(step or 0), int(timestamp), "nan" if math.isnan(number) else number)


def remove_delivered(store, run_id, metrics, params, history_page_size=None):
    """Return ``(metrics, params)`` without the items ``store`` already has for ``run_id``.

    ``history_page_size`` is the ``max_results`` of each metric-history request, or None for
    one request per key.
    """
    run = store.get_run(run_id)
    existing_params = run.data.params
    params = [param for param in params if existing_params.get(param.key) != param.value]
    logged_keys = set(run.data.metrics)
    present = set()
    for key in {metric.key for metric in metrics} & logged_keys:
        present |= _present_points(store, run_id, key, history_page_size)
    metrics = [
        metric
        for metric in metrics
        if _point_key(metric.key, metric.step, metric.timestamp, metric.value) not in present
    ]
    return metrics, params
