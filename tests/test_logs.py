"""Records of the plugin's loggers reach handlers with secrets replaced by ``***``."""

import logging

import pytest

from mlflow_azdual.logs import get_logger
from mlflow_azdual.uri import redact_text

AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@pytest.mark.parametrize(
    "text, secret",
    [
        ("Authorization: Bearer tok.en-123", "tok.en-123"),
        ("GET https://someone:pw-123@127.0.0.1:5000/api", "pw-123"),
        ("https://127.0.0.1/x?sig=abc123&sv=2020", "abc123"),
        (f"DefaultEndpointsProtocol=http;AccountName=a;AccountKey={AZURITE_KEY};", AZURITE_KEY),
        ('{"access_token": "tok-456", "expires_in": 3600}', "tok-456"),
        ("MLFLOW_TRACKING_TOKEN=eyJhbGciOi.eyJleHAiOjF9.c2ln", "eyJhbGciOi.eyJleHAiOjF9.c2ln"),
        ("password: hunter2", "hunter2"),
    ],
)
def test_redact_text_removes_secret(text, secret):
    redacted = redact_text(text)
    assert secret not in redacted
    assert "***" in redacted


def test_redact_text_keeps_plain_text():
    text = "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed: 503"
    assert redact_text(text) == text


def test_logger_redacts_message_arguments_and_traceback(caplog):
    logger = get_logger("mlflow_azdual.test_logs")
    caplog.set_level(logging.INFO, logger="mlflow_azdual.test_logs")
    logger.warning("request to %s failed", "https://user:pw-789@127.0.0.1/x")
    try:
        raise RuntimeError(f"AccountKey={AZURITE_KEY}")
    except RuntimeError:
        logger.exception("upload failed with Bearer tok-000")
    text = caplog.text
    for secret in ("pw-789", AZURITE_KEY, "tok-000"):
        assert secret not in text
    assert "request to https://***@127.0.0.1/x failed" in text
    assert "RuntimeError: AccountKey=***" in text


def test_filter_is_installed_once():
    first = get_logger("mlflow_azdual.test_logs_once")
    second = get_logger("mlflow_azdual.test_logs_once")
    assert first is second
    assert len(first.filters) == 1
