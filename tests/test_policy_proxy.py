"""The policy proxy's emulation of published Azure ML and Databricks limits.

One MLflow server with a SQLite store runs for the module, with an Azure ML and a Databricks
policy proxy in front of it. Each test checks one rule through a plain MlflowClient: the case
just inside the limit passes through, the case just outside gets the expected MLflow error.
These are emulations of limits reported in public sources, not the services themselves.
Reads that check what reached the server go to the server directly.
"""

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from rig.guard import GUARD_PATH
from rig.policy_proxy import PolicyProxy
from rig.processes import find_free_ports, mlflow_server_process
from rig.tls import write_certificates

EMULATION_GIST = "emulation of a published"
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def server_port(tmp_path_factory):
    directory = tmp_path_factory.mktemp("policy-proxy-server")
    (port,) = find_free_ports(1)
    server = mlflow_server_process(
        "policy-proxy-target",
        port,
        backend_store_uri=f"sqlite:///{directory / 'mlflow.db'}",
        artifact_root=str(directory / "artifacts"),
        log_path=directory / "server.log",
        cwd=directory,
        extra_env={
            "PYTHONPATH": str(GUARD_PATH),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        },
    )
    server.start()
    try:
        server.wait_ready(90)
        yield port
    finally:
        server.stop()


@pytest.fixture(scope="module")
def azureml(server_port):
    with PolicyProxy(server_port, "azureml") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def databricks(server_port):
    with PolicyProxy(server_port, "databricks") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def server(server_port):
    """A client of the server itself, to check what reached it."""
    return MlflowClient(tracking_uri=f"http://127.0.0.1:{server_port}")


@pytest.fixture
def azure_run(azureml, server):
    experiment_id = server.create_experiment(f"policy-{uuid.uuid4().hex}")
    client = MlflowClient(tracking_uri=azureml.uri)
    return client, client.create_run(experiment_id).info.run_id


