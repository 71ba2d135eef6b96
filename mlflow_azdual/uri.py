"""The ``azdual`` tracking URI: parse it into a primary URI, a secondary URI and options.

Three forms are accepted (see docs/configuration.md):
  azdual://<azure ml host>/mlflow/v1.0/subscriptions/.../workspaces/<ws>[?options]
  azdual:?primary=<percent-encoded uri>&secondary=<percent-encoded uri>[&options]
  azdual:   with MLFLOW_AZDUAL_PRIMARY_URI and MLFLOW_AZDUAL_SECONDARY_URI set.
A malformed URI raises MlflowException(INVALID_PARAMETER_VALUE) that names the wrong part and
the fix. Messages show URIs only through ``redact_uri``, so no token in a URI is ever echoed.
"""

import dataclasses
import os
import re
import urllib.parse
from typing import Mapping, Optional

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mlflow_azdual.options import BACKEND_KEYS, OPTIONS_BY_NAME, resolve_options

SCHEME = "azdual"
PRIMARY_ENV = "MLFLOW_AZDUAL_PRIMARY_URI"
SECONDARY_ENV = "MLFLOW_AZDUAL_SECONDARY_URI"

# Tracking URI schemes that MLflow and azureml-mlflow serve. A scheme registered by another
# plugin is accepted as well (checked against MLflow's store registry).
KNOWN_SCHEMES = {
    "http", "https", "file", "databricks", "azureml",
    "sqlite", "postgresql", "mysql", "mssql",
}

_AZUREML_PATH = re.compile(
    r"^/mlflow/v\d+\.\d+/subscriptions/[^/]+/resourceGroups/[^/]+"
    r"/providers/Microsoft\.MachineLearningServices/workspaces/[^/]+/?$",
    re.IGNORECASE,
)
_SECRET_KEY = re.compile(r"token|secret|password|passwd|key|sig|credential|auth", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class DualUri:
    """A parsed azdual tracking URI: the two backend URIs and the option values."""

    primary_uri: str
    secondary_uri: str
    options: Mapping[str, object]

    @property
    def primary_registry_uri(self) -> str:
        return self.options.get("primary_registry_uri") or self.primary_uri

    @property
    def secondary_registry_uri(self) -> str:
        return self.options.get("secondary_registry_uri") or self.secondary_uri


def redact_uri(uri: str) -> str:
    """Return ``uri`` with its user info and secret-looking query values replaced by ``***``."""
    try:
        parsed = urllib.parse.urlsplit(uri)
    except ValueError:
        return "<unparsable uri>"
    netloc = parsed.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    pairs = urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)
    query = "&".join(
        f"{key}={'***' if _SECRET_KEY.search(key) else _redact_nested(value)}"
        for key, value in pairs
    )
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, query, parsed.fragment))


# Secrets as they appear in error texts: bearer tokens, user info in URLs, key=value pairs
# (query strings, connection strings), JSON fields, and the well-known Azurite/Azure account key
# shape (base64 of 64 bytes).
_TEXT_SECRETS = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"(?i)(://)[^/@\s]+@"), r"\1***@"),
    (
        re.compile(
            r"(?i)\b([A-Za-z_]*(?:token|secret|password|passwd|accountkey|sharedaccesskey|sig|"
            r"credential|apikey|api_key)[A-Za-z_]*)(\"?\s*[=:]\s*\"?)[^\s&;,\"']+"
        ),
        r"\1\2***",
    ),
    (re.compile(r"\b[A-Za-z0-9+/]{86}==(?![A-Za-z0-9+/=])"), "***"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "***"),
)


