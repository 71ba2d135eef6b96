"""Checks of an azdual set-up, run by ``mlflow-azdual doctor``.

Each ``check_*`` function returns one ``CheckResult`` (ok, warning or FAILED, with the fix)
and does not raise for the condition it checks. URIs appear only through ``redact_uri`` and
error texts only through ``redact_text``, so no token, key or password is printed. Every
backend read runs on a daemon thread with a deadline, and the four reads run at the same
time, so stopped or hanging backends delay the command by about twice the timeout. Side effects: the spool directory is created as the plugin would create it,
and a probe file is written there and removed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.metadata
import math
import os
import platform
import secrets
import sys
import threading
import urllib.parse

from mlflow_azdual.uri import SCHEME, redact_text, redact_uri

OK = "ok"
WARNING = "warning"
FAILED = "FAILED"

# The plugin's entry points, by group: the builder each must name in mlflow_azdual.entry_points.
ENTRY_POINT_BUILDERS = {
    "mlflow.tracking_store": "build_tracking_store",
    "mlflow.model_registry_store": "build_registry_store",
    "mlflow.artifact_repository": "build_artifact_repository",
}
MLFLOW_DISTRIBUTIONS = ("mlflow", "mlflow-skinny")
PLUGIN_DISTRIBUTION = "mlflow-azdual"
AZUREML_DISTRIBUTION = "azureml-mlflow"
DEFAULT_TIMEOUT_S = 5.0
MAX_ERROR_CHARS = 300
_INSTALL_AZURE = "pip install 'mlflow-azdual[azure]'"


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: status (ok, warning, FAILED), what was checked, and the fix."""

    status: str
    name: str
    detail: str
    fix: str | None = None

    def line(self) -> str:
        text = f"{self.status:<8} {self.name}: {self.detail}"
        if not self.fix:
            return text
        stop = "" if text.endswith(".") else "."
        return f"{text}{stop} Fix: {self.fix}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# Configuration


def check_uri(uri: str):
    """Parse ``uri`` and return its CheckResult and the ``DualUri`` (None when ``uri`` is invalid)."""
    from mlflow.exceptions import MlflowException

    from mlflow_azdual.uri import parse_tracking_uri

    try:
        config = parse_tracking_uri(uri)
    except MlflowException as error:
        fix = "correct the part of the URI that the message names."
        return CheckResult(FAILED, "tracking URI", error.message, fix), None
    return CheckResult(OK, "tracking URI", redact_uri(uri)), config


def check_backend_config(config, role: str) -> CheckResult:
    """Report the tracking URI, registry URI and backend profile that ``role`` resolves to."""
    from mlflow_azdual.backend_profiles import profile_for

    tracking = getattr(config, f"{role}_uri")
    registry = getattr(config, f"{role}_registry_uri")
    try:
        profile = profile_for(
            tracking, config.options[f"{role}_profile"], config.options[f"{role}_limits"]
        ).name
    except ValueError as error:
        return CheckResult(
            FAILED, f"{role} backend", str(error),
            f"set {role}_profile to one of the valid profiles, or leave it unset.",
        )
    return CheckResult(
        OK, f"{role} backend",
        f"tracking URI {redact_uri(tracking)}, registry URI {redact_uri(registry)}, "
        f"profile {profile}",
    )


# Installed versions


def installed_version(distribution: str) -> str | None:
    """Return the installed version of ``distribution``, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def mlflow_requirements(requires: list, installed: dict) -> tuple:
    """Return the requirements on MLflow among ``requires`` and those ``installed`` misses.

    ``requires`` contains the Requires-Dist strings of one distribution. Requirements that apply only
    with an extra are skipped. ``installed`` maps ``mlflow`` and ``mlflow-skinny`` to their
    installed versions (None when absent). A requirement on one of the two is checked against
    the other when only that is installed, because both are released with the same versions.
    Returns ``(applicable, unmet)``, two lists of requirement strings.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    applicable, unmet = [], []
    for text in requires:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        name = canonicalize_name(requirement.name)
        if name not in MLFLOW_DISTRIBUTIONS:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        applicable.append(str(requirement))
        other = "mlflow" if name == "mlflow-skinny" else "mlflow-skinny"
        version = installed.get(name) or installed.get(other)
        if version is not None and not requirement.specifier.contains(version, prereleases=True):
            unmet.append(str(requirement))
    return applicable, unmet