def _http_get(url: str) -> tuple[int, dict, dict]:
    """Send a GET and return (status, JSON body, headers), also for error statuses."""
    try:
        with _DIRECT_OPENER.open(url, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def _http_post(url: str, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with _DIRECT_OPENER.open(request, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def _metrics(key: str, count: int) -> list[Metric]:
    now_ms = int(time.time() * 1000)
    return [Metric(key, float(step), now_ms, step) for step in range(count)]


def test_azureml_metric_values_per_key(azure_run, server):
    client, run_id = azure_run

    client.log_batch(run_id, metrics=_metrics("loss", 250))
    assert len(server.get_metric_history(run_id, "loss")) == 250

    with pytest.raises(MlflowException) as raised:
        client.log_batch(run_id, metrics=_metrics("accuracy", 251))
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert EMULATION_GIST in raised.value.message
    assert "accuracy" not in server.get_run(run_id).data.metrics


def test_azureml_params_per_run(azure_run, server):
    client, run_id = azure_run
    # MlflowClient splits params into requests of 100, so each request is checked against
    # the params already on the run.
    client.log_batch(run_id, params=[Param(f"p{i}", "v") for i in range(150)])
    client.log_batch(run_id, params=[Param(f"p{i}", "v") for i in range(150, 199)])
    client.log_param(run_id, "p199", "v")
    assert len(server.get_run(run_id).data.params) == 200

    # A key already on the run adds no param.
    client.log_param(run_id, "p0", "v")

    with pytest.raises(MlflowException) as raised:
        client.log_param(run_id, "p200", "v")
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert EMULATION_GIST in raised.value.message

    with pytest.raises(MlflowException) as raised:
        client.log_batch(run_id, params=[Param("p201", "v")])
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert len(server.get_run(run_id).data.params) == 200


def test_azureml_param_value_length(azure_run, server):
    client, run_id = azure_run

    client.log_param(run_id, "at_limit", "x" * 500)
    assert server.get_run(run_id).data.params["at_limit"] == "x" * 500

    with pytest.raises(MlflowException) as raised:
        client.log_param(run_id, "over_limit", "x" * 501)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert EMULATION_GIST in raised.value.message

    with pytest.raises(MlflowException) as raised:
        client.log_batch(run_id, params=[Param("over_limit_batch", "x" * 501)])
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "over_limit" not in server.get_run(run_id).data.params


def test_azureml_user_tag_rejected(azure_run, server):
    client, run_id = azure_run

    client.log_batch(run_id, tags=[RunTag("team", "vision")])
    assert server.get_run(run_id).data.tags["team"] == "vision"

    with pytest.raises(MlflowException) as raised:
        client.log_batch(run_id, tags=[RunTag("mlflow.user", "alice")])
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert EMULATION_GIST in raised.value.message

    with pytest.raises(MlflowException) as raised:
        client.set_tag(run_id, "mlflow.user", "alice")
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "mlflow.user" not in server.get_run(run_id).data.tags


def test_azureml_create_run_drops_source_tags(azureml, server):
    experiment_id = server.create_experiment(f"policy-{uuid.uuid4().hex}")
    client = MlflowClient(tracking_uri=azureml.uri)
    tags = {
        "mlflow.source.name": "train.py",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": "alice",
        "team": "vision",
    }

    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    created_tags = server.get_run(run_id).data.tags
    assert "mlflow.source.name" not in created_tags
    assert "mlflow.source.type" not in created_tags
    assert "mlflow.user" not in created_tags
    assert created_tags["team"] == "vision"

    client.set_tag(run_id, "mlflow.source.name", "train.py")
    client.set_tag(run_id, "mlflow.source.type", "LOCAL")
    later_tags = server.get_run(run_id).data.tags
    assert later_tags["mlflow.source.name"] == "train.py"
    assert later_tags["mlflow.source.type"] == "LOCAL"


def test_azureml_metric_history_page_size(azure_run, azureml):
    client, run_id = azure_run
    client.log_batch(run_id, metrics=_metrics("loss", 3))
    url = f"{azureml.uri}/api/2.0/mlflow/metrics/get-history"

    query = urllib.parse.urlencode({"run_id": run_id, "metric_key": "loss", "max_results": 999})
    status, body, _ = _http_get(f"{url}?{query}")
    assert status == 200
    assert len(body["metrics"]) == 3

    query = urllib.parse.urlencode({"run_id": run_id, "metric_key": "loss", "max_results": 1000})
    status, body, _ = _http_get(f"{url}?{query}")
    assert status == 400
    assert body["error_code"] == "BAD_REQUEST"
    assert EMULATION_GIST in body["message"]

    # MlflowClient requests pages of 25,000 (MLflow 3.17), so it fails behind this limit.
    with pytest.raises(MlflowException) as raised:
        client.get_metric_history(run_id, "loss")
    assert raised.value.error_code == "BAD_REQUEST"


def test_azureml_logged_models_missing(azureml, server):
    experiment_id = server.create_experiment(f"policy-{uuid.uuid4().hex}")
    server.create_logged_model(experiment_id, name="direct")

    client = MlflowClient(tracking_uri=azureml.uri)
    with pytest.raises(MlflowException) as raised:
        client.create_logged_model(experiment_id, name="through-proxy")
    assert raised.value.error_code == "ENDPOINT_NOT_FOUND"
    assert EMULATION_GIST in raised.value.message

    with pytest.raises(MlflowException) as raised:
        client.search_logged_models(experiment_ids=[experiment_id])
    assert raised.value.error_code == "ENDPOINT_NOT_FOUND"


def test_azureml_slash_experiment_hidden(azureml):
    client = MlflowClient(tracking_uri=azureml.uri)
    suffix = uuid.uuid4().hex
    plain_name = f"plain-{suffix}"
    slash_name = f"team/exp-{suffix}"

    plain_id = client.create_experiment(plain_name)
    slash_id = client.create_experiment(slash_name)

    assert client.get_experiment_by_name(plain_name).experiment_id == plain_id
    assert client.get_experiment_by_name(slash_name) is None
    assert client.get_experiment(slash_id).name == slash_name
    found_ids = {experiment.experiment_id for experiment in client.search_experiments()}
    assert plain_id in found_ids
    assert slash_id not in found_ids


def test_azureml_experiment_rename_missing(azureml, server):
    name = f"policy-{uuid.uuid4().hex}"
    experiment_id = server.create_experiment(name)

    client = MlflowClient(tracking_uri=azureml.uri)
    with pytest.raises(MlflowException) as raised:
        client.rename_experiment(experiment_id, name + "-renamed")
    assert raised.value.error_code == "ENDPOINT_NOT_FOUND"
    assert server.get_experiment(experiment_id).name == name


@pytest.mark.parametrize(
    "filter_string",
    [
        "tags.team = 'a' OR tags.team = 'b'",
        "tags.team != 'a'",
        "tags.`team` != 'a'",
        "tags.team LIKE 'a%'",
        "tags.team ILIKE 'a%'",
    ],
)
def test_azureml_search_filter_rejected(azure_run, server, filter_string):
    client, run_id = azure_run
    experiment_id = server.get_run(run_id).info.experiment_id

    with pytest.raises(MlflowException) as raised:
        client.search_runs([experiment_id], filter_string=filter_string)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert EMULATION_GIST in raised.value.message

    with pytest.raises(MlflowException) as raised:
        client.search_experiments(filter_string=filter_string)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize("order_by", ["metrics.loss DESC", "params.lr", "tags.team ASC"])
def test_azureml_search_order_by_rejected(azure_run, server, order_by):
    client, run_id = azure_run
    experiment_id = server.get_run(run_id).info.experiment_id

    with pytest.raises(MlflowException) as raised:
        client.search_runs([experiment_id], order_by=[order_by])
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert EMULATION_GIST in raised.value.message


def test_azureml_search_allowed_cases(azure_run, server):
    client, run_id = azure_run
    client.set_tag(run_id, "note", "this OR that")
    experiment_id = server.get_run(run_id).info.experiment_id

    for filter_string in ("tags.note = 'this OR that'", "tags.note = 'this OR that' AND "
                          "attributes.status != 'FAILED'"):
        runs = client.search_runs([experiment_id], filter_string=filter_string)
        assert [run.info.run_id for run in runs] == [run_id]
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])
    assert [run.info.run_id for run in runs] == [run_id]


def test_azureml_throttle_then_retry(azure_run, azureml, server):
    client, run_id = azure_run
    url = f"{azureml.uri}/api/2.0/mlflow/runs/log-batch"

    azureml.throttle(count=1, retry_after_s=1)
    status, body, headers = _http_post(url, {"run_id": run_id, "params": [{"key": "a", "value": "1"}]})
    assert status == 429
    assert body["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert headers["Retry-After"] == "1"
    assert "a" not in server.get_run(run_id).data.params

    # Only log-batch is throttled, so set-tag passes and the throttle stays pending.
    azureml.throttle(count=1, retry_after_s=1)
    client.set_tag(run_id, "team", "vision")
    assert azureml.stats()["throttle_pending"] == 1

    # MlflowClient retries a 429 after Retry-After.
    throttled_before = azureml.stats()["throttled"]
    started = time.monotonic()
    client.log_batch(run_id, params=[Param("a", "1")])
    elapsed_s = time.monotonic() - started
    assert elapsed_s >= 0.9
    assert azureml.stats()["throttled"] == throttled_before + 1
    assert server.get_run(run_id).data.params["a"] == "1"


def test_databricks_experiment_path_rule(databricks):
    client = MlflowClient(tracking_uri=databricks.uri)
    suffix = uuid.uuid4().hex

    for name in (f"plain-{suffix}", f"Shared/{suffix}", f"/Other/{suffix}"):
        with pytest.raises(MlflowException) as raised:
            client.create_experiment(name)
        assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
        assert "/Shared/" in raised.value.message
        assert EMULATION_GIST in raised.value.message

    for name in (f"/Shared/{suffix}", f"/Users/someone@example.com/{suffix}"):
        experiment_id = client.create_experiment(name)
        assert client.get_experiment_by_name(name).experiment_id == experiment_id


@pytest.mark.parametrize("prefix", ["/Workspace/Shared/", "//Shared/"])
def test_databricks_workspace_prefix_hidden(databricks, prefix):
    client = MlflowClient(tracking_uri=databricks.uri)
    name = f"{prefix}{uuid.uuid4().hex}"

    experiment_id = client.create_experiment(name)
    assert client.get_experiment(experiment_id).name == name
    assert client.get_experiment_by_name(name) is None

    with pytest.raises(MlflowException) as raised:
        client.create_experiment(name)
    assert raised.value.error_code == "RESOURCE_ALREADY_EXISTS"


def test_databricks_allows_azureml_limits(databricks, server):
    experiment_id = server.create_experiment(f"/Shared/{uuid.uuid4().hex}")
    client = MlflowClient(tracking_uri=databricks.uri)
    run_id = client.create_run(experiment_id, tags={"mlflow.source.name": "train.py"}).info.run_id

    client.log_batch(run_id, metrics=_metrics("loss", 251))
    client.log_param(run_id, "long", "x" * 501)
    client.create_logged_model(experiment_id, name="model")

    run = server.get_run(run_id)
    assert run.data.tags["mlflow.source.name"] == "train.py"
    assert run.data.params["long"] == "x" * 501
    assert len(client.get_metric_history(run_id, "loss")) == 251


AZUREML_PREFIX = (
    r"/mlflow/v2\.0/subscriptions/[^/]+/resourceGroups/[^/]+/providers/"
    r"Microsoft\.MachineLearningServices/workspaces/[^/]+"
)
WORKSPACE_PATH = (
    "/mlflow/v2.0/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/"
    "providers/Microsoft.MachineLearningServices/workspaces/ws"
)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return write_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def front_door(server_port, certificates):
    """An https Azure ML stand-in that wants a bearer token and the workspace path prefix."""
    with PolicyProxy(
        server_port,
        "azureml",
        tls=certificates,
        bearer_token="rig-test-token",
        strip_path_prefix=AZUREML_PREFIX,
    ) as proxy:
        yield proxy


def _https_get(url: str, authority, token: str | None) -> tuple[int, dict]:
    context = ssl.create_default_context(cafile=str(authority))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_front_door_serves_https_with_workspace_prefix(front_door, certificates, server):
    name = f"front-{uuid.uuid4().hex}"
    experiment_id = server.create_experiment(name)
    query = urllib.parse.urlencode({"experiment_name": name})
    url = f"{front_door.uri}{WORKSPACE_PATH}/api/2.0/mlflow/experiments/get-by-name?{query}"

    status, payload = _https_get(url, certificates.authority, "rig-test-token")

    assert front_door.uri.startswith("https://127.0.0.1:")
    assert status == 200
    assert payload["experiment"]["experiment_id"] == experiment_id
    assert front_door.stats()["routes"]["experiments/get-by-name"] == 1


@pytest.mark.parametrize("token", [None, "wrong-token", "rig-test-token-and-more"])
def test_front_door_rejects_wrong_bearer_token(front_door, certificates, token):
    before = front_door.stats()["unauthenticated"]
    url = f"{front_door.uri}{WORKSPACE_PATH}/api/2.0/mlflow/experiments/search?max_results=1"

    status, payload = _https_get(url, certificates.authority, token)

    assert status == 401
    assert payload["error_code"] == "UNAUTHENTICATED"
    assert front_door.stats()["unauthenticated"] == before + 1
    assert "rig-test-token" not in front_door.log_tail()


def test_front_door_certificate_checked_against_authority(front_door, tmp_path):
    other_authority = write_certificates(tmp_path).authority
    url = f"{front_door.uri}{WORKSPACE_PATH}/api/2.0/mlflow/experiments/search?max_results=1"

    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _https_get(url, other_authority, "rig-test-token")
