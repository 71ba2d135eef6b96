"""Every store method of the installed MLflow is routed on purpose by the dual stores.

MLflow's AbstractStore does not enforce abstract methods, so a method the dual store omits
inherits a stub that silently returns None. These tests list the methods of the installed
MLflow (AbstractStore plus the undeclared ones that the REST stores add and MLflow calls) and
fail on any that the dual stores neither implement nor route through a table.
"""

import inspect

import pytest
from mlflow.store.model_registry.abstract_store import AbstractStore as RegistryAbstractStore
from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
from mlflow.store.tracking.abstract_store import AbstractStore as TrackingAbstractStore
from mlflow.store.tracking.rest_store import RestStore as TrackingRestStore

from mlflow_azdual import routing
from mlflow_azdual.compat import public_methods
from mlflow_azdual.registry_store import DualRegistryStore
from mlflow_azdual.tracking_store import DualTrackingStore

pytestmark = pytest.mark.smoke


def unrouted(store_class, base_classes, tables):
    """Return the public methods of ``base_classes`` that ``store_class`` does not route."""
    expected = set().union(*(public_methods(base) for base in base_classes))
    routed = set().union(*tables) | set(store_class.__dict__)
    return sorted(expected - routed)


def test_tracking_store_routes_every_method():
    missing = unrouted(
        DualTrackingStore,
        (TrackingAbstractStore, TrackingRestStore),
        (routing.TRACKING_READS, routing.TRACKING_PRIMARY_ONLY_WRITES, routing.TRACKING_INHERITED),
    )
    assert missing == [], f"route these tracking store methods in mlflow_azdual: {missing}"


def test_registry_store_routes_every_method():
    missing = unrouted(
        DualRegistryStore,
        (RegistryAbstractStore, RegistryRestStore),
        (routing.REGISTRY_READS, routing.REGISTRY_PRIMARY_ONLY_WRITES),
    )
    assert missing == [], f"route these registry store methods in mlflow_azdual: {missing}"


def test_delete_tag_and_host_creds_are_defined():
    assert "delete_tag" in DualTrackingStore.__dict__
    assert "get_host_creds" in DualTrackingStore.__dict__


def test_no_method_falls_through_to_a_stub():
    for name in public_methods(TrackingAbstractStore) - routing.TRACKING_INHERITED:
        method = getattr(DualTrackingStore, name)
        assert method is not getattr(TrackingAbstractStore, name), name
    for name in public_methods(RegistryAbstractStore):
        method = getattr(DualRegistryStore, name)
        assert method is not getattr(RegistryAbstractStore, name), name


def test_tables_do_not_overlap():
    tables = [
        routing.TRACKING_READS, routing.TRACKING_PRIMARY_ONLY_WRITES, routing.TRACKING_INHERITED
    ]
    for index, table in enumerate(tables):
        for other in tables[index + 1:]:
            assert not table & other, sorted(table & other)
    assert not routing.REGISTRY_READS & routing.REGISTRY_PRIMARY_ONLY_WRITES


def test_generated_methods_are_named():
    assert DualTrackingStore.search_traces.__name__ == "search_traces"
    assert inspect.isfunction(DualTrackingStore.start_trace)
