"""The azdual tracking URI: the three forms, the helper, and the errors for malformed URIs."""

import urllib.parse

import pytest
from mlflow.exceptions import MlflowException

from mlflow_azdual.uri import (
    explicit_tracking_uri,
    parse_tracking_uri,
    redact_uri,
    tracking_uri,
)

WORKSPACE_PATH = (
    "/mlflow/v1.0/subscriptions/0000-1111/resourceGroups/rg-ml"
    "/providers/Microsoft.MachineLearningServices/workspaces/ws-churn"
)
AZUREML_URI = f"azureml://westeurope.api.azureml.ms{WORKSPACE_PATH}"
SECRET = "dapi0123456789abcdef"


def error_message(uri, environ=None):
    with pytest.raises(MlflowException) as raised:
        parse_tracking_uri(uri, environ or {})
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    return raised.value.message


def test_linked_workspace_form_default_profile():
    config = parse_tracking_uri(f"azdual://westeurope.api.azureml.ms{WORKSPACE_PATH}", {})
    assert config.primary_uri == "databricks"
    assert config.secondary_uri == AZUREML_URI


def test_linked_workspace_form_with_profile():
    uri = f"azdual://westeurope.api.azureml.ms{WORKSPACE_PATH}?databricks_profile=prod"
    config = parse_tracking_uri(uri, {})
    assert config.primary_uri == "databricks://prod"
    assert config.secondary_uri == AZUREML_URI


def test_linked_workspace_profile_from_environment():
    uri = f"azdual://westeurope.api.azureml.ms{WORKSPACE_PATH}"
    config = parse_tracking_uri(uri, {"MLFLOW_AZDUAL_DATABRICKS_PROFILE": "staging"})
    assert config.primary_uri == "databricks://staging"


def test_linked_workspace_passes_foreign_query_to_azureml():
    uri = f"azdual://westeurope.api.azureml.ms{WORKSPACE_PATH}?databricks_profile=p&is-remote=1"
    config = parse_tracking_uri(uri, {})
    assert config.secondary_uri == f"{AZUREML_URI}?is-remote=1"


def test_explicit_form():
    uri = explicit_tracking_uri("http://127.0.0.1:5001", "http://127.0.0.1:5002")
    config = parse_tracking_uri(uri, {})
    assert config.primary_uri == "http://127.0.0.1:5001"
    assert config.secondary_uri == "http://127.0.0.1:5002"
    assert config.primary_registry_uri == "http://127.0.0.1:5001"


def test_bare_form_reads_environment():
    environ = {
        "MLFLOW_AZDUAL_PRIMARY_URI": "databricks://dev",
        "MLFLOW_AZDUAL_SECONDARY_URI": AZUREML_URI,
    }
    for uri in ("azdual:", "azdual://"):
        config = parse_tracking_uri(uri, environ)
        assert config.primary_uri == "databricks://dev"
        assert config.secondary_uri == AZUREML_URI


def test_query_option_overrides_environment():
    uri = explicit_tracking_uri(
        "http://127.0.0.1:1", "http://127.0.0.1:2", experiment_name_template="{path}"
    )
    config = parse_tracking_uri(uri, {"MLFLOW_AZDUAL_EXPERIMENT_NAME_TEMPLATE": "{parent}"})
    assert config.options["experiment_name_template"] == "{path}"


def test_registry_uri_options():
    uri = explicit_tracking_uri(
        "databricks://p", AZUREML_URI, primary_registry_uri="databricks-uc://p"
    )
    config = parse_tracking_uri(uri, {})
    assert config.primary_registry_uri == "databricks-uc://p"
    assert config.secondary_registry_uri == AZUREML_URI


def test_tracking_uri_helper_from_string():
    uri = tracking_uri(AZUREML_URI, databricks_profile="prod")
    config = parse_tracking_uri(uri, {})
    assert uri.startswith("azdual://westeurope.api.azureml.ms/mlflow/v1.0/")
    assert config.primary_uri == "databricks://prod"
    assert config.secondary_uri == AZUREML_URI


def test_tracking_uri_helper_from_workspace():
    class Workspace:
        def get_mlflow_tracking_uri(self):
            return AZUREML_URI

    config = parse_tracking_uri(tracking_uri(Workspace()), {})
    assert config.secondary_uri == AZUREML_URI
    assert config.primary_uri == "databricks"


def test_tracking_uri_helper_rejects_other_schemes():
    with pytest.raises(MlflowException, match="expected azureml://"):
        tracking_uri("http://127.0.0.1:5000")
    with pytest.raises(MlflowException, match="pass an azureml-core Workspace"):
        tracking_uri(42)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("azdual://host.example/not/a/workspace", "is not an Azure ML workspace path"),
        ("azdual:?primary=http%3A%2F%2F127.0.0.1%3A1", "the secondary backend is missing"),
        ("azdual:", "the primary backend is missing"),
        ("azdual:?primary=ftp%3A%2F%2Fx&secondary=http%3A%2F%2F127.0.0.1", "scheme 'ftp'"),
        ("azdual:?primary=azdual%3A&secondary=http%3A%2F%2F127.0.0.1", "cannot contain another"),
        ("azdual:?primary=http%3A%2F%2Fa&secondary=http%3A%2F%2Fa%2F", "the same backend"),
        ("azdual:?primary=http%3A%2F%2Fa&secondary=http%3A%2F%2Fb&flush=1", "unknown option(s) flush"),
        ("azdual:?primary=http%3A%2F%2Fa&primary=http%3A%2F%2Fb", "more than once"),
        ("azdual:/some/path", "unexpected path"),
        ("azdual:?primary=http%3A%2F%2Fa&secondary=http%3A%2F%2Fb&mirror_registry=maybe",
         "invalid value for query option mirror_registry"),
        (f"azdual://h.example{WORKSPACE_PATH}?primary=http%3A%2F%2Fa", "has no host"),
        ("azdual:?primary=http%3A%2F%2Fa&secondary=http%3A%2F%2Fb&flush_interval_s=abc",
         "flush_interval_s: expected a number greater than 0, got 'abc'"),
        ("azdual:?primary=http%3A%2F%2Fa&secondary=http%3A%2F%2Fb&max_batch_tags=1.5",
         "max_batch_tags: expected an integer greater than 0, got '1.5'"),
        ("azdual:?primary=http%3A%2F%2Fa&secondary=http%3A%2F%2Fb&experiment_name_template=%7Bfoo%7D",
         "invalid experiment_name_template '{foo}'"),
        ("azdual:?primary=http%3A%2F%2Fa&secondary=http%3A%2F%2Fb&experiment_name_template=%7Bleaf.x%7D",
         "use the fields {leaf}, {parent} and {path}"),
    ],
)
def test_malformed_uri_names_the_wrong_part(uri, expected):
    assert expected in error_message(uri)


def test_error_never_echoes_token_in_query():
    uri = f"azdual://h.example/wrong/path?token={SECRET}&databricks_profile=p"
    message = error_message(uri)
    assert SECRET not in message
    assert "token=***" in message


def test_error_never_echoes_token_in_sub_uri():
    primary = f"https://user:{SECRET}@127.0.0.1:1/?access_token={SECRET}"
    uri = "azdual:?" + urllib.parse.urlencode({"primary": primary, "secondary": "ftp://x"})
    message = error_message(uri)
    assert SECRET not in message
    assert "ftp" in message


def test_redact_uri_hides_user_info_and_secret_keys():
    redacted = redact_uri(f"https://me:{SECRET}@h.example/p?sig={SECRET}&name=x")
    assert SECRET not in redacted
    assert redacted == "https://***@h.example/p?sig=***&name=x"
