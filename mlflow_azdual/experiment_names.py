"""Experiment names: the primary profile's rule for them, and their mapping to secondary names.

``validate_experiment_name`` applies the experiment-name rule of the primary's backend profile
before a name is sent. With the ``databricks`` profile it normalises a workspace path and
raises on a name that is not ``/Users/<user>/...`` or ``/Shared/...``. It sends no request.

Databricks names are workspace paths such as ``/Users/ana@example.com/churn/baseline``; Azure
ML names cannot contain ``/``. The default secondary name is the last path segment, sanitised.
Two different paths that map to the same name are distinguished by ``disambiguate``. It
appends a hash of the full path, so the same path always gets the same name.
"""

import hashlib
import re

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

# Azure ML experiment names: letters, digits, '_' and '-', starting with a letter or digit,
# at most 255 characters.
MAX_NAME_LENGTH = 255
_INVALID_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")
_HASH_LENGTH = 8

_REPEATED_SLASHES = re.compile(r"/{2,}")
_WORKSPACE_PREFIX = "/Workspace/"


def normalise_workspace_path(name: str) -> str:
    """Return ``name`` with repeated slashes collapsed and a leading ``/Workspace`` and a
    trailing slash dropped, so ``/Workspace/Shared/x``, ``//Shared//x/`` and ``/Shared/x`` are
    one name.
    """
    path = _REPEATED_SLASHES.sub("/", name)
    if path.startswith(_WORKSPACE_PREFIX):
        path = path[len(_WORKSPACE_PREFIX) - 1 :]
    if len(path) > 1:
        path = path.rstrip("/")
    return path


def normalise_experiment_name(name: str, profile) -> str:
    """Return ``name`` as it is sent to a primary of ``profile``, without checking it."""
    if profile.normalise_experiment_names:
        return normalise_workspace_path(name)
    return name


def validate_experiment_name(name: str, profile) -> str:
    """Normalise ``name`` for a primary of ``profile`` and check it against the profile's rule.

    Returns the name to send. Raises MlflowException (INVALID_PARAMETER_VALUE) naming the
    value and the accepted forms when the normalised name does not match the profile's
    ``experiment_name_pattern`` in full.
    """
    normalised = normalise_experiment_name(name, profile)
    pattern = profile.experiment_name_pattern
    if pattern is None or re.fullmatch(pattern, normalised):
        return normalised

    quoted_name = repr(name) if normalised == name else f"{name!r} (normalised: {normalised!r})"
    forms = profile.experiment_name_forms
    example = ""
    if name and "/" not in name:
        # A plain name is put into the first form whose only placeholder is <name>.
        plain_forms = [form for form in forms if form.count("<") == 1 and "<name>" in form]
        if plain_forms:
            example = f", for example {plain_forms[0].replace('<name>', name)}"
    raise MlflowException(
        f"mlflow-azdual: invalid experiment name {quoted_name}. The primary ({profile.name} "
        f"profile) accepts only experiment names of the form {' or '.join(forms)}, so use one "
        f"of these{example}.",
        error_code=INVALID_PARAMETER_VALUE,
    )


def sanitise(name: str) -> str:
    """Return ``name`` with every run of invalid characters replaced by '_'."""
    cleaned = _INVALID_CHARACTERS.sub("_", name).strip("_-")
    if not cleaned:
        cleaned = "experiment"
    return cleaned[:MAX_NAME_LENGTH]


def secondary_experiment_name(primary_name: str, template: str = "{leaf}") -> str:
    """Return the secondary name of ``primary_name`` built from ``template``.

    Template fields: ``{leaf}`` (last path segment), ``{parent}`` (the segment before it, or
    empty) and ``{path}`` (the whole path with '/' replaced by '-').
    """
    segments = [segment for segment in primary_name.split("/") if segment]
    leaf = segments[-1] if segments else primary_name
    parent = segments[-2] if len(segments) > 1 else ""
    path = "-".join(segments) if segments else primary_name
    try:
        name = template.format(leaf=leaf, parent=parent, path=path)
    except (AttributeError, KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"invalid experiment_name_template {template!r}: {error!r}; use the fields "
            "{leaf}, {parent} and {path}"
        ) from None
    return sanitise(name)


def disambiguate(name: str, primary_name: str) -> str:
    """Return ``name`` with a suffix derived from ``primary_name``, for a name already taken."""
    digest = hashlib.sha256(primary_name.encode("utf-8")).hexdigest()[:_HASH_LENGTH]
    return f"{name[: MAX_NAME_LENGTH - _HASH_LENGTH - 1]}-{digest}"
