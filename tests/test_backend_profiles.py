"""Requests shaped by the secondary's backend profile, against the Azure ML policy proxy.

The proxy (rig/policy_proxy.py) emulates Azure ML's published limit of 250 values of one
metric key per log_batch request in front of the rig's secondary server.
"""

import urllib.parse

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.tracking._tracking_service.utils import _get_store

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


def _azureml_uri(rig, proxy, tmp_path, **options):
    return explicit_tracking_uri(
        rig.primary_uri, proxy.uri, secondary_profile="azureml",
        spool_dir=str(tmp_path / "spool"), flush_interval_s=0.2, **options,
    )


def _mirror(rig, run_id):
    primary, secondary = backend_clients(rig)
    return secondary.get_run(secondary_run_id(primary, run_id))


def test_long_param_truncated_with_marker(rig, tmp_path):
    primary, _ = backend_clients(rig)
    port = urllib.parse.urlsplit(rig.secondary_uri).port
    with PolicyProxy(port, "azureml") as proxy:
        client = MlflowClient(tracking_uri=_azureml_uri(rig, proxy, tmp_path))
        run = client.create_run(client.create_experiment(unique_path()))
        client.log_param(run.info.run_id, "notes", "n" * 2000)
        client.set_terminated(run.info.run_id)
        assert mlflow_azdual.flush(timeout_s=60)

    assert primary.get_run(run.info.run_id).data.params["notes"] == "n" * 2000
    mirror = _mirror(rig, run.info.run_id)
    assert mirror.data.params["notes"] == "n" * 500
    assert mirror.data.tags["azdual.truncated_param.notes"] == "2000"


def test_long_param_dead_letter_option(rig, tmp_path):
    port = urllib.parse.urlsplit(rig.secondary_uri).port
    with PolicyProxy(port, "azureml") as proxy:
        uri = _azureml_uri(rig, proxy, tmp_path, param_overflow="dead_letter")
        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(client.create_experiment(unique_path()))
        client.log_param(run.info.run_id, "notes", "n" * 2000)
        client.log_param(run.info.run_id, "alpha", "0.5")
        assert mlflow_azdual.flush(timeout_s=60)
        spool = _get_store(uri).spool()
        spool.commit()
        dead = spool.counts()["secondary"]["dead_letters"]

    assert dead == 1
    assert _mirror(rig, run.info.run_id).data.params == {"alpha": "0.5"}


def test_params_over_run_cap_recorded(rig, tmp_path):
    primary, _ = backend_clients(rig)
    port = urllib.parse.urlsplit(rig.secondary_uri).port
    params = [Param(f"p{index:03d}", str(index)) for index in range(250)]
    with PolicyProxy(port, "azureml") as proxy:
        uri = _azureml_uri(rig, proxy, tmp_path)
        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(client.create_experiment(unique_path()))
        for start in range(0, 250, 100):
            client.log_batch(run.info.run_id, params=params[start : start + 100])
        client.log_metric(run.info.run_id, "after", 1.0)
        client.set_terminated(run.info.run_id)
        assert mlflow_azdual.flush(timeout_s=60)
        spool = _get_store(uri).spool()
        spool.commit()
        dead = spool.counts()["secondary"]["dead_letters"]

    assert len(primary.get_run(run.info.run_id).data.params) == 250
    mirror = _mirror(rig, run.info.run_id)
    assert sorted(mirror.data.params) == [param.key for param in params[:200]]
    assert dead == 50
    assert mirror.data.metrics == {"after": 1.0}
    assert mirror.info.status == "FINISHED"


def test_source_tags_set_again_after_create(rig, tmp_path):
    import mlflow

    primary, _ = backend_clients(rig)
    port = urllib.parse.urlsplit(rig.secondary_uri).port
    with PolicyProxy(port, "azureml") as proxy:
        mlflow.set_tracking_uri(_azureml_uri(rig, proxy, tmp_path))
        mlflow.set_experiment(unique_path())
        with mlflow.start_run() as run:
            mlflow.log_metric("loss", 0.5)
        assert mlflow_azdual.flush(timeout_s=60)
        assert proxy.stats()["dropped_tags"]  # the proxy did drop them at create_run

    primary_tags = primary.get_run(run.info.run_id).data.tags
    mirror_tags = _mirror(rig, run.info.run_id).data.tags
    for key in ("mlflow.source.name", "mlflow.source.type"):
        assert mirror_tags[key] == primary_tags[key]
    assert "mlflow.user" not in mirror_tags
