"""Databricks experiment-name rules, checked by the plugin under the ``databricks`` profile.

The rig tests run against the Databricks policy proxy (rig/policy_proxy.py) in front of the
rig's primary server. The proxy emulates published Databricks behaviour, not the service:
it rejects an experiment name that is not an absolute workspace path, and it does not find a
name with a leading ``/Workspace`` or ``//`` by name, although it creates one.
"""

import urllib.parse
import uuid

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

import mlflow_azdual
from mlflow_azdual.backend_profiles import PROFILES
from mlflow_azdual.experiment_names import (
    normalise_experiment_name,
    normalise_workspace_path,
    validate_experiment_name,
)
from mlflow_azdual.id_mapping import PRIMARY_EXPERIMENT_NAME_TAG
from mlflow_azdual.uri import explicit_tracking_uri
from rig.policy_proxy import PolicyProxy
from tests.dual_helpers import backend_clients, secondary_experiment

# The proxy's rule name for invalid experiment names at experiments/create.
PROXY_NAME_RULE = "experiment_name_pattern"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/Shared/x", "/Shared/x"),
        ("/Workspace/Shared/x", "/Shared/x"),
        ("//Shared/x", "/Shared/x"),
        ("/Shared//x", "/Shared/x"),
        ("/Shared/x/", "/Shared/x"),
        ("//Workspace//Shared///x//", "/Shared/x"),
        ("/Workspace/Users/ana@example.com/churn/base", "/Users/ana@example.com/churn/base"),
        ("/Users/ana@example.com/churn", "/Users/ana@example.com/churn"),
        ("/WorkspaceX/Shared/x", "/WorkspaceX/Shared/x"),
        ("/Shared/Workspace/x", "/Shared/Workspace/x"),
        ("churn", "churn"),
        ("/", "/"),
        ("/Workspace", "/Workspace"),
    ],
)
def test_normalise_workspace_path_cases(name, expected):
    assert normalise_workspace_path(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/Shared/churn", "/Shared/churn"),
        ("/Shared/churn/baseline", "/Shared/churn/baseline"),
        ("/Users/ana@example.com/churn", "/Users/ana@example.com/churn"),
        ("/Workspace/Shared/churn", "/Shared/churn"),
        ("//Users//ana@example.com//churn/", "/Users/ana@example.com/churn"),
    ],
)
def test_databricks_accepts_workspace_paths(name, expected):
    assert validate_experiment_name(name, PROFILES["databricks"]) == expected


@pytest.mark.parametrize(
    "name",
    [
        "churn",
        "",
        "Shared/churn",
        "/Shared",
        "/Shared/",
        "/Users/ana@example.com",
        "/Users/ana@example.com/",
        "/Workspace/Shared",
        "/Repos/ana@example.com/churn",
        "/Workspace",
    ],
)
def test_databricks_rejects_other_names(name):
    with pytest.raises(MlflowException) as raised:
        validate_experiment_name(name, PROFILES["databricks"])
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert repr(name) in raised.value.message
    assert "/Users/<user>/<name> or /Shared/<name>" in raised.value.message


def test_plain_name_error_suggests_shared_path():
    with pytest.raises(MlflowException, match="for example /Shared/churn"):
        validate_experiment_name("churn", PROFILES["databricks"])


def test_normalised_name_shown_in_error():
    with pytest.raises(MlflowException, match="normalised: '/Users/ana'"):
        validate_experiment_name("/Workspace/Users/ana/", PROFILES["databricks"])


@pytest.mark.parametrize("profile", ["mlflow", "azureml"])
@pytest.mark.parametrize("name", ["churn", "//Shared/x/", "/Workspace/Shared/x", ""])
def test_other_profiles_keep_any_name(profile, name):
    assert validate_experiment_name(name, PROFILES[profile]) == name
    assert normalise_experiment_name(name, PROFILES[profile]) == name


# Against the rig, behind the Databricks policy proxy


@pytest.fixture
def databricks_primary(rig, tmp_path):
    """A Databricks policy proxy of this test's own in front of the rig's primary server, and
    a dual URI through it. Its counters include no other test's requests."""
    port = urllib.parse.urlsplit(rig.primary_server_uri).port
    with PolicyProxy(port, "databricks") as proxy:
        uri = explicit_tracking_uri(
            proxy.uri, rig.secondary_uri, primary_profile="databricks", secondary_profile="azureml",
            spool_dir=str(tmp_path / "spool"), flush_interval_s=0.2,
        )
        yield proxy, uri


def _unique_leaf() -> str:
    return f"names-{uuid.uuid4().hex[:10]}"


