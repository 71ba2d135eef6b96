"""Map a primary (Databricks) experiment name to a valid secondary (Azure ML) experiment name.

Databricks names are workspace paths such as ``/Users/ana@example.com/churn/baseline``; Azure
ML names cannot contain ``/``. The default name is the last path segment, sanitised. Two
different paths that map to the same name are distinguished by ``disambiguate``. It appends a
hash of the full path, so the same path always gets the same name.
"""

import hashlib
import re

# Azure ML experiment names: letters, digits, '_' and '-', starting with a letter or digit,
# at most 255 characters.
MAX_NAME_LENGTH = 255
_INVALID_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")
_HASH_LENGTH = 8


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
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"invalid experiment_name_template {template!r}: {error!r}; use the fields "
            "{leaf}, {parent} and {path}"
        ) from None
    return sanitise(name)


def disambiguate(name: str, primary_name: str) -> str:
    """Return ``name`` with a suffix derived from ``primary_name``, for a name already taken."""
    digest = hashlib.sha256(primary_name.encode("utf-8")).hexdigest()[:_HASH_LENGTH]
    return f"{name[: MAX_NAME_LENGTH - _HASH_LENGTH - 1]}-{digest}"
