"""Mirror an MLflow 3 logged model to a backend without the logged-model API.

Azure ML has no ``/api/2.0/mlflow/logged-models`` endpoints: creating a logged model there
returns 404, so MLflow 3's ``log_model`` cannot run against it unchanged. On such a secondary
the plugin stores the model as artifacts of the secondary's copy of the model's source run,
under the model's name (``<run artifact root>/<name>``), the way MLflow 2 stored every model.
A registry version created from the model gets that location as its source and no
``model_id``.

The mirror is recorded where a logged model's secondary id would be (the id mapping and the
``azdual.secondary_model_id`` tag on the primary's model) as a location of the form
``runs:/<secondary run id>/<name>``, which no logged-model id can take.
"""

import os
from typing import NamedTuple, Optional

from mlflow_azdual.logs import get_logger

_logger = get_logger(__name__)

_PREFIX = "runs:/"
MLMODEL_FILE_NAME = "MLmodel"


class RunArtifactModel(NamedTuple):
    """The run and artifact path of a logged model on a backend without the logged-model API."""

    run_id: str
    artifact_path: str

    @property
    def location(self) -> str:
        """The value recorded in place of a secondary logged-model id."""
        return f"{_PREFIX}{self.run_id}/{self.artifact_path}"


def parse(mirror: Optional[str]) -> Optional[RunArtifactModel]:
    """Return the run and path of a recorded mirror, or None for a logged-model id."""
    if not mirror or not mirror.startswith(_PREFIX):
        return None
    run_id, _, artifact_path = mirror[len(_PREFIX):].partition("/")
    if not run_id or not artifact_path:
        return None
    return RunArtifactModel(run_id, artifact_path)


def artifact_path_for(model_name: Optional[str], model_id: str) -> str:
    """Return the run artifact path of a model: its name, or its id when it has none.

    A second model of the same name in one run gets the same path and replaces the first on
    the secondary, as two MLflow 2 models logged under one artifact path did.
    """
    name = (model_name or "").strip().strip("/")
    return name or model_id


def rewrite_mlmodel(directory: str, model: RunArtifactModel) -> bool:
    """Point the MLmodel file in ``directory`` at the secondary run; return True if rewritten.

    The file written by MLflow 3 names the primary's run, the primary's logged-model id and the
    primary's storage location, none of which exist on the secondary. The copy sent there
    gets the secondary run id and the run-relative artifact path, and no ``model_id``.
    """
    import yaml

    path = os.path.join(directory, MLMODEL_FILE_NAME)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as mlmodel_file:
        content = yaml.safe_load(mlmodel_file)
    if not isinstance(content, dict):
        _logger.warning("mlflow-azdual: %s is not an MLflow model file; sent unchanged", path)
        return False
    content["run_id"] = model.run_id
    content["artifact_path"] = model.artifact_path
    content.pop("model_id", None)
    with open(path, "w", encoding="utf-8") as mlmodel_file:
        yaml.safe_dump(content, mlmodel_file, default_flow_style=False, sort_keys=False)
    return True
