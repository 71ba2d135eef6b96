"""Request limits and quirks of each kind of backend, as data: one profile per backend kind.

A profile is chosen from the scheme of a backend's tracking URI (``databricks``, ``azureml``,
anything else ``mlflow``), or named by the ``primary_profile`` / ``secondary_profile`` option,
for example to treat a plain MLflow server as an Azure ML stand-in. The write queue of a
backend splits batches by its profile's limits, narrowed by the ``max_batch_*`` options. The
limits come from public reports, not from the services' own documentation:
  Databricks: MLflow's REST limits (1000 metrics, 100 params, 100 tags, 1000 entities).
  Experiment names must be absolute workspace paths, ``/Users/<user>/...`` or ``/Shared/...``
  (a plain name gets INVALID_PARAMETER_VALUE "An experiment name must be an absolute path
  within the Databricks workspace"). A name with a leading ``/Workspace`` or ``//`` is
  created but then not found by name, so the next create gets RESOURCE_ALREADY_EXISTS.
  Azure ML: at most 250 values of one metric key per log_batch request
  ("MetricV2Dto.Value Count Limit=250", mlflow/mlflow#11462), 200 params per run
  (Azure/azure-sdk-for-python#35685), param values of at most 500 characters (kedro-mlflow
  issue 551), ``mlflow.source.name`` / ``mlflow.source.type`` dropped when passed to create_run
  (Azure/azure-sdk-for-python#45207), ``mlflow.user`` refused as a tag
  (mlflow/mlflow-export-import#78), at most 100 files in one artifact upload batch (the reported
  error: "Artifact batch size exceeded the limit of 100"), a metric-history page size under
  1,000 (the reported error: "MaxResults = 25000 is invalid: MaxResults must be less than 1000"),
  no logged-model endpoints (Azure/azure-sdk-for-python#44896), and no experiment rename
  (Microsoft's MLflow support matrix for Azure ML).
"""

import dataclasses
import urllib.parse
from typing import Optional

from mlflow_azdual.coalesce import BatchLimits


@dataclasses.dataclass(frozen=True)
class BackendProfile:
    """The limits of one backend kind."""

    name: str
    limits: BatchLimits
    # None: no limit known.
    max_params_per_run: Optional[int] = None
    max_param_value_chars: Optional[int] = None
    # Tags the backend refuses, and tags it drops when they are passed to create_run.
    refused_tags: frozenset = frozenset()
    dropped_at_create_run: frozenset = frozenset()
    # False: no MLflow 3 logged-model endpoints, so models are kept as run artifacts there.
    logged_models: bool = True
    # False: experiments cannot be renamed there (no experiments/update endpoint).
    experiment_rename: bool = True
    # Experiment names: a regular expression that a name must match in full after
    # normalisation (None: any name), the accepted forms shown in the error, and whether names
    # are normalised as workspace paths (experiment_names.normalise_workspace_path).
    experiment_name_pattern: Optional[str] = None
    experiment_name_forms: tuple = ()
    normalise_experiment_names: bool = False
    # Files in one log_artifacts call, and max_results of one metrics/get-history request.
    max_artifact_files_per_batch: Optional[int] = None
    max_metric_history_page_size: Optional[int] = None


PROFILES = {
    "databricks": BackendProfile(
        "databricks",
        BatchLimits(),
        experiment_name_pattern=r"/(Users/[^/]+|Shared)/.+",
        experiment_name_forms=("/Users/<user>/<name>", "/Shared/<name>"),
        normalise_experiment_names=True,
    ),
    "azureml": BackendProfile(
        "azureml",
        BatchLimits(max_values_per_metric_key=250),
        max_params_per_run=200,
        max_param_value_chars=500,
        refused_tags=frozenset({"mlflow.user"}),
        dropped_at_create_run=frozenset({"mlflow.source.name", "mlflow.source.type"}),
        logged_models=False,
        experiment_rename=False,
        max_artifact_files_per_batch=100,
        max_metric_history_page_size=999,
    ),
    "mlflow": BackendProfile("mlflow", BatchLimits()),
}


def profile_for(
    uri: str, name: Optional[str] = None, overrides: Optional[dict] = None
) -> BackendProfile:
    """Return the profile named ``name``, or the one for the scheme of ``uri``, with the
    fields in ``overrides`` replaced (see ``parse_overrides``).

    Raises ValueError naming ``name`` and the valid names when there is no such profile.
    """
    if name is not None:
        if name not in PROFILES:
            raise ValueError(
                f"unknown backend profile {name!r}; valid profiles: {', '.join(sorted(PROFILES))}"
            )
        profile = PROFILES[name]
    else:
        profile = PROFILES.get(urllib.parse.urlsplit(uri).scheme, PROFILES["mlflow"])
    if not overrides:
        return profile
    limit_fields = {field.name for field in dataclasses.fields(BatchLimits)}
    limits = {key: value for key, value in overrides.items() if key in limit_fields}
    others = {key: value for key, value in overrides.items() if key not in limit_fields}
    return dataclasses.replace(
        profile, limits=dataclasses.replace(profile.limits, **limits), **others
    )


# Fields a user may override, with the type each value must have. None clears an optional
# limit (no limit).
_OVERRIDABLE = {
    **{field.name: int for field in dataclasses.fields(BatchLimits)},
    "max_params_per_run": int,
    "max_param_value_chars": int,
    "max_artifact_files_per_batch": int,
    "max_metric_history_page_size": int,
    "refused_tags": frozenset,
    "dropped_at_create_run": frozenset,
    "logged_models": bool,
    "experiment_rename": bool,
}
_REQUIRED = {"max_metrics", "max_params", "max_tags", "max_entities"}


def parse_overrides(text: str) -> dict:
    """Parse the ``primary_limits`` / ``secondary_limits`` option: a JSON object of profile
    fields, such as ``{"max_params_per_run": 400}``.

    Raises ValueError naming the field and the expected type for an unknown field or a value of
    the wrong type.
    """
    import json

    try:
        fields = json.loads(text)
    except ValueError as error:
        raise ValueError(f"expected a JSON object, got {text!r} ({error})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"expected a JSON object such as {{\"max_params_per_run\": 400}}, got {text!r}")
    parsed = {}
    for key, value in fields.items():
        kind = _OVERRIDABLE.get(key)
        if kind is None:
            raise ValueError(
                f"unknown profile field {key!r}; valid fields: {', '.join(sorted(_OVERRIDABLE))}"
            )
        if value is None and key not in _REQUIRED and kind is int:
            parsed[key] = None
        elif kind is int and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            parsed[key] = value
        elif kind is bool and isinstance(value, bool):
            parsed[key] = value
        elif kind is frozenset and isinstance(value, list) and all(isinstance(v, str) for v in value):
            parsed[key] = frozenset(value)
        else:
            expected = {int: "an integer greater than 0", bool: "true or false",
                        frozenset: "a list of tag names"}[kind]
            if kind is int and key not in _REQUIRED:
                expected += " or null for no limit"
            raise ValueError(f"profile field {key!r} must be {expected}, got {value!r}")
    return parsed
