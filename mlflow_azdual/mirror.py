"""Send writes to the secondary backend without ever failing the user's call.

``Mirror.send`` runs one secondary write and returns its result, or None when it failed. A
failure is logged as a WARNING naming the backend, the operation and the run id, and counted.
Repeats of the same operation within ``WARNING_INTERVAL_S`` are counted but not logged again.
Writes run on the caller's thread, in call order.
"""

import threading
import time
from collections import Counter
from typing import Callable, Optional

from mlflow_azdual.delivery import describe_error
from mlflow_azdual.forking import renew_after_fork
from mlflow_azdual.logs import get_logger
from mlflow_azdual.uri import redact_uri

_logger = get_logger(__name__)

WARNING_INTERVAL_S = 10.0


class Mirror:
    """Runs writes against one secondary backend and records the ones that failed."""

    def __init__(self, backend_uri: str):
        self.backend = redact_uri(backend_uri)
        self.failures = Counter()
        self.unsupported = Counter()
        self._lock = threading.Lock()
        renew_after_fork(self, "_lock")
        self._last_warning_s = {}
        self._suppressed = Counter()

    def send(self, operation: str, run_id: Optional[str], write: Callable[[], object]):
        """Run ``write``; on failure log a WARNING with the backend, operation and run id."""
        try:
            return write()
        except Exception as error:  # noqa: BLE001 - a secondary error never reaches the user.
            self._record_failure(operation, run_id, error)
            return None

    def record_unsupported(self, operation: str, reason: str, part: Optional[str] = None) -> None:
        """Record a write, or the ``part`` of it named, that the plugin does not send to the
        secondary, logging it once per operation."""
        with self._lock:
            self.unsupported[operation] += 1
            first = self.unsupported[operation] == 1
        if first:
            subject = f"{part} of {operation}" if part else operation
            _logger.warning(
                "mlflow-azdual: %s is written to the primary only and not mirrored to the "
                "secondary %s: %s",
                subject, self.backend, reason,
            )

    def _record_failure(self, operation: str, run_id: Optional[str], error: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self.failures[operation] += 1
            last = self._last_warning_s.get(operation)
            if last is not None and now - last < WARNING_INTERVAL_S:
                self._suppressed[operation] += 1
                return
            self._last_warning_s[operation] = now
            suppressed = self._suppressed.pop(operation, 0)
        repeats = f" ({suppressed} similar failures not logged)" if suppressed else ""
        _logger.warning(
            "mlflow-azdual: secondary write failed and was not mirrored: backend=%s "
            "operation=%s run_id=%s error=%s%s",
            self.backend, operation, run_id or "-", describe_error(error), repeats,
        )
