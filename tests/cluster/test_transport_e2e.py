"""The transport's trust rules through AzureCluster on the local cloud: `env=` values reach
the worker but no log line and no error message, env.sh on the instance is 0600, and nothing
connects to an instance's address once the cloud reported it deleted."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import asyncssh
import pytest

from prefect_azmanagers.azure.clients import ArmClients, IdempotentRetryPolicy
from prefect_azmanagers.blocks import load_manifest
from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.cluster.transport import InstanceConnection
from prefect_azmanagers.exceptions import JoinTimeout
from tests.cluster.test_engine_e2e import (  # noqa: F401
    admin,
    assert_nothing_left,
    group_name,
    wait_until,
)

pytestmark = pytest.mark.e2e

SECRET = "s3cret-token-value"


def _worker_view() -> tuple[str, int]:
    path = os.path.expanduser("~/.azmanagers/env.sh")
    return os.environ["TOKEN"], os.stat(path).st_mode & 0o777


def test_env_values_reach_the_worker_but_no_log_and_env_sh_is_private(localcloud, admin, caplog):
    caplog.set_level(logging.DEBUG)
    logging.getLogger("asyncssh").setLevel(logging.DEBUG)  # it logs each exec command at INFO
    group = group_name("redact")
    with AzureCluster("localcloud-small", 1, manifest="localcloud", group=group, progress=False, warm_up=None,
                      join_timeout=240, waitfor=True, env={"TOKEN": SECRET}) as cluster:
        assert cluster.submit(_worker_view).result(timeout=240) == (SECRET, 0o600)
    assert "TOKEN=<redacted>" in caplog.text and SECRET not in caplog.text
    assert_nothing_left(admin, group, set())


def test_an_agent_that_cannot_start_is_reported_without_env_values(localcloud, admin, caplog):
    caplog.set_level(logging.DEBUG)
    manifest = load_manifest("localcloud").model_copy(update={"python": "/nonexistent/python3"})
    group = group_name("redact-fail")
    cluster = AzureCluster("localcloud-small", 1, manifest=manifest, group=group, progress=False, warm_up=None,
                           join_timeout=240, waitfor=True, max_replacements=0,
                           env={"TOKEN": SECRET})
    with pytest.raises(JoinTimeout) as info:
        cluster.start()
    message = str(info.value)
    assert "/nonexistent/python3" in message and "TOKEN=<redacted>" in message
    assert SECRET not in message and SECRET not in caplog.text
    assert_nothing_left(admin, group, set())


async def _delete_instance(manifest, scale_set: str, name: str) -> None:
    async with ArmClients(manifest) as arm:  # someone else deletes it, as the portal would
        poller = await arm.compute.virtual_machine_scale_set_vms.begin_delete(
            manifest.resource_group, scale_set, name.rsplit("_", 1)[1])
        await poller.result()


def test_nothing_connects_to_an_instance_once_the_cloud_deleted_it(localcloud, admin, monkeypatch):
    attempts: list[tuple[str, float]] = []  # every SSH connection the driver opens
    gone: list[tuple[str, float]] = []
    real_connect, real_mark_gone = asyncssh.create_connection, InstanceConnection.mark_gone.__func__

    async def connect(factory, host, *args, **kwargs):
        attempts.append((host, time.monotonic()))
        return await real_connect(factory, host, *args, **kwargs)

    def mark_gone(cls, vm_id):
        gone.append((vm_id, time.monotonic()))
        real_mark_gone(cls, vm_id)

    monkeypatch.setattr(asyncssh, "create_connection", connect)
    monkeypatch.setattr(InstanceConnection, "mark_gone", classmethod(mark_gone))
    manifest = load_manifest("localcloud")
    group = group_name("gone")
    with AzureCluster("localcloud-small", 2, manifest="localcloud", group=group, progress=False, warm_up=None,
                      join_timeout=300, waitfor=True, max_replacements=0) as cluster:
        addresses = {w.ip for w in cluster.workers}
        victim = cluster.workers[0]
        deleted = time.monotonic()
        asyncio.run(_delete_instance(manifest, group, victim.instance))
        wait_until(lambda: any(t > deleted for _, t in gone), 120, "the cluster to see it gone")
        marked = min(t for _, t in gone if t > deleted)
        time.sleep(15)  # reconnects, keepalives and diagnostics would have knocked by now
        assert cluster.submit(lambda: "still working").result(timeout=60) == "still working"
    assert [t for host, t in attempts if host == victim.ip and t > marked] == []
    assert_nothing_left(admin, group, addresses)


def test_nothing_connects_to_instances_once_the_local_cloud_stopped(localcloud, tmp_path, monkeypatch):
    """A local cloud of the test's own stops under a running cluster: the instance's SSH
    connection drops, and the cloud can no longer vouch for the instance. The reconnect asks
    the cloud first and, with no answer, backs off without a packet to the instance's address
    (which, once the cloud's routes are gone, would leave the machine), then loses it: the
    call fails and the cluster closes."""
    from prefect_azmanagers.cli.localcloud import localcloud_blocks
    from prefect_azmanagers.exceptions import AzureError, WorkerLost
    from prefect_azmanagers.localcloud import start, stop
    from tests.cluster.test_engine_e2e import ssh_connections_to

    state_dir = tmp_path / "cloud"
    blocks = localcloud_blocks(start(state_dir, blob="off"))
    stopped: list[float] = []
    knocks: list[tuple[str, float]] = []   # every SSH connection the driver opens
    real_connect = asyncssh.create_connection

    async def connect(factory, host, *args, **kwargs):
        knocks.append((host, time.monotonic()))
        if stopped:   # refused here, so this test never sends stray traffic itself
            raise ConnectionRefusedError(f"test: {host} contacted after the local cloud stopped")
        return await real_connect(factory, host, *args, **kwargs)

    monkeypatch.setattr(asyncssh, "create_connection", connect)
    # Every ARM call from here on fails to connect: azure-core's retries would make each of the
    # five reconnects wait ~10 s before it fails; quick retries keep the same sequence.
    configure_retries = IdempotentRetryPolicy.configure_retries
    monkeypatch.setattr(IdempotentRetryPolicy, "configure_retries",
                        lambda self, options: {**configure_retries(self, options), "backoff": 0.05})
    try:
        # closing cannot delete the instance with the cloud gone, and says so
        with pytest.raises(AzureError, match="Could not reach Azure Resource Manager"), \
                AzureCluster(blocks["localcloud-small"], 1, manifest=blocks["localcloud"],
                             group=group_name("stopped"), progress=False, warm_up=None, join_timeout=300,
                             waitfor=True, max_replacements=0) as cluster:
            addresses = {w.ip for w in cluster.workers}
            assert cluster.submit(lambda: "up").result(timeout=120) == "up"
            stopped.append(time.monotonic())
            assert stop(state_dir)
            with pytest.raises(WorkerLost) as lost:
                cluster.submit(lambda: "after").result(timeout=600)
            print(f"cloud stopped: {lost.value}\nfailed after {time.monotonic() - stopped[0]:.1f} s")
    finally:
        stop(state_dir)
    assert [host for host, t in knocks if host in addresses and t > stopped[0]] == []
    assert ssh_connections_to(addresses) == []
