"""The rules that shape a primary run's params and tags for the secondary (pure functions).

Live mirroring, ``mlflow-azdual mirror`` and ``mlflow-azdual diff`` apply the same rules, so a
run copied by one is what the others expect. Params are fitted to the secondary profile's
value length and per-run cap, and tags the secondary refuses stay on the primary. The
plugin's own ``azdual.*`` tags and the model-history tag (which names each backend's own run
id) are not compared.
"""

from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from mlflow_azdual.id_mapping import TAG_PREFIX

TRUNCATED_PARAM_TAG_PREFIX = "azdual.truncated_param."
# MLflow's run tag that lists the models logged to the run. Each entry names its backend's run id.
MODEL_HISTORY_TAG = "mlflow.log-model.history"

TRUNCATE = "truncate"
DEAD_LETTER = "dead_letter"


class FittedParams(NamedTuple):
    """Params as the secondary takes them, the tags marking truncated values, and the rest.

    ``rejected`` contains ``(param, reason)`` pairs for params the secondary does not get.
    """

    kept: list
    markers: list
    rejected: List[Tuple[object, str]]


def fit_params(profile, overflow: str, params: Iterable, known_keys: Optional[set]) -> FittedParams:
    """Fit ``params`` to the value length and the per-run cap of ``profile``.

    A value over the length limit is cut to it and marked with the tag
    ``azdual.truncated_param.<key>`` holding the original length (``overflow`` "truncate"), or
    rejected (``overflow`` "dead_letter"). A param over the per-run cap is rejected unless its
    key is in ``known_keys``, the keys the mirror run already has, which this function extends
    with the keys it keeps. ``known_keys`` may be None when the profile has no cap.
    """
    from mlflow.entities import Param, RunTag

    kept, markers, rejected = [], [], []
    limit = profile.max_param_value_chars
    for param in params:
        if limit is not None and len(param.value) > limit:
            if overflow == DEAD_LETTER:
                rejected.append((param, f"its value of {len(param.value)} characters is over "
                                        f"the secondary's limit of {limit}"))
                continue
            markers.append(RunTag(f"{TRUNCATED_PARAM_TAG_PREFIX}{param.key}", str(len(param.value))))
            param = Param(param.key, param.value[:limit])
        kept.append(param)
    cap = profile.max_params_per_run
    if cap is not None and kept:
        allowed = []
        for param in kept:
            if param.key in known_keys or len(known_keys) < cap:
                known_keys.add(param.key)
                allowed.append(param)
            else:
                rejected.append((param, f"the secondary takes at most {cap} params per run"))
        kept = allowed
    return FittedParams(kept, markers, rejected)


def truncation_markers(profile, overflow: str, params: Dict[str, str]) -> Dict[str, str]:
    """Return the marker tags the mirror of a run with ``params`` (key to value) should have."""
    limit = profile.max_param_value_chars
    if limit is None or overflow != TRUNCATE:
        return {}
    return {
        f"{TRUNCATED_PARAM_TAG_PREFIX}{key}": str(len(value))
        for key, value in params.items()
        if len(value) > limit
    }


def without_refused_tags(profile, tags: Iterable) -> list:
    """Return ``tags`` (RunTag entities) without those the secondary refuses."""
    return [tag for tag in tags if tag.key not in profile.refused_tags]


def user_tags(tags: Dict[str, str]) -> Dict[str, str]:
    """Return ``tags`` without the plugin's own ``azdual.*`` tags."""
    return {key: value for key, value in tags.items() if not key.startswith(TAG_PREFIX)}


def compared_tags(profile, tags: Dict[str, str]) -> Dict[str, str]:
    """Return the tags of a run that must be equal on both backends.

    Left out: the plugin's own tags, tags the secondary refuses (such as ``mlflow.user`` on
    Azure ML) and the model-history tag.
    """
    return {
        key: value
        for key, value in user_tags(tags).items()
        if key not in profile.refused_tags and key != MODEL_HISTORY_TAG
    }
