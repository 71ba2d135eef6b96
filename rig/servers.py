"""The rig: local stand-ins for the Databricks and Azure ML workspaces on loopback ports.

`Rig` starts moto (S3), Azurite (Azure Blob) and two `mlflow server` processes, each with
its own SQLite store: the primary stores artifacts in moto S3, the secondary in Azurite.
Each MLflow server sits behind a policy proxy (`rig.policy_proxy`) that emulates the limits
published for its service: the Databricks rules in front of the primary, the Azure ML rules
in front of the secondary. These are emulations of public reports, not the services.
`primary_uri` and `secondary_uri` are the proxies' addresses; `primary_server_uri` and
`secondary_server_uri` reach the MLflow servers directly.

A second policy proxy, `primary-databricks`, is the primary's front door for MLflow's real
Databricks client: https with a certificate of the rig's own authority, a bearer token, and
an emulation of the DBFS calls of MLflow's DBFS artifact repository (`rig.dbfs_emulation`).
The rig writes a Databricks config file with the profile `rig` (and `[DEFAULT]`) for it, so
`databricks://rig` is the primary for a client with `Rig.databricks_env`.

Clients write artifacts straight to storage, so they need `Rig.env`. The rig writes
state.json into its state dir, and `Rig.attach()` rebuilds a Rig from it in another process.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

from rig.guard import GUARD_PATH
from rig.policy_proxy import PolicyProxyControl
from rig.processes import ServerProcess, find_free_ports, mlflow_server_process
from rig.tls import write_certificates

log = logging.getLogger("rig")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO_ROOT / ".rig" / "state"
AZURITE_NODE_PREFIX = REPO_ROOT / ".rig" / "node"
AZURITE_INSTALL_COMMAND = f"npm install --prefix {AZURITE_NODE_PREFIX} azurite@3.37.0"

# Azurite's fixed development account. The key is public and documented by Microsoft
# (https://learn.microsoft.com/azure/storage/common/storage-use-azurite), not a secret.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

SERVER_NAMES = (
    "moto", "azurite", "primary", "secondary", "primary-policy", "secondary-policy",
    "primary-databricks",
)
MLFLOW_SERVER_NAMES = ("primary", "secondary")
# The policy profile emulated in front of each MLflow server, and the plugin's matching
# backend profile options for a dual URI over the rig.
POLICY_PROFILES = {"primary": "databricks", "secondary": "azureml"}
PLUGIN_PROFILE_OPTIONS = {"primary_profile": "databricks", "secondary_profile": "azureml"}
# The front doors of each MLflow server, stopped and started with it.
FRONT_DOORS = {
    "primary": ("primary-policy", "primary-databricks"),
    "secondary": ("secondary-policy",),
}

# The Databricks CLI profile of the primary's https front door in the rig's config file.
DATABRICKS_PROFILE = "rig"
# Databricks settings in the environment that take precedence over the config file's profile.
DATABRICKS_ENV_OVERRIDES = ("DATABRICKS_HOST", "DATABRICKS_TOKEN", "DATABRICKS_CONFIG_PROFILE")
# Seconds the Databricks SDK and MLflow's Databricks client retry one call. Their defaults
# (300 s in the SDK, 500 s in MLflow 3.17) make a call to a stopped front door hang for minutes.
DATABRICKS_RETRY_TIMEOUT_S = 5


def find_azurite_blob() -> str:
    """Return the path of the `azurite-blob` executable, preferring the project-local install.

    Raises FileNotFoundError with the install command if it is in neither place.
    """
    local = AZURITE_NODE_PREFIX / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)

    on_path = shutil.which("azurite-blob")
    if on_path:
        return on_path

    raise FileNotFoundError(
        f"azurite-blob not found in {local.parent} or on PATH. Install it with:\n"
        f"    {AZURITE_INSTALL_COMMAND}"
    )


class Rig:
    """Loopback stand-ins for the primary (Databricks) and secondary (Azure ML) workspaces.

    Use as a context manager, or call `start()` and `stop()`. Every server binds 127.0.0.1.
    moto and Azurite keep data in memory, so restarting either of them loses its objects.
    The MLflow servers keep runs in SQLite in the state dir, so `stop_server("secondary")`
    followed by `start_server("secondary")` keeps the secondary's data and port.
    """

    bucket = "primary-artifacts"
    container = "secondary-artifacts"
    primary_artifact_root = f"s3://{bucket}/mlflow"
    secondary_artifact_root = f"wasbs://{container}@{AZURITE_ACCOUNT}.blob.core.windows.net/mlflow"

    def __init__(
        self, state_dir: str | os.PathLike | None = None, *, startup_timeout: float = 90.0
    ):
        self.state_dir = Path(state_dir or DEFAULT_STATE_DIR).resolve()
        self.state_path = self.state_dir / "state.json"
        self.startup_timeout = startup_timeout
        self.processes: dict[str, ServerProcess] = {}
        self._ports: dict[str, int] = {}

    # Construction of the servers.

    def _build_processes(self) -> None:
        ports = find_free_ports(10)
        moto_port, azurite_port, primary_port, secondary_port = ports[:4]
        self._ports = {
            "moto": moto_port,
            "azurite": azurite_port,
            "primary": primary_port,
            "secondary": secondary_port,
            "primary-policy": ports[4],
            "secondary-policy": ports[5],
            "primary-databricks": ports[8],
        }
        control_ports = {
            "primary-policy": ports[6], "secondary-policy": ports[7], "primary-databricks": ports[9],
        }
        logs = self.state_dir / "logs"
        self.processes = {
            "moto": ServerProcess(
                "moto",
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                port=moto_port,
                health_url=f"http://127.0.0.1:{moto_port}/moto-api/",
                log_path=logs / "moto.log",
                cwd=self.state_dir / "moto",
                extra_env=self._python_server_env(),
                accept_any_status=True,
            ),
            "azurite": ServerProcess(
                "azurite",
                [
                    find_azurite_blob(),
                    "--blobHost", "127.0.0.1",
                    "--blobPort", str(azurite_port),
                    "--inMemoryPersistence",
                    "--skipApiVersionCheck",
                    "--loose",
                    "--disableTelemetry",
                ],
                port=azurite_port,
                health_url=f"http://127.0.0.1:{azurite_port}/{AZURITE_ACCOUNT}?comp=list",
                log_path=logs / "azurite.log",
                cwd=self.state_dir / "azurite",
                extra_env={"DO_NOT_TRACK": "true"},
                accept_any_status=True,
            ),
        }

        for name, port, artifact_root in (
            ("primary", primary_port, self.primary_artifact_root),
            ("secondary", secondary_port, self.secondary_artifact_root),
        ):
            database = self.state_dir / name / "mlflow.db"
            self.processes[name] = mlflow_server_process(
                name,
                port,
                backend_store_uri=f"sqlite:///{database}",
                artifact_root=artifact_root,
                log_path=logs / f"{name}.log",
                cwd=self.state_dir / name,
                extra_env=self._python_server_env(),
            )

        for name, profile in POLICY_PROFILES.items():
            proxy_name = f"{name}-policy"
            control_port = control_ports[proxy_name]
            self.processes[proxy_name] = ServerProcess(
                proxy_name,
                [
                    sys.executable, "-m", "rig.policy_proxy",
                    "--profile", profile,
                    "--target-port", str(self._ports[name]),
                    "--listen-port", str(self._ports[proxy_name]),
                    "--control-port", str(control_port),
                ],
                port=self._ports[proxy_name],
                health_url=f"http://127.0.0.1:{control_port}/stats",
                log_path=logs / f"{proxy_name}.log",
                cwd=REPO_ROOT,
                extra_env=self._python_server_env(),
            )

        self.processes["primary-databricks"] = self._databricks_front_process(
            control_ports["primary-databricks"], logs
        )

    def _databricks_front_process(self, control_port: int, logs: Path) -> ServerProcess:
        """Write the front door's certificate, token and config file, and return its process.

        The token is read from a file, so that it is in neither state.json nor a log.
        """
        directory = self.databricks_dir
        certificates = write_certificates(directory / "tls")
        self._write_ca_bundle(certificates.authority)
        token = f"dapi-rig-{secrets.token_hex(16)}"
        _write_private(directory / "token", token + "\n")
        self._write_databricks_config(token)
        port = self._ports["primary-databricks"]
        return ServerProcess(
            "primary-databricks",
            [
                sys.executable, "-m", "rig.policy_proxy",
                "--profile", "databricks",
                "--target-port", str(self._ports["primary"]),
                "--listen-port", str(port),
                "--control-port", str(control_port),
                "--tls-cert-file", str(certificates.certificate),
                "--tls-key-file", str(certificates.key),
                "--bearer-token-file", str(directory / "token"),
                "--dbfs-root", str(self.dbfs_root),
            ],
            port=port,
            health_url=f"http://127.0.0.1:{control_port}/stats",
            log_path=logs / "primary-databricks.log",
            cwd=REPO_ROOT,
            extra_env=self._python_server_env(),
        )

    def _write_ca_bundle(self, authority: Path) -> None:
        """Write the rig's authority after the certificates that clients trusted before.

        Clients get this file as REQUESTS_CA_BUNDLE, so other https hosts stay trusted too.
        """
        import certifi

        previous = os.environ.get("REQUESTS_CA_BUNDLE") or certifi.where()
        if Path(previous).resolve() == self.ca_bundle_path.resolve():
            previous = certifi.where()
        try:
            trusted = Path(previous).read_text()
        except OSError:
            trusted = Path(certifi.where()).read_text()
        self.ca_bundle_path.write_text(trusted.rstrip("\n") + "\n" + authority.read_text())

    def _write_databricks_config(self, token: str) -> None:
        """Write the config file with the profile `rig` and the same settings in `[DEFAULT]`.

        Some of MLflow's Databricks artifact code falls back to the default credentials when
        the registry URI carries none, as an azdual URI does not (in MLflow 3.17,
        DatabricksSDKModelsArtifactRepository). So both profiles point at the front door.
        """
        settings = (
            f"host = {self.primary_databricks_host}\n"
            f"token = {token}\n"
            f"retry_timeout_seconds = {DATABRICKS_RETRY_TIMEOUT_S}\n"
        )
        _write_private(
            self.databricks_config_path,
            f"[DEFAULT]\n{settings}\n[{DATABRICKS_PROFILE}]\n{settings}",
        )

    def _python_server_env(self) -> dict[str, str]:
        """Return the environment additions for a Python server: client env plus the guard.

        The servers get the storage settings too, so that any artifact access on the server
        side also goes to moto and Azurite.
        """
        python_path = os.pathsep.join(filter(None, [str(GUARD_PATH), os.environ.get("PYTHONPATH")]))
        return {**self.env, "PYTHONPATH": python_path}

    # Addresses and environment.

    @property
    def primary_uri(self) -> str:
        """The Databricks stand-in: the primary MLflow server behind the Databricks policy."""
        return f"http://127.0.0.1:{self._ports['primary-policy']}"

    @property
    def secondary_uri(self) -> str:
        """The Azure ML stand-in: the secondary MLflow server behind the Azure ML policy."""
        return f"http://127.0.0.1:{self._ports['secondary-policy']}"

    @property
    def primary_server_uri(self) -> str:
        """The primary MLflow server itself, without the policy proxy."""
        return f"http://127.0.0.1:{self._ports['primary']}"

    @property
    def secondary_server_uri(self) -> str:
        """The secondary MLflow server itself, without the policy proxy."""
        return f"http://127.0.0.1:{self._ports['secondary']}"

    @property
    def databricks_dir(self) -> Path:
        """Folder of the Databricks front door: certificates, token, config file, DBFS files."""
        return self.state_dir / "databricks"

    @property
    def databricks_config_path(self) -> Path:
        return self.databricks_dir / "databrickscfg"

    @property
    def ca_bundle_path(self) -> Path:
        return self.databricks_dir / "ca-bundle.pem"

    @property
    def dbfs_root(self) -> Path:
        """Local folder that contains the files of the DBFS emulation: `dbfs:/a/b` is `<root>/a/b`."""
        return self.databricks_dir / "dbfs"

    @property
    def primary_databricks_host(self) -> str:
        """The primary's https front door, the host of the `rig` Databricks profile."""
        return f"https://127.0.0.1:{self._ports['primary-databricks']}"

    @property
    def primary_databricks_uri(self) -> str:
        """The primary as MLflow's Databricks client reaches it, with `databricks_env` set."""
        return f"databricks://{DATABRICKS_PROFILE}"

    @property
    def databricks_env(self) -> dict[str, str]:
        """Environment variables a client of `databricks://rig` needs, in addition to `env`.

        The variables in DATABRICKS_ENV_OVERRIDES must also be unset, because they take
        precedence over the config file.
        """
        return {
            "DATABRICKS_CONFIG_FILE": str(self.databricks_config_path),
            "REQUESTS_CA_BUNDLE": str(self.ca_bundle_path),
            "MLFLOW_DATABRICKS_ENDPOINT_HTTP_RETRY_TIMEOUT": str(DATABRICKS_RETRY_TIMEOUT_S),
        }

    def databricks_dual_tracking_uri(self, **options) -> str:
        """Return the plugin's tracking URI with `databricks://rig` as the primary.

        The primary's backend profile follows from its scheme. `options` are added as in
        `dual_tracking_uri`.
        """
        from mlflow_azdual.uri import explicit_tracking_uri

        return explicit_tracking_uri(
            self.primary_databricks_uri, self.secondary_uri,
            **{"secondary_profile": PLUGIN_PROFILE_OPTIONS["secondary_profile"], **options},
        )

    def dual_tracking_uri(self, **options) -> str:
        """Return the plugin's tracking URI over both stand-ins, with their backend profiles.

        `options` adds plugin options to the URI's query, such as `strict=true`.
        """
        from mlflow_azdual.uri import explicit_tracking_uri

        return explicit_tracking_uri(
            self.primary_uri, self.secondary_uri, **{**PLUGIN_PROFILE_OPTIONS, **options}
        )

    def policy_control(self, name: str) -> PolicyProxyControl:
        """Return the control client of a policy proxy.

        `primary` and `secondary` name the plain http proxy in front of that server, and
        `primary-databricks` the primary's https front door.
        """
        proxies = {"primary": "primary-policy", "secondary": "secondary-policy",
                   "primary-databricks": "primary-databricks"}
        if name not in proxies:
            raise ValueError(
                f"unknown policy proxy {name!r}; expected primary, secondary or primary-databricks"
            )
        argv = self._process(proxies[name]).argv
        return PolicyProxyControl(int(argv[argv.index("--control-port") + 1]))

    @property
    def s3_endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._ports['moto']}"

    @property
    def azure_storage_connection_string(self) -> str:
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self._ports['azurite']}/{AZURITE_ACCOUNT};"
        )

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that an MLflow client process of the rig needs.

        The HTTP settings make a call to a stopped MLflow server fail after 2 retries, in
        about 2 s with the connection refused. MLflow's defaults (7 retries, backoff factor 2)
        take about 4 minutes, as its environment_variables.py states.
        """
        no_proxy = "127.0.0.1,localhost,::1"
        return {
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "AWS_ACCESS_KEY_ID": "rig-access-key-id",
            "AWS_SECRET_ACCESS_KEY": "rig-secret-access-key",
            "AWS_DEFAULT_REGION": "us-east-1",
            # botocore would otherwise ask the EC2 instance metadata endpoint for credentials.
            "AWS_EC2_METADATA_DISABLED": "true",
            "AZURE_STORAGE_CONNECTION_STRING": self.azure_storage_connection_string,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
            # MLflow parses the backoff factor as an integer, so "0.5" would be rejected.
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.2",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
            # Keeps loopback traffic away from any HTTP proxy set in the caller's environment.
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    def apply_env(self) -> None:
        """Put `env` into os.environ of this process."""
        os.environ.update(self.env)

    @property
    def log_paths(self) -> dict[str, Path]:
        return {name: process.log_path for name, process in self.processes.items()}

    def log_tail(self, lines: int = 40) -> str:
        """Return the last `lines` lines of every server log, each under a header line."""
        sections = []
        for name, process in self.processes.items():
            sections.append(f"----- {name}: {process.log_path} -----\n{process.log_tail(lines)}")
        return "\n".join(sections)

    # Start and stop.

    def start(self) -> Rig:
        """Start all servers in parallel, create the bucket and container, write state.json.

        Removes the SQLite stores of an earlier rig in the same state dir and truncates its
        logs, because the artifacts of its runs were in memory and are gone. Raises
        RuntimeError if a rig from this state dir is still running.
        """
        self._raise_if_running()
        self._remove_previous_state()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._build_processes()

        started = time.monotonic()
        try:
            for process in self.processes.values():
                process.start(truncate_log=True)

            self.processes["moto"].wait_ready(self.startup_timeout)
            self._create_bucket()
            self.processes["azurite"].wait_ready(self.startup_timeout)
            self._create_container()
            for name in MLFLOW_SERVER_NAMES:
                self.processes[name].wait_ready(self.startup_timeout)
                for front in FRONT_DOORS[name]:
                    self.processes[front].wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise

        self._write_state()
        log.info(
            "rig ready in %.1f s: primary %s, secondary %s",
            time.monotonic() - started,
            self.primary_uri,
            self.secondary_uri,
        )
        return self

    def stop(self) -> None:
        """Stop every server that this rig started or attached to, and remove state.json."""
        if not self.processes:
            return
        for name in reversed(SERVER_NAMES):
            if name in self.processes:
                self.processes[name].stop()
        self.state_path.unlink(missing_ok=True)

    def stop_server(self, name: str) -> None:
        """Stop one server: `primary`, `secondary`, `moto`, `azurite` or a front door.

        Stopping `primary` or `secondary` stops its front doors (policy proxies) too, so
        clients get connection refused, as from a backend that cannot be reached. Stopping
        `primary-databricks` stops only the https front door. `start_server(name)` starts it
        again on the same port.
        """
        for process in self._processes_of(name):
            process.stop()
        self._write_state()

    def start_server(self, name: str) -> None:
        """Start one stopped server again on the same port and with the same data directory.

        moto and Azurite come back empty, with the bucket or container created again.
        """
        try:
            for process in self._processes_of(name):
                if process.is_running():
                    continue
                process.start()
                process.wait_ready(self.startup_timeout)
            if name == "moto":
                self._create_bucket()
            elif name == "azurite":
                self._create_container()
        finally:
            self._write_state()

    def _processes_of(self, name: str) -> list[ServerProcess]:
        """Return the processes that make up server `name`: an MLflow server and its proxies."""
        processes = [self._process(name)]
        processes += [self._process(front) for front in FRONT_DOORS.get(name, ())]
        return processes

    def is_server_running(self, name: str) -> bool:
        return self._process(name).is_running()

    def __enter__(self) -> Rig:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _process(self, name: str) -> ServerProcess:
        if name not in self.processes:
            raise ValueError(f"unknown server {name!r}; expected one of {', '.join(SERVER_NAMES)}")
        return self.processes[name]

    def _raise_if_running(self) -> None:
        if not self.state_path.exists():
            return
        try:
            previous = Rig.attach(self.state_path)
        except (ValueError, KeyError) as exc:
            log.warning("ignoring unreadable %s: %s", self.state_path, exc)
            return
        running = [name for name in SERVER_NAMES if previous.is_server_running(name)]
        if running:
            raise RuntimeError(
                f"a rig started from {self.state_dir} is still running ({', '.join(running)}); "
                f"stop it with `python -m rig down --state-dir {self.state_dir}` or reuse it "
                f"with AZDUAL_RIG_STATE={self.state_path}"
            )

    def _remove_previous_state(self) -> None:
        for name in MLFLOW_SERVER_NAMES:
            (self.state_dir / name / "mlflow.db").unlink(missing_ok=True)
        shutil.rmtree(self.dbfs_root, ignore_errors=True)
        self.state_path.unlink(missing_ok=True)

    # Storage set-up. moto and Azurite keep data in memory, so this runs after every start.

    def _create_bucket(self) -> None:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )
        s3.create_bucket(Bucket=self.bucket)

    def _create_container(self) -> None:
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.azure_storage_connection_string)
        service.create_container(self.container)

    # State file.

    def _write_state(self) -> None:
        state = {
            "primary_uri": self.primary_uri,
            "secondary_uri": self.secondary_uri,
            "dual_tracking_uri": self.dual_tracking_uri(),
            "databricks_dual_tracking_uri": self.databricks_dual_tracking_uri(),
            "env": self.env,
            "databricks_env": self.databricks_env,
            "processes": {name: process.to_state() for name, process in self.processes.items()},
        }
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2) + "\n")
        temporary.replace(self.state_path)

    @classmethod
    def attach(cls, state_path: str | os.PathLike) -> Rig:
        """Rebuild a Rig from the state.json of a rig that another process started.

        `stop()`, `stop_server()` and `start_server()` then act on those processes and
        update the state file. Raises FileNotFoundError if there is no state file.
        """
        state_path = Path(state_path).resolve()
        state = json.loads(state_path.read_text())
        rig = cls(state_path.parent)
        # A rig started by an older version of this module lacks some servers, and those that
        # it has can still be stopped.
        rig.processes = {
            name: ServerProcess.from_state(name, state["processes"][name])
            for name in SERVER_NAMES
            if name in state["processes"]
        }
        rig._ports = {name: process.port for name, process in rig.processes.items()}
        return rig


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by the owner only from the moment it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
