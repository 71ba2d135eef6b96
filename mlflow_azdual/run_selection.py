"""Select primary runs for ``mlflow-azdual mirror`` and ``diff``: by experiment, start time or id.

Experiments are given by path (name) or id. Times are ISO 8601 dates or date-times, UTC unless
they carry an offset, and compared with the run's start time. Deleted runs and experiments are
not selected. Every read goes to the primary through the dual store's (paced) primary store.
"""

import dataclasses
import datetime
from typing import Iterator, List, Optional

SEARCH_PAGE_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class Selection:
    """The primary runs a command works on. Empty lists select every active experiment."""

    experiments: List[str] = dataclasses.field(default_factory=list)
    run_ids: List[str] = dataclasses.field(default_factory=list)
    since_ms: Optional[int] = None
    until_ms: Optional[int] = None

    def in_window(self, start_time_ms: Optional[int]) -> bool:
        start = start_time_ms or 0
        if self.since_ms is not None and start < self.since_ms:
            return False
        return self.until_ms is None or start < self.until_ms


def parse_time_ms(text: str) -> int:
    """Parse an ISO 8601 date or date-time (UTC unless it has an offset) to epoch milliseconds.

    Raises ValueError naming the value and the accepted forms.
    """
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: expected an ISO 8601 date or date-time such as 2024-05-01 "
            "or 2024-05-01T13:30:00+02:00 (UTC when no offset is given)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


def resolve_experiment(store, name_or_id: str):
    """Return the primary experiment named ``name_or_id`` (a path) or with that id.

    Raises LookupError naming the value when the primary has neither.
    """
    from mlflow.exceptions import MlflowException

    from mlflow_azdual.experiment_names import normalise_experiment_name

    name = normalise_experiment_name(name_or_id, store.primary_profile)
    experiment = store.primary.get_experiment_by_name(name)
    if experiment is not None:
        return experiment
    try:
        return store.primary.get_experiment(name_or_id)
    except MlflowException:
        raise LookupError(
            f"experiment {name_or_id!r} not found on the primary: pass the experiment's path "
            "(such as /Users/<user>/<name>) or its id"
        ) from None


def selected_experiments(store, selection: Selection) -> list:
    """Return the primary experiments of ``selection``: those named, or every active one."""
    if selection.experiments:
        return [resolve_experiment(store, value) for value in selection.experiments]
    from mlflow.entities import ViewType

    experiments, page_token = [], None
    while True:
        page = store.primary.search_experiments(
            view_type=ViewType.ACTIVE_ONLY, max_results=SEARCH_PAGE_SIZE, page_token=page_token
        )
        experiments.extend(page)
        page_token = page.token
        if not page_token:
            return experiments


def runs_of_experiment(store, experiment_id: str, selection: Selection) -> Iterator:
    """Yield the active primary runs of one experiment within the selection's time window."""
    from mlflow.entities import ViewType

    clauses = []
    if selection.since_ms is not None:
        clauses.append(f"attributes.start_time >= {selection.since_ms}")
    if selection.until_ms is not None:
        clauses.append(f"attributes.start_time < {selection.until_ms}")
    page_token = None
    while True:
        page = store.primary.search_runs(
            [experiment_id], " and ".join(clauses), ViewType.ACTIVE_ONLY,
            max_results=SEARCH_PAGE_SIZE, page_token=page_token,
        )
        yield from page
        page_token = page.token
        if not page_token:
            return


def selected_runs(store, selection: Selection) -> list:
    """Return the primary runs of ``selection``, oldest first.

    Runs named by id are read one by one and kept when they start within the time window.
    Raises LookupError naming an id that the primary does not have.
    """
    from mlflow.exceptions import MlflowException

    runs = []
    for run_id in selection.run_ids:
        try:
            run = store.primary.get_run(run_id)
        except MlflowException as error:
            raise LookupError(
                f"run {run_id!r} not found on the primary ({error.error_code}): pass the id of a "
                "run on the primary backend"
            ) from None
        if selection.in_window(run.info.start_time):
            runs.append(run)
    if selection.experiments or not selection.run_ids:
        for experiment in selected_experiments(store, selection):
            runs.extend(runs_of_experiment(store, experiment.experiment_id, selection))
    unique = {run.info.run_id: run for run in runs}
    return sorted(unique.values(), key=lambda run: (run.info.start_time or 0, run.info.run_id))
