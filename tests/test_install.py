"""Installing the wheel into an environment that already has MLflow leaves that MLflow alone.

Databricks Runtime fixes the MLflow version of a cluster, so the plugin's wheel must install
next to it without upgrading or downgrading mlflow-skinny or any other distribution. The test
builds the wheel, creates a virtual environment with one pinned mlflow-skinny, installs the
wheel with plain `pip install`, and loads the plugin through MLflow's store registry there.
It needs pip to reach the package index and is skipped when pip reports that it cannot.
"""

import configparser
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path
from urllib.parse import quote

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent

# The MLflow version of the environment the wheel is installed into: Databricks Runtime 16.4
# LTS ML ships MLflow 2.21.3.
PINNED_MLFLOW_SKINNY = "2.21.3"

# MLflow versions of Databricks Runtime ML releases. The plugin's requirement must admit each.
RUNTIME_MLFLOW_VERSIONS = {
    "14.3 LTS": "2.9.2",
    "15.4 LTS": "2.13.1",
    "16.4 LTS": "2.21.3",
    "17.3 LTS": "3.0.1",
    "18 LTS": "3.8.1",
    "19": "3.12.0",
}

ENTRY_POINT_GROUPS = (
    "mlflow.tracking_store",
    "mlflow.artifact_repository",
    "mlflow.model_registry_store",
)

# Substrings of pip's output when it cannot connect to the index (urllib3 and socket errors).
INDEX_UNREACHABLE_MARKERS = (
    "NewConnectionError",
    "ConnectTimeoutError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ProxyError",
)

PROBE = r"""
import json, sys
from importlib.metadata import entry_points, version

import mlflow
import mlflow_azdual
from mlflow.tracking._tracking_service.utils import _get_store

groups = sys.argv[2:]
found = {}
for group in groups:
    found[group] = {ep.name: ep.value for ep in entry_points(group=group)}
store = _get_store(sys.argv[1])
print(json.dumps({
    "mlflow_skinny": version("mlflow-skinny"),
    "mlflow": mlflow.__version__,
    "plugin_file": mlflow_azdual.__file__,
    "entry_points": found,
    "store_class": type(store).__module__ + "." + type(store).__name__,
}))
"""


