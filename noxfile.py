"""Run the test suite on each MLflow version that a Databricks Runtime ML LTS release ships.

One session per version, named ``mlflow-<version>`` (``nox -l`` lists them). A session builds
its own virtualenv under ``.nox/`` with uv, installs the package with its dev extra and that
MLflow, and runs pytest against the rig, whose two ``mlflow server`` processes are of the same
version. Without arguments a session runs the tests marked ``smoke``. Arguments after ``--``
replace pytest's test selection, so ``nox -s mlflow-2.21.3 -- tests`` runs the whole suite.
Azurite must be installed first (``make install``).
"""

import os

import nox

nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True

# Pin of every session: MLflow 2.x to 3.8 import sqlalchemy.pool.FallbackAsyncAdaptedQueuePool
# in their SQL store, which SQLAlchemy 2.1 removed, so the rig's `mlflow server` processes fail
# to start with it.
SQLALCHEMY_PIN = ("sqlalchemy<2.1",)

NEWEST = "newest"

# Databricks Runtime ML release -> its MLflow version and that version's extra pins.
MLFLOW_VERSIONS = {
    "14.3 LTS": (
        "2.9.2",
        SQLALCHEMY_PIN + (
            # MLflow 2.9 imports pkg_resources, which setuptools 82 removed, and uv makes
            # virtualenvs without setuptools.
            "setuptools<82",
        ),
    ),
    "15.4 LTS": (
        "2.13.1",
        SQLALCHEMY_PIN + (
            # MLflow 2.13 imports pkg_resources too.
            "setuptools<82",
        ),
    ),
    "16.4 LTS": ("2.21.3", SQLALCHEMY_PIN),
    "17.3 LTS": ("3.0.1", SQLALCHEMY_PIN),
    "18 LTS": ("3.8.1", SQLALCHEMY_PIN),
    # `make test` runs the whole suite on the newest MLflow that pip resolves in .venv.
    # NOTE: mlflow 3.18.0 does not install from the package index this project uses, because
    # its requirement mlflow-tracing==3.18.0 is not published there. pip then resolves 3.17.2.
    NEWEST: ("3.18.0", ()),
}

# Environment of every session: no usage telemetry from MLflow 3, Azurite or other tools.
SESSION_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}

PYTEST_COMMAND = ("python", "-m", "pytest", "-p", "no:cacheprovider", "--timeout=600", "-q", "-rs")


def run_suite(session: nox.Session, mlflow_version: str, pins: tuple) -> None:
    """Install the package with one MLflow version, then run the smoke tests or the arguments.

    MLflow 2.9.2 and 2.13.1 do not require ``mlflow-skinny``, so without the ``mlflow-skinny`` pin
    the package's own ``mlflow-skinny`` requirement would install the newest one, whose files
    overwrite those of the ``mlflow`` distribution.
    """
    session.install(
        "-e", ".[dev]", f"mlflow=={mlflow_version}", f"mlflow-skinny=={mlflow_version}", *pins
    )
    session.run("python", "-c", "import mlflow; print('MLflow', mlflow.__version__)")

    selection = session.posargs or ["-m", "smoke", "tests"]
    session.run(*PYTEST_COMMAND, *selection, env=SESSION_ENV)


def _register(runtime: str, mlflow_version: str, pins: tuple) -> None:
    def session_function(session: nox.Session) -> None:
        run_suite(session, mlflow_version, pins)

    if runtime == NEWEST:
        session_function.__doc__ = f"MLflow {mlflow_version} (the newest release)"
        tags = []
    else:
        session_function.__doc__ = f"MLflow {mlflow_version} (Databricks Runtime ML {runtime})"
        tags = ["matrix"]
    nox.session(name=f"mlflow-{mlflow_version}", tags=tags)(session_function)


for _runtime, (_version, _pins) in MLFLOW_VERSIONS.items():
    _register(_runtime, _version, _pins)

# The tests that go through azureml-mlflow's own client. azureml-mlflow declares a ceiling on
# MLflow, so the session pins the newest MLflow it supports (constraints/azureml.txt).
AZUREML_TESTS = ("tests/test_azureml_client.py", "tests/test_azureml_deploy.py")


@nox.session(name="azureml", tags=["matrix"])
def azureml(session: nox.Session) -> None:
    """azureml-mlflow's client, on the newest MLflow that azureml-mlflow supports"""
    session.install("-c", "constraints/azureml.txt", "-e", ".[azure,dev]")
    session.run("python", "-c", "import mlflow; print('MLflow', mlflow.__version__)")
    session.run(*PYTEST_COMMAND, *(session.posargs or AZUREML_TESTS), env=SESSION_ENV)

os.environ.update(SESSION_ENV)
