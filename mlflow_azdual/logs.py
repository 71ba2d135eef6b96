"""Loggers of the plugin, which remove secrets from every record before any handler receives it.

Messages of the plugin quote errors of the backends and of their client libraries, which can
contain a URL with user info, a token or a storage connection string. ``get_logger`` returns
the standard logger of a module with a filter that runs ``redact_text`` over the formatted
message and the traceback. Logger filters are not inherited, so every module of the package
takes its logger from here.
"""

import logging

from mlflow_azdual.uri import redact_text


class RedactingFilter(logging.Filter):
    """Replaces a record's message and traceback with their redacted text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg = redact_text(message)
        record.args = None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact_text(text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


_FILTER = RedactingFilter()


def get_logger(name: str) -> logging.Logger:
    """Return the logger ``name`` with the redacting filter installed once."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
