"""Merge queued writes into as few requests as a backend's batch limits allow (pure functions).

A window of queued writes, in FIFO order, becomes a list of requests. Consecutive mergeable
writes (metrics, params, tags of one run) become ``Batch`` requests per run. Every other write
(any operation but ``log_batch``) is a barrier, emitted alone after everything queued before it.
Within a run, items keep their order, and a param or tag key that repeats starts a new batch,
so that a later value is applied after an earlier one.
"""

import dataclasses
from typing import List, Optional, Sequence, Union


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    """Maximum entities in one ``log_batch`` request (MLflow REST API defaults).

    ``max_values_per_metric_key`` caps the points of one metric key in one request (Azure ML
    takes 250); None for no cap.
    """

    max_metrics: int = 1000
    max_params: int = 100
    max_tags: int = 100
    max_entities: int = 1000
    max_values_per_metric_key: Optional[int] = None

    def narrowed(self, other: "BatchLimits") -> "BatchLimits":
        """Return the stricter of ``self`` and ``other`` for every limit."""

        def stricter(first, second):
            if first is None or second is None:
                return second if first is None else first
            return min(first, second)

        return BatchLimits(*(
            stricter(getattr(self, field.name), getattr(other, field.name))
            for field in dataclasses.fields(self)
        ))


LOG_BATCH = "log_batch"


class Write:
    """One queued write, as data: metrics, params and tags of a run, or a named operation.

    A ``log_batch`` write carries ``metrics``, ``params`` and ``tags``. Any other operation
    carries its arguments in ``args``, a dict of JSON values, MLflow entities and MLflow
    ``Model`` objects, so that the write can be spooled to disk and replayed by another
    process. ``run_id`` is always the primary's id. ``spool_id`` is the write's row in the
    spool once it is durable, and ``attempts`` counts failed sends. ``uncertain`` is set when
    a send may have reached the backend although it failed, so that a retry checks first.
    Slotted, because a full queue contains ``buffer_capacity_points`` of them.
    """

    __slots__ = (
        "seq", "run_id", "metrics", "params", "tags", "operation", "args",
        "enqueued_s", "spool_id", "attempts", "uncertain",
    )

    def __init__(
        self,
        seq: int,
        run_id: Optional[str] = None,
        metrics: Sequence = (),
        params: Sequence = (),
        tags: Sequence = (),
        operation: str = LOG_BATCH,
        args: Optional[dict] = None,
    ):
        self.seq = seq
        self.run_id = run_id
        self.metrics = metrics
        self.params = params
        self.tags = tags
        self.operation = operation
        self.args = args
        self.enqueued_s = 0.0
        self.spool_id = None
        self.attempts = 0
        self.uncertain = False

    @property
    def is_barrier(self) -> bool:
        """True for an operation other than log_batch, which is sent alone and in order."""
        return self.operation != LOG_BATCH

    @property
    def size(self) -> int:
        """Buffer slots this write takes: its entities, or one for another operation."""
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
    # Points per metric key, kept only when the limits cap them.
    key_counts: dict = dataclasses.field(default_factory=dict)
    # The queued writes whose items this batch carries, in order.
    writes: List = dataclasses.field(default_factory=list)

    @property
    def entities(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)


Request = Union[Batch, Write]


def _fits(batch: Batch, kind: str, item, limits: BatchLimits) -> bool:
    if batch.entities >= limits.max_entities:
        return False
    if kind == "metrics":
        if limits.max_values_per_metric_key is not None:
            if batch.key_counts.get(item.key, 0) >= limits.max_values_per_metric_key:
                return False
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
        if write.is_barrier:
            close_segment()
            requests.append(write)
            continue
        batch = open_batches.get(write.run_id)
        for kind in ("metrics", "params", "tags"):
            for item in getattr(write, kind):
                if batch is None or not _fits(batch, kind, item, limits):
                    batch = Batch(write.run_id, first_seq=write.seq, last_seq=write.seq)
                    open_batches[write.run_id] = batch
                    segment.append(batch)
                getattr(batch, kind).append(item)
                if kind == "metrics" and limits.max_values_per_metric_key is not None:
                    batch.key_counts[item.key] = batch.key_counts.get(item.key, 0) + 1
                if not batch.writes or batch.writes[-1] is not write:
                    batch.writes.append(write)
        if batch is not None:
            batch.last_seq = write.seq
    close_segment()
    return requests
