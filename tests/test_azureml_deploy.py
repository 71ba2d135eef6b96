"""The mirrored Azure ML model version as azureml-mlflow's deployment client sees it.

`mlflow.deployments.get_deploy_client(<azureml:// URI>)` returns azureml-mlflow's
AzureMLDeploymentClient. Its `create_deployment(name, "models:/<name>/<version>", ...)` takes the
name and version from the URI as they are and deploys that Azure ML model version. Endpoints and
managed online deployments are created through Azure Resource Manager (management.azure.com).
ACI and AKS deployments go to the workspace host, and they first download the model through the
active MLflow registry URI to build a scoring script and a conda environment from its MLmodel.

These tests run the offline steps against the rig's https Azure ML stand-in, with the fixtures of
test_azureml_client.py. They build the client, turn a `models:/` URI into a name and version, and
run the model download and scoring-environment step of the ACI and AKS path. They stop before
the first request to Azure Resource Manager and before the first request to Azure ML's artifact
and model management services, which the stand-in, a plain MLflow server, does not have. The
loopback guard fails a test that tries any other host.
"""

# ruff: noqa: F811  (tests take the imported fixtures as arguments of the same names)

import os
import uuid

import pytest

pytest.importorskip(
    "azureml.mlflow",
    reason="azureml-mlflow is not installed here; `make test-azureml` runs these tests in the "
    "nox session azureml, pinned to MLflow 3.15.0, the newest that azureml-mlflow supports",
)

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

import mlflow_azdual  # noqa: E402
from mlflow_azdual.registry_store import PRIMARY_VERSION_TAG, SECONDARY_VERSION_TAG  # noqa: E402
from tests.test_azureml_client import (  # noqa: E402, F401  (pytest fixtures)
    FLUSH_TIMEOUT_S,
    RESOURCE_GROUP,
    SUBSCRIPTION,
    WORKSPACE,
    azure_env,
    azure_token,
    certificates,
    dual_uri,
    front_door,
    mirror_run_id,
    no_outbound_attempt,
    secondary_server,
    unique_experiment_path,
)

ARM_HOST = "management.azure.com"


@pytest.fixture
def mirrored_version(dual_uri, front_door, secondary_server, iris_model):
    """Register a model through the azdual URI and return its name and both version numbers.

    The secondary registry already contains one version of the name, registered there directly,
    so the mirrored version gets another number on Azure ML than on Databricks.
    """
    from mlflow.models import infer_signature

    model, features = iris_model
    name = f"iris-deploy-{uuid.uuid4().hex[:10]}"
    secondary_server.create_registered_model(name)
    secondary_server.create_model_version(name, "s3://elsewhere/registered-in-azure-ml/model")

    mlflow.set_experiment(unique_experiment_path())
    signature = infer_signature(features[:5], model.predict(features[:5]))
    with mlflow.start_run() as run:
        mlflow.sklearn.log_model(
            model, name="model", registered_model_name=name, signature=signature
        )
    mirror_run_id(run.info.run_id)

    primary = MlflowClient().get_model_version(name, "1")
    return name, primary.version, primary.tags[SECONDARY_VERSION_TAG]


@pytest.fixture
def azureml_registry(front_door):
    """Make the Azure ML stand-in MLflow's registry URI, as on a machine that deploys."""
    previous = mlflow.get_registry_uri()
    mlflow.set_registry_uri(front_door.uri)
    yield front_door.uri
    mlflow.set_registry_uri(previous)


def test_deploy_client_builds_offline(front_door):
    from azureml.mlflow.deploy import AzureMLDeploymentClient
    from mlflow.deployments import get_deploy_client

    requests_before = front_door.proxy.stats()["requests_total"]

    client = get_deploy_client(front_door.uri)
    context = client.service_context
    mms_base_url = client._mms_client._client._client._base_url
    arm_base_url = client._mir_client._client._client._base_url

    assert isinstance(client, AzureMLDeploymentClient)
    assert context.host_url == f"https://127.0.0.1:{front_door.proxy.port}"
    assert (context.subscription_id, context.resource_group_name, context.workspace_name) == (
        SUBSCRIPTION, RESOURCE_GROUP, WORKSPACE,
    )
    # ACI and AKS services go to the workspace host, endpoints to Azure Resource Manager.
    assert mms_base_url == context.host_url
    assert arm_base_url.startswith(f"https://{ARM_HOST}")
    assert front_door.proxy.stats()["requests_total"] == requests_before


