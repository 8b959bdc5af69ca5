"""Detached runs end to end on the local cloud: real VMs (sandboxes reached over OpenSSH), the
real Azure SDK against the local ARM endpoint, a real Prefect server, the Prefect worker that
the VM's boot script starts, and jobs submitted with detachat/detach.

One VM serves the module (the `detached_vm` fixture; its teardown checks that rmproc leaves
nothing); persist=False makes its own. The server-restart test runs last: it restarts the
session's Prefect server.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from prefect_azmanagers.detached import DetachedJob, DetachedJobFailed, detachat, variablebundle
from prefect_azmanagers.detached.vm import DetachedVM
from tests.detached.conftest import FAKE_API_KEY

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def hello(n):
    import sys
    print(f"hello {n} from the VM")
    print("a warning", file=sys.stderr)
    return n * 2


def test_addproc_detachat_streams_status_result(detached_vm):
    vm = detached_vm
    assert DetachedVM.from_name(vm.name, manifest="localcloud") == vm

    def slow_hello(n):
        import time
        time.sleep(4)
        return hello(n)

    job = detachat(vm, slow_hello, 21)
    seen = []
    deadline = time.monotonic() + 300
    while (status := job.status()) not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.3)
    seen.append(status)
    assert seen[0] in ("starting", "running") and "running" in seen and seen[-1] == "done"
    assert seen == sorted(seen, key=["starting", "running", "done"].index)
    assert job.wait(timeout=10) == "done"
    assert job.result() == 42
    assert job.read() == "hello 21 from the VM\n"
    assert job.read("stderr") == "a warning\n"


def test_api_key_is_shipped_over_ssh_to_a_private_file(detached_vm, run_on_vm):
    shown = run_on_vm(detached_vm, "stat -c %a ~/.azmanagers/prefect.env; "
                                   "bash -c 'set -a; . ~/.azmanagers/prefect.env; "
                                   "printf %s \"$PREFECT_API_KEY\"'")
    mode, key = shown.stdout.split("\n", 1)
    assert (mode, key) == ("600", FAKE_API_KEY)
    boot_log = run_on_vm(detached_vm, "cat /var/log/cloud-init-output.log").stdout
    assert "worker" in boot_log or "boot" in boot_log
    assert FAKE_API_KEY not in boot_log


def test_failing_job_is_failed_with_traceback(detached_vm):
    def broken():
        return {}["missing key"]

    job = detachat(detached_vm, broken)
    assert job.wait(timeout=300) == "failed"
    stderr = job.read("stderr")
    assert "Traceback (most recent call last)" in stderr and "KeyError: 'missing key'" in stderr
    with pytest.raises(DetachedJobFailed, match="missing key"):
        job.result()


def test_kill_stops_the_process_on_the_vm(detached_vm, run_on_vm):
    def sleeper():
        import time
        print("sleeping", flush=True)
        time.sleep(900)

    job = detachat(detached_vm, sleeper)
    deadline = time.monotonic() + 300
    while "sleeping" not in job.read():
        assert time.monotonic() < deadline, job.status()
        time.sleep(1)
    find = f"pgrep -f 'detached.jobprocess .*{job.flow_run_id}'"
    assert run_on_vm(detached_vm, find).exit_status == 0
    assert job.kill(timeout=180) == "cancelled"
    deadline = time.monotonic() + 60
    while run_on_vm(detached_vm, find).exit_status == 0:
        assert time.monotonic() < deadline, "the job process still runs on the VM"
        time.sleep(1)


def test_variablebundle_reaches_the_job(detached_vm):
    variablebundle.update(session="token-abc", factor=3)
    try:
        def use_bundle(x):
            from prefect_azmanagers import variablebundle as bundle
            return f"{bundle['session']}:{x * bundle['factor']}"

        assert detachat(detached_vm, use_bundle, 5).result(timeout=300) == "token-abc:15"
    finally:
        variablebundle.clear()


def test_two_megabyte_payload_travels_over_sftp(detached_vm, run_on_vm):
    data = os.urandom(2 * 1024 * 1024)

    def digest(blob):
        import hashlib
        return len(blob), hashlib.sha256(blob).hexdigest()

    job = detachat(detached_vm, digest, data)
    assert job.result(timeout=300) == (len(data), hashlib.sha256(data).hexdigest())
    from prefect import get_client
    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(job.flow_run_id).parameters
    assert "payload" not in parameters and parameters["payload_file"].endswith(".pkl")
    assert run_on_vm(detached_vm, "ls -A ~/.azmanagers/payloads").stdout.strip() == ""


def test_output_order_partial_and_long_lines(detached_vm):
    def many():
        import os
        import sys
        for i in range(300):
            print(i)
        print("x" * 200_000)
        os.system("echo from a child process")
        sys.stdout.write("no newline at the end")

    job = detachat(detached_vm, many)
    assert job.wait(timeout=300) == "done"
    expected = "".join(f"{i}\n" for i in range(300)) + "x" * 200_000 + "\n"
    assert job.read() == expected + "from a child process\nno newline at the end"


def _cli(*args: str):
    """Run `prefect-azmanagers ARGS` in process (the root app, with its error handling)."""
    from typer.testing import CliRunner

    from prefect_azmanagers.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_cli_vm_list_and_job_commands(detached_vm):
    listed = _cli("detached", "list", "--manifest", "localcloud")
    assert listed.exit_code == 0 and detached_vm.name in listed.stdout

    def two_streams():
        import sys
        print("out line")
        print("err line", file=sys.stderr)
        raise SystemExit(3)

    job = detachat(detached_vm, two_streams)
    waited = _cli("job", "wait", job.flow_run_id, "--timeout", "300")
    assert (waited.exit_code, waited.stdout.strip()) == (1, "failed")
    assert _cli("job", "status", job.flow_run_id).stdout.strip() == "failed"
    assert _cli("job", "logs", job.flow_run_id).stdout == "out line\n"
    assert _cli("job", "logs", job.flow_run_id, "--stderr").stdout.startswith("err line\n")
    for bad in (("job", "status", "not-a-uuid"), ("job", "logs", str(uuid.UUID(int=0))),
                ("vm", "rm", "no-such-vm", "--manifest", "no-such-manifest")):
        result = _cli(*bad)
        assert result.exit_code == 1 and "Error" in result.stderr, result.output
        assert "Traceback" not in result.stderr


def test_job_from_an_exited_process_read_from_another(detached_vm, tmp_path):
    starter = tmp_path / "starter.py"
    starter.write_text(
        "from prefect_azmanagers import detachat\n"
        "from prefect_azmanagers.detached.vm import DetachedVM\n"
        "def job():\n"
        "    import time\n"
        "    time.sleep(5)\n"
        "    print('still here after the starter exited')\n"
        "    return 'finished'\n"
        f"vm = DetachedVM.from_name({detached_vm.name!r}, manifest='localcloud')\n"
        "print(detachat(vm, job).flow_run_id)\n")
    started = subprocess.run([sys.executable, str(starter)], capture_output=True, text=True,
                             timeout=300, env=os.environ)
    assert started.returncode == 0, started.stderr
    flow_run_id = started.stdout.split()[-1]
    reader = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom prefect_azmanagers import DetachedJob\n"
         "job = DetachedJob.from_flow_run_id(sys.argv[1])\n"
         "print(job.wait(300), job.result(), repr(job.read()))", flow_run_id],
        capture_output=True, text=True, timeout=400, env=os.environ)
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.split("\n")[-2] == "done finished 'still here after the starter exited\\n'"


def test_prefect_yaml_deployment_runs_on_the_vm(detached_vm):
    env = dict(os.environ, AZM_VM=detached_vm.name)
    deployed = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "hello"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    run = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "detached-hello/hello", "--watch",
         "--watch-timeout", "300"],
        env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Completed" in run.stdout
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterName, LogFilter, LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["hello"])))
        assert flow_run.state.is_completed()
        work_pool = flow_run.work_pool_name
        messages = [log.message for log in client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))]
    assert work_pool == detached_vm.name
    assert any(message.startswith("hello DETACHED WORLD from ") for message in messages)


def test_failed_boot_leaves_nothing(localcloud, assert_vm_gone):
    from prefect_azmanagers.detached import addproc
    from prefect_azmanagers.exceptions import AzManagersError
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    with LocalCloudAdmin.from_info(localcloud) as admin:
        admin.boot_fail(1)
        try:
            with pytest.raises(AzManagersError, match="boot failure injected"):
                addproc("localcloud-vm", "localcloud-nic", manifest="localcloud",
                        name="azmbootfail-1")
        finally:
            admin.clear_faults()
    assert_vm_gone("azmbootfail-1", timeout=30)


def test_cli_vm_add_reports_a_failed_boot_and_leaves_nothing(localcloud, assert_vm_gone):
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    with LocalCloudAdmin.from_info(localcloud) as admin:
        admin.boot_fail(1)
        try:
            added = _cli("detached", "add", "localcloud-vm", "--nic", "localcloud-nic",
                         "--manifest", "localcloud", "--name", "azmbootfail-2")
        finally:
            admin.clear_faults()
    # the console wraps the message at its width: compare it with the line breaks undone
    assert added.exit_code == 1 and "boot failure injected" in " ".join(added.stderr.split()), \
        added.output
    assert "Traceback" not in added.stderr
    assert_vm_gone("azmbootfail-2", timeout=30)


def test_persist_false_leaves_nothing(localcloud, assert_vm_gone, tmp_path):
    starter = tmp_path / "detach_once.py"
    starter.write_text(
        "from prefect_azmanagers import detach\n"
        "def job():\n"
        "    print('one-shot job')\n"
        "    return 7\n"
        "j = detach(job, vm_template='localcloud-vm', nic_template='localcloud-nic',\n"
        "           manifest='localcloud', basename='azmonce', persist=False)\n"
        "print(j.flow_run_id)\n")
    started = subprocess.run([sys.executable, str(starter)], capture_output=True, text=True,
                             timeout=900, env=os.environ)
    assert started.returncode == 0, started.stderr
    job = DetachedJob.from_flow_run_id(started.stdout.split()[-1])
    assert job.result(timeout=300) == 7 and job.read() == "one-shot job\n"
    from prefect import get_client
    with get_client(sync_client=True) as client:
        vm_name = client.read_flow_run(job.flow_run_id).work_pool_name
    assert vm_name.startswith("azmonce-")
    assert_vm_gone(vm_name, timeout=300)
    assert job.result() == 7  # still readable once the VM is gone


def test_a_vm_lost_outside_rmproc_fails_its_job(localcloud, assert_vm_gone):
    """A VM whose guest dies (ARM then shows it stopped) fails its running job as Crashed,
    naming the VM, instead of leaving it "running" forever."""
    from prefect import get_client
    from prefect.client.schemas.objects import StateType

    from prefect_azmanagers.detached import addproc, rmproc
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    vm = addproc("localcloud-vm", "localcloud-nic", manifest="localcloud", basename="azmlost")
    try:
        job = detachat(vm, time.sleep, 900)
        deadline = time.monotonic() + 120
        while job.status() != "running":
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(1)
        with LocalCloudAdmin.from_info(localcloud) as admin:
            admin.kill(vm.name)
        assert job.status() == "running"  # a live worker's last heartbeat is recent
        assert job.wait(timeout=180) == "failed"
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(job.flow_run_id).state
        assert state.type == StateType.CRASHED
        assert f"detached VM {vm.name} is stopped" in state.message
    finally:
        rmproc(vm)
    assert_vm_gone(vm.name)


def test_rmproc_by_name_leaves_a_vm_addproc_did_not_make(localcloud, assert_vm_gone):
    from prefect.utilities.asyncutils import run_coro_as_sync

    from prefect_azmanagers.azure import vm as azure_vm
    from prefect_azmanagers.azure.clients import ArmClients
    from prefect_azmanagers.azure.ownership import ownership_tags
    from prefect_azmanagers.blocks import load_manifest, load_nic_template, load_vm_template
    from prefect_azmanagers.detached import rmproc
    from prefect_azmanagers.exceptions import ConfigurationError

    manifest = load_manifest("localcloud")
    name = azure_vm.vm_name("azmplain")

    async def create() -> None:
        async with ArmClients(manifest) as clients:
            await azure_vm.create_vm(clients, manifest, load_vm_template("localcloud-vm"),
                                     load_nic_template("localcloud-nic"), name, custom_data="",
                                     tags=ownership_tags("someone-else"))

    async def still_there() -> bool:
        async with ArmClients(manifest) as clients:
            return (await azure_vm.get_vm(clients, manifest.resource_group, name)).name == name

    async def delete() -> None:
        async with ArmClients(manifest) as clients:
            await azure_vm.delete_vm(clients, manifest.resource_group, name)

    run_coro_as_sync(create())
    try:
        with pytest.raises(ConfigurationError, match=f"VM '{name}' .* is not a detached VM"):
            rmproc(name, manifest="localcloud")
        assert run_coro_as_sync(still_there())
    finally:
        run_coro_as_sync(delete())
    assert_vm_gone(name)


def test_worker_survives_a_prefect_server_restart(detached_vm, prefect_server):
    prefect_server.restart()
    job = detachat(detached_vm, hello, 5)
    assert job.wait(timeout=300) == "done"
    assert job.result() == 10


def test_a_jobs_result_is_in_the_container_and_checked_against_its_signature(detached_vm):
    """With the manifest's blob container, the result travels through Blob Storage (issue 15):
    the signed artifact names its path and digest; a result changed there is refused."""
    import cloudpickle
    from prefect_azure import AzureBlobStorageContainer

    from prefect_azmanagers.exceptions import UntrustedPayload

    job = detachat(detached_vm, hello, 5)
    assert job.wait(timeout=300) == "done"
    assert job.result() == 10
    blob = job._signed_result("done")["blob"]
    assert blob["block"] == "azure-blob-storage-container/localcloud"
    container = AzureBlobStorageContainer.load("localcloud")
    assert blob["path"] in container.list_blobs()
    container.write_path(blob["path"], cloudpickle.dumps(11))
    with pytest.raises(UntrustedPayload, match="not the one its VM signed"):
        job.result()


def test_deployment_code_is_pushed_to_and_pulled_from_the_container(detached_vm):
    """prefect.yaml's hello-blob: prefect-azure's push step uploads the code at deploy time, the
    VM's worker pulls it before the run (issue 15)."""
    from prefect_azure import AzureBlobStorageContainer

    folder = f"code/{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, AZM_VM=detached_vm.name, AZM_CODE_FOLDER=folder)
    deployed = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "hello-blob"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    pushed = AzureBlobStorageContainer.load("localcloud").list_blobs()
    assert f"{folder}/flows/detached_hello.py" in pushed
    assert not any(name.startswith(f"{folder}/.venv/") for name in pushed)  # .prefectignore
    run = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "detached-hello/hello-blob",
         "--watch", "--watch-timeout", "300"],
        env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Completed" in run.stdout
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["hello-blob"])))
        deployment = client.read_deployment(flow_run.deployment_id)
    step = deployment.pull_steps[0]["prefect_azure.deployments.steps.pull_from_azure_blob_storage"]
    assert step["folder"] == folder
    assert "AccountKey" not in str(deployment.pull_steps)  # resolved on the VM, from the API
