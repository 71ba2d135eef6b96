"""The dual model registry store: registry writes go to the primary, then to the secondary.

Registered models keep their name on both sides. Each backend numbers its own versions, so a
secondary version is found through tags (``azdual.secondary_version`` on the primary version,
``azdual.primary_version`` on the secondary one) and a cache. A version's source is translated
to the secondary's copy of the artifacts: the secondary part of a dual artifact URI, the
secondary run for ``runs:/``, the secondary logged model for ``models:/<model id>``. Reads go
to the primary. Secondary writes are queued as data (``registry.<operation>`` with its
arguments) on the dual tracking store's secondary queue, so they are spooled, retried and
replayed like run writes; ``apply_secondary`` sends one. A secondary failure is never raised
outside strict mode.
"""

import threading
import urllib.parse

from mlflow.store.model_registry.abstract_store import AbstractStore

from mlflow_azdual import artifact_uri as dual_uri
from mlflow_azdual import compat, routing
from mlflow_azdual.job_credentials import tracking_token_belongs_to_secondary, without_tracking_token
from mlflow_azdual.logs import get_logger
from mlflow_azdual.mirror import Mirror
from mlflow_azdual.single_attempt import make_single_attempt
from mlflow_azdual.uri import parse_tracking_uri

_logger = get_logger(__name__)

SECONDARY_VERSION_TAG = "azdual.secondary_version"
PRIMARY_VERSION_TAG = "azdual.primary_version"


def build_registry_store(store_uri, tracking_uri=None, **_):
    """Build the dual registry store for an azdual registry URI (``mlflow.model_registry_store``)."""
    return DualRegistryStore(store_uri, tracking_uri)


