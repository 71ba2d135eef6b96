"""Mapping Databricks experiment paths to Azure ML experiment names."""

import pytest

from mlflow_azdual.experiment_names import (
    MAX_NAME_LENGTH,
    disambiguate,
    sanitise,
    secondary_experiment_name,
)


@pytest.mark.parametrize(
    ("primary_name", "expected"),
    [
        ("/Users/ana@example.com/churn/baseline", "baseline"),
        ("/Shared/churn model v2", "churn_model_v2"),
        ("plain-name", "plain-name"),
        ("/Users/ana@example.com/ümlaut.run", "mlaut_run"),
        ("/Shared/???", "experiment"),
    ],
)
def test_default_template_uses_sanitised_leaf(primary_name, expected):
    assert secondary_experiment_name(primary_name) == expected


def test_templates_with_parent_and_path():
    name = "/Users/ana@example.com/churn/baseline"
    assert secondary_experiment_name(name, "{parent}-{leaf}") == "churn-baseline"
    assert secondary_experiment_name(name, "{path}") == "Users-ana_example_com-churn-baseline"


def test_unknown_template_field_raises():
    with pytest.raises(ValueError, match="use the fields"):
        secondary_experiment_name("/Shared/x", "{project}")


def test_names_never_contain_slash_and_fit_length():
    long_name = "/Shared/" + "a/" * 10 + "b" * 400
    name = secondary_experiment_name(long_name, "{path}")
    assert "/" not in name
    assert len(name) == MAX_NAME_LENGTH
    assert len(disambiguate(name, long_name)) <= MAX_NAME_LENGTH


def test_disambiguate_is_deterministic_per_path():
    first = disambiguate("baseline", "/Users/a@example.com/baseline")
    second = disambiguate("baseline", "/Users/b@example.com/baseline")
    assert first == disambiguate("baseline", "/Users/a@example.com/baseline")
    assert first != second
    assert first.startswith("baseline-")


def test_sanitise_keeps_valid_characters():
    assert sanitise("run_1-A") == "run_1-A"
