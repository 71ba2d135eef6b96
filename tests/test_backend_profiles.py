"""Requests shaped by the secondary's backend profile, against the Azure ML policy proxy.

The proxy (rig/policy_proxy.py) emulates Azure ML's published limits in front of the rig's
secondary server: 250 values of one metric key per log_batch request, 200 params per run,
param values of 500 characters, the refused and dropped run tags, and a metric-history page
size under 1,000. These are emulations of published limits, not the service. The rig has no
artifact-batch endpoint, so the limit of 100 files per artifact upload batch is checked by
counting the files of each call that reaches the secondary's artifact repository.
"""

import os
import posixpath
import time
import urllib.parse

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.store.artifact.azure_blob_artifact_repo import AzureBlobArtifactRepository
from mlflow.tracking._tracking_service.utils import _get_store

import mlflow_azdual
from mlflow_azdual import delivery, rest_batch
from mlflow_azdual.artifact_repository import staging_root
from mlflow_azdual.backend_profiles import PROFILES, profile_for
from mlflow_azdual.retry import RateLimitedLogger
from mlflow_azdual.uri import explicit_tracking_uri
from rig.latency_proxy import LatencyProxy
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


def test_raised_param_cap_by_option(rig, tmp_path):
    """A service that raised its limit: secondary_limits lifts the profile's cap, and the
    policy proxy, started with the same new limit, accepts every param."""
    import json

    primary, _ = backend_clients(rig)
    port = urllib.parse.urlsplit(rig.secondary_server_uri).port
    params = [Param(f"p{index:03d}", str(index)) for index in range(250)]
    with PolicyProxy(port, "azureml", limits={"max_params_per_run": 300}) as proxy:
        uri = explicit_tracking_uri(
            rig.primary_uri, proxy.uri, secondary_profile="azureml",
            secondary_limits=json.dumps({"max_params_per_run": 300}),
            spool_dir=str(tmp_path / "spool"), flush_interval_s=0.2,
        )
        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(client.create_experiment(unique_path()))
        for start in range(0, 250, 100):
            client.log_batch(run.info.run_id, params=params[start : start + 100])
        assert _get_store(uri).flush(timeout_s=60)
        rejected = proxy.stats()["rejected"]

    assert _get_store(uri).secondary_profile.max_params_per_run == 300
    assert len(_mirror(rig, run.info.run_id).data.params) == 250
    assert len(primary.get_run(run.info.run_id).data.params) == 250
    assert rejected == {}


@pytest.mark.parametrize(
    "value, message",
    [
        ('{"max_params_per_run": 0}', "'max_params_per_run' must be an integer greater than 0"),
        ('{"max_param_per_run": 300}', "unknown profile field 'max_param_per_run'"),
        ('{"max_metrics": null}', "'max_metrics' must be an integer greater than 0, got None"),
        ('{"logged_models": "no"}', "'logged_models' must be true or false"),
        ("[300]", "expected a JSON object"),
    ],
)
def test_limits_option_rejects_bad_value(value, message):
    from mlflow.exceptions import MlflowException

    from mlflow_azdual.uri import parse_tracking_uri

    uri = explicit_tracking_uri("http://127.0.0.1:1", "http://127.0.0.1:2")
    with pytest.raises(MlflowException) as raised:
        parse_tracking_uri(uri + "&secondary_limits=" + urllib.parse.quote(value))
    assert "secondary_limits" in raised.value.message
    assert message in raised.value.message


def test_limits_option_replaces_profile_fields():
    from mlflow_azdual.backend_profiles import parse_overrides

    overrides = parse_overrides(
        '{"max_values_per_metric_key": null, "max_params_per_run": 400, "refused_tags": []}'
    )
    profile = profile_for("http://127.0.0.1:1", "azureml", overrides)

    assert profile.limits.max_values_per_metric_key is None
    assert profile.max_params_per_run == 400
    assert profile.refused_tags == frozenset()
    assert profile.max_param_value_chars == PROFILES["azureml"].max_param_value_chars
    assert PROFILES["azureml"].max_params_per_run == 200


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


@pytest.fixture
def own_retry_warnings(monkeypatch):
    """Give the test its own rate limit of retry warnings.

    Retry warnings are rate-limited per backend and operation for the whole process, so the
    retries this test causes would otherwise silence the warnings later tests expect.
    """
    monkeypatch.setattr(delivery, "_rate_limited", RateLimitedLogger(delivery._logger))


