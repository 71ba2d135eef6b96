"""Version differences handled in mlflow_azdual.compat, checked on the installed MLflow."""

import sys
import types

import pytest
from mlflow.protos.service_pb2 import GetRun, LogBatch
from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
from mlflow.store.tracking.rest_store import RestStore

from mlflow_azdual import compat

pytestmark = pytest.mark.smoke


def _no_credentials():
    raise AssertionError("looking up an endpoint must not build credentials")


def test_rest_endpoint_of_tracking_store():
    path, method = compat.rest_endpoint(RestStore(_no_credentials), LogBatch)
    assert path == "/api/2.0/mlflow/runs/log-batch"
    assert method == "POST"


def test_rest_endpoint_of_registry_store():
    from mlflow.protos.model_registry_pb2 import CreateRegisteredModel

    path, method = compat.rest_endpoint(RegistryRestStore(_no_credentials), CreateRegisteredModel)
    assert path == "/api/2.0/mlflow/registered-models/create"
    assert method == "POST"


def test_rest_endpoint_from_module_table(monkeypatch):
    """MLflow 2 keeps the tracking table in the store's module, not on the class."""
    module = types.ModuleType("fake_mlflow2_rest_store")
    module._METHOD_TO_INFO = {GetRun: ("/api/2.0/mlflow/runs/get", "GET")}
    exec("class RestStore:\n    pass\n", module.__dict__)
    module.RestStore.__module__ = module.__name__
    monkeypatch.setitem(sys.modules, module.__name__, module)

    assert compat.rest_endpoint(module.RestStore(), GetRun) == ("/api/2.0/mlflow/runs/get", "GET")
    with pytest.raises(LookupError, match="LogBatch"):
        compat.rest_endpoint(module.RestStore(), LogBatch)
