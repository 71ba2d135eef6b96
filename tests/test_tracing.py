"""Traces written through the azdual URI reach the primary only.

The store method that a trace reaches differs by version: MLflow 2 calls ``start_trace`` and
``end_trace``, and MLflow 3.0 sends a finished trace with ``start_trace_v3``.
"""

import mlflow
import pytest

from tests.dual_helpers import backend_clients, unique_path
from tests.mlflow_versions import flush_traces, needs_tracing


@needs_tracing
@pytest.mark.smoke
def test_trace_lands_on_primary(rig, dual):
    primary, _ = backend_clients(rig)
    experiment = mlflow.set_experiment(unique_path())

    @mlflow.trace
    def add(left, right):
        return left + right

    assert add(1, 2) == 3
    flush_traces()

    # The store-level search returns trace infos without downloading span data, which MLflow
    # 2.21.3's client fails to download from the rig's storage even without the plugin.
    store = primary._tracking_client.store
    trace_infos, _ = store.search_traces(experiment_ids=[experiment.experiment_id])
    assert len(trace_infos) == 1