def _dead_letters(uri):
    spool = _get_store(uri).spool()
    spool.commit()
    return spool.counts()["secondary"]["dead_letters"]


# Artifact upload batches

ARTIFACT_FILES = 150


def _write_tree(root, count):
    """Write ``count`` small files in nested folders under ``root`` and return them by path."""
    files = {}
    for index in range(count):
        relative = os.path.join(f"group{index % 3}", f"part{index % 4}", f"file{index:03d}.txt")
        content = f"file {index}\n".encode() * (index + 1)
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        files[relative] = content
    return files


def _read_tree(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as file:
                files[os.path.relpath(path, root)] = file.read()
    return files


def _count_files(local_dir):
    return sum(len(names) for _, _, names in os.walk(local_dir))


@pytest.fixture
def azureml_artifacts(rig, tmp_path):
    """Set MLflow's tracking URI to a dual URI with the azureml secondary profile for the test."""
    previous_tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = explicit_tracking_uri(
        rig.primary_uri, rig.secondary_uri, secondary_profile="azureml",
        spool_dir=str(tmp_path / "spool"), flush_interval_s=0.2, retry_initial_backoff_s=0.2,
    )
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(unique_path())
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous_tracking_uri)


def _assert_both_stores_have(rig, run_id, files, tmp_path):
    primary, secondary = backend_clients(rig)
    mirror_id = secondary_run_id(primary, run_id)
    on_primary = primary.download_artifacts(run_id, "tree", str(tmp_path / "primary"))
    on_secondary = secondary.download_artifacts(mirror_id, "tree", str(tmp_path / "secondary"))
    assert _read_tree(on_primary) == files
    assert _read_tree(on_secondary) == files


def test_artifact_upload_split_for_azureml(rig, tmp_path, monkeypatch, azureml_artifacts):
    files = _write_tree(tmp_path / "tree", ARTIFACT_FILES)
    # Files of each log_artifacts call that reaches the secondary's Azurite repository. Azurite
    # accepts any number of files, so this count checks the limit of 100 files per batch, not
    # a service.
    files_per_call = []
    real_log_artifacts = AzureBlobArtifactRepository.log_artifacts

    def counting_log_artifacts(self, local_dir, artifact_path=None):
        files_per_call.append(_count_files(local_dir))
        return real_log_artifacts(self, local_dir, artifact_path)

    monkeypatch.setattr(AzureBlobArtifactRepository, "log_artifacts", counting_log_artifacts)

    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "tree"), artifact_path="tree")
    assert mlflow_azdual.flush(timeout_s=120)

    assert files_per_call == [100, 50]
    _assert_both_stores_have(rig, run.info.run_id, files, tmp_path)
    assert os.listdir(staging_root(_get_store(azureml_artifacts))) == []


def test_artifact_chunk_failure_retried_whole(
    rig, tmp_path, monkeypatch, azureml_artifacts, own_retry_warnings
):
    files = _write_tree(tmp_path / "tree", ARTIFACT_FILES)
    files_per_call = []
    real_log_artifacts = AzureBlobArtifactRepository.log_artifacts

    def failing_second_call(self, local_dir, artifact_path=None):
        files_per_call.append(_count_files(local_dir))
        if len(files_per_call) == 2:
            # Uploads one folder of the chunk, then fails as a dropped connection does.
            folder = sorted(os.listdir(local_dir))[0]
            real_log_artifacts(
                self, os.path.join(local_dir, folder), posixpath.join(artifact_path, folder)
            )
            raise ConnectionResetError("connection reset during the second chunk (injected)")
        return real_log_artifacts(self, local_dir, artifact_path)

    monkeypatch.setattr(AzureBlobArtifactRepository, "log_artifacts", failing_second_call)

    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "tree"), artifact_path="tree")
    assert mlflow_azdual.flush(timeout_s=120)

    # The retry sends both chunks again.
    assert files_per_call == [100, 50, 100, 50]
    _assert_both_stores_have(rig, run.info.run_id, files, tmp_path)
    assert os.listdir(staging_root(_get_store(azureml_artifacts))) == []


# Metric-history pages

