"""The Prefect UI shows a detached job: headless Chromium (Debian's) against the real server.

A job runs on a detached VM of the local cloud; the UI's flow-runs list names its flow run and
the flow-run page shows its state and the job's own output lines (the `job.stdout` logs).
"""

from __future__ import annotations

import re

import pytest

from prefect_azmanagers.detached import addproc, detachat, rmproc

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

def ui_check_job():
    print("visible in the Prefect UI: line one")
    print("visible in the Prefect UI: line two")
    return "ok"


@pytest.fixture(scope="module")
def finished_job(localcloud):
    vm = addproc("localcloud-vm", "localcloud-nic", manifest="localcloud", basename="azmui")
    try:
        job = detachat(vm, ui_check_job)
        assert job.wait(timeout=300) == "done"
        yield job
    finally:
        rmproc(vm)


def test_ui_lists_the_detached_flow_run_with_its_logs(finished_job, ui):
    from playwright.sync_api import expect
    from prefect import get_client

    with get_client(sync_client=True) as client:
        flow_run_name = client.read_flow_run(finished_job.flow_run_id).name
    page = ui.page
    ui.open("/runs", lambda page: page.get_by_text(flow_run_name).first)

    ui.open(f"/runs/flow-run/{finished_job.flow_run_id}",
            lambda page: page.get_by_text(flow_run_name).first)
    expect(page.get_by_text("Completed").first).to_be_visible(timeout=60_000)
    logs_tab = page.get_by_role("tab", name=re.compile("Logs"))
    if logs_tab.count():
        logs_tab.first.click()
    expect(page.get_by_text("visible in the Prefect UI: line one")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("visible in the Prefect UI: line two")).to_be_visible(timeout=60_000)