def redact_text(text: str) -> str:
    """Return ``text`` (an error message, a log line) with secret-looking values replaced by ``***``.

    Covers bearer and basic credentials, user info in URLs, ``name=value`` and JSON pairs whose
    name looks secret (token, secret, password, AccountKey, SharedAccessKey, sig, credential,
    api key), Azure storage account keys and JWTs. A secret in another shape is not recognised.
    """
    for pattern, replacement in _TEXT_SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _redact_nested(value: str) -> str:
    # A query value can itself be a URI (primary=, secondary=) with a token inside.
    if "://" in value or "?" in value:
        return urllib.parse.quote(redact_uri(value), safe="")
    return value


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _split_query(query: str, uri: str) -> dict:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise _invalid(
            f"Invalid azdual tracking URI {redact_uri(uri)!r}: query option(s) "
            f"{', '.join(duplicates)} given more than once. Give each option once."
        )
    return dict(pairs)


def _check_backend_uri(role: str, value: str, uri: str) -> str:
    scheme = urllib.parse.urlsplit(value).scheme.lower()
    if value == "databricks":
        scheme = "databricks"
    elif not scheme and value.startswith(("/", ".")):
        scheme = "file"  # MLflow takes a plain local path as a file store.
    where = f"{role} URI {redact_uri(value)!r} of azdual tracking URI {redact_uri(uri)!r}"
    if not value:
        raise _invalid(f"Invalid {where}: it is empty. Set it to an MLflow tracking URI.")
    if scheme == SCHEME:
        raise _invalid(f"Invalid {where}: an azdual URI cannot contain another azdual URI.")
    if scheme not in KNOWN_SCHEMES and not _is_registered_scheme(scheme):
        raise _invalid(
            f"Invalid {where}: scheme {scheme or '(none)'!r} is not an MLflow tracking URI "
            f"scheme. Use one of: {', '.join(sorted(KNOWN_SCHEMES))} (percent-encode the URI "
            "when it is a query value)."
        )
    return value


def _is_registered_scheme(scheme: str) -> bool:
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    return bool(scheme) and scheme in _tracking_store_registry._registry


def _parse_linked_workspace(parsed: urllib.parse.SplitResult, query: dict, uri: str):
    if not _AZUREML_PATH.match(parsed.path):
        raise _invalid(
            f"Invalid azdual tracking URI {redact_uri(uri)!r}: path {parsed.path!r} is not an "
            "Azure ML workspace path. Expected /mlflow/v1.0/subscriptions/<subscription id>"
            "/resourceGroups/<resource group>/providers/Microsoft.MachineLearningServices"
            "/workspaces/<workspace>, as in the URI that Workspace.get_mlflow_tracking_uri() "
            "returns (with azureml:// replaced by azdual://)."
        )
    passthrough = {key: value for key, value in query.items() if key not in _OWN_KEYS}
    secondary = urllib.parse.urlunsplit(
        ("azureml", parsed.netloc, parsed.path, urllib.parse.urlencode(passthrough), "")
    )
    return secondary


