"""Merge queued writes into as few requests as a backend's batch limits allow (pure functions).

A window of queued writes, in FIFO order, becomes a list of requests. Consecutive mergeable
writes (metrics, params, tags of one run) become ``Batch`` requests per run. Every other write
(a ``Write`` with a ``call``) is a barrier, emitted alone after everything queued before it.
Within a run, items keep their order, and a param or tag key that repeats starts a new batch,
so that a later value is applied after an earlier one.
"""

import dataclasses
from typing import Callable, List, Optional, Sequence, Union


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    """Maximum entities in one ``log_batch`` request (MLflow REST API defaults)."""

    max_metrics: int = 1000
    max_params: int = 100
    max_tags: int = 100
    max_entities: int = 1000


class Write:
    """One queued write: metrics, params and tags of a run, or a ``call`` run on its own.

    Slotted, because a full queue contains ``buffer_capacity_points`` of them.
    """

    __slots__ = ("seq", "run_id", "metrics", "params", "tags", "call", "operation", "enqueued_s")

    def __init__(
        self,
        seq: int,
        run_id: Optional[str] = None,
        metrics: Sequence = (),
        params: Sequence = (),
        tags: Sequence = (),
        call: Optional[Callable[[], object]] = None,
        operation: str = "log_batch",
    ):
        self.seq = seq
        self.run_id = run_id
        self.metrics = metrics
        self.params = params
        self.tags = tags
        self.call = call
        self.operation = operation
        self.enqueued_s = 0.0

    @property
    def size(self) -> int:
        """Buffer slots this write takes: its entities, or one for a call."""
        return (len(self.metrics) + len(self.params) + len(self.tags)) or 1

    def __repr__(self) -> str:
        return f"Write(seq={self.seq}, run_id={self.run_id}, operation={self.operation})"


@dataclasses.dataclass
class Batch:
    """One ``log_batch`` request for a run."""

    run_id: str
    metrics: List = dataclasses.field(default_factory=list)
    params: List = dataclasses.field(default_factory=list)
    tags: List = dataclasses.field(default_factory=list)
    first_seq: int = 0
    last_seq: int = 0

    @property
    def entities(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)


Request = Union[Batch, Write]


def _fits(batch: Batch, kind: str, item, limits: BatchLimits) -> bool:
    if batch.entities >= limits.max_entities:
        return False
    if kind == "metrics":
        return len(batch.metrics) < limits.max_metrics
    if kind == "params":
        return len(batch.params) < limits.max_params and all(
            param.key != item.key for param in batch.params
        )
    return len(batch.tags) < limits.max_tags and all(tag.key != item.key for tag in batch.tags)


def coalesce(writes: Sequence[Write], limits: BatchLimits = BatchLimits()) -> List[Request]:
    """Return the requests that send ``writes`` in order within ``limits``."""
    requests: List[Request] = []
    segment: List[Batch] = []
    open_batches = {}

    def close_segment():
        requests.extend(segment)
        segment.clear()
        open_batches.clear()

    for write in writes:
        if write.call is not None:
            close_segment()
            requests.append(write)
            continue
        batch = open_batches.get(write.run_id)
        for kind in ("metrics", "params", "tags"):
            for item in getattr(write, kind):
                if batch is None or not _fits(batch, kind, item, limits):
                    batch = Batch(write.run_id, first_seq=write.seq)
                    open_batches[write.run_id] = batch
                    segment.append(batch)
                getattr(batch, kind).append(item)
        if batch is not None:
            batch.last_seq = write.seq
    close_segment()
    return requests
