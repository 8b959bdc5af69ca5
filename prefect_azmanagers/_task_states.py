"""Task runs the runner ends itself: their submissions and the states it writes for them.

When the engine rather than the task ends a task run (its worker kept being lost, an argument
cannot be sent or rebuilt, the call was cancelled), no worker reports that outcome: the runner
writes the task run's Crashed, Failed or Cancelled state to the API itself, as Prefect's task
engine would have. When a worker did report it but its events were lost on their way to the
API, `ReportedStates` holds that final state for the runner to write at the flow's end.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import RunInput
from prefect.context import SettingsContext
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFuture, wait
from prefect.results import ResultRecordMetadata
from prefect.states import Cancelled, Crashed, Failed, State
from prefect.utilities.collections import visit_collection
from prefect.utilities.engine import collect_task_run_inputs_sync

from prefect_azmanagers import _prefect_compat as compat
from prefect_azmanagers.exceptions import PayloadError, WorkerLost

if TYPE_CHECKING:
    from prefect.tasks import Task


def futures_to_states(parameters: dict[str, Any]) -> dict[str, Any]:
    futures: list[PrefectFuture[Any]] = []
    visit_collection(
        parameters,
        lambda x: futures.append(x) if isinstance(x, PrefectFuture) else None,
        return_data=False,
    )
    if not futures:
        return parameters
    wait(futures)
    return visit_collection(
        parameters,
        lambda x: x.state if isinstance(x, PrefectFuture) else x,
        return_data=True,
    )


def state_for_error(exc: BaseException) -> State:
    """The final State of a task run the runner could not complete (the task did not raise):
    Failed when what was sent cannot travel, Crashed when the infrastructure failed."""
    if isinstance(exc, PayloadError):
        return Failed(message=str(exc), data=exc)
    if isinstance(exc, WorkerLost):
        return Crashed(message=str(exc), data=exc)
    if isinstance(exc, concurrent.futures.CancelledError):
        return Cancelled(message="Cancelled with the flow run.")
    return Crashed(message=f"{type(exc).__name__}: {exc}", data=exc)


@dataclass
class Submission:
    """One submitted task run, from `submit` until its future is settled."""

    outer: concurrent.futures.Future[State]
    task: Task[Any, Any]
    task_run_id: uuid.UUID
    parameters: dict[str, Any]
    wait_for: list[PrefectFuture[Any]] | None
    dependencies: dict[str, set[RunInput]]
    context: dict[str, Any]
    shared: bytes


def record_state(run: Submission, state: State, flow_run_id: uuid.UUID | None,
                  settings: SettingsContext | None) -> None:
    """Write a state the runner built for `run` to the Prefect API, as the task engine would
    have: the task run's state if it exists (forced, as the engine forces its crashes), or a
    new task run holding it. A final state the API already holds (the worker's) is kept; one
    still on its way (sent just before the worker died) is not seen and gets overwritten.

    Runs on a recorder thread with the flow's settings (they say where the API is) and a
    client of its own: the flow's client is not to be entered from another thread.
    """
    with (SettingsContext(profile=settings.profile, settings=settings.settings) if settings
          else contextlib.nullcontext()), get_client(sync_client=True) as client:
        try:
            current = client.read_task_run(run.task_run_id)
        except ObjectNotFound:  # the engine never ran, or its first event was lost with it
            try:
                client.create_task_run(
                    task=run.task, flow_run_id=flow_run_id, id=run.task_run_id,
                    **compat.task_run_identity(run.task, run.parameters),
                    extra_tags=run.context.get("tags_context", {}).get("current_tags", ()),
                    state=state, task_inputs=_task_inputs(run),
                )
                return
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 409:
                    raise
                current = client.read_task_run(run.task_run_id)  # its events arrived meanwhile
        if current.state is not None and current.state.is_final():
            return
        client.set_task_run_state(run.task_run_id, state, force=True)


def _task_inputs(run: Submission) -> dict[str, list[RunInput]]:
    """The task run's inputs (data edges and wait_for) as the engine records them."""
    inputs = {name: list(found) for name, found in run.dependencies.items()}
    if run.wait_for:
        inputs["wait_for"] = list(collect_task_run_inputs_sync(run.wait_for))
    return inputs


def settle(future: concurrent.futures.Future[State], state: State) -> None:
    try:
        future.set_result(state)
    except concurrent.futures.InvalidStateError:
        pass  # already settled (e.g. cancelled first)


class ReportedStates:
    """The final state each worker reported for the flow's task runs, kept small (type, name,
    message, the record of a persisted result and the task; never an in-memory value), so the
    runner can write it to the API where the worker's own events did not arrive: `repair` a
    task run the API holds unfinished, `restore` one the API never heard of."""

    def __init__(self) -> None:
        self._states: dict[uuid.UUID, tuple[Any, str | None, str | None, Any, Task]] = {}
        self._lock = threading.Lock()

    def note(self, task_run_id: uuid.UUID, state: State, task: Task[Any, Any]) -> None:
        if not isinstance(state, State) or not state.is_final():
            return
        record = state.data if isinstance(state.data, ResultRecordMetadata) else None
        with self._lock:
            self._states[task_run_id] = (state.type, state.name, state.message, record, task)

    def _reported(self, task_run_id: uuid.UUID) -> tuple[State, Task] | None:
        with self._lock:
            reported = self._states.get(task_run_id)
        if reported is None:
            return None
        kind, name, message, record, task = reported
        return State(type=kind, name=name, message=message, data=record), task

    def repair(self, client: Any, task_run_id: uuid.UUID) -> bool:
        """Write the reported final state of `task_run_id` (forced, as the engine's own final
        state would have been); False when no worker reported one here."""
        if (reported := self._reported(task_run_id)) is None:
            return False
        client.set_task_run_state(task_run_id, reported[0], force=True)
        return True

    def task_run_ids(self) -> list[uuid.UUID]:
        with self._lock:
            return list(self._states)

    def restore(self, client: Any, flow_run_id: uuid.UUID, task_run_id: uuid.UUID) -> bool:
        """Create `task_run_id`, which the API never heard of (all of its events were lost),
        holding its reported final state, as the runner creates a run whose engine never
        started; False when no worker reported it here or its events arrived meanwhile. Its
        name, key and tags are made anew: only the state travelled back."""
        if (reported := self._reported(task_run_id)) is None:
            return False
        state, task = reported
        try:
            client.create_task_run(task=task, flow_run_id=flow_run_id, id=task_run_id,
                                   **compat.task_run_identity(task, {}), state=state)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 409:
                return False
            raise
        return True