def child_env(tmp_path):
    """Environment for the child processes: no MLflow settings or Python paths of this session."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "PYTHON", "VIRTUAL_ENV"))
    }
    environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    environ["DO_NOT_TRACK"] = "true"
    environ["MLFLOW_AZDUAL_SPOOL_DIR"] = str(tmp_path / "spool")
    return environ


def run(command, tmp_path, timeout_s=300):
    return subprocess.run(
        [str(part) for part in command],
        cwd=tmp_path, env=child_env(tmp_path), capture_output=True, text=True, timeout=timeout_s,
    )


def installed_versions(python, tmp_path):
    """Map each distribution installed in the environment of ``python`` to its version."""
    listed = run([python, "-m", "pip", "list", "--format=json"], tmp_path)
    assert listed.returncode == 0, listed.stderr[-3000:]
    return {canonicalize_name(item["name"]): item["version"] for item in json.loads(listed.stdout)}


def build_wheel(tmp_path):
    """Build the plugin's wheel from a copy of the sources, so the checkout gets no build/ folder."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "mlflow_azdual", source / "mlflow_azdual",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    dist = tmp_path / "dist"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, source], tmp_path)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def read_wheel(wheel):
    """Return the wheel's file names, its entry points and its Requires-Dist lines."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(name.split("/")[0] for name in names if ".dist-info/" in name)
        entry_points = configparser.ConfigParser(delimiters=("=",))
        entry_points.optionxform = str
        entry_points.read_string(archive.read(f"{dist_info}/entry_points.txt").decode())
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    requires = [
        Requirement(line.split(":", 1)[1].strip())
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    return names, entry_points, requires


def declared_install_requires():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].strip().splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip()]


def create_venv_with_pinned_mlflow(tmp_path):
    """Create a virtual environment with mlflow-skinny==PINNED_MLFLOW_SKINNY and return its python.

    Skip the test when pip's output shows that the package index cannot be reached.
    """
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    installed = run(
        [python, "-m", "pip", "install", "--retries", "2", f"mlflow-skinny=={PINNED_MLFLOW_SKINNY}"],
        tmp_path,
    )
    if installed.returncode != 0:
        output = installed.stdout + installed.stderr
        unreachable = [marker for marker in INDEX_UNREACHABLE_MARKERS if marker in output]
        if unreachable:
            pytest.skip(f"pip cannot reach the package index ({unreachable[0]}): {output[-500:]}")
        pytest.fail(f"pip install mlflow-skinny=={PINNED_MLFLOW_SKINNY} failed:\n{output[-3000:]}")
    return python


def pip_install_command(python, wheel, install_method, tmp_path):
    """Return the pip command of one documented way to install the wheel (docs/clusters.md)."""
    if install_method == "plain":
        return [python, "-m", "pip", "install", wheel]
    # The init script's way: pin mlflow-skinny to the version of the MLflow already installed.
    probed = run([python, "-c", "import mlflow; print(mlflow.__version__)"], tmp_path)
    assert probed.returncode == 0, probed.stderr[-3000:]
    constraints = tmp_path / "mlflow-constraints.txt"
    constraints.write_text(f"mlflow-skinny=={probed.stdout.strip()}\n")
    return [python, "-m", "pip", "install", "-c", constraints, wheel]


@pytest.mark.parametrize("install_method", ["plain", "constraint"])
def test_wheel_installs_without_changing_mlflow(tmp_path, install_method):
    python = create_venv_with_pinned_mlflow(tmp_path)
    wheel = build_wheel(tmp_path)

    assert wheel.name.startswith("mlflow_azdual-"), wheel.name
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names, wheel_entry_points, requires = read_wheel(wheel)
    assert "mlflow_azdual/__init__.py" in names
    assert "mlflow_azdual/entry_points.py" in names
    assert not [name for name in names if name.startswith(("rig/", "tests/"))], names
    for group in ENTRY_POINT_GROUPS:
        assert wheel_entry_points[group]["azdual"].startswith("mlflow_azdual.entry_points:"), group
    assert wheel_entry_points["console_scripts"]["mlflow-azdual"] == "mlflow_azdual.cli:main"

    unconditional = [requirement for requirement in requires if requirement.marker is None]
    assert [requirement.name for requirement in unconditional] == ["mlflow-skinny"]
    assert [str(requirement) for requirement in unconditional] == [
        str(requirement) for requirement in declared_install_requires()
    ]
    for runtime, mlflow_version in RUNTIME_MLFLOW_VERSIONS.items():
        assert unconditional[0].specifier.contains(mlflow_version), (runtime, mlflow_version)
    azure_extra = [r.name for r in requires if r.marker and r.marker.evaluate({"extra": "azure"})]
    assert "azureml-mlflow" in azure_extra
    assert "azureml-mlflow" not in [requirement.name for requirement in unconditional]

    before = installed_versions(python, tmp_path)
    assert before["mlflow-skinny"] == PINNED_MLFLOW_SKINNY

    installed = run(pip_install_command(python, wheel, install_method, tmp_path), tmp_path)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]

    after = installed_versions(python, tmp_path)
    assert after["mlflow-skinny"] == PINNED_MLFLOW_SKINNY
    changed = {
        name: (version, after.get(name))
        for name, version in before.items()
        if after.get(name) != version
    }
    assert changed == {}, f"pip install of the wheel changed (before, after): {changed}"
    added = sorted(set(after) - set(before))
    assert added == ["mlflow-azdual"], added

    primary = (tmp_path / "primary").as_uri()
    secondary = (tmp_path / "secondary").as_uri()
    tracking_uri = f"azdual:?primary={quote(primary, safe='')}&secondary={quote(secondary, safe='')}"
    probed = run([python, "-c", PROBE, tracking_uri, *ENTRY_POINT_GROUPS], tmp_path)
    assert probed.returncode == 0, probed.stderr[-3000:]
    result = json.loads(probed.stdout.strip().splitlines()[-1])

    assert result["mlflow_skinny"] == PINNED_MLFLOW_SKINNY
    assert result["mlflow"] == PINNED_MLFLOW_SKINNY
    assert Path(result["plugin_file"]).is_relative_to(tmp_path / "venv"), result["plugin_file"]
    for group in ENTRY_POINT_GROUPS:
        assert result["entry_points"][group].get("azdual", "").startswith(
            "mlflow_azdual.entry_points:"
        ), (group, result["entry_points"][group])
    assert result["store_class"] == "mlflow_azdual.tracking_store.DualTrackingStore"