def test_uncertain_retry_pages_history(rig, tmp_path, monkeypatch, own_retry_warnings):
    primary, secondary = backend_clients(rig)
    port = urllib.parse.urlsplit(rig.secondary_uri).port
    with PolicyProxy(port, "azureml") as policy, LatencyProxy(policy.port) as faults:
        uri = explicit_tracking_uri(
            rig.primary_uri, faults.uri, secondary_profile="azureml",
            spool_dir=str(tmp_path / "spool"), flush_interval_s=60, retry_initial_backoff_s=0.2,
        )
        client = MlflowClient(tracking_uri=uri)
        store = _get_store(uri)
        run_id = client.create_run(client.create_experiment(unique_path())).info.run_id
        base_ms = int(time.time() * 1000)
        points = [Metric("loss", step / 1000, base_ms + step, step) for step in range(1400)]
        for start in range(0, 1200, 400):
            client.log_batch(run_id, metrics=points[start : start + 400])
        assert store.flush(timeout_s=120)

        # The proxy forwards a get-history request without max_results, and the server then
        # returns the whole history, so the page sizes are recorded here.
        page_sizes = []
        real_history = store.secondary.get_metric_history

        def recording_history(history_run_id, metric_key, max_results=None, page_token=None):
            page_sizes.append(max_results)
            return real_history(
                history_run_id, metric_key, max_results=max_results, page_token=page_token
            )

        monkeypatch.setattr(store.secondary, "get_metric_history", recording_history)
        # The rig's SQL store skips a point identical to one it has, so the points sent show
        # whether the retry sent any again.
        points_sent = []
        real_log_batch = rest_batch.log_batch

        def recording_log_batch(target, batch_run_id, metrics, params, tags):
            if target is store.secondary:
                points_sent.extend(metrics)
            return real_log_batch(target, batch_run_id, metrics, params, tags)

        monkeypatch.setattr(rest_batch, "log_batch", recording_log_batch)

        # The server stores the next log_batch, but the client sees the connection reset, so
        # the retry first reads the 1,400 points the mirror already has.
        client.log_batch(run_id, metrics=points[1200:])
        faults.reset_after_forward(count=1)
        assert store.flush(timeout_s=120)
        resets = faults.stats()["faults_applied"]["reset_after_forward"]
        rejected = policy.stats()["rejected"]

    assert resets == 1
    assert rejected == {}
    assert page_sizes == [999, 999]
    assert len(points_sent) == 200, "points sent to the secondary after the first 1,200"
    mirror_points = metric_points(secondary, secondary_run_id(primary, run_id), "loss")
    assert len(mirror_points) == 1400
    assert mirror_points == metric_points(primary, run_id, "loss")


# Runs copied from the primary

def test_copied_run_fits_azureml_limits(rig, tmp_path):
    primary, secondary = backend_clients(rig)
    experiment_id = primary.create_experiment(unique_path())
    tags = {"mlflow.user": "alice", "mlflow.source.name": "train.py", "mlflow.source.type": "LOCAL"}
    run_id = primary.create_run(experiment_id, tags=tags).info.run_id
    params = [Param(f"param{index:03d}", str(index)) for index in range(250)]
    params[7] = Param("param007", "v" * 2000)
    for start in range(0, 250, 100):
        primary.log_batch(run_id, params=params[start : start + 100])
    base_ms = int(time.time() * 1000)
    primary.log_batch(
        run_id, metrics=[Metric("loss", step / 1000, base_ms + step, step) for step in range(700)]
    )

    port = urllib.parse.urlsplit(rig.secondary_uri).port
    with PolicyProxy(port, "azureml") as proxy:
        uri = _azureml_uri(rig, proxy, tmp_path)
        MlflowClient(tracking_uri=uri).log_metric(run_id, "loss", 0.5, base_ms + 700, step=700)
        assert mlflow_azdual.flush(timeout_s=120)
        stats = proxy.stats()
        dead = _dead_letters(uri)

    assert stats["rejected"] == {}
    # The proxy dropped the source tags at create_run, so the copy set them again.
    assert stats["dropped_tags"] == {"mlflow.source.name": 1, "mlflow.source.type": 1}
    mirror = _mirror(rig, run_id)
    expected_params = {param.key: param.value for param in params[:200]}
    expected_params["param007"] = "v" * 500
    assert mirror.data.params == expected_params
    assert mirror.data.tags["azdual.truncated_param.param007"] == "2000"
    assert dead == 50
    assert "mlflow.user" not in mirror.data.tags
    assert mirror.data.tags["mlflow.source.name"] == "train.py"
    assert mirror.data.tags["mlflow.source.type"] == "LOCAL"
    mirror_points = metric_points(secondary, mirror.info.run_id, "loss")
    assert len(mirror_points) == 701
    assert mirror_points == metric_points(primary, run_id, "loss")
