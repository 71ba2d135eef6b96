"""An emulation of the Azure ML run artifact routes that azureml-mlflow's RunArtifactsClient
calls, for the rig's https front door. It is not the service: it was written from
azureml-mlflow 1.62.0.post6's generated REST client (azureml/mlflow/_restclient/run_artifact),
not checked against a workspace.

Three routes under `/history/v1.0/subscriptions/<sub>/resourceGroups/<rg>/providers/
Microsoft.MachineLearningServices/workspaces/<ws>/experiments/<experiment>/runs/<run>/artifacts`:
  POST .../batch/metadata   body {"paths": [{"path": P}, ...]}: returns, per path, a
                            `contentUri` with a write SAS where the client PUTs the file
  GET  ...                  the run's artifacts, one page: {"value": [{"path": P, ...}]}
  GET  .../contentinfo?path=P  the `contentUri` of one artifact with a read SAS, or 404
The files are blobs in Azurite, the container `azureml-run-artifacts`, named
`ExperimentRun/dcid.<run>/<path>`, and the SAS is signed with Azurite's development key.
A listed artifact is a blob that exists, so a path created by batch/metadata but never
uploaded is not listed. Experiment and workspace names are not checked.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re

from aiohttp import web

log = logging.getLogger("rig.azureml_artifacts")

CONTAINER = "azureml-run-artifacts"
ORIGIN = "ExperimentRun"
SAS_LIFETIME = datetime.timedelta(hours=1)
ARTIFACTS_PATH = re.compile(
    r"^/history/v1\.0/subscriptions/[^/]+/resourceGroups/[^/]+/providers/"
    r"Microsoft\.MachineLearningServices/workspaces/[^/]+/experiments/[^/]+/runs/"
    r"(?P<run_id>[^/]+)/artifacts(?P<operation>/batch/metadata|/contentinfo)?/?$"
)


class RunArtifactService:
    """Serves the run artifact routes from Azurite, given its connection string."""

    def __init__(self, connection_string: str):
        from azure.storage.blob import BlobServiceClient

        self._service = BlobServiceClient.from_connection_string(connection_string)
        self._container = self._service.get_container_client(CONTAINER)
        self._container_ready = False

    @staticmethod
    def matches(path: str) -> bool:
        return ARTIFACTS_PATH.match(path) is not None

    async def handle(self, request: web.Request) -> web.Response:
        match = ARTIFACTS_PATH.match(request.path)
        run_id, operation = match.group("run_id"), match.group("operation")
        await asyncio.to_thread(self._create_container_once)

        if operation == "/batch/metadata" and request.method == "POST":
            document = await request.json()
            paths = [entry["path"] for entry in document.get("paths") or []]
            return web.json_response(self._batch_metadata(run_id, paths))
        if operation == "/contentinfo" and request.method == "GET":
            path = request.query.get("path", "")
            exists = await asyncio.to_thread(self._blob_exists, run_id, path)
            if not exists:
                return _not_found(f"no artifact {path!r} in run {run_id}")
            return web.json_response(self._content_information(run_id, path, "r"))
        if operation is None and request.method == "GET":
            paths = await asyncio.to_thread(self._list_paths, run_id)
            artifacts = [self._artifact(run_id, path) for path in paths]
            return web.json_response({"value": artifacts, "continuationToken": None, "nextLink": None})
        return _not_found(f"{request.method} {request.path} is not emulated")

    def _batch_metadata(self, run_id: str, paths: list[str]) -> dict:
        return {
            "artifacts": {path: self._artifact(run_id, path) for path in paths},
            "artifactContentInformation": {
                path: self._content_information(run_id, path, "rcw") for path in paths
            },
            "errors": {},
        }

    def _artifact(self, run_id: str, path: str) -> dict:
        return {
            "artifactId": f"{ORIGIN}/dcid.{run_id}/{path}",
            "origin": ORIGIN,
            "container": f"dcid.{run_id}",
            "path": path,
        }

    def _content_information(self, run_id: str, path: str, permission: str) -> dict:
        from azure.storage.blob import generate_blob_sas

        blob_name = _blob_name(run_id, path)
        sas = generate_blob_sas(
            account_name=self._service.account_name,
            container_name=CONTAINER,
            blob_name=blob_name,
            account_key=self._service.credential.account_key,
            permission=permission,
            expiry=datetime.datetime.now(datetime.timezone.utc) + SAS_LIFETIME,
        )
        blob_url = self._container.get_blob_client(blob_name).url
        return {
            "contentUri": f"{blob_url}?{sas}",
            "origin": ORIGIN,
            "container": f"dcid.{run_id}",
            "path": path,
        }

    def _create_container_once(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        if self._container_ready:
            return
        try:
            self._container.create_container()
        except ResourceExistsError:
            pass
        self._container_ready = True

    def _blob_exists(self, run_id: str, path: str) -> bool:
        return self._container.get_blob_client(_blob_name(run_id, path)).exists()

    def _list_paths(self, run_id: str) -> list[str]:
        prefix = _blob_name(run_id, "")
        return sorted(blob.name[len(prefix):] for blob in self._container.list_blobs(prefix))


def _blob_name(run_id: str, path: str) -> str:
    return f"{ORIGIN}/dcid.{run_id}/{path}"


def _not_found(message: str) -> web.Response:
    log.info("run artifact request not found: %s", message)
    return web.json_response(
        {"error": {"code": "UserError", "message": f"{message} [rig.azureml_artifacts emulation]"}},
        status=404,
    )
