"""The dual artifact repository: uploads go to both backends, reads come from the primary.

It serves the ``azdual:`` artifact URIs that the dual tracking store returns. Uploads run on
both backends in parallel; a primary failure raises, a secondary failure is logged and never
raised. Listing and downloads read from the primary and fall back to the secondary when the
primary fails. Files are handed to each backend's own repository, which streams them.
"""

import concurrent.futures
import logging

from mlflow.store.artifact.artifact_repo import ArtifactRepository

from mlflow_azdual import artifact_uri as dual_uri
from mlflow_azdual import compat
from mlflow_azdual.mirror import Mirror

_logger = logging.getLogger(__name__)


def build_artifact_repository(artifact_uri, tracking_uri=None, registry_uri=None, **_):
    """Build the repository for a dual artifact URI (MLflow's ``mlflow.artifact_repository``).

    MLflow passes ``artifact_uri`` alone up to 3.1, ``tracking_uri=`` from 3.2 and
    ``registry_uri=`` from 3.5; further keywords are accepted for later versions.
    """
    return DualArtifactRepository(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)


def _backend_tracking_uris(tracking_uri):
    """Return the primary and secondary tracking URIs behind an azdual tracking URI, if any."""
    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    if not str(tracking_uri).startswith("azdual:"):
        return None, None
    from mlflow_azdual.uri import parse_tracking_uri

    config = parse_tracking_uri(tracking_uri)
    return config.primary_uri, config.secondary_uri


class DualArtifactRepository(ArtifactRepository):
    """Artifact repository over the primary and secondary roots of one dual artifact URI."""

    def __init__(self, artifact_uri, tracking_uri=None, registry_uri=None, **_):
        compat.artifact_repository_base_init(self, artifact_uri, tracking_uri, registry_uri)
        roots = dual_uri.resolve(artifact_uri)
        primary_tracking_uri, secondary_tracking_uri = _backend_tracking_uris(tracking_uri)

        primary_root = roots.primary
        if primary_tracking_uri:
            primary_root = compat.add_databricks_profile(primary_root, primary_tracking_uri)
        self.primary = compat.build_artifact_repository(primary_root, primary_tracking_uri)
        self.secondary = None
        if roots.secondary:
            self.secondary = compat.build_artifact_repository(roots.secondary, secondary_tracking_uri)
        self.mirror = Mirror(roots.secondary or "secondary artifact store")

    def _upload(self, operation, upload_primary, upload_secondary):
        if self.secondary is None:
            return upload_primary(self.primary)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            secondary_done = pool.submit(
                self.mirror.send, operation, None, lambda: upload_secondary(self.secondary)
            )
            try:
                return upload_primary(self.primary)
            finally:
                secondary_done.result()

    def log_artifact(self, local_file, artifact_path=None):
        def upload(repository):
            return repository.log_artifact(local_file, artifact_path)

        return self._upload("log_artifact", upload, upload)

    def log_artifacts(self, local_dir, artifact_path=None):
        def upload(repository):
            return repository.log_artifacts(local_dir, artifact_path)

        return self._upload("log_artifacts", upload, upload)

    def _read(self, operation, read):
        try:
            return read(self.primary)
        except Exception as primary_error:
            if self.secondary is None:
                raise
            try:
                result = read(self.secondary)
            except Exception:
                # Missing on both sides (MLflow probes optional files this way): the primary's
                # error is the one the caller expects.
                raise primary_error from None
            _logger.warning(
                "mlflow-azdual: %s failed on the primary artifact store (%s: %s); the "
                "secondary's copy was used",
                operation,
                type(primary_error).__name__,
                str(primary_error).splitlines()[0][:300],
            )
            return result

    def list_artifacts(self, path=None):
        return self._read("list_artifacts", lambda repository: repository.list_artifacts(path))

    def download_artifacts(self, artifact_path, dst_path=None):
        return self._read(
            "download_artifacts",
            lambda repository: repository.download_artifacts(artifact_path, dst_path),
        )

    def _download_file(self, remote_file_path, local_path):
        return self._read(
            "download_file",
            lambda repository: repository._download_file(remote_file_path, local_path),
        )

    def delete_artifacts(self, artifact_path=None):
        self.primary.delete_artifacts(artifact_path)
        if self.secondary is not None:
            self.mirror.send(
                "delete_artifacts", None, lambda: self.secondary.delete_artifacts(artifact_path)
            )