def _installed_mlflow() -> dict:
    return {name: installed_version(name) for name in MLFLOW_DISTRIBUTIONS}


def _describe_mlflow(installed: dict) -> str:
    names = [f"{name} {version}" for name, version in installed.items() if version]
    return ", ".join(names) or "not installed"


def check_python() -> CheckResult:
    return CheckResult(
        OK, "Python", f"{platform.python_version()} ({platform.python_implementation()}, "
        f"{sys.executable})",
    )


def check_mlflow() -> CheckResult:
    """Report the installed MLflow and check it against the plugin's own requirement."""
    installed = _installed_mlflow()
    if not any(installed.values()):
        return CheckResult(
            FAILED, "MLflow", "neither mlflow nor mlflow-skinny is installed",
            f"pip install mlflow-azdual into this environment ({sys.executable}).",
        )
    _, unmet = mlflow_requirements(
        importlib.metadata.requires(PLUGIN_DISTRIBUTION) or [], installed
    )
    if unmet:
        return CheckResult(
            WARNING, "MLflow",
            f"{_describe_mlflow(installed)} is outside the versions mlflow-azdual supports "
            f"({', '.join(unmet)})",
            f"pip install '{unmet[0]}'.",
        )
    return CheckResult(OK, "MLflow", _describe_mlflow(installed))


def check_plugin() -> CheckResult:
    import mlflow_azdual

    version = installed_version(PLUGIN_DISTRIBUTION)
    location = os.path.dirname(os.path.abspath(mlflow_azdual.__file__))
    if version is None:
        return CheckResult(
            FAILED, "mlflow-azdual", f"the package in {location} has no installed metadata, "
            "so MLflow cannot find its entry points",
            "pip install mlflow-azdual (or pip install -e . in a checkout).",
        )
    return CheckResult(OK, "mlflow-azdual", f"{version} ({location})")


def check_azureml_mlflow(config=None) -> CheckResult:
    """Report azureml-mlflow and warn when the installed MLflow is outside what it declares.

    ``config`` (a ``DualUri`` or None) decides whether a missing azureml-mlflow is a failure:
    it is when a backend URI uses azureml://.
    """
    version = installed_version(AZUREML_DISTRIBUTION)
    if version is None:
        uses_azureml = config is not None and any(
            urllib.parse.urlsplit(uri).scheme.lower() == "azureml"
            for uri in (config.primary_uri, config.secondary_uri)
        )
        if uses_azureml:
            return CheckResult(
                FAILED, AZUREML_DISTRIBUTION,
                "not installed, and a backend URI uses azureml://", f"{_INSTALL_AZURE}.",
            )
        return CheckResult(
            OK, AZUREML_DISTRIBUTION,
            f"not installed (the azure extra, {_INSTALL_AZURE}, is needed only for azureml:// "
            "URIs)",
        )
    installed = _installed_mlflow()
    applicable, unmet = mlflow_requirements(
        importlib.metadata.requires(AZUREML_DISTRIBUTION) or [], installed
    )
    declared = ", ".join(applicable) or "no MLflow requirement declared"
    if unmet:
        return CheckResult(
            WARNING, AZUREML_DISTRIBUTION,
            f"{version} declares {declared}, and the installed {_describe_mlflow(installed)} is "
            "outside that range",
            f"pip install '{unmet[0]}', or an azureml-mlflow release that supports this MLflow.",
        )
    return CheckResult(OK, AZUREML_DISTRIBUTION, f"{version} (declares {declared})")


# Entry points


def _installed_entry_points(group: str) -> list:
    entry_points = importlib.metadata.entry_points()
    if hasattr(entry_points, "select"):
        return list(entry_points.select(group=group, name=SCHEME))
    # Python 3.9 returns a dict of groups.
    return [entry for entry in entry_points.get(group, []) if entry.name == SCHEME]


