"""Dual artifact URIs survive MLflow's own path handling and resolve to both roots."""

import posixpath

from mlflow.tracking.artifact_utils import _get_root_uri_and_artifact_path
from mlflow.utils.uri import append_to_uri_path

from mlflow_azdual.artifact_uri import (
    is_dual_artifact_uri,
    make_dual_artifact_uri,
    primary_part,
    resolve,
    secondary_part,
)

PRIMARY = "s3://primary-bucket/1/abc/artifacts"
SECONDARY = "wasbs://artifacts@devstoreaccount1.blob.core.windows.net/2/def/artifacts"


def test_root_resolves_to_both_roots():
    uri = make_dual_artifact_uri(PRIMARY, SECONDARY)
    assert is_dual_artifact_uri(uri)
    assert resolve(uri)[:2] == (PRIMARY, SECONDARY)


def test_appended_paths_reach_both_roots():
    uri = append_to_uri_path(make_dual_artifact_uri(PRIMARY, SECONDARY), "model")
    uri = append_to_uri_path(uri, "sub/MLmodel")
    roots = resolve(uri)
    assert roots.primary == PRIMARY + "/model/sub/MLmodel"
    assert roots.secondary == SECONDARY + "/model/sub/MLmodel"


def test_download_split_keeps_roots():
    uri = append_to_uri_path(make_dual_artifact_uri(PRIMARY, SECONDARY), "model/MLmodel")
    root, artifact_path = _get_root_uri_and_artifact_path(uri)
    assert artifact_path == "MLmodel"
    assert resolve(root)[:2] == (PRIMARY + "/model", SECONDARY + "/model")


def test_string_concatenation_reaches_both_roots():
    uri = make_dual_artifact_uri(PRIMARY, SECONDARY).rstrip("/") + "/model/MLmodel"
    assert resolve(uri)[:2] == (PRIMARY + "/model/MLmodel", SECONDARY + "/model/MLmodel")
    joined = posixpath.join(make_dual_artifact_uri(PRIMARY, SECONDARY), "model")
    assert resolve(joined)[:2] == (PRIMARY + "/model", SECONDARY + "/model")


def test_deferred_mirror_form():
    uri = append_to_uri_path(make_dual_artifact_uri(PRIMARY, mirror_of="run:abc"), "model")
    roots = resolve(uri)
    assert roots.primary == PRIMARY + "/model"
    assert roots.secondary is None
    assert roots.mirror_of == "run:abc"
    assert roots.sub_path == "model"


def test_tracking_uri_is_not_an_artifact_uri():
    assert not is_dual_artifact_uri("azdual://westeurope.api.azureml.ms/mlflow/v1.0/x")
    assert not is_dual_artifact_uri("s3://bucket/path")


def test_local_roots_join_as_paths():
    uri = append_to_uri_path(make_dual_artifact_uri("/tmp/p/artifacts", "/tmp/s/a"), "m")
    assert resolve(uri)[:2] == ("/tmp/p/artifacts/m", "/tmp/s/a/m")


def test_without_secondary_the_primary_uri_is_kept():
    assert make_dual_artifact_uri(PRIMARY, None) == PRIMARY
    assert primary_part(PRIMARY) == PRIMARY
    assert secondary_part(PRIMARY) is None


def test_parts_of_dual_uri():
    uri = make_dual_artifact_uri(PRIMARY, SECONDARY)
    assert primary_part(uri) == PRIMARY
    assert secondary_part(uri) == SECONDARY
