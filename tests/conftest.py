"""Shared fixtures: the loopback guard, the rig, and the environment for child processes.

The guard is installed when pytest imports this file, so code in the pytest process cannot
reach a host other than this machine. The session-scoped `rig` fixture starts a Rig, or
attaches to a running one when AZDUAL_RIG_STATE names the state.json written by
`python -m rig up`. It stops only a rig that it started. When a test fails, its report
gets the end of every server log. The module-scoped `databricks_primary` fixture sets up
this process as a client of `databricks://rig`, the primary behind its https front door.
"""

import os
import shutil
import tempfile

import pytest

from rig import Rig
from rig.guard import GUARD_PATH
from rig.servers import DATABRICKS_ENV_OVERRIDES
from rig.guard import install as install_loopback_guard

install_loopback_guard()
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# Spool files of the tests stay out of the user's home directory, in a folder removed at the
# end of the session.
_SPOOL_DIR = None
if "MLFLOW_AZDUAL_SPOOL_DIR" not in os.environ:
    _SPOOL_DIR = tempfile.mkdtemp(prefix="mlflow-azdual-test-spool-")
    os.environ["MLFLOW_AZDUAL_SPOOL_DIR"] = _SPOOL_DIR

_RIG_KEY = pytest.StashKey[Rig]()


def pytest_unconfigure(config):
    if _SPOOL_DIR is not None:
        shutil.rmtree(_SPOOL_DIR, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "rig: the test uses the rig's servers (added automatically)")


def pytest_collection_modifyitems(items):
    for item in items:
        if "rig" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.rig)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    running_rig = item.config.stash.get(_RIG_KEY, None)
    if report.failed and running_rig is not None:
        report.sections.append(("rig server logs (last 40 lines each)", running_rig.log_tail(40)))


@pytest.fixture(scope="session")
def rig(request, tmp_path_factory):
    """The running Rig, with its environment applied to os.environ for the session."""
    saved_environ = dict(os.environ)
    state_path = os.environ.get("AZDUAL_RIG_STATE")

    if state_path:
        running_rig = Rig.attach(state_path)
        stopped = [
            name for name in running_rig.processes if not running_rig.is_server_running(name)
        ]
        if stopped:
            pytest.exit(
                f"AZDUAL_RIG_STATE={state_path} names a rig whose servers are not running: "
                f"{', '.join(stopped)}. "
                "Start it with `python -m rig up` or unset AZDUAL_RIG_STATE.",
                returncode=1,
            )
    else:
        running_rig = Rig(tmp_path_factory.mktemp("rig")).start()

    request.config.stash[_RIG_KEY] = running_rig
    running_rig.apply_env()
    try:
        yield running_rig
    finally:
        del request.config.stash[_RIG_KEY]
        if not state_path:
            running_rig.stop()
        os.environ.clear()
        os.environ.update(saved_environ)


@pytest.fixture(scope="module")
def databricks_primary(rig):
    """The rig, with this process set up as a client of `databricks://rig` for the module.

    Puts the rig's Databricks config file, its certificate bundle as REQUESTS_CA_BUNDLE and
    short Databricks retry timeouts into os.environ, and unsets DATABRICKS_HOST,
    DATABRICKS_TOKEN and DATABRICKS_CONFIG_PROFILE, which would take precedence over the
    config file. The previous values come back after the module.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name in DATABRICKS_ENV_OVERRIDES:
            patch.delenv(name, raising=False)
        for name, value in rig.databricks_env.items():
            patch.setenv(name, value)
        yield rig


@pytest.fixture
def subprocess_env(rig):
    """Environment for a child Python process: the rig's env, with the guard on PYTHONPATH."""
    python_path = os.pathsep.join(filter(None, [str(GUARD_PATH), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **rig.env, "PYTHONPATH": python_path}


@pytest.fixture
def dual(rig):
    """An MlflowClient on the azdual URI of the rig, also set as MLflow's active URIs."""
    from tests.dual_helpers import active_dual_client

    with active_dual_client(rig.dual_tracking_uri()) as client:
        yield client


@pytest.fixture(scope="session")
def iris_model():
    """A small fitted scikit-learn classifier and the features it was trained on."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    return LogisticRegression(max_iter=300).fit(features, labels), features
