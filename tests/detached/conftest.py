"""Fixtures of the detached-run tests: a detached VM on the local cloud, SSH to it, leftovers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

FAKE_API_KEY = "pnu_fake-key-for-tests-$(not run)"


@pytest.fixture
def run_on_vm(localcloud):
    """run_on_vm(vm, command): a shell command on a detached VM over SSH (pinned host key)."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    from prefect_azmanagers.blocks import load_manifest
    from prefect_azmanagers.detached.vm import ssh_connection

    def run_command(vm, command: str):
        async def run():
            async with ssh_connection(vm, load_manifest("localcloud")) as connection:
                return await connection.run(command)

        return run_coro_as_sync(run())

    return run_command


def leftovers(name: str, localcloud_info: dict) -> list[str]:
    """What is left of detached VM `name`: ARM VM/NIC, local-cloud instance, work pool,
    deployments, worker or job processes."""
    import psutil
    from prefect import get_client
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
    from prefect.exceptions import ObjectNotFound

    from tests.cloud_leftovers import cloud_leftovers

    found = cloud_leftovers(localcloud_info, name)  # a VM's NICs are named after it
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            found.append(f"work pool {name}")
        except ObjectNotFound:
            pass
        found += [f"deployment {d.name}" for d in client.read_deployments(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[name])))]
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if f"--pool {name}" in cmdline:
            found.append(f"process {process.pid}: {cmdline[:120]}")
    return found


@pytest.fixture
def assert_vm_gone(localcloud):
    """Wait until nothing of a detached VM is left (see `leftovers`); fail with what remains."""
    def check(name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while remaining := leftovers(name, localcloud):
            assert time.monotonic() < deadline, f"left behind: {remaining}"
            time.sleep(2)

    return check


@pytest.fixture(scope="module")
def detached_vm(localcloud):
    """One detached VM on the local cloud for a test module; rmproc'ed after, and checked gone."""
    from prefect_azmanagers.detached import addproc, detachat, rmproc

    from prefect.settings import PREFECT_API_KEY, temporary_settings

    # As with Prefect Cloud: the driver has an API key, which addproc must ship privately (the
    # local server ignores it).
    with temporary_settings(updates={PREFECT_API_KEY: FAKE_API_KEY}):
        vm = addproc("localcloud-vm", "localcloud-nic", manifest="localcloud",
                     basename="azmtest", code=Path(__file__).resolve().parents[2] / "flows")
    try:
        yield vm
    finally:
        # A job still running when its VM is removed must end as failed, not run forever.
        unfinished = detachat(vm, time.sleep, 900)
        deadline = time.monotonic() + 300
        while unfinished.status() == "starting" and time.monotonic() < deadline:
            time.sleep(1)
        rmproc(vm)
        assert leftovers(vm.name, localcloud) == []
        assert unfinished.status() == "failed"
