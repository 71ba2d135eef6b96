"""Options of the plugin: one table, read from the tracking URI's query or the environment.

Every option has a URI query name, an ``MLFLOW_AZDUAL_*`` environment variable, a unit in its
name where it has one, and a default. A query option overrides the environment. An unknown
query option or a value of the wrong type raises ``MlflowException`` naming the option.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

ENV_PREFIX = "MLFLOW_AZDUAL_"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"expected a number greater than 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"expected an integer greater than 0, got {text!r}")
    return value


def _param_overflow(text: str) -> str:
    choice = text.strip().lower()
    if choice not in ("truncate", "dead_letter"):
        raise ValueError(f"expected truncate or dead_letter, got {text!r}")
    return choice


def _profile_name(text: str) -> str:
    from mlflow_azdual.backend_profiles import PROFILES

    name = text.strip().lower()
    if name not in PROFILES:
        raise ValueError(f"expected one of {', '.join(sorted(PROFILES))}, got {text!r}")
    return name


def _experiment_name_template(text: str) -> str:
    from mlflow_azdual.experiment_names import secondary_experiment_name

    # Raises ValueError naming the template and the valid fields.
    secondary_experiment_name("/Users/someone@example.com/project/name", text)
    return text


def _profile_overrides(text: str) -> dict:
    from mlflow_azdual.backend_profiles import parse_overrides

    return parse_overrides(text)


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its query name, type, default and help text."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS = (
    Option(
        "databricks_profile",
        str,
        None,
        "Databricks CLI profile of the primary in the linked-workspace URI form; the primary "
        "becomes databricks://<profile>. Unset: the default Databricks credentials.",
    ),
    Option(
        "experiment_name_template",
        _experiment_name_template,
        "{leaf}",
        "Name of the secondary experiment built from the primary experiment name. Fields: "
        "{leaf} (last path segment), {path} (the whole path, '/' replaced by '-'), {parent} "
        "(the segment before the leaf). The result is sanitised for Azure ML.",
    ),
    Option(
        "primary_registry_uri",
        str,
        None,
        "Model registry URI of the primary. Unset: the primary tracking URI (the Databricks "
        "workspace registry for databricks://). Set databricks-uc://<profile> for Unity Catalog.",
    ),
    Option(
        "secondary_registry_uri",
        str,
        None,
        "Model registry URI of the secondary. Unset: the secondary tracking URI.",
    ),
    Option(
        "primary_profile",
        _profile_name,
        None,
        "Backend profile (databricks, azureml, mlflow) whose request limits the primary's "
        "writer follows. databricks also checks and normalises experiment names as workspace "
        "paths before they are sent. Unset: chosen from the primary URI's scheme "
        "(databricks://, azureml://, anything else mlflow).",
    ),
    Option(
        "secondary_profile",
        _profile_name,
        None,
        "Backend profile of the secondary, as for primary_profile. azureml splits a batch so "
        "that no request carries more than 250 values of one metric key.",
    ),
    Option(
        "primary_limits",
        _profile_overrides,
        None,
        "JSON object of fields that replace those of the primary's backend profile, for a "
        'service whose limits changed, such as {"max_params_per_run": 3200}. Fields: the '
        "request limits (max_metrics, max_params, max_tags, max_entities, "
        "max_values_per_metric_key), max_params_per_run, max_param_value_chars, "
        "max_artifact_files_per_batch, max_metric_history_page_size (integers; null for no "
        "limit), refused_tags, dropped_at_create_run (lists of tag names), logged_models, "
        "experiment_rename (true or false).",
    ),
    Option(
        "secondary_limits",
        _profile_overrides,
        None,
        "JSON object of fields that replace those of the secondary's backend profile, as for "
        'primary_limits, such as {"max_params_per_run": 400}.',
    ),
    Option(
        "param_overflow",
        _param_overflow,
        "truncate",
        "What the secondary gets for a param value longer than its profile allows (Azure ML: "
        "500 characters): truncate (the value cut to the limit, and the tag "
        "azdual.truncated_param.<key> with the original length) or dead_letter (not sent, "
        "recorded as a dead letter). The primary always has the whole value.",
    ),
    Option(
        "mirror_registry",
        _parse_bool,
        True,
        "Mirror registered models and model versions to the secondary registry.",
    ),
    Option(
        "flush_interval_s",
        _positive_float,
        2.0,
        "Maximum time in seconds a queued write waits before the worker sends it.",
    ),
    Option(
        "flush_threshold_points",
        _positive_int,
        25_000,
        "Queued entities (metric points, params, tags) per backend that make the worker send "
        "at once, before flush_interval_s has passed.",
    ),
    Option(
        "buffer_capacity_points",
        _positive_int,
        50_000,
        "Entities one backend's queue holds in memory. When it is full, further writes go to "
        "the spool only and are read back in order; without the spool the caller blocks until "
        "there is room (backpressure). Nothing is dropped.",
    ),
    Option(
        "backpressure_timeout_s",
        _positive_float,
        300.0,
        "Maximum time in seconds a caller blocks on a full queue before MlflowException "
        "(only with spool=false).",
    ),
    Option(
        "exit_flush_timeout_s",
        _positive_float,
        30.0,
        "Maximum time in seconds the interpreter waits at exit to send queued writes; what is "
        "left is reported with counts.",
    ),
    Option(
        "spark_task_write_through",
        _parse_bool,
        True,
        "In a PySpark task (pyspark.TaskContext.get() is set), make each write return only once "
        "both backends have it, or the spool when a backend is failing, because a Spark Python "
        "worker can end without running exit handlers. Off: writes are buffered as elsewhere; "
        "call mlflow_azdual.flush() before the task function returns.",
    ),
    Option(
        "flush_timeout_s",
        _positive_float,
        120.0,
        "Maximum time in seconds a read of a run, a synchronous write to it (log_param, "
        "set_tag, ...) or end_run waits for the run's queued primary metrics. end_run raises "
        "with the counts when they are not delivered by then; they stay in the spool. In "
        "strict mode end_run also waits this long for the run's secondary writes.",
    ),
    Option(
        "strict",
        _parse_bool,
        False,
        "Raise secondary failures (rejected writes, writes given up after retries) at the next "
        "flush or end_run, and make end_run wait flush_timeout_s for the secondary too. Off: "
        "they are logged and recorded, never raised.",
    ),
    Option(
        "spool",
        _parse_bool,
        True,
        "Keep queued writes in a SQLite spool on local disk until each backend acknowledges "
        "them, so a crash or an outage loses nothing committed. Off: queued writes live in "
        "memory only.",
    ),
    Option(
        "spool_dir",
        str,
        None,
        "Root directory of the spool. Unset: /local_disk0/mlflow-azdual/spool when /local_disk0 "
        "exists and is writable (Databricks clusters), else ~/.mlflow-azdual/spool.",
    ),
    Option(
        "spool_commit_interval_s",
        _positive_float,
        0.2,
        "Group-commit interval of the spool in seconds: a write accepted longer ago than this "
        "survives a crash of the process.",
    ),
    Option(
        "spool_max_artifact_bytes",
        _positive_int,
        2 * 1024**3,
        "Bytes of artifact copies the spool holds for secondary uploads. A larger upload is "
        "recorded as a dead letter with a warning, or raises in strict mode.",
    ),
    Option(
        "retry_initial_backoff_s",
        _positive_float,
        0.5,
        "Wait in seconds before the first retry of a failed background write; it doubles on "
        "each retry, with jitter.",
    ),
    Option(
        "retry_max_backoff_s",
        _positive_float,
        60.0,
        "Longest wait in seconds between two retries, unless a Retry-After header asks for "
        "more. Also the probing interval after a write was given up.",
    ),
    Option(
        "retry_attempt_timeout_s",
        _positive_float,
        60.0,
        "Timeout in seconds of one background request to a backend.",
    ),
    Option(
        "retry_total_s",
        _positive_float,
        600.0,
        "Time in seconds a background write is retried before it is given up in this "
        "process: logged at ERROR, reported at flush, kept in the spool for the next process "
        "or mlflow-azdual sync.",
    ),
    Option(
        "max_batch_metrics",
        _positive_int,
        1000,
        "Metrics in one log_batch request.",
    ),
    Option(
        "max_batch_params",
        _positive_int,
        100,
        "Params in one log_batch request.",
    ),
    Option(
        "max_batch_tags",
        _positive_int,
        100,
        "Tags in one log_batch request.",
    ),
)

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}

# Query keys that select the two backends in the explicit URI form; they are not options.
BACKEND_KEYS = ("primary", "secondary")


def resolve_options(
    query: Mapping[str, str], environ: Optional[Mapping[str, str]] = None
) -> dict:
    """Return every option's value from ``query``, then ``environ``, then its default.

    Raises ValueError naming the option for an unknown key or an unparsable value, so the
    URI parser can wrap it into an MlflowException with the URI context.
    """
    import os

    environ = os.environ if environ is None else environ
    unknown = sorted(set(query) - set(OPTIONS_BY_NAME) - set(BACKEND_KEYS))
    if unknown:
        known = ", ".join(sorted(OPTIONS_BY_NAME))
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; valid options: {known}")

    values = {}
    for option in OPTIONS:
        if option.name in query:
            text, source = query[option.name], f"query option {option.name}"
        elif option.env_var in environ:
            text, source = environ[option.env_var], f"environment variable {option.env_var}"
        else:
            values[option.name] = option.default
            continue
        try:
            values[option.name] = option.parse(text)
        except ValueError as error:
            raise ValueError(f"invalid value for {source}: {error}") from None
    return values


def options_table_markdown() -> str:
    """Render the option table that docs/configuration.md contains."""
    rows = ["| URI query option | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for option in OPTIONS:
        default = "unset" if option.default is None else f"`{option.default}`"
        rows.append(f"| `{option.name}` | `{option.env_var}` | {default} | {option.help} |")
    return "\n".join(rows)
