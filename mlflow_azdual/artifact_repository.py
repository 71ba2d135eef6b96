"""The dual artifact repository: uploads go to both backends, reads come from the primary.

It serves the ``azdual:`` artifact URIs that the dual tracking store returns. An upload goes
to the primary synchronously, so its error raises at the call site. The secondary upload is
queued on the dual tracking store's secondary queue, after the writes that create the run
or model it belongs to. The files are first copied into the spool's ``artifacts`` folder (a
temporary folder with the spool off), because MLflow often deletes its temporary folder as soon
as ``log_artifact`` returns, and a backend that is down gets them later, from this process or
from a replay. The copies are capped at ``spool_max_artifact_bytes``: an upload over the cap
raises in strict mode and is otherwise recorded as a dead letter with a warning. Other
secondary failures are retried and logged, and raised only in strict mode; a failed copy is
only logged. A directory upload with more files than the secondary's profile takes in one batch
(``max_artifact_files_per_batch``) is sent to it as several ``log_artifacts`` calls. Listing and
downloads read from the primary and fall back to the secondary when the primary fails, except
for a model folder that only the secondary keeps in the run's artifacts (a logged model on the
primary): there the primary's error is raised, and MLflow reads the logged model instead.
"""

import os
import posixpath
import shutil
import tempfile
import uuid

from mlflow.store.artifact.artifact_repo import ArtifactRepository

from mlflow_azdual import artifact_uri as dual_uri
from mlflow_azdual import compat, model_as_run_artifacts
from mlflow_azdual.logs import get_logger
from mlflow_azdual.mirror import Mirror

_logger = get_logger(__name__)

def build_artifact_repository(artifact_uri, tracking_uri=None, registry_uri=None, **_):
    """Build the repository for a dual artifact URI (MLflow's ``mlflow.artifact_repository``).

    MLflow passes ``artifact_uri`` alone up to 3.1, ``tracking_uri=`` from 3.2 and
    ``registry_uri=`` from 3.5; further keywords are accepted for later versions.
    """
    return DualArtifactRepository(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)


def _dual_tracking_store(tracking_uri):
    """Return the dual tracking store of ``tracking_uri`` (or the active URI), if it is azdual."""
    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    if not str(tracking_uri).startswith("azdual:"):
        return None
    from mlflow.tracking._tracking_service.utils import _get_store

    return _get_store(tracking_uri)


