"""The Prefect UI and the azure-vm work-pool type: headless Chromium (Debian's) against the real
server, with a real `prefect worker start` and local-cloud VMs.

The UI's create form lists the worker types of Prefect's collection registry view
(`/api/collections/views/aggregate-worker-metadata`, which the server fetches from GitHub and
otherwise answers from the copy bundled with Prefect). azure-vm is in neither, so the UI's
create form offers it only once the registry lists this package. The first test stands in for
that view: the bundled copy plus this package's entry, made from the worker class as the
registry makes its entries. The other tests answer that view with the bundled copy only (so
the server never reaches out), and show what needs no registry: the job configuration of a
pool made with `prefect work-pool create --type azure-vm`, and a run's logs with its VM's
output.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from tests.worker.conftest import (  # noqa: F401 - fixtures
    _pool_worker,
    assert_nothing_left,
    cli,
    flows_repo,
    vm_pool,
    vm_worker,
)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# The form's labels of the job variables (titles from AzureVMVariables)
FIELDS = ["Manifest", "VM template", "NIC template", "Spot", "Max Price", "Customenv",
          "Environment Variables", "OS disk size (GB)", "Image Name", "Image Version",
          "Boot timeout (s)", "Keep on failure (s)"]


def _worker_view(*, with_azure_vm: bool) -> dict:
    """Prefect's bundled registry view of worker types, with this package's entry if asked."""
    import prefect

    from prefect_azmanagers.workers.azure_vm import AzureVMWorker

    bundled = (Path(prefect.__file__).parent / "server" / "api" / "collections_data" / "views"
               / "aggregate-worker-metadata.json")
    view = json.loads(bundled.read_text())
    if with_azure_vm:
        view["prefect-azmanagers"] = {"azure-vm": {
            "type": AzureVMWorker.type, "display_name": "Azure VM",
            "description": AzureVMWorker.__doc__, "documentation_url": "",
            "install_command": "pip install prefect-azmanagers", "is_beta": False,
            "logo_url": "",
            "default_base_job_configuration": AzureVMWorker.get_default_base_job_template()}}
    return view


def _answer_worker_view(page, view: dict) -> None:
    page.route("**/api/collections/views/aggregate-worker-metadata",
               lambda route: route.fulfill(json=view))


def _expect_fields(page) -> None:
    from playwright.sync_api import expect

    for label in FIELDS:
        expect(page.get_by_text(label, exact=True).or_(page.get_by_text(f"{label} (Optional)",
                                                                        exact=True)).first
               ).to_be_visible(timeout=60_000)


def test_the_create_form_offers_azure_vm_with_its_fields(ui):
    from playwright.sync_api import expect
    from prefect import get_client

    page = ui.page
    _answer_worker_view(page, _worker_view(with_azure_vm=True))
    name = f"azmui-{uuid.uuid4().hex[:6]}"
    ui.open("/work-pools/create", lambda page: page.get_by_text("Azure VM", exact=True))
    page.get_by_text("Azure VM", exact=True).click()
    page.get_by_role("button", name="Next").click()
    page.get_by_label("Name").first.fill(name)
    page.get_by_role("button", name="Next").click()
    expect(page.get_by_role("heading", name="Base Job Template")).to_be_visible(timeout=60_000)
    _expect_fields(page)
    page.get_by_role("button", name="Create").click()
    expect(page).to_have_url(re.compile(rf"/work-pools/work-pool/{name}"), timeout=60_000)
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(name)
        try:
            assert pool.type == "azure-vm"
            properties = pool.base_job_template["variables"]["properties"]
            assert properties["boot_timeout"]["default"] == 600
            assert properties["keep_on_failure"]["default"] == 0
        finally:
            client.delete_work_pool(name)


def test_a_cli_made_pool_shows_its_fields_in_the_ui(vm_pool, ui):
    from playwright.sync_api import expect

    page = ui.page
    _answer_worker_view(page, _worker_view(with_azure_vm=False))
    ui.open(f"/work-pools/work-pool/{vm_pool.pool}",
            lambda page: page.get_by_text("Azure Vm", exact=True))  # its type
    expect(page.get_by_role("heading", name="Base Job Configuration")).to_be_visible(
        timeout=60_000)
    _expect_fields(page)


def test_a_runs_logs_show_its_vms_boot_output_and_the_flows_own_lines(vm_pool, vm_worker, ui,
                                                                      assert_nothing_left):
    from playwright.sync_api import expect

    from tests.worker.runs import messages_of, run_deployment, wait_for_run

    page = ui.page
    _answer_worker_view(page, _worker_view(with_azure_vm=False))
    flow_run_id = run_deployment(vm_pool("flows.py:hello", "hello-ui",
                                          parameters={"name": "the UI"}))
    flow_run = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the run's end", 400)
    assert flow_run.state.is_completed(), "\n".join(messages_of(flow_run_id))
    vm_name = flow_run.infrastructure_pid.split("/", 1)[1]
    boot = next(m for m in messages_of(flow_run_id) if m.startswith(f"[{vm_name} boot] "))

    ui.open(f"/runs/flow-run/{flow_run_id}", lambda page: page.get_by_text("Completed").first)
    logs_tab = page.get_by_role("tab", name=re.compile("Logs"))
    if logs_tab.count():
        logs_tab.first.click()
    expect(page.get_by_text(boot).first).to_be_visible(timeout=60_000)
    expect(page.get_by_text(f"hello the UI from {vm_name}").first).to_be_visible(timeout=60_000)
    # the worker deletes the VM once the engine exited; a worker stopped before leaves it
    # for the next worker's adoption, so the test waits for the deletion
    assert_nothing_left(vm_pool.pool)
