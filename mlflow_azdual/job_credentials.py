"""Keep the MLflow token of an Azure ML job away from an http(s) primary.

Azure ML jobs set MLFLOW_TRACKING_TOKEN to a token for their workspace, and azureml-mlflow
sends it to Azure ML. MLflow's REST stores for http(s) tracking URIs send the same variable
as a bearer token to their server, so an http(s) primary next to an azureml:// secondary
would receive the Azure ML token. ``without_tracking_token`` gives such a primary store host
credentials without a token equal to MLFLOW_TRACKING_TOKEN. A ``databricks`` primary takes
its credentials from the Databricks configuration and never reads the variable.
"""

import copy
import os
import urllib.parse

TRACKING_TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
_HTTP_SCHEMES = ("http", "https")


def tracking_token_belongs_to_secondary(primary_uri: str, secondary_uri: str) -> bool:
    """Return True when MLFLOW_TRACKING_TOKEN is for an azureml:// secondary, not an http(s) primary."""
    primary_scheme = urllib.parse.urlsplit(primary_uri).scheme.lower()
    secondary_scheme = urllib.parse.urlsplit(secondary_uri).scheme.lower()
    return primary_scheme in _HTTP_SCHEMES and secondary_scheme == "azureml"


def without_tracking_token(store):
    """Return ``store`` with MLFLOW_TRACKING_TOKEN left out of the host credentials it sends.

    The variable is read on every request, as MLflow reads it, so a token set or changed later
    is left out too. A store without a ``get_host_creds`` callable is returned unchanged.
    """
    get_host_creds = getattr(store, "get_host_creds", None)
    if not callable(get_host_creds):
        return store

    def host_creds_without_tracking_token():
        creds = get_host_creds()
        token = os.environ.get(TRACKING_TOKEN_ENV)
        if token and getattr(creds, "token", None) == token:
            creds = copy.copy(creds)
            creds.token = None
        return creds

    store.get_host_creds = host_creds_without_tracking_token
    return store
