"""RecordingWatch against a real Prefect server: it reports the task runs that came back and
are not yet recorded in a final state, and releases a hold (with a warning) when recording
stalls."""

from __future__ import annotations

import logging
import time

from prefect import flow, task
from prefect.context import SettingsContext

from prefect_azmanagers._recording import RecordingWatch


class FakeCluster:
    def __init__(self, in_flight: int = 0, max_unrecorded: int = 10):
        self.in_flight = in_flight
        self.options = type("Options", (), {"max_unrecorded": max_unrecorded})()
        self.backlogs: list = []

    def pace_by_unrecorded(self, backlog):
        self.backlogs.append(backlog)
        return lambda: self.backlogs.remove(backlog)

    def source(self) -> int:
        [backlog] = self.backlogs
        return backlog()


@task
def echo(x: int) -> int:
    return x


@flow
def five() -> list[int]:
    return [echo(i) for i in range(5)]


def until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_it_reports_returned_minus_recorded_task_runs(prefect_server):
    state = five(return_state=True)
    cluster = FakeCluster(in_flight=3)
    watch = RecordingWatch(cluster, state.state_details.flow_run_id, SettingsContext.get(),
                           lambda: 5, logging.getLogger("test"), interval=0.2).start()
    try:
        assert cluster.source() == 5  # before any count: all back, none known recorded
        until(lambda: watch.recorded == 5)  # the server records the engine's events shortly
        assert cluster.source() == 0  # 5 back - 5 recorded (the cluster adds its in flight)
    finally:
        watch.stop()
    assert cluster.backlogs == []  # stopping releases the cluster


def test_a_stalled_count_releases_the_hold_and_says_so(prefect_server, caplog):
    state = five(return_state=True)
    cluster = FakeCluster(max_unrecorded=10)
    logger = logging.getLogger("test-recording")
    watch = RecordingWatch(cluster, state.state_details.flow_run_id, SettingsContext.get(),
                           lambda: 100, logger, interval=0.2, stall_after=3.0).start()
    try:
        until(lambda: watch.recorded == 5)
        held = cluster.source()
        until(lambda: cluster.source() == 0)  # released once the count stalled
    finally:
        watch.stop()
    assert held == 95  # 100 back - 5 recorded, read at once (the stall comes 3 s later)
    assert any("recorded no task run of this flow" in r.getMessage() for r in caplog.records)


def test_settle_returns_once_recorded_and_says_what_is_missing_when_recording_stops(
        prefect_server, caplog):
    state = five(return_state=True)
    logger = logging.getLogger("test-recording-settle")
    for finished, missing in ((5, None), (7, 2)):
        watch = RecordingWatch(FakeCluster(), state.state_details.flow_run_id,
                               SettingsContext.get(), lambda: finished, logger,
                               interval=0.2).start()
        try:
            watch.settle(patience=2.0)
            assert watch.recorded == 5
        finally:
            watch.stop()
        told = [r.getMessage() for r in caplog.records if "are not recorded" in r.getMessage()]
        assert (told[-1].startswith(f"{missing} task runs") if missing else not told), told


def test_settle_writes_the_reported_final_states_the_api_lost(prefect_server, caplog):
    """Two task runs whose Completed events were lost (the API holds them Running, as a busy
    server left 22-36 of a large run) and one all of whose events were lost (the API never
    heard of it, as 1-5 of 10,000): settle writes the final state the workers reported,
    through the REST API, creating the third, and says so; one no worker reported stays as
    it is."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Completed, Running

    from prefect_azmanagers._prefect_compat import new_task_run_id
    from prefect_azmanagers._task_states import ReportedStates

    state = five(return_state=True)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[flow_run_id])))
        lost, unknown = [r.id for r in runs[:2]], runs[2].id
        for task_run_id in [*lost, unknown]:
            client.set_task_run_state(task_run_id, Running(), force=True)
    absent = new_task_run_id()
    reported = ReportedStates()
    for task_run_id in [*lost, absent]:
        reported.note(task_run_id, Completed(message="reported by its worker"), echo)
    logger = logging.getLogger("test-recording-repair")
    caplog.set_level(logging.INFO, logger=logger.name)
    watch = RecordingWatch(FakeCluster(), flow_run_id, SettingsContext.get(), lambda: 6,
                           logger, interval=0.2).start()
    try:
        watch.settle(patience=1.0, repair=reported)
    finally:
        watch.stop()
    with get_client(sync_client=True) as client:
        runs = {r.id: r for r in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}
    assert all(runs[i].state.is_completed() and runs[i].state.message == "reported by its worker"
               for i in [*lost, absent]), runs
    assert runs[absent].flow_run_id == flow_run_id and runs[absent].name.startswith("echo-")
    assert runs[unknown].state.is_running()
    told = [r.getMessage() for r in caplog.records if r.name == "test-recording-repair"]
    assert any(m.startswith("3 task runs of this flow ended on their workers but the Prefect "
                            "API still held 2 of them unfinished and had never heard of 1")
               for m in told), told
    assert any(m.startswith("1 task runs of this flow are not recorded") for m in told), told