class DualArtifactRepository(ArtifactRepository):
    """Artifact repository over the primary and secondary locations of one dual artifact URI."""

    def __init__(self, artifact_uri, tracking_uri=None, registry_uri=None, **_):
        compat.artifact_repository_base_init(self, artifact_uri, tracking_uri, registry_uri)
        self.roots = dual_uri.resolve(artifact_uri)
        self.store = _dual_tracking_store(tracking_uri)
        config = self.store.config if self.store is not None else None

        primary_root = self.roots.primary
        if config is not None:
            primary_root = compat.add_databricks_profile(primary_root, config.primary_uri)
        self.primary = compat.build_artifact_repository(
            primary_root, config.primary_uri if config else None
        )
        self._secondary = None
        self.mirror = self.store.mirror if self.store is not None else Mirror("secondary")

    @property
    def secondary(self):
        """The secondary repository, resolving a ``mirror_of`` location on first use."""
        if self._secondary is None:
            root = self.roots.secondary
            if root is None and self.roots.mirror_of and self.store is not None:
                base = self.store.secondary_artifact_root(self.roots.mirror_of)
                root = dual_uri.join(base, self.roots.sub_path)
            if root is None:
                return None
            if self.store is None:
                self._secondary = compat.build_artifact_repository(root)
            else:
                self._secondary = compat.build_artifact_repository(
                    root, self.store.config.secondary_uri, tracking_store=self.store.secondary
                )
        return self._secondary

    def _has_secondary(self) -> bool:
        return bool(self.roots.secondary or self.roots.mirror_of)

    def _mirror_upload(self, operation, local_path, artifact_path):
        """Queue the secondary upload of a staged copy of ``local_path``."""
        if not self._has_secondary():
            return
        run_id = self.roots.mirror_of.split(":", 1)[1] if self.roots.mirror_of else None
        if self.store is None:
            # No dual tracking store to queue on: upload now, logging a failure.
            self.mirror.send(
                operation, run_id, lambda: _upload(self.secondary, operation, local_path, artifact_path)
            )
            return
        staged = self._stage(operation, run_id, local_path)
        if staged is not None:
            self.store.enqueue_secondary(
                _OPERATION_PREFIX + operation, run_id, artifact_uri=self.artifact_uri,
                staged_path=staged, artifact_path=artifact_path,
            )

    def _stage(self, operation, run_id, local_path):
        """Copy ``local_path`` under the staging root; return the copy's path or None."""
        from mlflow.exceptions import MlflowException

        root = staging_root(self.store)
        size = _size_bytes(local_path)
        cap = self.store.config.options["spool_max_artifact_bytes"]
        staged_bytes = _size_bytes(root)
        if size + staged_bytes > cap:
            reason = (
                f"{local_path} ({size} bytes) does not fit in the spool's artifact copies "
                f"({staged_bytes} of spool_max_artifact_bytes={cap} bytes in use)"
            )
            if self.store.config.options["strict"]:
                raise MlflowException(
                    f"mlflow-azdual (strict mode): the primary has the artifact, but {reason}, so "
                    "it cannot be queued for the secondary. Raise spool_max_artifact_bytes, or "
                    "wait for the secondary to catch up (mlflow-azdual status)."
                )
            self.store.record_dead_letter(
                "secondary", _OPERATION_PREFIX + operation, run_id,
                {"artifact_uri": self.artifact_uri, "local_path": local_path}, reason,
            )
            _logger.warning(
                "mlflow-azdual: artifact not mirrored to the secondary and recorded as a dead "
                "letter: %s. Raise spool_max_artifact_bytes to mirror uploads this large.", reason,
            )
            return None
        staging = os.path.join(root, uuid.uuid4().hex)
        staged = os.path.join(staging, os.path.basename(os.path.normpath(local_path)))
        try:
            os.makedirs(staging, mode=0o700)
            if os.path.isdir(local_path):
                shutil.copytree(local_path, staged)
            else:
                shutil.copy2(local_path, staged)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            _logger.warning(
                "mlflow-azdual: copying %s for the secondary upload failed, so it was not "
                "mirrored: operation=%s run_id=%s error=%s",
                local_path, operation, run_id or "-", error,
            )
            return None
        return staged

    def log_artifact(self, local_file, artifact_path=None):
        self.primary.log_artifact(local_file, artifact_path)
        self._mirror_upload("log_artifact", local_file, artifact_path)

    def log_artifacts(self, local_dir, artifact_path=None):
        self.primary.log_artifacts(local_dir, artifact_path)
        self._mirror_upload("log_artifacts", local_dir, artifact_path)

    def _read(self, operation, read, path=None):
        try:
            return read(self.primary)
        except Exception as primary_error:
            if path is not None and self._model_only_on_secondary(path):
                # MLflow 3 looks for a model in the run's folder before its logged model. The
                # secondary's copy of the run contains the model that the primary keeps as a
                # logged model, so the secondary is not read here and MLflow goes on to the
                # primary's logged model.
                raise
            try:
                secondary = self.secondary if self._has_secondary() else None
                if secondary is None:
                    raise primary_error
                result = read(secondary)
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

    def _model_only_on_secondary(self, path) -> bool:
        """Return True if the top folder of ``path`` is a model folder on the secondary only.

        That is a model which the secondary keeps as run artifacts because it has no
        logged-model API. The primary lists this location but has no such folder.
        """
        top = str(path).strip("/").split("/", 1)[0]
        if not top or not self._has_secondary():
            return False
        try:
            on_primary = {posixpath.basename(info.path) for info in self.primary.list_artifacts()}
            if top in on_primary:
                return False
            in_folder = {posixpath.basename(info.path) for info in self.secondary.list_artifacts(top)}
        except Exception:
            return False
        return model_as_run_artifacts.MLMODEL_FILE_NAME in in_folder

    def list_artifacts(self, path=None):
        return self._read("list_artifacts", lambda repository: repository.list_artifacts(path))

    def download_artifacts(self, artifact_path, dst_path=None):
        return self._read(
            "download_artifacts",
            lambda repository: repository.download_artifacts(artifact_path, dst_path),
            artifact_path,
        )

    def _download_file(self, remote_file_path, local_path):
        return self._read(
            "download_file",
            lambda repository: repository._download_file(remote_file_path, local_path),
            remote_file_path,
        )

    def delete_artifacts(self, artifact_path=None):
        self.primary.delete_artifacts(artifact_path)
        if not self._has_secondary():
            return
        if self.store is not None:
            self.store.enqueue_secondary(
                _OPERATION_PREFIX + "delete_artifacts", None,
                artifact_uri=self.artifact_uri, artifact_path=artifact_path,
            )
        else:
            self.mirror.send(
                "delete_artifacts", None, lambda: self.secondary.delete_artifacts(artifact_path)
            )


_OPERATION_PREFIX = "artifact."


