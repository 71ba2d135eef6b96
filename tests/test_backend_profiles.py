"""Requests shaped by the secondary's backend profile, against the Azure ML policy proxy.

The proxy (rig/policy_proxy.py) emulates Azure ML's published limit of 250 values of one
metric key per log_batch request in front of the rig's secondary server.
"""

import urllib.parse

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

import mlflow_azdual
from mlflow_azdual.backend_profiles import PROFILES, profile_for
from mlflow_azdual.uri import explicit_tracking_uri
from rig.policy_proxy import PolicyProxy
from tests.dual_helpers import backend_clients, metric_points, secondary_run_id, unique_path


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("databricks://prod", "databricks"),
        ("azureml://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/s", "azureml"),
        ("http://127.0.0.1:5000", "mlflow"),
    ],
)
def test_profile_chosen_from_scheme(uri, expected):
    assert profile_for(uri).name == expected


def test_profile_option_overrides_scheme():
    assert profile_for("http://127.0.0.1:5000", "azureml") is PROFILES["azureml"]
    with pytest.raises(ValueError, match="unknown backend profile 'azure'"):
        profile_for("http://127.0.0.1:5000", "azure")


def test_profile_option_rejects_unknown_name():
    from mlflow.exceptions import MlflowException

    from mlflow_azdual.uri import parse_tracking_uri

    with pytest.raises(MlflowException, match="secondary_profile"):
        parse_tracking_uri(
            "azdual:?primary=http%3A%2F%2F127.0.0.1%3A1&secondary=http%3A%2F%2F127.0.0.1%3A2"
            "&secondary_profile=aml"
        )


@pytest.mark.parametrize("profile, delivered", [("azureml", True), ("mlflow", False)])
def test_autolog_batch_split_for_azureml(rig, tmp_path, profile, delivered):
    primary, secondary = backend_clients(rig)
    port = urllib.parse.urlsplit(rig.secondary_uri).port
    with PolicyProxy(port, "azureml") as proxy:
        uri = explicit_tracking_uri(
            rig.primary_uri, proxy.uri, secondary_profile=profile,
            spool_dir=str(tmp_path / "spool"), flush_interval_s=0.2,
        )
        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(client.create_experiment(unique_path()))
        # One autolog-style call: 700 values of one key.
        client.log_batch(
            run.info.run_id, [Metric("loss", 1.0 / (step + 1), step, step) for step in range(700)]
        )
        client.set_terminated(run.info.run_id)
        assert mlflow_azdual.flush(timeout_s=60)

    assert len(metric_points(primary, run.info.run_id, "loss")) == 700
    mirror_points = metric_points(secondary, secondary_run_id(primary, run.info.run_id), "loss")
    # With the mlflow profile the 700-value request is rejected whole: a dead letter.
    assert len(mirror_points) == (700 if delivered else 0)
