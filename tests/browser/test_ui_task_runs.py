"""The Prefect UI shows a flow run of AzureScaleSetTaskRunner: its task runs (run on local-cloud
workers) and a worker's output line in the flow run's log. Headless Debian Chromium against the
real server; only the server's own address may be reached."""

from __future__ import annotations

import re
import time

import pytest
from prefect import flow, task
from prefect.context import FlowRunContext

from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


@task
def shout(i: int) -> int:
    print(f"ui-check line from task {i}")  # plain stdout: forwarded as "From worker N: ..."
    return i


@pytest.fixture(scope="module")
def finished_flow_run(localcloud):
    @flow(task_runner=AzureScaleSetTaskRunner("localcloud-small", 1, manifest="localcloud",
                                              ppi=2, join_timeout=300))
    def ui_check():
        shout.map(range(3)).result()
        return FlowRunContext.get().flow_run.id

    return ui_check()


def test_ui_shows_task_runs_and_worker_log_line(finished_flow_run, ui):
    from playwright.sync_api import expect
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[finished_flow_run])))
    assert len(task_runs) == 3

    _wait_for_log(finished_flow_run, "From worker")
    page = ui.page
    ui.open(f"/runs/flow-run/{finished_flow_run}",
            lambda page: page.get_by_text("Completed").first)
    expect(page.get_by_text(re.compile(r"From worker \d+: ui-check line from task \d"))
           .first).to_be_visible(timeout=60_000)

    tab = page.get_by_text(re.compile(r"Task [Rr]uns")).first
    expect(tab).to_be_visible(timeout=60_000)
    tab.click()
    for task_run in task_runs:
        expect(page.get_by_text(task_run.name).first).to_be_visible(timeout=60_000)


def _wait_for_log(flow_run_id, text: str, timeout: float = 30) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if any(text in log.message for log in logs):
                return
            time.sleep(0.5)
    raise AssertionError(f"no log containing {text!r} reached the API")
