"""The dual artifact URI: both backends' artifact roots in one self-contained ``azdual`` URI.

Form: ``azdual:/<sub path>?primary_root=<percent-encoded uri>&secondary_root=<...>``. MLflow
appends sub-paths to the path component (``runs:/<id>/model`` becomes ``.../model``) and keeps
the query, so the URI still resolves in any process, with no lookup, after any number of
appends. The sub path is joined to each root when the URI is resolved.
"""

import posixpath
import urllib.parse
from typing import NamedTuple, Optional

from mlflow_azdual.uri import SCHEME

PRIMARY_ROOT_KEY = "primary_root"
SECONDARY_ROOT_KEY = "secondary_root"


class ArtifactRoots(NamedTuple):
    """The two artifact URIs a dual artifact URI resolves to (the secondary may be None)."""

    primary: str
    secondary: Optional[str]


def is_dual_artifact_uri(uri: Optional[str]) -> bool:
    return bool(uri) and uri.split(":", 1)[0].lower() == SCHEME and PRIMARY_ROOT_KEY in uri


def make_dual_artifact_uri(primary_root: str, secondary_root: Optional[str]) -> str:
    """Return the dual URI of two roots, or ``primary_root`` alone when there is no secondary."""
    if not secondary_root or not primary_root:
        return primary_root
    query = urllib.parse.urlencode(
        {PRIMARY_ROOT_KEY: primary_root, SECONDARY_ROOT_KEY: secondary_root}
    )
    return f"{SCHEME}:/?{query}"


def resolve(uri: str) -> ArtifactRoots:
    """Return the primary and secondary artifact URIs that a dual artifact URI stands for."""
    parsed = urllib.parse.urlsplit(uri)
    query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
    primary_root = query.get(PRIMARY_ROOT_KEY)
    if parsed.scheme.lower() != SCHEME or not primary_root:
        raise ValueError(
            f"invalid dual artifact URI {uri!r}: expected "
            f"{SCHEME}:/<path>?{PRIMARY_ROOT_KEY}=<uri>&{SECONDARY_ROOT_KEY}=<uri>"
        )
    sub_path = parsed.path.strip("/")
    secondary_root = query.get(SECONDARY_ROOT_KEY) or None
    return ArtifactRoots(
        _join(primary_root, sub_path),
        _join(secondary_root, sub_path) if secondary_root else None,
    )


def primary_part(uri: Optional[str]) -> Optional[str]:
    """Return the primary URI of a dual artifact URI, or ``uri`` itself for any other URI."""
    return resolve(uri).primary if is_dual_artifact_uri(uri) else uri


def secondary_part(uri: Optional[str]) -> Optional[str]:
    """Return the secondary URI of a dual artifact URI, or None for any other URI."""
    return resolve(uri).secondary if is_dual_artifact_uri(uri) else None


def _join(root: str, sub_path: str) -> str:
    if not sub_path:
        return root
    from mlflow.utils.uri import append_to_uri_path

    if "://" not in root and ":" not in root.split("/", 1)[0]:
        return posixpath.join(root, sub_path)
    return append_to_uri_path(root, sub_path)
