"""How far the Prefect API is behind the task runs a runner sent: the credit that keeps a
server that falls behind from dropping their events.

Prefect's default server (SQLite, in-memory messaging) answers quickly while it falls behind:
the events the workers' task engines send queue up in its messaging and are dropped past the
queue's size ("Subscription queue is full, dropping message"), with no 429 to slow anyone.
So the runner counts, every `interval` seconds, the flow run's task runs the API holds in a
final state, and the cluster's dispatch reads its `backlog()` (calls that came back, minus
that count) before each call it sends, holding when the backlogs of the flows on the cluster
plus the calls in flight reach `max_unrecorded`. Read at
dispatch time, the hold engages at once, however long a count takes on a busy server. A count
that stops moving while dispatch is held (an API that records nothing, events lost anyway)
releases the hold after `stall_after` seconds, with a warning: a hold never hangs the flow.
At the flow's end `settle()` keeps the workers up while the API is still recording, then
writes the final state the runner holds to each task run the API still holds unfinished: on a
busy server a worker's last events can be lost on their way (their logs arrive, the Completed
event does not), and the run would stay Running in the UI forever. A task run all of whose
events were lost is created with its final state.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import TaskRunSort
from prefect.context import SettingsContext

if TYPE_CHECKING:
    from prefect_azmanagers.cluster.cluster import AzureCluster

FINAL = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
UNFINISHED = [kind for kind in StateType if kind not in FINAL]
COUNT_TIMEOUT = 30.0  # s for one count; a busier server keeps the last count standing


class Repair(Protocol):
    """Writes the final states the runner knows (`_task_states.ReportedStates`)."""

    def repair(self, client: Any, task_run_id: uuid.UUID) -> bool: ...

    def restore(self, client: Any, flow_run_id: uuid.UUID, task_run_id: uuid.UUID) -> bool: ...

    def task_run_ids(self) -> list[uuid.UUID]: ...


class RecordingWatch:
    """Counts the flow run's recorded task runs from a thread of its own; the cluster paces
    dispatch by its `backlog()` while the watch runs."""

    def __init__(self, cluster: AzureCluster, flow_run_id: uuid.UUID, settings: Any,
                 finished: Callable[[], int], logger: Any, *, interval: float = 2.0,
                 stall_after: float = 300.0):
        self.cluster, self.flow_run_id, self.settings = cluster, flow_run_id, settings
        self.finished = finished  # task runs whose call came back (their engines reported)
        self.logger, self.interval, self.stall_after = logger, interval, stall_after
        self.recorded = 0
        self.stalled = False
        self._stop = threading.Event()
        self._unpace: Callable[[], None] = lambda: None
        self._thread = threading.Thread(target=self._run, daemon=True, name="azm-recording")

    def backlog(self) -> int:
        """Task runs that came back and are not recorded in a final state yet (0 once
        recording stalled)."""
        if self.stalled:
            return 0
        return self.finished() - self.recorded

    def start(self) -> RecordingWatch:
        self._unpace = self.cluster.pace_by_unrecorded(self.backlog)
        self._thread.start()
        return self

    def settle(self, *, patience: float = 60.0, repair: Repair | None = None) -> None:
        """At the flow's end, before the workers go: wait while the API is still recording
        this flow's task runs (the count moved within `patience` s); a flow whose last events
        are in flight would otherwise lose them with its instances. Then `repair` writes the
        final state the runner knows to each task run the API holds unfinished, and creates
        each one it never heard of. Says what is still missing."""
        progress_at, last = time.monotonic(), self.recorded
        while (missing := self.finished() - self.recorded) > 0:
            if self.recorded > last:
                progress_at, last = time.monotonic(), self.recorded
            elif time.monotonic() - progress_at > patience or not self._thread.is_alive():
                repaired, restored = self._repair(repair, missing) if repair else (0, 0)
                if repaired or restored:
                    self.logger.info(
                        "%d task runs of this flow ended on their workers but the Prefect API "
                        "still held %d of them unfinished and had never heard of %d %.0f s "
                        "after the flow's last one ended (their events were lost on the way): "
                        "their final states were written to the API from here.",
                        repaired + restored, repaired, restored, patience)
                if missing > repaired + restored:
                    self.logger.warning(
                        "%d task runs of this flow are not recorded by the Prefect API %.0f s "
                        "after the flow's last one ended; they may be missing from the UI.",
                        missing - repaired - restored, patience)
                return
            time.sleep(min(self.interval, 1.0))

    def _repair(self, repair: Repair, missing: int) -> tuple[int, int]:
        """`repair.repair` each task run of the flow run that the API holds unfinished; if
        that leaves some of the `missing` ones out, `repair.restore` each reported one the
        API does not hold at all (only when it listed them all). Returns how many were
        repaired and restored."""
        unfinished = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
            any_=UNFINISHED)))
        repaired = restored = 0
        with self._client() as client:
            for task_run_id in self._task_run_ids(client, unfinished)[0]:
                repaired += self._write(repair.repair, client, task_run_id)
            if missing > repaired:
                in_api, complete = self._task_run_ids(client, None)
                if complete:  # a partial list would make the runs it missed look absent
                    for task_run_id in set(repair.task_run_ids()) - set(in_api):
                        restored += self._write(repair.restore, client, self.flow_run_id,
                                                task_run_id)
        return repaired, restored

    def _task_run_ids(self, client: Any,
                      task_runs: TaskRunFilter | None) -> tuple[list[uuid.UUID], bool]:
        """The ids of the flow run's task runs that `task_runs` selects (all when None), as
        far as the API could list them, and whether it listed them all."""
        flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[self.flow_run_id]))
        found: list[uuid.UUID] = []
        try:
            while page := client.read_task_runs(
                    flow_run_filter=flow_runs, task_run_filter=task_runs,
                    sort=TaskRunSort.ID_DESC, limit=200, offset=len(found)):
                found += [task_run.id for task_run in page]
        except Exception as exc:  # noqa: BLE001 - the flow's outcome stands; a warning says it
            logging.getLogger(__name__).debug("could not list the flow's task runs: %s", exc)
            return found, False
        return found, True

    @staticmethod
    def _write(write: Callable[..., bool], *args: Any) -> bool:
        try:
            return bool(write(*args))
        except Exception as exc:  # noqa: BLE001 - one refused write spoils no other
            logging.getLogger(__name__).debug("could not write a task run's final state "
                                              "(%s): %s", args[-1], exc)
            return False

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        """A sync client under the flow's settings (they say where the API is)."""
        settings = self.settings
        with (SettingsContext(profile=settings.profile, settings=settings.settings) if settings
              else contextlib.nullcontext()), \
                get_client(sync_client=True, httpx_settings={"timeout": COUNT_TIMEOUT}) as client:
            yield client

    def stop(self) -> None:
        self._unpace()
        self._stop.set()
        self._thread.join(timeout=COUNT_TIMEOUT + 5)

    def _run(self) -> None:
        filters = {  # POST /task_runs/count (the client has no method for it)
            "flow_runs": FlowRunFilter(id=FlowRunFilterId(any_=[self.flow_run_id])).model_dump(
                mode="json", exclude_unset=True),
            "task_runs": TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                any_=FINAL))).model_dump(mode="json", exclude_unset=True)}
        progress_at = time.monotonic()
        with self._client() as client:
            while not self._stop.wait(self.interval):
                try:
                    answer = client.request("POST", "/task_runs/count", json=filters)
                    answer.raise_for_status()
                    recorded = int(answer.json())
                except Exception as exc:  # noqa: BLE001 - an outage is the API probe's to judge
                    # too busy to count: the last count stands, so a hold stays held
                    logging.getLogger(__name__).debug("could not count task runs: %s", exc)
                    continue
                now = time.monotonic()
                if recorded > self.recorded:
                    self.recorded, progress_at, self.stalled = recorded, now, False
                elif (not self.stalled and now - progress_at > self.stall_after
                        and (unrecorded := self.backlog() + self.cluster.in_flight)
                        >= self.cluster.options.max_unrecorded):
                    self.stalled = True
                    self.logger.warning(
                        "The Prefect API recorded no task run of this flow for %.0f s with %d "
                        "unrecorded: dispatch goes on without waiting for it (some task runs "
                        "may be missing from the UI).", self.stall_after, unrecorded)