class DualRegistryStore(AbstractStore):
    """Model registry store that writes to two registries and reads from the primary."""

    def __init__(self, store_uri, tracking_uri=None):
        self._config = parse_tracking_uri(store_uri)
        self.store_uri = store_uri
        self._tracking_uri = tracking_uri if str(tracking_uri).startswith("azdual:") else store_uri
        self._build_lock = threading.Lock()
        self._primary = None
        self._secondary = None
        self._versions = {}
        self.mirror = Mirror(self._config.secondary_registry_uri)
        super().__init__()

    @property
    def primary(self):
        if self._primary is None:
            self._build_sub_stores()
        return self._primary

    @property
    def secondary(self):
        if self._secondary is None:
            self._build_sub_stores()
        return self._secondary

    def _build_sub_stores(self):
        with self._build_lock:
            if self._primary is not None:
                return
            config = self._config
            self._secondary = make_single_attempt(
                compat.build_registry_store(config.secondary_registry_uri, config.secondary_uri),
                config.options["retry_attempt_timeout_s"],
            )
            primary = compat.build_registry_store(config.primary_registry_uri, config.primary_uri)
            if tracking_token_belongs_to_secondary(
                config.primary_registry_uri, config.secondary_registry_uri
            ):
                primary = without_tracking_token(primary)
            self._primary = primary

    def gate_sub_stores(self, wrap_primary, wrap_secondary):
        """Replace the sub-stores with ``wrap_primary(store)`` and ``wrap_secondary(store)``."""
        self._build_sub_stores()
        with self._build_lock:
            self._primary = wrap_primary(self._primary)
            self._secondary = wrap_secondary(self._secondary)

    @property
    def tracking(self):
        """The dual tracking store of the same URI, which owns the run and model id mapping."""
        from mlflow.tracking._tracking_service.utils import _get_store

        return _get_store(self._tracking_uri)

    def _mirror(self, operation, **args):
        """Queue ``operation`` on the secondary queue, after the run and artifact writes before it.

        Without a dual tracking store to queue on, the write is sent now and a failure logged.
        """
        if not self._config.options["mirror_registry"]:
            return
        tracking = self.tracking
        if hasattr(tracking, "enqueue_secondary"):
            # The write is spooled to disk, and the URI can contain credentials, so the usual
            # registry URI (the tracking URI) is left out and apply_secondary uses the
            # replaying store's own. NOTE: a different registry URI is still stored as is.
            registry_uri = None if self.store_uri == tracking.store_uri else self.store_uri
            tracking.enqueue_secondary(
                _OPERATION_PREFIX + operation, None, registry_uri=registry_uri, **args
            )
        else:
            handler = getattr(self, f"_mirror_{operation}")
            self.mirror.send(operation, None, lambda: handler(False, **args))

    # Version mapping

    def _secondary_version(self, name, version):
        key = (name, str(version))
        if key not in self._versions:
            primary_version = self.primary.get_model_version(name, version)
            recorded = (primary_version.tags or {}).get(SECONDARY_VERSION_TAG)
            if recorded is None:
                raise LookupError(
                    f"model version {name} {version} has no mirror on the secondary registry"
                )
            self._versions[key] = recorded
        return self._versions[key]

    def _find_secondary_version(self, name, primary_version):
        """Return the secondary version tagged as the mirror of ``primary_version``, or None."""
        for candidate in self.secondary.search_model_versions(f"name='{name}'"):
            if (candidate.tags or {}).get(PRIMARY_VERSION_TAG) == str(primary_version):
                return candidate
        return None

    # Reads that return an artifact location

    def get_model_version_download_uri(self, name, version):
        """Return the primary's download URI, with the primary's profile on a ``dbfs:/`` URI.

        MLflow's DBFS repositories take credentials from the profile in the URI, else from
        the active tracking URI, which is the azdual URI and has none.
        """
        uri = self.primary.get_model_version_download_uri(name, version)
        return compat.add_databricks_profile(uri, self._config.primary_registry_uri)

    # Registered models

    def create_registered_model(self, name, tags=None, description=None, *args, **kwargs):
        model = self.primary.create_registered_model(name, tags, description, *args, **kwargs)
        self._mirror(
            "create_registered_model", name=name, tags=_tag_list(tags), description=description
        )
        return model

    def _mirror_create_registered_model(self, uncertain, name, tags, description):
        return self._create_or_adopt_secondary_model(name, tags, description)

    def _create_or_adopt_secondary_model(self, name, tags, description):
        """Create the registered model on the secondary, or update one that already exists."""
        from mlflow.exceptions import MlflowException

        try:
            return self.secondary.create_registered_model(name, tags, description)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        for tag in tags:
            self.secondary.set_registered_model_tag(name, tag)
        if description:
            self.secondary.update_registered_model(name, description)
        return self.secondary.get_registered_model(name)

    def _ensure_secondary_model(self, name):
        from mlflow.exceptions import MlflowException

        try:
            self.secondary.get_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            primary_model = self.primary.get_registered_model(name)
            self._create_or_adopt_secondary_model(
                name, _tag_list(primary_model.tags), primary_model.description
            )

    def update_registered_model(self, name, description, *args, **kwargs):
        model = self.primary.update_registered_model(name, description, *args, **kwargs)
        self._mirror("update_registered_model", name=name, description=description)
        return model

    def _mirror_update_registered_model(self, uncertain, name, description):
        self.secondary.update_registered_model(name, description)

    def rename_registered_model(self, name, new_name):
        model = self.primary.rename_registered_model(name, new_name)
        for key in [key for key in self._versions if key[0] == name]:
            self._versions[(new_name, key[1])] = self._versions.pop(key)
        self._mirror("rename_registered_model", name=name, new_name=new_name)
        return model

    def _mirror_rename_registered_model(self, uncertain, name, new_name):
        self.secondary.rename_registered_model(name, new_name)

    def delete_registered_model(self, name):
        self.primary.delete_registered_model(name)
        for key in [key for key in self._versions if key[0] == name]:
            del self._versions[key]
        self._mirror("delete_registered_model", name=name)

    def _mirror_delete_registered_model(self, uncertain, name):
        self.secondary.delete_registered_model(name)

    def set_registered_model_tag(self, name, tag):
        self.primary.set_registered_model_tag(name, tag)
        self._mirror("set_registered_model_tag", name=name, tag=tag)

    def _mirror_set_registered_model_tag(self, uncertain, name, tag):
        self.secondary.set_registered_model_tag(name, tag)

    def delete_registered_model_tag(self, name, key):
        self.primary.delete_registered_model_tag(name, key)
        self._mirror("delete_registered_model_tag", name=name, key=key)

    def _mirror_delete_registered_model_tag(self, uncertain, name, key):
        self.secondary.delete_registered_model_tag(name, key)

    def set_registered_model_alias(self, name, alias, version):
        self.primary.set_registered_model_alias(name, alias, version)
        self._mirror("set_registered_model_alias", name=name, alias=alias, version=str(version))

    def _mirror_set_registered_model_alias(self, uncertain, name, alias, version):
        self.secondary.set_registered_model_alias(
            name, alias, self._secondary_version(name, version)
        )

    def delete_registered_model_alias(self, name, alias):
        self.primary.delete_registered_model_alias(name, alias)
        self._mirror("delete_registered_model_alias", name=name, alias=alias)

    def _mirror_delete_registered_model_alias(self, uncertain, name, alias):
        self.secondary.delete_registered_model_alias(name, alias)

    # Model versions

    def create_model_version(
        self, name, source, run_id=None, tags=None, run_link=None, description=None,
        local_model_path=None, model_id=None,
    ):
        extra = {} if model_id is None else {"model_id": model_id}
        version = self.primary.create_model_version(
            name, dual_uri.primary_part(source), run_id, tags, run_link, description,
            local_model_path, **extra,
        )
        self._mirror(
            "create_model_version",
            name=version.name,
            version=str(version.version),
            source=source,
            run_id=run_id,
            tags=list(tags or []),
            description=description,
            model_id=model_id,
        )
        return version

    def _mirror_create_model_version(
        self, uncertain, name, version, source, run_id, tags, description, model_id
    ):
        from mlflow.entities.model_registry import ModelVersionTag

        tracking = self.tracking
        mapping = getattr(tracking, "mapping", None)
        secondary_run_id = tracking._secondary_run(run_id).run_id if (mapping and run_id) else None
        secondary_model_id = None
        secondary_source = None
        if model_id and mapping is not None and mapping.secondary_model_id(model_id):
            # The logged model's own location on the secondary, never a models:/ URI, and no
            # model id when the secondary keeps the model as run artifacts.
            secondary_source, secondary_model_id, model_run_id = (
                tracking.secondary_model_version_source(model_id)
            )
            secondary_run_id = model_run_id or secondary_run_id
        if secondary_source is None:
            secondary_source = self._secondary_source(source, run_id, secondary_run_id)
        if secondary_source is None:
            raise LookupError(
                f"source {source!r} of model version {name} {version} has no copy on the secondary"
            )

        self._ensure_secondary_model(name)
        # A create that was applied before a failure (a reset, a crash) is found by its tag,
        # so the secondary never gets two versions for one primary version.
        mirrored = self._find_secondary_version(name, version) if uncertain else None
        if mirrored is None:
            extra = {} if secondary_model_id is None else {"model_id": secondary_model_id}
            secondary_tags = list(tags or []) + [ModelVersionTag(PRIMARY_VERSION_TAG, version)]
            mirrored = self.secondary.create_model_version(
                name, secondary_source, secondary_run_id, secondary_tags, None, description,
                **extra,
            )
        self._versions[(name, version)] = str(mirrored.version)
        self.primary.set_model_version_tag(
            name, version, ModelVersionTag(SECONDARY_VERSION_TAG, str(mirrored.version))
        )
        return mirrored

    def _secondary_source(self, source, run_id, secondary_run_id):
        """Return the secondary's equivalent of a model version source, or None if it has none.

        A ``models:/`` source has no equivalent here: it is resolved from the model id.
        """
        if dual_uri.is_dual_artifact_uri(source):
            roots = dual_uri.resolve(source)
            if roots.secondary or not roots.mirror_of:
                return roots.secondary
            base = self.tracking.secondary_artifact_root(roots.mirror_of)
            return dual_uri.join(base, roots.sub_path)
        parsed = urllib.parse.urlsplit(source)
        if parsed.scheme == "runs" and secondary_run_id:
            path = parsed.path.lstrip("/").split("/", 1)
            sub_path = path[1] if len(path) > 1 else ""
            return f"runs:/{secondary_run_id}/{sub_path}".rstrip("/")
        if parsed.scheme == "models":
            return None
        if run_id and secondary_run_id:
            tracking = self.tracking
            primary_root = tracking.primary.get_run(run_id).info.artifact_uri
            mirror = tracking.mapping.cached_secondary_run(run_id)
            if mirror is not None and source.startswith(primary_root):
                return mirror.artifact_uri + source[len(primary_root):]
        return None

    def update_model_version(self, name, version, description):
        result = self.primary.update_model_version(name, version, description)
        self._mirror(
            "update_model_version", name=name, version=str(version), description=description
        )
        return result

    def _mirror_update_model_version(self, uncertain, name, version, description):
        self.secondary.update_model_version(
            name, self._secondary_version(name, version), description
        )

    def transition_model_version_stage(self, name, version, stage, archive_existing_versions):
        result = self.primary.transition_model_version_stage(
            name, version, stage, archive_existing_versions
        )
        self._mirror(
            "transition_model_version_stage", name=name, version=str(version), stage=stage,
            archive_existing_versions=archive_existing_versions,
        )
        return result

    def _mirror_transition_model_version_stage(
        self, uncertain, name, version, stage, archive_existing_versions
    ):
        self.secondary.transition_model_version_stage(
            name, self._secondary_version(name, version), stage, archive_existing_versions
        )

    def delete_model_version(self, name, version):
        # The mapping tag lives on the primary version, so it is read before the delete.
        secondary = self.mirror.send(
            "resolve_model_version", None, lambda: self._secondary_version(name, version)
        )
        self.primary.delete_model_version(name, version)
        self._versions.pop((name, str(version)), None)
        if secondary is not None:
            self._mirror("delete_model_version", name=name, secondary_version=str(secondary))

    def _mirror_delete_model_version(self, uncertain, name, secondary_version):
        from mlflow.exceptions import MlflowException

        try:
            self.secondary.delete_model_version(name, secondary_version)
        except MlflowException as error:
            # A replayed delete finds the version gone, which is the intended state.
            if not (uncertain and error.error_code == "RESOURCE_DOES_NOT_EXIST"):
                raise

    def set_model_version_tag(self, name, version, tag):
        self.primary.set_model_version_tag(name, version, tag)
        self._mirror("set_model_version_tag", name=name, version=str(version), tag=tag)

    def _mirror_set_model_version_tag(self, uncertain, name, version, tag):
        self.secondary.set_model_version_tag(name, self._secondary_version(name, version), tag)

    def delete_model_version_tag(self, name, version, key):
        self.primary.delete_model_version_tag(name, version, key)
        self._mirror("delete_model_version_tag", name=name, version=str(version), key=key)

    def _mirror_delete_model_version_tag(self, uncertain, name, version, key):
        self.secondary.delete_model_version_tag(
            name, self._secondary_version(name, version), key
        )

    def copy_model_version(self, src_mv, dst_name):
        copied = self.primary.copy_model_version(src_mv, dst_name)
        self._mirror(
            "copy_model_version", source_name=src_mv.name, source_version=str(src_mv.version),
            destination_name=dst_name, destination_version=str(copied.version),
        )
        return copied

    def _mirror_copy_model_version(
        self, uncertain, source_name, source_version, destination_name, destination_version
    ):
        from mlflow.entities.model_registry import ModelVersionTag

        mirrored = self._find_secondary_version(destination_name, destination_version) if uncertain else None
        if mirrored is None:
            source = self.secondary.get_model_version(
                source_name, self._secondary_version(source_name, source_version)
            )
            mirrored = self.secondary.copy_model_version(source, destination_name)
            self.secondary.set_model_version_tag(
                destination_name, mirrored.version,
                ModelVersionTag(PRIMARY_VERSION_TAG, destination_version),
            )
        self._versions[(destination_name, destination_version)] = str(mirrored.version)
        self.primary.set_model_version_tag(
            destination_name, destination_version,
            ModelVersionTag(SECONDARY_VERSION_TAG, str(mirrored.version)),
        )
        return mirrored


_OPERATION_PREFIX = "registry."


def apply_secondary(tracking, write, uncertain):
    """Send a queued registry write (``registry.<operation>``) through its dual registry store."""
    args = dict(write.args)
    registry = tracking.registry_mirror(args.pop("registry_uri") or tracking.store_uri)
    handler = getattr(registry, f"_mirror_{write.operation[len(_OPERATION_PREFIX):]}")
    return handler(uncertain or write.uncertain, **args)


def _tag_list(tags):
    from mlflow.entities.model_registry import RegisteredModelTag

    if isinstance(tags, dict):
        return [RegisteredModelTag(key, value) for key, value in tags.items()]
    return list(tags or [])


routing.install_routes(
    DualRegistryStore, routing.REGISTRY_READS, routing.REGISTRY_PRIMARY_ONLY_WRITES
)
