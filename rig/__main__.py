"""Command line for the rig: `python -m rig up | env | status | down [--state-dir DIR]`.

`up` starts the servers in their own sessions and returns, leaving them running, and writes
<state dir>/state.json. `env` prints shell exports for a client. `down` stops exactly the
process groups recorded in state.json.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from rig.servers import DATABRICKS_ENV_OVERRIDES, DEFAULT_STATE_DIR, Rig


def _attach(state_dir: Path) -> Rig:
    state_path = state_dir / "state.json"
    if not state_path.exists():
        raise SystemExit(f"no rig state at {state_path}; start the rig with `python -m rig up`")
    return Rig.attach(state_path)


def command_up(state_dir: Path) -> None:
    rig = Rig(state_dir).start()
    print(f"primary (Databricks stand-in) UI and API: {rig.primary_uri}")
    print(f"secondary (Azure ML stand-in) UI and API: {rig.secondary_uri}")
    print("  each is an MLflow server behind a policy proxy that emulates the service's "
          "published limits")
    print(f"plugin tracking URI: {rig.dual_tracking_uri()}")
    print(f"primary through MLflow's Databricks client: {rig.primary_databricks_uri} "
          f"({rig.primary_databricks_host}, profile in {rig.databricks_config_path})")
    print(f"plugin tracking URI with that primary: {rig.databricks_dual_tracking_uri()}")
    print(f"S3 (moto): {rig.s3_endpoint_url}")
    print(f"logs: {rig.state_dir / 'logs'}")
    quoted_state_dir = shlex.quote(str(state_dir))
    # The interpreter that runs the rig is the one that has MLflow and the plugin installed.
    python = shlex.quote(sys.executable)
    print(f"client environment: eval \"$({python} -m rig env --state-dir {quoted_state_dir})\"")
    print(f"stop: {python} -m rig down --state-dir {quoted_state_dir}")


def command_env(state_dir: Path) -> None:
    rig = _attach(state_dir)
    print(f"# primary: {rig.primary_uri}")
    print(f"# secondary: {rig.secondary_uri}")
    print(f"# plugin tracking URI: {rig.dual_tracking_uri()}")
    print(f"# with {rig.primary_databricks_uri} as the primary: {rig.databricks_dual_tracking_uri()}")
    exports = {**rig.env, **rig.databricks_env, "AZDUAL_RIG_STATE": str(rig.state_path)}
    for key, value in exports.items():
        print(f"export {key}={shlex.quote(value)}")
    print("# these would take precedence over the rig's Databricks config file")
    print(f"unset {' '.join(DATABRICKS_ENV_OVERRIDES)}")


def command_status(state_dir: Path) -> None:
    state_path = state_dir / "state.json"
    if not state_path.exists():
        raise SystemExit(f"no rig is running from {state_dir}")
    rig = Rig.attach(state_path)
    stopped = [name for name in rig.processes if not rig.is_server_running(name)]
    for name in rig.processes:
        print(f"{name}: {'stopped' if name in stopped else 'running'}")
    if stopped:
        raise SystemExit(f"rig in {state_dir} is not fully running: {', '.join(stopped)} stopped")
    print(f"primary: {rig.primary_uri}")
    print(f"secondary: {rig.secondary_uri}")


def command_down(state_dir: Path) -> None:
    _attach(state_dir).stop()
    print(f"rig in {state_dir} stopped")


def command_stop_server(state_dir: Path, server: str) -> None:
    _attach(state_dir).stop_server(server)
    print(f"{server} stopped: clients get connection refused until start-server {server}")


def command_start_server(state_dir: Path, server: str) -> None:
    _attach(state_dir).start_server(server)
    print(f"{server} running again")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rig", description=__doc__.splitlines()[0])
    parser.add_argument(
        "command",
        choices=("up", "env", "status", "down", "stop-server", "start-server"),
        help="up: start the rig in the background; env: print shell exports for a client; "
        "status: exit 0 if every server of the rig is running; down: stop the rig that `up` "
        "started; stop-server / start-server SERVER: stop or restart one MLflow "
        "server and its policy proxies, or only the primary's https front door "
        "(primary-databricks), to try an outage",
    )
    parser.add_argument(
        "server", nargs="?", choices=("primary", "secondary", "primary-databricks"),
        help="the server for stop-server and start-server",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"folder for state.json, logs and the SQLite stores (default: {DEFAULT_STATE_DIR})",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    # azure-core logs every request and response at INFO.
    logging.getLogger("azure").setLevel(logging.WARNING)

    state_dir = args.state_dir.resolve()
    commands = {
        "up": command_up,
        "env": command_env,
        "status": command_status,
        "down": command_down,
    }
    if args.command in ("stop-server", "start-server"):
        if args.server is None:
            parser.error(
                f"{args.command} needs a server: primary, secondary or primary-databricks"
            )
        server_commands = {"stop-server": command_stop_server, "start-server": command_start_server}
        try:
            server_commands[args.command](state_dir, args.server)
        except (RuntimeError, FileNotFoundError) as exc:
            raise SystemExit(f"python -m rig {args.command} failed: {exc}") from None
        return
    try:
        commands[args.command](state_dir)
    except (RuntimeError, FileNotFoundError) as exc:
        raise SystemExit(f"python -m rig {args.command} failed: {exc}") from None


if __name__ == "__main__":
    main()