def staging_root(store) -> str:
    """Return the folder of artifact copies waiting for the secondary (created 0700)."""
    if store.config.options["spool"]:
        root = os.path.join(store.spool_directory(), "artifacts")
    else:
        root = os.path.join(tempfile.gettempdir(), f"mlflow-azdual-staging-{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


def _size_bytes(path) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


def _upload(repository, operation, local_path, artifact_path, max_files=None):
    """Upload ``local_path`` with ``operation``, at most ``max_files`` files per call (None: any)."""
    if operation != "log_artifacts":
        return repository.log_artifact(local_path, artifact_path)
    if max_files is not None:
        files = _relative_files(local_path)
        if len(files) > max_files:
            return _upload_in_chunks(repository, local_path, artifact_path, files, max_files)
    return repository.log_artifacts(local_path, artifact_path)


def _relative_files(local_dir):
    """Return the paths of the files under ``local_dir``, relative to it, sorted."""
    files = []
    for folder, _, names in os.walk(local_dir):
        for name in names:
            files.append(os.path.relpath(os.path.join(folder, name), local_dir))
    return sorted(files)


def _upload_in_chunks(repository, local_dir, artifact_path, files, max_files):
    """Send ``files`` of ``local_dir`` as ``log_artifacts`` calls of at most ``max_files`` each.

    Each call uploads a chunk folder that contains hard links (copies where the file system
    has none) of its files at their relative paths, so every file keeps its artifact path. The
    chunk folders are made next to ``local_dir`` one at a time and removed, also on failure. A
    retry sends every chunk again, which overwrites the files already uploaded.
    """
    local_dir = os.path.normpath(local_dir)
    chunk_root = tempfile.mkdtemp(prefix="chunks-", dir=os.path.dirname(local_dir))
    try:
        for start in range(0, len(files), max_files):
            chunk = os.path.join(chunk_root, str(start // max_files))
            for relative in files[start : start + max_files]:
                target = os.path.join(chunk, relative)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                _link_or_copy(os.path.join(local_dir, relative), target)
            repository.log_artifacts(chunk, artifact_path)
            shutil.rmtree(chunk)
    finally:
        shutil.rmtree(chunk_root, ignore_errors=True)


def _link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _point_model_at_secondary_run(store, roots, staged, artifact_path):
    """Rewrite the MLmodel file of a model upload that the secondary keeps as run artifacts.

    The rewritten file names the secondary run, not the primary's ids. Returns the model's
    run location and the folder of the rewritten file, or None for any other upload.
    """
    mirror_of = roots.mirror_of or ""
    if not mirror_of.startswith("model:") or roots.sub_path or artifact_path:
        return None
    as_artifacts = store.run_artifact_model(mirror_of.split(":", 1)[1])
    if as_artifacts is None:
        return None
    if os.path.isdir(staged):
        folder = staged
    elif os.path.basename(staged) == model_as_run_artifacts.MLMODEL_FILE_NAME:
        folder = os.path.dirname(staged)
    else:
        return None
    if not model_as_run_artifacts.rewrite_mlmodel(folder, as_artifacts):
        return None
    return as_artifacts, folder


def _record_model_on_secondary_run(store, as_artifacts, folder):
    """Add the model to the secondary run's ``mlflow.log-model.history`` tag, as MLflow 2 did,
    so the workspace lists it with the run. A failure is logged: the files are uploaded."""
    from mlflow.models import Model

    try:
        model = Model.load(os.path.join(folder, model_as_run_artifacts.MLMODEL_FILE_NAME))
        store.secondary.record_logged_model(as_artifacts.run_id, model)
    except Exception as error:
        _logger.warning(
            "mlflow-azdual: the model at %s is on the secondary, but recording it in the run's "
            "model history failed: %s: %s",
            as_artifacts.location, type(error).__name__, str(error).splitlines()[0][:300],
        )


def apply_secondary(store, write):
    """Send a queued artifact write (``artifact.<operation>``) to the secondary repository.

    The staged copy is removed once the upload succeeded or was rejected for good; a
    transient failure keeps it for the retry.
    """
    from mlflow_azdual.retry import classify

    operation = write.operation[len(_OPERATION_PREFIX):]
    args = write.args
    repository = DualArtifactRepository(args["artifact_uri"], tracking_uri=store.store_uri)
    if operation == "delete_artifacts":
        return repository.secondary.delete_artifacts(args["artifact_path"])
    staged = args["staged_path"]
    if not os.path.exists(staged):
        raise LookupError(f"the staged copy {staged} of the upload is missing")
    model_folder = _point_model_at_secondary_run(store, repository.roots, staged, args["artifact_path"])
    max_files = store.secondary_profile.max_artifact_files_per_batch
    try:
        _upload(repository.secondary, operation, staged, args["artifact_path"], max_files)
    except Exception as error:
        if classify(error).retry:
            raise
        shutil.rmtree(os.path.dirname(staged), ignore_errors=True)
        raise
    if model_folder is not None:
        _record_model_on_secondary_run(store, *model_folder)
    shutil.rmtree(os.path.dirname(staged), ignore_errors=True)
