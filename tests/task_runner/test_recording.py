"""RecordingWatch against a real Prefect server: it reports the task runs sent and not yet
recorded in a final state, and releases a hold (with a warning) when recording stalls."""

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
        self.reported: list[int] = []

    def note_unrecorded(self, count: int) -> None:
        self.reported.append(count)


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


def test_it_reports_sent_minus_recorded_task_runs(prefect_server):
    state = five(return_state=True)
    cluster = FakeCluster(in_flight=3)
    watch = RecordingWatch(cluster, state.state_details.flow_run_id, SettingsContext.get(),
                           lambda: 5, logging.getLogger("test"), interval=0.2).start()
    try:
        until(lambda: watch.recorded == 5)  # the server records the engine's events shortly
        until(lambda: cluster.reported and cluster.reported[-1] == 3)  # 5 back + 3 out - 5
    finally:
        watch.stop()
    assert cluster.reported[-1] == 0  # stopping releases the cluster


def test_a_stalled_count_releases_the_hold_and_says_so(prefect_server, caplog):
    state = five(return_state=True)
    cluster = FakeCluster(max_unrecorded=10)
    logger = logging.getLogger("test-recording")
    watch = RecordingWatch(cluster, state.state_details.flow_run_id, SettingsContext.get(),
                           lambda: 100, logger, interval=0.2, stall_after=1.0).start()
    try:
        until(lambda: watch.recorded == 5)
        until(lambda: 0 in cluster.reported[1:])  # held at 95, then released
    finally:
        watch.stop()
    assert 95 in cluster.reported
    assert any("recorded no task run of this flow" in r.getMessage() for r in caplog.records)