def check_entry_point(group: str) -> CheckResult:
    """Check that ``group`` has the plugin's ``azdual`` entry point and MLflow registered it."""
    from mlflow_azdual import compat, entry_points

    builder_name = ENTRY_POINT_BUILDERS[group]
    expected_value = f"{entry_points.__name__}:{builder_name}"
    name = f"entry point {group}"
    reinstall = (
        f"pip install mlflow-azdual (or pip install -e . in a checkout) into the environment "
        f"that runs MLflow ({sys.executable})."
    )

    found = _installed_entry_points(group)
    if not found:
        return CheckResult(FAILED, name, f"no {SCHEME!r} entry point is installed", reinstall)
    values = sorted({entry.value for entry in found})
    if values != [expected_value]:
        return CheckResult(
            FAILED, name, f"{SCHEME!r} names {', '.join(values)}, expected {expected_value}",
            f"uninstall the other package that registers {SCHEME!r}, then {reinstall}",
        )

    registered = compat.registered_store_builders(SCHEME)[group]
    if registered is None:
        return CheckResult(
            FAILED, name,
            f"installed, but MLflow has no {SCHEME!r} scheme in this registry, because loading "
            "the entry point failed during 'import mlflow'",
            "run python -W always -c 'import mlflow' and fix the warning that names the "
            f"{SCHEME!r} scheme.",
        )
    if registered is not getattr(entry_points, builder_name):
        where = f"{getattr(registered, '__module__', '?')}.{getattr(registered, '__name__', '?')}"
        return CheckResult(
            FAILED, name, f"MLflow maps {SCHEME!r} to {where}, not to {expected_value}",
            f"remove the code that registers {SCHEME!r} with MLflow, or uninstall its package.",
        )
    return CheckResult(OK, name, f"{SCHEME} -> {expected_value}, registered in MLflow")


# Backends


