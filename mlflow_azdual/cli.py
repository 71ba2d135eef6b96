"""The ``mlflow-azdual`` command: inspect how an azdual tracking URI resolves.

``mlflow-azdual resolve [URI]`` prints the primary and secondary tracking and registry URIs
and every option value, with secrets redacted. URI defaults to MLFLOW_TRACKING_URI.
"""

import argparse
import os
import sys

from mlflow_azdual.options import OPTIONS


def _resolve(uri: str) -> int:
    from mlflow.exceptions import MlflowException

    from mlflow_azdual.uri import parse_tracking_uri, redact_uri

    try:
        config = parse_tracking_uri(uri)
    except MlflowException as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    print(f"primary tracking URI:    {redact_uri(config.primary_uri)}")
    print(f"secondary tracking URI:  {redact_uri(config.secondary_uri)}")
    print(f"primary registry URI:    {redact_uri(config.primary_registry_uri)}")
    print(f"secondary registry URI:  {redact_uri(config.secondary_registry_uri)}")
    for option in OPTIONS:
        print(f"{option.name} = {config.options[option.name]!r}")
    return 0


def main(argv=None) -> int:
    """Run the ``mlflow-azdual`` command line and return its exit code."""
    parser = argparse.ArgumentParser(prog="mlflow-azdual", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    resolve = commands.add_parser("resolve", help="show the backends an azdual URI resolves to")
    resolve.add_argument(
        "uri", nargs="?", default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="azdual tracking URI (default: MLFLOW_TRACKING_URI)",
    )
    arguments = parser.parse_args(argv)
    if arguments.command == "resolve":
        if not arguments.uri:
            parser.error("no URI given and MLFLOW_TRACKING_URI is not set")
        return _resolve(arguments.uri)
    return 2


if __name__ == "__main__":
    sys.exit(main())