def test_mirrored_version_tags_map_numbers(mirrored_version, secondary_server):
    name, primary_version, secondary_version = mirrored_version

    mirrored = secondary_server.get_model_version(name, secondary_version)

    assert primary_version == "1"
    assert secondary_version == "2"
    assert mirrored.tags[PRIMARY_VERSION_TAG] == primary_version
    assert mirrored.source.startswith("wasbs://")
    assert mirrored.source.endswith("/model")


def test_model_uri_version_taken_verbatim(mirrored_version, azureml_registry):
    from azureml.mlflow.deploy._util import handle_model_uri

    name, primary_version, secondary_version = mirrored_version

    # create_deployment calls this first, and its result names the Azure ML model version.
    resolved = handle_model_uri(f"models:/{name}/{secondary_version}", "churn-svc")
    unmapped = handle_model_uri(f"models:/{name}/{primary_version}", "churn-svc")

    assert resolved == (name, secondary_version)
    # The Databricks number is not translated, so on Azure ML it names another version.
    assert unmapped == (name, primary_version)


def test_stage_resolves_on_registry_uri(mirrored_version, dual_uri, front_door):
    from azureml.mlflow.deploy._util import handle_model_uri

    name, primary_version, secondary_version = mirrored_version
    MlflowClient().transition_model_version_stage(name, primary_version, "Staging")
    assert mlflow_azdual.flush(timeout_s=FLUSH_TIMEOUT_S)

    through_dual = handle_model_uri(f"models:/{name}/Staging", "churn-svc")
    mlflow.set_registry_uri(front_door.uri)
    through_azureml = handle_model_uri(f"models:/{name}/Staging", "churn-svc")

    # A stage is looked up in the active registry, which is Databricks with the azdual URI.
    assert through_dual == (name, primary_version)
    assert through_azureml == (name, secondary_version)


def test_mirrored_version_downloads_deployable(mirrored_version, azureml_registry, iris_model,
                                               tmp_path):
    from azureml.mlflow.deploy._util import load_pyfunc_conf
    from mlflow.models import Model

    model, features = iris_model
    name, _, secondary_version = mirrored_version

    local_path = mlflow.artifacts.download_artifacts(
        f"models:/{name}/{secondary_version}", dst_path=str(tmp_path)
    )
    mlmodel = Model.load(os.path.join(local_path, "MLmodel"))
    pyfunc_conf = load_pyfunc_conf(mlmodel)
    loaded = mlflow.pyfunc.load_model(local_path)

    assert pyfunc_conf["loader_module"] == "mlflow.sklearn"
    assert os.path.isfile(os.path.join(local_path, pyfunc_conf["env"]["conda"]))
    assert mlmodel.signature is not None
    assert mlmodel.signature.inputs.to_dict()
    assert mlmodel.signature.outputs.to_dict()
    assert mlmodel.model_id is None
    assert mlmodel.artifact_path == "model"
    assert (loaded.predict(features[:5]) == model.predict(features[:5])).all()


def test_scoring_environment_from_mirrored_version(mirrored_version, azureml_registry,
                                                   front_door):
    from azureml.mlflow.deploy._mms.utils import create_inference_env_and_entry_script
    from mlflow.utils.file_utils import TempDir

    name, _, secondary_version = mirrored_version
    requests_before = front_door.proxy.stats()["requests_total"]

    # The step of create_deployment's ACI and AKS path that runs before any upload.
    with TempDir(chdr=True) as tmp_dir:
        script_path, environment = create_inference_env_and_entry_script(
            tmp_dir, name, secondary_version, "churn-svc"
        )
        with open(script_path, encoding="utf-8") as script_file:
            script = script_file.read()
    conda = environment.python.conda_dependencies
    pip_packages = next(entry["pip"] for entry in conda["dependencies"] if isinstance(entry, dict))
    routes = front_door.routes()

    # NOTE: the folder named here is the local download folder (a temporary directory with
    # MLflow 3.15), not the model's folder on Azure ML. No real ACI deployment was run.
    assert "model_path = os.path.join(os.getenv('AZUREML_MODEL_DIR'), '" in script
    assert "model = load_model(model_path)" in script
    assert "@input_schema('input_data'" in script
    assert "@output_schema(" in script
    assert any(package.startswith("scikit-learn") for package in pip_packages)
    assert any(package.startswith("mlflow") for package in pip_packages)
    assert environment.environment_variables["AZUREML_ENTRY_SCRIPT"].endswith("execution_script.py")
    assert front_door.proxy.stats()["requests_total"] > requests_before
    assert routes.get("model-versions/get-download-uri", 0) >= 1