def test_plain_name_raises_before_request(databricks_primary):
    proxy, uri = databricks_primary
    client = MlflowClient(tracking_uri=uri)
    leaf = _unique_leaf()
    before = proxy.stats()

    with pytest.raises(MlflowException) as raised:
        client.create_experiment(leaf)

    after = proxy.stats()
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert repr(leaf) in raised.value.message
    assert "/Users/<user>/<name> or /Shared/<name>" in raised.value.message
    assert after["requests_total"] == before["requests_total"]
    assert PROXY_NAME_RULE not in after["rejected"]


def test_set_experiment_plain_name_raises(rig, databricks_primary):
    proxy, uri = databricks_primary
    primary, _ = backend_clients(rig)
    leaf = _unique_leaf()
    mlflow.set_tracking_uri(uri)

    with pytest.raises(MlflowException) as raised:
        mlflow.set_experiment(leaf)

    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert repr(leaf) in raised.value.message
    assert "/Shared/<name>" in raised.value.message
    # The proxy rejects every invalid create, so no rejection means no create reached it.
    assert PROXY_NAME_RULE not in proxy.stats()["rejected"]
    assert primary.get_experiment_by_name(leaf) is None


def test_path_variants_share_one_experiment(rig, databricks_primary):
    proxy, uri = databricks_primary
    primary, secondary = backend_clients(rig)
    leaf = _unique_leaf()
    mlflow.set_tracking_uri(uri)
    variants = [
        f"/Workspace/Shared/{leaf}",
        f"//Shared/{leaf}",
        f"/Shared/{leaf}",
        f"/Shared//{leaf}/",
    ]

    ids = [mlflow.set_experiment(name).experiment_id for name in variants]
    found = MlflowClient(tracking_uri=uri).get_experiment_by_name(f"/Workspace/Shared/{leaf}")
    assert mlflow_azdual.flush(timeout_s=60)

    assert len(set(ids)) == 1, ids
    assert found.experiment_id == ids[0]
    on_primary = primary.search_experiments(
        view_type=ViewType.ALL, filter_string=f"name LIKE '%{leaf}%'"
    )
    assert [experiment.name for experiment in on_primary] == [f"/Shared/{leaf}"]
    mirror = secondary_experiment(secondary, ids[0])
    assert mirror.tags[PRIMARY_EXPERIMENT_NAME_TAG] == f"/Shared/{leaf}"
    assert mirror.name == leaf
    assert PROXY_NAME_RULE not in proxy.stats()["rejected"]


def test_rename_to_plain_name_raises(rig, databricks_primary):
    proxy, uri = databricks_primary
    primary, _ = backend_clients(rig)
    client = MlflowClient(tracking_uri=uri)
    leaf = _unique_leaf()
    experiment_id = client.create_experiment(f"/Shared/{leaf}")
    # The mirror is created first, because creating it reads the experiment through the proxy.
    assert mlflow_azdual.flush(timeout_s=60)
    before = proxy.stats()

    with pytest.raises(MlflowException) as raised:
        client.rename_experiment(experiment_id, "churn")

    after = proxy.stats()
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "'churn'" in raised.value.message
    assert after["requests_total"] == before["requests_total"]
    assert primary.get_experiment(experiment_id).name == f"/Shared/{leaf}"


def test_rename_normalises_new_name(rig, databricks_primary):
    _, uri = databricks_primary
    primary, secondary = backend_clients(rig)
    client = MlflowClient(tracking_uri=uri)
    old_leaf = _unique_leaf()
    experiment_id = client.create_experiment(f"/Shared/{old_leaf}")
    # The mirror is created before the rename; created after it, it would take the new name.
    assert mlflow_azdual.flush(timeout_s=60)
    new_leaf = _unique_leaf()

    client.rename_experiment(experiment_id, f"/Workspace/Shared//{new_leaf}/")
    assert mlflow_azdual.flush(timeout_s=60)

    assert primary.get_experiment(experiment_id).name == f"/Shared/{new_leaf}"
    mirror = secondary_experiment(secondary, experiment_id)
    assert mirror.tags[PRIMARY_EXPERIMENT_NAME_TAG] == f"/Shared/{new_leaf}"
    # The Azure ML stand-in cannot rename experiments, so the mirror keeps its first name.
    assert mirror.name == old_leaf


def test_mlflow_profile_keeps_plain_names(rig):
    primary, _ = backend_clients(rig)
    # The primary server itself, without the Databricks policy, with the default profiles.
    uri = explicit_tracking_uri(rig.primary_server_uri, rig.secondary_uri)
    client = MlflowClient(tracking_uri=uri)
    leaf = _unique_leaf()

    experiment_id = client.create_experiment(leaf)
    assert mlflow_azdual.flush(timeout_s=60)

    assert primary.get_experiment(experiment_id).name == leaf