@contextlib.contextmanager
def bounded_mlflow_http(timeout_s: float):
    """Set MLflow's HTTP client to one attempt with ``timeout_s`` for the ``with`` block.

    Covers stores whose requests do not go through ``make_single_attempt`` (plugin stores such
    as azureml-mlflow's). The previous environment is restored afterwards.
    """
    seconds = str(max(1, math.ceil(timeout_s)))
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        # MLflow reads these variables as integers.
        "MLFLOW_HTTP_REQUEST_TIMEOUT": seconds,
        # The total time MLflow's Databricks client retries one call through the Databricks
        # SDK (MLflow 3.17 default: 500 s). NOTE: the SDK's own probe of the host when it
        # builds a client follows the profile's retry_timeout_seconds (default 300 s), which
        # no environment variable sets. The doctor's deadline bounds it.
        "MLFLOW_DATABRICKS_ENDPOINT_HTTP_RETRY_TIMEOUT": seconds,
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _call_with_deadline(function, deadline_s: float):
    """Run ``function`` on a daemon thread and raise TimeoutError after ``deadline_s`` seconds."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except Exception as error:  # noqa: BLE001 - re-raised on the calling thread.
            outcome["error"] = error

    thread = threading.Thread(target=target, name="mlflow-azdual-doctor", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        raise TimeoutError(f"timed out after {deadline_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _read_once(kind: str, uri: str, tracking_uri: str, timeout_s: float) -> None:
    from mlflow_azdual import compat
    from mlflow_azdual.single_attempt import make_single_attempt

    if kind == "tracking":
        store = make_single_attempt(compat.build_tracking_store(uri), timeout_s)
        store.search_experiments(max_results=1)
    else:
        store = make_single_attempt(compat.build_registry_store(uri, tracking_uri), timeout_s)
        store.search_registered_models(max_results=1)


def _is_authentication_error(error: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    if getattr(error, "http_status", None) in (401, 403):
        return True
    return isinstance(error, MlflowException) and error.error_code in (
        "UNAUTHENTICATED", "PERMISSION_DENIED",
    )


def _credentials_fix(uri: str) -> str:
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme.startswith("databricks") or uri == "databricks":
        where = (
            "the token of the Databricks profile (~/.databrickscfg, or DATABRICKS_HOST and "
            "DATABRICKS_TOKEN) and its access to the workspace"
        )
    elif scheme == "azureml":
        where = (
            "the Azure credentials (az login, or the service principal in AZURE_CLIENT_ID, "
            "AZURE_TENANT_ID and AZURE_CLIENT_SECRET) and their role on the workspace"
        )
    else:
        where = (
            "MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
            "or the user info in the URI"
        )
    return f"check {where}."


# Phrases in the texts of requests/urllib3 errors that mean the backend was not reached.
_CONNECTION_PROBLEMS = (
    ("connection refused", "connection refused"),
    ("timed out", "timed out"),
    ("timeout", "timed out"),
    ("name or service not known", "host name not found"),
    ("nodename nor servname", "host name not found"),
    ("getaddrinfo failed", "host name not found"),
)


def _connection_problem(error: Exception):
    text = str(getattr(error, "message", None) or error).lower()
    for phrase, problem in _CONNECTION_PROBLEMS:
        if phrase in text:
            return problem
    return None


def _error_text(error: Exception) -> str:
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    text = redact_text(" ".join(str(text).split()))
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + "..."
    return f"{type(error).__name__}: {text}"


def check_backend(role: str, kind: str, uri: str, tracking_uri: str, timeout_s: float) -> CheckResult:
    """Send one cheap read to the ``kind`` ("tracking" or "registry") store of ``role``.

    The request is sent once, with a timeout of ``timeout_s``. The whole call, store set-up
    and credential lookup included, gets twice that before it is reported as timed out.
    NOTE: a store with its own HTTP client (the Databricks SDK behind databricks://,
    azureml-mlflow) may retry within that deadline. Only the rig's plain MLflow servers were
    tested.
    """
    name = f"{role} {kind} read"
    where = f"{role} backend {redact_uri(uri)}"
    read = "search_experiments" if kind == "tracking" else "search_registered_models"
    deadline_s = 2 * timeout_s
    unreachable_fix = f"start the {role} backend, or check the host and port of its URI."
    try:
        _call_with_deadline(lambda: _read_once(kind, uri, tracking_uri, timeout_s), deadline_s)
    except TimeoutError:
        return CheckResult(
            FAILED, name, f"{where} did not respond to {read} within {deadline_s:g} s",
            unreachable_fix,
        )
    except Exception as error:  # noqa: BLE001 - every failure is reported with its fix.
        if _is_authentication_error(error):
            return CheckResult(
                FAILED, name, f"{where} rejected the credentials of {read}: {_error_text(error)}",
                _credentials_fix(uri),
            )
        problem = _connection_problem(error)
        if problem is not None:
            return CheckResult(
                FAILED, name, f"{where} failed {read}: {problem}", unreachable_fix
            )
        return CheckResult(
            FAILED, name, f"{where} failed {read}: {_error_text(error)}",
            f"check the URI's host, port and path, and the {role} backend's log.",
        )
    return CheckResult(OK, name, f"{where} returned the result of {read}")


# The spool


def check_spool(config) -> CheckResult:
    """Check that the spool directory of ``config`` is writable: create and remove a file there."""
    from mlflow_azdual.spool import _make_private_directory, spool_directory, spool_root

    options = config.options
    if not options["spool"]:
        return CheckResult(
            WARNING, "spool",
            "off (spool=false): queued writes are kept in memory only and are lost if the "
            "process dies",
            "remove spool=false (or MLFLOW_AZDUAL_SPOOL) unless losing them is acceptable.",
        )
    directory = spool_directory(
        spool_root(options["spool_dir"]), config.primary_uri, config.secondary_uri
    )
    probe = os.path.join(directory, f".doctor-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _make_private_directory(directory)
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, b"mlflow-azdual doctor probe\n")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
            os.unlink(probe)
    except OSError as error:
        return CheckResult(
            FAILED, "spool", f"directory {directory} is not writable: {error}",
            "set the spool_dir option (MLFLOW_AZDUAL_SPOOL_DIR) to a writable local directory, "
            "or spool=false to keep queued writes in memory only.",
        )
    return CheckResult(OK, "spool", f"directory {directory} is writable")


def run_checks(uri: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
    """Run every check on the azdual tracking URI ``uri`` and return their results in order.

    When ``uri`` is invalid, the checks that need its backends are left out.
    """
    uri_result, config = check_uri(uri)
    results = [uri_result]
    if config is not None:
        results += [check_backend_config(config, role) for role in ("primary", "secondary")]
    results += [check_python(), check_mlflow(), check_plugin(), check_azureml_mlflow(config)]
    results += [check_entry_point(group) for group in ENTRY_POINT_BUILDERS]
    if config is None:
        return results

    reads = []
    for role in ("primary", "secondary"):
        tracking_uri = getattr(config, f"{role}_uri")
        registry_uri = getattr(config, f"{role}_registry_uri")
        reads.append((role, "tracking", tracking_uri, tracking_uri, timeout_s))
        reads.append((role, "registry", registry_uri, tracking_uri, timeout_s))
    with bounded_mlflow_http(timeout_s):
        # check_backend returns within its deadline, so these threads always finish.
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(reads)) as executor:
            results += list(executor.map(lambda read: check_backend(*read), reads))
    results.append(check_spool(config))
    return results
