"""The dual artifact URI: both backends' artifact locations in one ``azdual`` URI.

Form: ``azdual://primary_root=<percent-encoded uri>;secondary_root=<...>/<sub path>``. The two
roots sit in the authority part, so a sub-path added in any of the ways MLflow code and users
add one (``append_to_uri_path``, ``runs:/<id>/model``, ``posixpath.join``, or plain
``artifact_uri + "/model"``) lands in the path, and the URI resolves in any process with no
lookup.

While the secondary mirror of a run, experiment or logged model is still being created in the
background, ``secondary_root`` is replaced by ``mirror_of=run:<primary run id>`` (or
``experiment:<id>``, ``model:<id>``), which the dual tracking store resolves when it uploads.
"""

import posixpath
import urllib.parse
from typing import NamedTuple, Optional

from mlflow_azdual.uri import SCHEME

PRIMARY_ROOT_KEY = "primary_root"
SECONDARY_ROOT_KEY = "secondary_root"
MIRROR_OF_KEY = "mirror_of"
MIRROR_KINDS = ("run", "experiment", "model")


class ArtifactRoots(NamedTuple):
    """The locations a dual artifact URI resolves to.

    ``secondary`` is None when the URI names the mirrored object in ``mirror_of`` instead, or
    when there is no secondary copy. ``sub_path`` is the path appended after the roots.
    """

    primary: str
    secondary: Optional[str]
    mirror_of: Optional[str] = None
    sub_path: str = ""


def is_dual_artifact_uri(uri: Optional[str]) -> bool:
    if not uri or uri.split(":", 1)[0].lower() != SCHEME:
        return False
    return urllib.parse.urlsplit(uri).netloc.startswith(PRIMARY_ROOT_KEY + "=")


def make_dual_artifact_uri(
    primary_root: str, secondary_root: Optional[str] = None, mirror_of: Optional[str] = None
) -> str:
    """Return the dual URI of two roots (or of a primary root and the object it mirrors)."""
    if not primary_root or not (secondary_root or mirror_of):
        return primary_root
    fields = [(PRIMARY_ROOT_KEY, primary_root)]
    if secondary_root:
        fields.append((SECONDARY_ROOT_KEY, secondary_root))
    else:
        fields.append((MIRROR_OF_KEY, mirror_of))
    authority = ";".join(f"{key}={urllib.parse.quote(value, safe='')}" for key, value in fields)
    return f"{SCHEME}://{authority}/"


def resolve(uri: str) -> ArtifactRoots:
    """Return the primary and secondary artifact URIs that a dual artifact URI stands for."""
    parsed = urllib.parse.urlsplit(uri)
    fields = {}
    for field in parsed.netloc.split(";"):
        key, _, value = field.partition("=")
        fields[key] = urllib.parse.unquote(value)
    primary_root = fields.get(PRIMARY_ROOT_KEY)
    if parsed.scheme.lower() != SCHEME or not primary_root:
        raise ValueError(
            f"invalid dual artifact URI {uri!r}: expected "
            f"{SCHEME}://{PRIMARY_ROOT_KEY}=<uri>;{SECONDARY_ROOT_KEY}=<uri>/<path>"
        )
    mirror_of = fields.get(MIRROR_OF_KEY) or None
    if mirror_of is not None and mirror_of.split(":", 1)[0] not in MIRROR_KINDS:
        raise ValueError(f"invalid {MIRROR_OF_KEY}={mirror_of!r} in dual artifact URI {uri!r}")
    sub_path = parsed.path.strip("/")
    secondary_root = fields.get(SECONDARY_ROOT_KEY) or None
    return ArtifactRoots(
        join(primary_root, sub_path),
        join(secondary_root, sub_path) if secondary_root else None,
        mirror_of,
        sub_path,
    )


def primary_part(uri: Optional[str]) -> Optional[str]:
    """Return the primary URI of a dual artifact URI, or ``uri`` itself for any other URI."""
    return resolve(uri).primary if is_dual_artifact_uri(uri) else uri


def secondary_part(uri: Optional[str]) -> Optional[str]:
    """Return the secondary URI of a dual artifact URI if it names one, else None."""
    return resolve(uri).secondary if is_dual_artifact_uri(uri) else None


def join(root: str, sub_path: str) -> str:
    """Append ``sub_path`` to an artifact URI or local path."""
    if not sub_path:
        return root
    from mlflow.utils.uri import append_to_uri_path

    if "://" not in root and ":" not in root.split("/", 1)[0]:
        return posixpath.join(root, sub_path)
    return append_to_uri_path(root, sub_path)
