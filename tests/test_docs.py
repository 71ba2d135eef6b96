"""The documentation lists every option exactly as the code defines it."""

from pathlib import Path

from mlflow_azdual.options import OPTIONS, options_table_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_doc_has_current_option_table():
    text = (DOCS / "configuration.md").read_text()
    assert options_table_markdown() in text, "regenerate the table with options_table_markdown()"


def test_quantity_options_name_units():
    quantities = [option for option in OPTIONS if isinstance(option.default, (int, float))]
    quantities = [option for option in quantities if not isinstance(option.default, bool)]
    for option in quantities:
        assert option.name.endswith(("_s", "_points", "_metrics", "_params", "_tags", "_bytes")), option.name
