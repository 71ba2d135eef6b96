"""The documentation lists every option exactly as the code defines it."""

import ast
import re
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


# Messages that docs/troubleshooting.md leaves out, by the first words of one of their fixed
# parts (as ``_fixed_parts`` returns them), each with the reason.
UNDOCUMENTED_MESSAGES = {
    "invalid dual artifact uri": "the plugin builds dual artifact URIs itself",
    "in dual artifact uri": "the plugin builds dual artifact URIs itself",
    "no rest endpoint of": "compat: a store class that MLflow does not have",
    "belongs to the parent of this forked process": "a spool used across fork by the plugin",
    "mlflow azdual cannot send the unknown operation": "a queued operation without a handler, "
    "which the plugin never queues",
}
# Modules whose raises check the arguments of internal calls, not user input.
INTERNAL_MODULES = {"retry.py"}

# A value put into a message: an f-string field or a %-style conversion.
_PLACEHOLDER = re.compile(r"\{[^{}]*\}|%(?:\.\d+)?[sdrf]")
_LOG_METHODS = {"warning", "error", "exception", "critical"}


def _normalise(text: str) -> str:
    """Return the lower-case words of ``text``, so markdown, quotes and line breaks do not matter."""
    return " ".join(re.findall(r"[a-z0-9_]+", text.lower()))


def _template(node):
    """Return the text of a string literal, an f-string or a sum of them, with ``{}`` for
    every value put in, or None for another expression."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value if isinstance(part, ast.Constant) else "{}" for part in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        if left is not None or right is not None:
            return (left or "{}") + (right or "{}")
    return None


def _first_template(arguments):
    return next((text for text in map(_template, arguments) if text is not None), None)


def _is_stderr_print(node) -> bool:
    return node.func.id == "print" and any(
        keyword.arg == "file" and ast.unparse(keyword.value) == "sys.stderr"
        for keyword in node.keywords
    )


def _user_messages(tree):
    """Yield (line, template) of every message a user can see in one module: the text of each
    raised exception, each log call at WARNING or above, each FAILED or warning doctor check
    and each line printed to stderr."""
    for node in ast.walk(tree):
        text = None
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            text = _first_template(node.exc.args)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method, arguments = node.func.attr, node.args
            if method in _LOG_METHODS:
                text = _first_template(arguments[:1])
            elif method == "log" and len(arguments) >= 3:
                level = arguments[0]
                if isinstance(level, ast.Attribute) and level.attr in ("WARNING", "ERROR"):
                    text = _first_template(arguments[2:3])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "CheckResult" and len(node.args) >= 3:
                status = node.args[0]
                if isinstance(status, ast.Name) and status.id in ("FAILED", "WARNING"):
                    text = _first_template(node.args[2:3])
            elif _is_stderr_print(node):
                text = _first_template(node.args[:1])
        if text is not None:
            yield node.lineno, text


def _fixed_parts(template: str) -> list:
    """Return the normalised text between the placeholders of ``template``, for each part of
    three words or more. Shorter parts ("failed", "is closed") are too common to search for."""
    parts = [_normalise(part) for part in _PLACEHOLDER.split(template)]
    return [part for part in parts if len(part.split()) >= 3]


def _package_messages():
    """Yield ("module.py:line", fixed parts) of every user-facing message in mlflow_azdual."""
    package = Path(__file__).resolve().parent.parent / "mlflow_azdual"
    for path in sorted(package.glob("*.py")):
        if path.name in INTERNAL_MODULES:
            continue
        for line, template in _user_messages(ast.parse(path.read_text())):
            parts = _fixed_parts(template)
            if parts:
                yield f"{path.name}:{line}", parts


def _is_undocumented_on_purpose(parts) -> bool:
    return any(part.startswith(key) for part in parts for key in UNDOCUMENTED_MESSAGES)


def test_troubleshooting_doc_has_every_message():
    text = f" {_normalise((DOCS / 'troubleshooting.md').read_text())} "
    messages = list(_package_messages())
    assert len(messages) > 80, "the message scan found too few messages to be working"
    missing = [
        f"{where}: {part!r}"
        for where, parts in messages
        if not _is_undocumented_on_purpose(parts)
        for part in parts
        if f" {part} " not in text
    ]
    assert not missing, "add these messages to docs/troubleshooting.md:\n" + "\n".join(missing)


def test_undocumented_messages_still_exist():
    parts = [part for _, message_parts in _package_messages() for part in message_parts]
    stale = [key for key in UNDOCUMENTED_MESSAGES if not any(p.startswith(key) for p in parts)]
    assert not stale, f"remove from UNDOCUMENTED_MESSAGES: {stale}"


def test_architecture_doc_lists_every_module():
    package = Path(__file__).resolve().parent.parent / "mlflow_azdual"
    text = (DOCS / "architecture.md").read_text()
    modules = sorted(path.name for path in package.glob("*.py") if path.name != "__init__.py")
    missing = [name for name in modules if f"`{name}`" not in text]
    assert len(modules) > 30
    assert missing == [], "add a row to the module table of docs/architecture.md"
