"""MLflow loads the plugin's entry points in a fresh interpreter, without the silent skip.

MLflow turns an ImportError in a plugin into a UserWarning and goes on without it, so these
tests import mlflow in a new process with warnings as errors and check the stores in use.
MLflow 2.9 and 2.13 import ``pkg_resources``, whose deprecation UserWarning from recent
setuptools releases is ignored.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.smoke

PROBE = r"""
import json, warnings
warnings.simplefilter("error", UserWarning)
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
import mlflow
from mlflow.tracking._tracking_service.utils import _get_store
from mlflow.tracking._model_registry.utils import _get_store as _get_registry_store
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
uri = mlflow.get_tracking_uri()
artifact_uri = "azdual://primary_root=%2Ftmp%2Fp;secondary_root=%2Ftmp%2Fs/model"
print(json.dumps({
    "tracking": type(_get_store()).__module__ + "." + type(_get_store()).__name__,
    "registry": type(_get_registry_store()).__module__ + "." + type(_get_registry_store()).__name__,
    "artifacts": type(get_artifact_repository(artifact_uri)).__name__,
}))
"""


def run_probe(tracking_uri):
    environ = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    completed = subprocess.run(
        [sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_entry_points_load_in_fresh_process(tmp_path):
    uri = (
        f"azdual:?primary=sqlite%3A%2F%2F%2F{tmp_path}%2Fp.db"
        f"&secondary=sqlite%3A%2F%2F%2F{tmp_path}%2Fs.db"
    )
    stores = run_probe(uri)
    assert stores["tracking"] == "mlflow_azdual.tracking_store.DualTrackingStore"
    assert stores["registry"] == "mlflow_azdual.registry_store.DualRegistryStore"
    assert stores["artifacts"] == "DualArtifactRepository"


def test_store_module_imported_before_mlflow(tmp_path):
    script = (
        "import warnings\n"
        "warnings.simplefilter('error', UserWarning)\n"
        "warnings.filterwarnings('ignore', message='pkg_resources is deprecated')\n"
        "import mlflow_azdual.tracking_store\n"
        "from mlflow.tracking._tracking_service.utils import _tracking_store_registry\n"
        "print(_tracking_store_registry.get_store_builder('azdual:').__module__)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"},
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "mlflow_azdual.entry_points"
