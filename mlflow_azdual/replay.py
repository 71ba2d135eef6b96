"""Replay the spool files that ended processes left behind, in the background or in the foreground.

A spool file whose lock is free belongs to a process that ended (normally with writes still
unsent, or killed). ``replay_directory`` claims each such file of one configuration and sends its
writes in spool order, through the dual store's own senders and retry policy, deleting each
row once the backend acknowledged it. The primary's writes go first, so that a run copied to
the secondary from the primary already has the primary's replayed metrics. Every
replayed write is ``uncertain``, because its process may have sent it just before ending.
Metrics and params already on the backend are left out (``idempotency``), and a run, logged
model or model version is looked up by its mapping tag before it is created.

A permanent rejection goes to the file's dead letters. When a backend stays unavailable for the
policy's time budget, that backend's remaining writes stay in the file for a later replay. A
corrupt or foreign file is renamed aside (``spool.quarantine``) with an ERROR naming it, so it
never stops the replay of other files or makes every process fail on it again.

``resume_in_background`` runs this once per process and directory on a daemon thread, when the
process's own spool is created; ``mlflow-azdual sync`` runs it in the foreground.
"""

import dataclasses
import threading
from typing import Callable, Dict, List, Optional

from mlflow_azdual import idempotency
from mlflow_azdual.coalesce import coalesce
from mlflow_azdual.delivery import DELIVERED, REJECTED, Delivery, writes_of
from mlflow_azdual.logs import get_logger

_logger = get_logger(__name__)

BACKENDS = ("primary", "secondary")
_CHUNK_WRITES = 1000

_started_lock = threading.Lock()
_started = set()


@dataclasses.dataclass
class ReplayResult:
    """Counts of a replay per backend, in writes (rows of the spool)."""

    delivered: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(BACKENDS, 0))
    rejected: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(BACKENDS, 0))
    left: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(BACKENDS, 0))
    files: int = 0
    bad_files: List[str] = dataclasses.field(default_factory=list)
    # The path each bad file was moved aside to, by its original path.
    moved_to: Dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when nothing was left unsent and no file was unreadable."""
        return not any(self.left.values()) and not self.bad_files


def resume_in_background(store, directory: str) -> Optional[threading.Thread]:
    """Start replaying ``directory``'s orphaned spool files on a daemon thread, once per process."""
    import os

    key = (os.getpid(), directory)
    with _started_lock:
        if key in _started:
            return None
        _started.add(key)

    def run():
        try:
            result = replay_directory(store, directory)
        except Exception:  # noqa: BLE001 - a failed replay must not disturb the user's process.
            _logger.exception(
                "mlflow-azdual: replaying the spool in %s failed; its files stay there for the "
                "next process or `mlflow-azdual sync`", directory,
            )
            return
        if result.files:
            _logger.info(
                "mlflow-azdual: replayed %d spool file(s) left by ended processes: delivered %s, "
                "rejected %s, left %s",
                result.files, result.delivered, result.rejected, result.left,
            )

    thread = threading.Thread(target=run, name="mlflow-azdual-replay", daemon=True)
    thread.start()
    return thread


def replay_directory(
    store,
    directory: str,
    progress: Optional[Callable[[int, int], None]] = None,
    stop: Optional[threading.Event] = None,
) -> ReplayResult:
    """Replay every orphaned spool file in ``directory``; ``progress(done, total)`` is called
    as writes are settled (delivered or rejected)."""
    from mlflow_azdual.spool import (
        ClaimedSpool,
        SpoolFileError,
        orphan_files,
        quarantine,
    )

    result = ReplayResult()
    claimed_files = []
    for path in orphan_files(directory):
        try:
            claimed = ClaimedSpool.claim(path)
        except SpoolFileError as error:
            moved = quarantine(path)
            _logger.error(
                "mlflow-azdual: spool file %s %s, so its writes cannot be replayed. It was moved "
                "aside to %s; delete that file once you have looked at it.",
                path, error.problem, moved,
            )
            result.bad_files.append(path)
            result.moved_to[path] = moved
            continue
        if claimed is not None:
            claimed_files.append(claimed)

    total = sum(claimed.counts().get(backend, {}).get("pending", 0)
                for claimed in claimed_files for backend in BACKENDS)
    settled = [0]

    def advance(count):
        settled[0] += count
        if progress is not None:
            progress(settled[0], total)

    if progress is not None:
        progress(0, total)
    for claimed in claimed_files:
        result.files += 1
        _logger.info("mlflow-azdual: replaying unsent writes from %s", claimed.path)
        try:
            with idempotency.history_cache():
                for backend in BACKENDS:
                    _replay_backend(store, claimed, backend, result, advance, stop)
        finally:
            claimed.close(remove_if_empty=True)
    return result


def _replay_backend(store, claimed, backend, result, advance, stop) -> None:
    send = store.send_primary if backend == "primary" else store.send_secondary
    delivery = Delivery(
        backend, send, store.policy, stop,
        lambda write, reason: claimed.record_failure(write, backend, reason),
    )
    after_id = 0
    while True:
        writes = claimed.read_pending(backend, after_id=after_id, limit=_CHUNK_WRITES)
        if not writes:
            return
        after_id = writes[-1].spool_id
        for write in writes:
            write.uncertain = True
        settled_ids, unsettled_ids = set(), set()
        rejected = 0
        stopped = False
        for request in coalesce(writes, store.backend_limits[backend]):
            ids = {write.spool_id for write in writes_of(request)}
            if stopped:
                unsettled_ids |= ids
                continue
            outcome = delivery.deliver(request)
            parts = [(request, outcome)]
            if outcome.status == REJECTED and len(writes_of(request)) > 1:
                # Each write on its own, so one bad item does not reject the others.
                parts = [
                    (part, delivery.deliver(part))
                    for write in writes_of(request)
                    for part in coalesce([write], store.backend_limits[backend])
                ]
            for part, outcome in parts:
                part_ids = {write.spool_id for write in writes_of(part)}
                if outcome.status == DELIVERED:
                    settled_ids |= part_ids
                elif outcome.status == REJECTED:
                    for write in writes_of(part):
                        claimed.dead_letter(write, backend, outcome.reason)
                    rejected += len(part_ids)
                    delivery.log_rejection(part, outcome.reason, f" in {claimed.path}")
                else:
                    delivery.log_give_up(part, outcome.reason, f"the writes stay in {claimed.path}")
                    unsettled_ids |= part_ids
                    stopped = True
        delivered = settled_ids - unsettled_ids
        claimed.ack_ids(sorted(delivered))
        result.delivered[backend] += len(delivered)
        result.rejected[backend] += rejected
        advance(len(delivered) + rejected)
        if stopped:
            result.left[backend] += claimed.counts().get(backend, {}).get("pending", 0)
            return
