"""Admin faults on instances (kill, drop SSH) seen from ARM and from an SSH client."""

from __future__ import annotations

import subprocess
import time

import pytest
from arm_harness import Cloud, unique

from prefect_azmanagers.localcloud import AdminError


def _ip(cloud: Cloud, name: str, instance_id: str) -> str:
    for nic in cloud.network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(cloud.rg, name):
        if nic.virtual_machine.id.rsplit("/", 1)[-1] == instance_id:
            return nic.ip_configurations[0].private_ip_address
    raise AssertionError(f"no NIC for instance {instance_id}")


def test_drop_ssh_cuts_sessions_and_kill_stops_the_instance(cloud: Cloud):
    name = unique("adm")
    cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, name, cloud.scale_set_body(1)).result()
    try:
        ip = _ip(cloud, name, "0")
        argv = ["ssh", "-i", cloud.info["ssh_private_key_file"], "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                f"azureuser@{ip}", "echo up; sleep 120"]
        session = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        try:
            assert session.stdout.readline().strip() == "up"
            started = time.monotonic()
            cloud.admin.drop_ssh(f"{name}_0")
            assert session.wait(30) != 0 and time.monotonic() - started < 30
        finally:
            if session.poll() is None:
                session.kill()
                session.wait()
        assert cloud.ssh(ip, "echo again").stdout.strip() == "again"  # the instance itself is fine

        vm_id = cloud.compute.virtual_machine_scale_set_vms.get(cloud.rg, name, "0").vm_id
        cloud.admin.kill(vm_id)  # by vmId this time
        assert cloud.ssh(ip, "true", timeout=30).returncode == 255
        view = cloud.compute.virtual_machine_scale_set_vms.get_instance_view(cloud.rg, name, "0")
        assert [s.code for s in view.statuses] == ["ProvisioningState/succeeded", "PowerState/stopped"]
        assert cloud.admin.counters()["live_instances"] == 0
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()


def test_admin_refuses_bad_input_clearly(cloud: Cloud):
    with pytest.raises(AdminError, match="no instance named 'ghost'"):
        cloud.admin.kill("ghost")
    with pytest.raises(AdminError, match="non-negative integer"):
        cloud.admin.throttle(-1)
    with pytest.raises(AdminError, match="unknown setting 'boot_dealy'"):
        cloud.admin.settings(boot_dealy=1)


def test_an_idle_connection_outlives_the_clients_keep_alive(cloud: Cloud):
    """One connection idle for longer than httpx's 5 s keep-alive still serves its next request:
    the server must not close it at the moment a client reuses it (it did, at uvicorn's 5 s)."""
    import http.client
    import ssl
    from urllib.parse import urlsplit

    admin = urlsplit(cloud.info["admin_endpoint"])
    connection = http.client.HTTPSConnection(
        admin.hostname, admin.port, timeout=30,
        context=ssl.create_default_context(cafile=cloud.info["ca_cert"]))
    headers = {"Authorization": f"Bearer {cloud.info['static_token']}"}

    def status() -> int:
        connection.request("GET", admin.path + "/status", headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status

    try:
        assert status() == 200
        first_socket = connection.sock
        time.sleep(6)
        assert status() == 200 and connection.sock is first_socket
    finally:
        connection.close()