def parse_tracking_uri(uri: str, environ: Optional[Mapping[str, str]] = None) -> DualUri:
    """Parse an azdual tracking URI into a ``DualUri``; raise MlflowException if malformed."""
    environ = os.environ if environ is None else environ
    try:
        parsed = urllib.parse.urlsplit(uri)
    except ValueError as error:
        raise _invalid(
            f"Invalid azdual tracking URI: {error}. Check the brackets and ports."
        ) from None
    if parsed.scheme.lower() != SCHEME:
        raise _invalid(
            f"Invalid azdual tracking URI {redact_uri(uri)!r}: the scheme must be 'azdual'."
        )
    if parsed.fragment:
        raise _invalid(
            f"Invalid azdual tracking URI {redact_uri(uri)!r}: a '#' fragment is not allowed. "
            "Percent-encode '#' inside a primary= or secondary= value."
        )
    query = _split_query(parsed.query, uri)

    try:
        options = resolve_options(
            {key: value for key, value in query.items() if key in _OWN_KEYS or not parsed.netloc},
            environ,
        )
    except ValueError as error:
        # The error names its source: a query option of the URI or an environment variable.
        raise _invalid(
            f"Invalid azdual configuration for tracking URI {redact_uri(uri)!r}: {error}."
        ) from None

    if parsed.netloc:
        if "primary" in query or "secondary" in query:
            raise _invalid(
                f"Invalid azdual tracking URI {redact_uri(uri)!r}: primary= and secondary= "
                "belong to the explicit form 'azdual:?primary=...&secondary=...', which has "
                "no host. Remove the host or the two options."
            )
        secondary = _parse_linked_workspace(parsed, query, uri)
        profile = options["databricks_profile"]
        primary = f"databricks://{profile}" if profile else "databricks"
    else:
        if parsed.path not in ("", "/"):
            raise _invalid(
                f"Invalid azdual tracking URI {redact_uri(uri)!r}: unexpected path "
                f"{parsed.path!r}. Use 'azdual:?primary=<uri>&secondary=<uri>' or "
                "'azdual://<azure ml host>/mlflow/v1.0/subscriptions/...'."
            )
        primary = query.get("primary") or environ.get(PRIMARY_ENV, "")
        secondary = query.get("secondary") or environ.get(SECONDARY_ENV, "")
        for role, value, env_name in (
            ("primary", primary, PRIMARY_ENV),
            ("secondary", secondary, SECONDARY_ENV),
        ):
            if not value:
                raise _invalid(
                    f"Invalid azdual tracking URI {redact_uri(uri)!r}: the {role} backend is "
                    f"missing. Add {role}=<percent-encoded tracking URI> to the query or set "
                    f"{env_name}."
                )

    primary = _check_backend_uri("primary", primary, uri)
    secondary = _check_backend_uri("secondary", secondary, uri)
    if primary.rstrip("/") == secondary.rstrip("/"):
        raise _invalid(
            f"Invalid azdual tracking URI {redact_uri(uri)!r}: primary and secondary are the "
            "same backend, so every write would be applied twice. Point them at two backends."
        )
    return DualUri(primary, secondary, options)


# Query keys of the linked-workspace form that the plugin consumes; the rest go to azureml://.
_OWN_KEYS = frozenset(OPTIONS_BY_NAME) | frozenset(BACKEND_KEYS)


def tracking_uri(workspace_or_uri, databricks_profile: Optional[str] = None, **options) -> str:
    """Build an azdual tracking URI from an azureml-core ``Workspace`` or an azureml:// URI.

    ``databricks_profile`` picks the Databricks CLI profile of the primary; further keyword
    arguments become query options (see docs/configuration.md).
    """
    if hasattr(workspace_or_uri, "get_mlflow_tracking_uri"):
        azureml_uri = workspace_or_uri.get_mlflow_tracking_uri()
    elif isinstance(workspace_or_uri, str):
        azureml_uri = workspace_or_uri
    else:
        raise _invalid(
            f"Invalid workspace {type(workspace_or_uri).__name__}: pass an azureml-core "
            "Workspace or an azureml:// tracking URI string."
        )
    parsed = urllib.parse.urlsplit(azureml_uri)
    if parsed.scheme.lower() != "azureml" or not parsed.netloc:
        raise _invalid(
            f"Invalid Azure ML tracking URI {redact_uri(azureml_uri)!r}: expected "
            "azureml://<region>.api.azureml.ms/mlflow/v1.0/subscriptions/..., as returned by "
            "Workspace.get_mlflow_tracking_uri()."
        )
    query = _split_query(parsed.query, azureml_uri)
    if databricks_profile:
        options["databricks_profile"] = databricks_profile
    query.update({key: str(value) for key, value in options.items()})
    uri = urllib.parse.urlunsplit(
        (SCHEME, parsed.netloc, parsed.path, urllib.parse.urlencode(query), "")
    )
    parse_tracking_uri(uri)
    return uri


def explicit_tracking_uri(primary_uri: str, secondary_uri: str, **options) -> str:
    """Build the explicit form ``azdual:?primary=...&secondary=...`` from two tracking URIs."""
    query = {"primary": primary_uri, "secondary": secondary_uri}
    query.update({key: str(value) for key, value in options.items()})
    uri = f"{SCHEME}:?{urllib.parse.urlencode(query)}"
    parse_tracking_uri(uri)
    return uri
