"""An emulation of the few DBFS REST calls that MLflow's DBFS artifact repository sends.

MLflow's `DbfsRestArtifactRepository` (store/artifact/dbfs_artifact_repo.py, read in MLflow
3.17) serves `dbfs:/<path>` artifact URIs outside `dbfs:/databricks/mlflow-tracking/` with
four calls to the workspace host:

  POST /dbfs/<path>                 the body is the whole file; it replaces an existing file
  GET  /dbfs/<path>                 the file's bytes
  GET  /api/2.0/dbfs/get-status     ?path=/<path>: {"path", "is_dir", "file_size"}
  GET  /api/2.0/dbfs/list           ?path=/<path>: {"files": [...]}; a file lists itself

`DbfsEmulation` serves exactly these from files under a local folder, and responds with 404
RESOURCE_DOES_NOT_EXIST to a path that is not there. It is an emulation of what that
repository needs, not DBFS: the streaming API (create, add-block, close, read, put), moves,
deletes and size limits are not served.
"""

from __future__ import annotations

import json
import logging
import posixpath
from pathlib import Path

from aiohttp import web

log = logging.getLogger("rig.dbfs_emulation")

FILE_PREFIX = "/dbfs/"
API_PREFIX = "/api/2.0/dbfs/"


class DbfsEmulation:
    """DBFS paths stored as files under `root`: `/a/b.txt` is `<root>/a/b.txt`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def handles(path: str) -> bool:
        """Return True for a request path that this emulation serves."""
        return path.startswith(FILE_PREFIX) or path.startswith(API_PREFIX)

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        if path.startswith(FILE_PREFIX) and request.method == "POST":
            return await self._upload(request, path[len(FILE_PREFIX) - 1:])
        if path.startswith(FILE_PREFIX) and request.method == "GET":
            return self._download(path[len(FILE_PREFIX) - 1:])
        if path == API_PREFIX + "get-status" and request.method == "GET":
            return self._get_status(request.query.get("path", ""))
        if path == API_PREFIX + "list" and request.method == "GET":
            return self._list(request.query.get("path", ""))
        return _error(404, "ENDPOINT_NOT_FOUND",
                      f"{request.method} {path} is not served by the rig's DBFS emulation.")

    def _local_path(self, dbfs_path: str) -> Path | None:
        """Return the file under `root` for an absolute DBFS path, or None if it is invalid."""
        if not dbfs_path.startswith("/") or ".." in dbfs_path.split("/"):
            return None
        return self.root / posixpath.normpath(dbfs_path).lstrip("/")

    async def _upload(self, request: web.Request, dbfs_path: str) -> web.Response:
        local = self._local_path(dbfs_path)
        if local is None:
            return _invalid_path(dbfs_path)
        if local.is_dir():
            return _error(400, "RESOURCE_ALREADY_EXISTS", f"{dbfs_path} is a directory.")
        body = await request.read()
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(body)
        return web.json_response({})

    def _download(self, dbfs_path: str) -> web.Response:
        local = self._local_path(dbfs_path)
        if local is None:
            return _invalid_path(dbfs_path)
        if not local.is_file():
            return _not_found(dbfs_path)
        return web.Response(body=local.read_bytes(), content_type="application/octet-stream")

    def _get_status(self, dbfs_path: str) -> web.Response:
        local = self._local_path(dbfs_path)
        if local is None:
            return _invalid_path(dbfs_path)
        if not local.exists():
            return _not_found(dbfs_path)
        return web.json_response(_file_info(dbfs_path, local))

    def _list(self, dbfs_path: str) -> web.Response:
        local = self._local_path(dbfs_path)
        if local is None:
            return _invalid_path(dbfs_path)
        if not local.exists():
            return _not_found(dbfs_path)
        if local.is_file():
            return web.json_response({"files": [_file_info(dbfs_path, local)]})
        base = "/" + dbfs_path.strip("/")
        files = [
            _file_info(posixpath.join(base, child.name), child) for child in sorted(local.iterdir())
        ]
        # DBFS leaves "files" out of the listing of an empty directory (a comment in MLflow's
    # dbfs_artifact_repo.py states this, and the repository handles it).
        return web.json_response({"files": files} if files else {})


def _file_info(dbfs_path: str, local: Path) -> dict:
    is_dir = local.is_dir()
    stat = local.stat()
    return {
        "path": "/" + dbfs_path.strip("/"),
        "is_dir": is_dir,
        "file_size": 0 if is_dir else stat.st_size,
        "modification_time": int(stat.st_mtime * 1000),
    }


def _error(status: int, error_code: str, message: str) -> web.Response:
    log.info("DBFS emulation: %d %s: %s", status, error_code, message)
    return web.Response(
        status=status,
        text=json.dumps({"error_code": error_code, "message": message}),
        content_type="application/json",
    )


def _not_found(dbfs_path: str) -> web.Response:
    return _error(404, "RESOURCE_DOES_NOT_EXIST", f"No file or directory exists on path {dbfs_path}.")


def _invalid_path(dbfs_path: str) -> web.Response:
    return _error(
        400, "INVALID_PARAMETER_VALUE",
        f"Invalid DBFS path {dbfs_path!r}: it must be absolute and contain no '..' segment.",
    )
