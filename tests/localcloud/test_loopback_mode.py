"""The local cloud in loopback mode, run by a real non-root user (a throwaway account when the
tests run as root, see loopback_harness.py), driven with the real Azure SDK and reached with
the stock OpenSSH client: instances on 127.x.y.z at port 2222, each with its own host key,
accepting exactly the osProfile keys for adminUsername; customData (the project's own boot
script) run once as that user; IMDS on the instance's address, named by AZMANAGERS_IMDS_URL;
eviction, kill, drop-ssh; stop (and stop after a crash) leaves nothing running or listening.
Also the `--network` switch through the CLI, and AzureCluster end to end in loopback mode."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from arm_harness import Cloud, StaticCredential, nic_body, unique, vm_body
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient
from loopback_harness import NonRootUser, listeners_in
from sandbox_harness import LoopbackService, cmdline, make_key

from prefect_azmanagers.azure.bootscript import boot_script, encode_custom_data
from prefect_azmanagers.cli.localcloud import LOCALCLOUD_TEMPDISK, localcloud_blocks
from prefect_azmanagers.localcloud import LocalCloudAdmin, loopback
from prefect_azmanagers.localcloud.sandbox import SandboxHost

LOOPBACK_BLOCK = ipaddress.ip_network("127.213.0.0/16")
SPOT = dict(priority="Spot", evictionPolicy="Delete", billingProfile={"maxPrice": -1})
IMDS_EVENTS = ('curl -s -H Metadata:true '
               '"$AZMANAGERS_IMDS_URL/metadata/scheduledevents?api-version=2020-07-01"')
CLI = [sys.executable, "-m", "prefect_azmanagers.cli", "localcloud"]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _clients(info: dict) -> Cloud:
    kwargs = dict(base_url=info["arm_endpoint"], connection_verify=info["ca_cert"], polling_interval=0)
    return Cloud(info, LocalCloudAdmin.from_info(info),
                 ComputeManagementClient(StaticCredential(info["static_token"]), info["subscription_id"], **kwargs),
                 NetworkManagementClient(StaticCredential(info["static_token"]), info["subscription_id"], **kwargs))


def _close(cloud: Cloud) -> None:
    cloud.compute.close()
    cloud.network.close()
    cloud.admin.close()


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _uids(pids: list[int]) -> set[int]:
    """Owners of those of `pids` still alive (a session's process may end meanwhile)."""
    owners = set()
    for pid in pids:
        try:
            owners.add(_uid_of(pid))
        except OSError:
            pass
    return owners


def _running(pid: int) -> bool:
    """Alive and not a zombie (orphans wait a moment for init to reap them)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _sandbox(cloud: Cloud, name: str) -> dict:
    [inst] = [i for i in cloud.admin.status()["instances"] if i["name"] == name]
    return inst["sandbox"]


def _create_vm(cloud: Cloud, name: str) -> None:
    """A VM `name` with its NIC `name-nic` (the example templates' bodies)."""
    nic = cloud.network.network_interfaces.begin_create_or_update(
        cloud.rg, f"{name}-nic", nic_body(cloud)).result()
    cloud.compute.virtual_machines.begin_create_or_update(cloud.rg, name, vm_body(cloud, nic.id, name)).result()


def _wait_for_ssh(cloud: Cloud, ip: str, timeout: float = 60) -> None:
    """Until a session on the instance runs a command. ARM says Succeeded once the instance is
    created; under a loaded machine its first sessions broke ("send disconnect: Broken pipe",
    no output) in two full runs out of three, and passed alone."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = cloud.ssh(ip, "id -un", timeout=30)
        if last.returncode == 0 and last.stdout.strip() == "azureuser":
            return
        time.sleep(1)
    raise AssertionError(f"no working SSH session on {ip} within {timeout:.0f} s: "
                         f"exit {last.returncode}, {last.stderr.strip()!r}")


def _cloud_block(state_dir: Path) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(json.loads((state_dir / "sandbox-host.json").read_text())["subnet"])


def _cloud_processes(state_dir: Path) -> list[int]:
    """Processes of the loopback instances of the local cloud with this state dir."""
    cloud_id = SandboxHost(state_dir, network="loopback").cloud_id
    return loopback.marked_pids(f"azlc-{cloud_id}-")


def _pinned_ssh(cloud: Cloud, ip: str, host_key: str, key: Path | str, command: str, tmp: Path,
                user: str = "azureuser") -> subprocess.CompletedProcess:
    """Stock OpenSSH client, host key pinned (StrictHostKeyChecking=yes)."""
    port = cloud.info["ssh_port"]
    known_hosts = tmp / f"known_hosts-{ip}"
    known_hosts.write_text(f"[{ip}]:{port} {host_key}\n")
    argv = ["ssh", "-i", str(key), "-p", str(port), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", f"{user}@{ip}", command]
    for attempt in range(3):
        ran = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        # sshd dropping a connection it just accepted (seen under three parallel test files)
        # is retried; refusals (a wrong key, a changed host key) are answers, returned as such
        if ran.returncode != 255 or not any(word in ran.stderr for word in _CONNECTION_DROPPED):
            return ran
        time.sleep(2.0)
    return ran


_CONNECTION_DROPPED = ("closed by remote host", "Connection reset", "kex_exchange_identification")


@pytest.fixture(scope="module")
def user():
    account = NonRootUser.create()
    yield account
    account.remove()


@pytest.fixture(scope="module")
def api_service():
    """An HTTP server on the driver's 127.0.0.1, standing in for the Prefect API."""
    service = LoopbackService()
    yield service.url
    service.close()


@pytest.fixture(scope="module")
def lb(user, api_service):
    """A local cloud started by the non-root user with no --network: loopback is the default."""
    state_dir = user.base / "cloud"
    info = user.start_cloud(state_dir, prefect_api_url=api_service)
    cloud = _clients(info)
    try:
        yield cloud
    finally:
        _close(cloud)
        result = user.stop_cloud(state_dir)
        assert result.returncode == 0, result.stderr


def test_a_user_without_root_gets_loopback_mode_and_status_says_so(lb: Cloud, user: NonRootUser):
    info = lb.info
    assert info["mode"] == "loopback" and info["ssh_port"] == 2222 and info["ssh_user"] == "azureuser"
    assert _uid_of(info["pid"]) == user.uid != 0
    status = user.run([*CLI, "status", "--state-dir", info["state_dir"]], env_extra={"COLUMNS": "250"})
    assert status.returncode == 0, status.stderr
    assert "mode loopback" in status.stdout and "shared loopback" in status.stdout
    assert "SSH on port 2222" in status.stdout
    as_json = json.loads(user.run([*CLI, "status", "--json", "--state-dir", info["state_dir"]]).stdout)
    assert as_json["host"]["mode"] == "loopback" and as_json["host"]["ssh_port"] == 2222
    # the manifest `localcloud start` saves carries the port and user the instances answer on
    manifest = localcloud_blocks(info)["localcloud"]
    assert (manifest.ssh_port, manifest.ssh_user) == (2222, "azureuser")


def test_the_prefect_api_reaches_instances_through_the_blocks_first_address(lb: Cloud, api_service: str):
    block = _cloud_block(Path(lb.info["state_dir"]))
    url = lb.info["prefect_api_url_for_vms"]
    gateway = str(block.network_address + 1)
    assert url.startswith(f"http://{gateway}:") and url.endswith("/api") and url != api_service
    name = unique("lbapi")
    _create_vm(lb, name)
    try:
        ip = lb.network.network_interfaces.get(lb.rg, f"{name}-nic").ip_configurations[0].private_ip_address
        # the forwarder may still be settling on a loaded machine: curl retries a refusal
        answer = lb.ssh(ip, f"curl -s --retry 5 --retry-connrefused --retry-delay 1 --max-time 20 "
                            f"{url}/health")
        assert answer.stdout == "driver-loopback-ok", answer
    finally:
        lb.compute.virtual_machines.begin_delete(lb.rg, name).result()
        lb.network.network_interfaces.begin_delete(lb.rg, f"{name}-nic").result()


def test_scale_set_instances_over_openssh_boot_script_and_imds(lb: Cloud, user: NonRootUser, tmp_path: Path):
    name = unique("lbss")
    script = boot_script(
        admin_username="azureuser", tempdisk=LOCALCLOUD_TEMPDISK, env={"GREETING": "it's $HOME `x`"},
        hooks=['echo "boot as $(id -un) uid $(id -u) home $HOME imds $AZMANAGERS_IMDS_URL"',
               # the detached worker's hook starts it with runuser, as root would on Azure
               "runuser -u azureuser -- sh -c 'id -un > /home/azureuser/runuser.txt'",
               "nohup sleep 600 >/dev/null 2>&1 &"])
    body = lb.scale_set_body(2, custom_data=encode_custom_data(script))
    lb.compute.virtual_machine_scale_sets.begin_create_or_update(lb.rg, name, body).result()
    try:
        nics = list(lb.network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(lb.rg, name))
        ips = {n.virtual_machine.id.rsplit("/", 1)[-1]: n.ip_configurations[0].private_ip_address for n in nics}
        assert len(set(ips.values())) == 2
        assert all(ipaddress.ip_address(ip) in LOOPBACK_BLOCK for ip in ips.values())
        pids = []
        for instance_id, ip in ips.items():
            vm_name = f"{name}_{instance_id}"
            sandbox = _sandbox(lb, vm_name)
            key = lb.info["ssh_private_key_file"]
            _wait(lambda: _pinned_ssh(lb, ip, sandbox["host_key"], key, "cat ~/.azmanagers/boot.status",
                                      tmp_path).stdout.strip() == "ready", 180, f"{vm_name}'s boot script")
            probe = _pinned_ssh(lb, ip, sandbox["host_key"], key, "; ".join([
                "id -un", "echo $HOME", "pwd", "echo ${PYTHONPATH-unset}", "echo $AZMANAGERS_IMDS_URL",
                f"test -e {Path(__file__)} && echo source-visible || echo source-hidden",
                "cat ~/runuser.txt", ". ~/.azmanagers/env.sh && echo \"$GREETING\"",
                "test -d /mnt/scratch && echo scratch", "cat /var/log/cloud-init-output.log",
            ]), tmp_path)
            assert probe.returncode == 0, probe.stderr
            lines = probe.stdout.splitlines()
            assert lines[:9] == ["azureuser", "/home/azureuser", "/home/azureuser", "unset",
                                 f"http://{ip}:8254", "source-hidden", "azureuser", "it's $HOME `x`", "scratch"]
            log = "\n".join(lines[9:])
            assert f"boot as azureuser uid {user.uid} home /home/azureuser imds http://{ip}:8254" in log
            assert "prefect-azmanagers boot: ready" in log and log.count("boot script finished") == 1
            # IMDS from inside, on the instance's own address; Azure's rules apply
            doc = json.loads(_pinned_ssh(lb, ip, sandbox["host_key"], key, 'curl -s -H Metadata:true '
                                         '"$AZMANAGERS_IMDS_URL/metadata/instance?api-version=2021-02-01"',
                                         tmp_path).stdout)
            assert doc["compute"]["name"] == vm_name
            assert doc["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"] == ip
            no_header = _pinned_ssh(lb, ip, sandbox["host_key"], key, "curl -s -o /dev/null -w '%{http_code}' "
                                    '"$AZMANAGERS_IMDS_URL/metadata/instance?api-version=2021-02-01"', tmp_path)
            assert no_header.stdout == "400"
            # exactly the osProfile keys, for adminUsername only
            other = make_key(tmp_path, f"other-{instance_id}")
            refused = _pinned_ssh(lb, ip, sandbox["host_key"], other, "true", tmp_path)
            assert refused.returncode == 255 and "Permission denied" in refused.stderr
            as_root = _pinned_ssh(lb, ip, sandbox["host_key"], key, "true", tmp_path, user="root")
            assert as_root.returncode == 255
            # everything of the instance runs as the non-root user, the boot script's sleep included
            assert sandbox["pids"] and _uids(sandbox["pids"]) == {user.uid}
            assert f"{ip}:2222" in listeners_in(str(LOOPBACK_BLOCK))
            assert f"{ip}:8254" in listeners_in(str(LOOPBACK_BLOCK))
            pids += _sandbox(lb, vm_name)["pids"]
        assert any(cmdline(p).startswith(b"sleep\0") for p in pids if _running(p))
    finally:
        lb.compute.virtual_machine_scale_sets.begin_delete(lb.rg, name).result()
    assert not [p for p in pids if _running(p)]
    assert not set(listeners_in(str(LOOPBACK_BLOCK))) & {f"{ip}:{port}" for ip in ips.values()
                                                         for port in (2222, 8254)}


MI_TOKEN = ("from azure.identity import ManagedIdentityCredential; "
            "print(ManagedIdentityCredential().get_token('https://management.azure.com/.default').token)")


def test_managed_identity_from_the_instance_imds(lb: Cloud, tmp_path: Path):
    """azure-identity's ManagedIdentityCredential on a loopback instance: it finds the instance's
    IMDS through AZURE_POD_IDENTITY_AUTHORITY_HOST, and ARM accepts the token."""
    name = unique("lbmi")
    nic = lb.network.network_interfaces.begin_create_or_update(lb.rg, f"{name}-nic", nic_body(lb)).result()
    body = vm_body(lb, nic.id, name) | {"identity": {"type": "SystemAssigned"}}
    vm = lb.compute.virtual_machines.begin_create_or_update(lb.rg, name, body).result()
    try:
        ip = lb.network.network_interfaces.get(lb.rg, f"{name}-nic").ip_configurations[0].private_ip_address
        sandbox = _sandbox(lb, name)
        ran = _pinned_ssh(lb, ip, sandbox["host_key"], lb.info["ssh_private_key_file"],
                          f"echo $AZURE_POD_IDENTITY_AUTHORITY_HOST; {lb.info['python']} -c \"{MI_TOKEN}\"", tmp_path)
        assert ran.returncode == 0, ran.stderr[-2000:]
        authority_host, token = ran.stdout.split()
        assert authority_host == f"http://{ip}:8254"
        with_token = ComputeManagementClient(StaticCredential(token), lb.info["subscription_id"],
                                             base_url=lb.info["arm_endpoint"], connection_verify=lb.info["ca_cert"])
        with with_token:
            assert with_token.virtual_machines.get(lb.rg, name).identity.principal_id == vm.identity.principal_id
    finally:
        lb.compute.virtual_machines.begin_delete(lb.rg, name).result()


def test_eviction_preempt_in_imds_then_the_instance_is_gone(lb: Cloud, tmp_path: Path):
    name = unique("lbev")
    lb.admin.settings(eviction_notice=4)
    lb.compute.virtual_machine_scale_sets.begin_create_or_update(lb.rg, name, lb.scale_set_body(1, **SPOT)).result()
    try:
        [nic] = lb.network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(lb.rg, name)
        ip = nic.ip_configurations[0].private_ip_address
        assert json.loads(lb.ssh(ip, IMDS_EVENTS).stdout)["Events"] == []
        lb.compute.virtual_machine_scale_set_vms.simulate_eviction(lb.rg, name, "0")
        [event] = json.loads(lb.ssh(ip, IMDS_EVENTS).stdout)["Events"]
        assert event["EventType"] == "Preempt" and event["Resources"] == [f"{name}_0"]
        _wait(lambda: not list(lb.network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(
            lb.rg, name)), 60, "the evicted instance to go")
        assert lb.ssh(ip, "true", timeout=30).returncode == 255
        assert f"{ip}:2222" not in listeners_in(str(LOOPBACK_BLOCK))
    finally:
        lb.admin.settings(eviction_notice=30)
        lb.compute.virtual_machine_scale_sets.begin_delete(lb.rg, name).result()


def test_drop_ssh_cuts_sessions_and_kill_ends_the_instance(lb: Cloud, user: NonRootUser):
    name = unique("lbvm")
    _create_vm(lb, name)
    try:
        ip = lb.network.network_interfaces.get(lb.rg, f"{name}-nic").ip_configurations[0].private_ip_address
        argv = ["ssh", "-i", lb.info["ssh_private_key_file"], "-p", "2222", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                f"azureuser@{ip}", "echo started; sleep 30; echo finished"]
        session = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   stdin=subprocess.DEVNULL)
        try:
            assert session.stdout.readline().strip() == "started"
            lb.admin.drop_ssh(name)
            out, _ = session.communicate(timeout=15)
        finally:
            session.kill()
        assert session.returncode == 255 and "finished" not in out
        assert lb.ssh(ip, "echo again").stdout.strip() == "again"  # sshd itself stays

        pids = _sandbox(lb, name)["pids"]
        assert pids and _uids(pids) == {user.uid}
        lb.admin.kill(name)
        assert not [p for p in pids if _running(p)]
        assert _sandbox(lb, name)["pids"] == []
        assert lb.ssh(ip, "true", timeout=30).returncode == 255
        statuses = [s.code for s in lb.compute.virtual_machines.instance_view(lb.rg, name).statuses]
        assert "PowerState/stopped" in statuses
    finally:
        lb.compute.virtual_machines.begin_delete(lb.rg, name).result()
        lb.network.network_interfaces.begin_delete(lb.rg, f"{name}-nic").result()


def test_stop_after_a_crash_and_a_normal_stop_leave_nothing():
    """Its own throwaway user, so 'nothing left' means: no process of that user at all."""
    user = NonRootUser.create()
    try:
        state_dir = user.base / "cloud"
        info = user.start_cloud(state_dir)
        block = _cloud_block(state_dir)
        cloud = _clients(info)
        try:
            name = unique("crash")
            script = encode_custom_data("#!/bin/bash\nnohup sleep 600 >/dev/null 2>&1 &\necho booted\n")
            nic = cloud.network.network_interfaces.begin_create_or_update(cloud.rg, f"{name}-nic",
                                                                          nic_body(cloud)).result()
            body = vm_body(cloud, nic.id, name)
            body["properties"]["osProfile"]["customData"] = script
            cloud.compute.virtual_machines.begin_create_or_update(cloud.rg, name, body).result()
            ip = cloud.network.network_interfaces.get(cloud.rg, f"{name}-nic").ip_configurations[0].private_ip_address
            assert cloud.ssh(ip, "nohup sleep 600 >/dev/null 2>&1 & echo ok").stdout.strip() == "ok"
            sshd_pid = _sandbox(cloud, name)["sshd_pid"]
        finally:
            _close(cloud)
        os.kill(info["pid"], signal.SIGKILL)  # the local cloud crashes; its instances stay
        _wait(lambda: info["pid"] not in user.pids(), 10, "the local cloud to die")
        survivors = _cloud_processes(state_dir)
        assert sshd_pid in survivors
        # the boot script's sleep and the SSH one (a background child may not have exec'd yet)
        _wait(lambda: sum(cmdline(p) == b"sleep\x00600\x00" for p in _cloud_processes(state_dir)) == 2,
              10, "both sleeps among the instance's processes")
        assert f"{ip}:2222" in listeners_in(str(block))

        stopped = user.stop_cloud(state_dir)
        assert stopped.returncode == 0 and stopped.stdout.strip() == "False", stopped.stderr
        assert _cloud_processes(state_dir) == [] and listeners_in(str(block)) == []
        assert user.pids() == []

        # a normal start + stop in the same state dir: same block again, nothing left either
        info = user.start_cloud(state_dir)
        assert _cloud_block(state_dir) == block
        cloud = _clients(info)
        try:
            name = unique("again")
            _create_vm(cloud, name)
            assert listeners_in(str(block))
        finally:
            _close(cloud)
        stopped = user.stop_cloud(state_dir)
        assert stopped.returncode == 0 and stopped.stdout.strip() == "True", stopped.stderr
        assert listeners_in(str(block)) == [] and user.pids() == []
        network = loopback.reserve(block, block)  # the block's reservation ended with the cloud
        try:
            assert network.subnet == block
        finally:
            network.release()
    finally:
        user.remove()


def test_isolated_mode_is_refused_without_root(user: NonRootUser):
    state_dir = user.base / "isolated"
    result = user.run([*CLI, "start", "--background", "--network", "isolated", "--state-dir", str(state_dir)],
                      env_extra={"COLUMNS": "250"})
    assert result.returncode != 0
    assert "the isolated network mode needs root" in result.stdout + result.stderr
    assert "--network loopback" in result.stdout + result.stderr


def test_network_switch_through_the_cli(tmp_path: Path):
    """`localcloud start --network loopback` as whoever runs the tests (root in CI)."""
    state_dir = tmp_path / "cloud"
    env = dict(os.environ, COLUMNS="250", PREFECT_API_URL="http://127.0.0.1:9/api",
               PREFECT_CLIENT_MAX_RETRIES="0")
    started = subprocess.run([*CLI, "start", "--background", "--network", "loopback", "--state-dir", str(state_dir)],
                             capture_output=True, text=True, timeout=180, env=env)
    try:
        assert started.returncode == 0, started.stderr
        assert "Prefect blocks were NOT saved" in started.stdout  # no Prefect server here: said, not fatal
        assert "Loopback mode without --prefect-api-url" in started.stdout  # and why flows need one
        info = json.loads((state_dir / "localcloud.json").read_text())
        assert info["mode"] == "loopback" and info["ssh_port"] == 2222
        assert info["prefect_api_url_for_vms"] is None
        status = subprocess.run([*CLI, "status", "--state-dir", str(state_dir)], capture_output=True, text=True,
                                timeout=60, env=env)
        assert "mode loopback" in status.stdout and "shared loopback" in status.stdout
        cloud = _clients(info)
        try:
            name = unique("cli")
            _create_vm(cloud, name)
            ip = cloud.network.network_interfaces.get(cloud.rg, f"{name}-nic").ip_configurations[0].private_ip_address
            _wait_for_ssh(cloud, ip)
            probe = cloud.ssh(ip, f"id -un; echo $AZMANAGERS_IMDS_URL; touch {Path(sys.prefix) / 'azlc-probe'}")
            assert probe.stdout.split() == ["azureuser", f"http://{ip}:8254"], (probe.returncode, probe.stderr)
            # the interpreter is shared read-only, even with the host uid of the local cloud's user
            assert probe.returncode != 0 and "Read-only" in probe.stderr
            assert not (Path(sys.prefix) / "azlc-probe").exists()
        finally:
            _close(cloud)
        block = _cloud_block(state_dir)
    finally:
        stopped = subprocess.run([*CLI, "stop", "--state-dir", str(state_dir)], capture_output=True, text=True,
                                 timeout=120, env=env)
    assert stopped.returncode == 0 and "Stopped the local cloud" in stopped.stdout
    assert listeners_in(str(block)) == [] and _cloud_processes(state_dir) == []


def square(x: int) -> int:
    return x * x


def where() -> tuple[str, str]:
    import socket

    return socket.gethostname(), os.environ.get("HOME", "")


def test_azure_cluster_end_to_end_in_loopback_mode(lb: Cloud):
    from prefect_azmanagers.cluster.cluster import AzureCluster

    blocks = localcloud_blocks(lb.info)
    group = f"lbcl-{uuid.uuid4().hex[:6]}"
    with AzureCluster(blocks["localcloud-small"], 2, manifest=blocks["localcloud"], group=group,
                      progress=False, join_timeout=300, waitfor=True) as cluster:
        futures = [cluster.submit(lambda i=i: square(i)) for i in range(12)]
        assert [f.result(timeout=120) for f in futures] == [i * i for i in range(12)]
        addresses = {w.ip for w in cluster.workers}
        assert len(addresses) == 2 and all(ipaddress.ip_address(a) in LOOPBACK_BLOCK for a in addresses)
        hosts = {cluster.submit(where).result(timeout=60) for _ in range(8)}
        assert {home for _, home in hosts} == {"/home/azureuser"}
    assert [i for i in lb.admin.status()["instances"] if i["scale_set"] == group] == []
    assert not set(listeners_in(str(LOOPBACK_BLOCK))) & {f"{a}:2222" for a in addresses}


# -- the parts, without a running local cloud ---------------------------------------------------

def test_two_clouds_never_share_a_loopback_block():
    first = loopback.reserve("127.213.0.0/16", None)
    try:
        second = loopback.reserve("127.213.0.0/16", first.subnet)  # asks for the held one
        try:
            assert second.subnet != first.subnet and not second.subnet.overlaps(first.subnet)
            assert second.subnet.prefixlen == 22 and second.subnet.subnet_of(LOOPBACK_BLOCK)
        finally:
            second.release()
        held = first.subnet
    finally:
        first.release()
    again = loopback.reserve("127.213.0.0/16", held)  # released with its holder
    try:
        assert again.subnet == held
    finally:
        again.release()


def test_a_block_outside_127_is_refused():
    with pytest.raises(ValueError, match="not inside 127.0.0.0/8"):
        loopback.reserve("10.213.0.0/16", None)


def test_unknown_network_mode_and_privileged_ports_are_clear_errors(tmp_path: Path):
    from prefect_azmanagers.localcloud.sandbox import SandboxError

    with pytest.raises(SandboxError, match="unknown network mode 'bridged'.*'isolated'.*'loopback'"):
        SandboxHost(tmp_path, network="bridged")
    with pytest.raises(SandboxError, match="loopback_ssh_port 22 is not an unprivileged port"):
        SandboxHost(tmp_path, network="loopback", loopback_ssh_port=22)


def test_instance_identity_names_the_user_admin_and_nobody_else_with_its_ids():
    from prefect_azmanagers.localcloud.accounts import loopback_identity

    passwd, group = loopback_identity("azureuser", 4242, 4343)
    entries = [line.split(":") for line in passwd.splitlines()]
    assert entries[0] == ["azureuser", "x", "4242", "4343", "", "/home/azureuser", "/bin/bash"]
    assert [e[0] for e in entries if e[2] == "4242"] == ["azureuser"]
    assert [e for e in entries if e[0] == "root"]  # the rest of the host's accounts stay
    assert [g.split(":")[0] for g in group.splitlines() if g.split(":")[2] == "4343"] == ["azureuser"]


def test_runuser_shim_runs_commands_as_the_admin_only(tmp_path: Path):
    from prefect_azmanagers.localcloud.fsview import runuser_shim

    shim = tmp_path / "runuser"
    shim.write_text(runuser_shim("azureuser"))
    ok = subprocess.run(["sh", str(shim), "-u", "azureuser", "--", "echo", "a b"], capture_output=True, text=True)
    assert (ok.returncode, ok.stdout) == (0, "a b\n")
    refused = subprocess.run(["sh", str(shim), "-u", "root", "--", "id"], capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "without root (loopback mode)" in refused.stderr and "runuser -u azureuser" in refused.stderr


FLOW = '''
import json, socket, sys
from prefect import flow, task
from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

@task
def square(x):
    return x * x, socket.gethostname()

@flow(task_runner=AzureScaleSetTaskRunner(sys.argv[1], 2, manifest=sys.argv[2], group=sys.argv[3],
                                          join_timeout=300))
def squares():
    return [future.result() for future in square.map(range(6))]

print(json.dumps(squares()))
'''


@pytest.fixture(scope="module")
def prefect_cloud(prefect_server, user: NonRootUser):
    """The non-root user's loopback local cloud for the session's Prefect server; its blocks are
    saved under names of their own (the session's `localcloud` blocks stay). Yields the block
    names and the environment of the user's Prefect clients."""
    state_dir = user.base / "prefect-cloud"
    info = user.start_cloud(state_dir, prefect_api_url=prefect_server.api_url)
    try:
        prefix = f"lbtest-{uuid.uuid4().hex[:6]}"
        names = {}
        for name, block in localcloud_blocks(info).items():  # the blob blocks before the manifest
            names[name] = prefix if name == "localcloud" else f"{prefix}-{name.removeprefix('localcloud-')}"
            if name == "localcloud" and block.blob_container:
                block.blob_container = names["blob-container"]
            block.save(names[name])
        yield names, {"PREFECT_API_URL": prefect_server.api_url, "PREFECT_HOME": str(user.base / "prefect-home")}
    finally:
        stopped = user.stop_cloud(state_dir)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "True"
    assert _cloud_processes(state_dir) == [] and listeners_in(str(_cloud_block(state_dir))) == []


def test_a_flow_on_scale_set_workers_run_by_the_non_root_user(prefect_cloud, user: NonRootUser):
    """What the demo does, by a user without root: Prefect server, local cloud in loopback mode,
    a flow whose task runner grows a scale set, task runs reported to the server."""
    names, env = prefect_cloud
    flow_file = user.base / "squares.py"
    flow_file.write_text(FLOW)
    group = f"lbflow-{uuid.uuid4().hex[:6]}"
    ran = user.run([sys.executable, str(flow_file), names["localcloud-small"], names["localcloud"], group],
                   timeout=600, env_extra=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    results = json.loads(ran.stdout.strip().splitlines()[-1])
    assert [r[0] for r in results] == [i * i for i in range(6)]
    # computerNamePrefix; a replacement (a lost instance) would say why in the flow's log
    assert {r[1] for r in results} <= {f"{group}-{i:06d}" for i in range(2)}, ran.stderr[-6000:]
    assert "Finished in state Completed()" in ran.stderr + ran.stdout


DETACHED = '''
import json, sys
from prefect_azmanagers import addproc, detachat, rmproc

vm_template, nic_template, manifest = sys.argv[1:4]
vm = addproc(vm_template, nic_template, manifest=manifest)
def job(x):
    import os, socket
    print("running on", socket.gethostname(), "as", os.getuid())
    return x * 2, socket.gethostname()
run = detachat(vm, job, 21)
value = run.result(timeout=300)
print(json.dumps({"vm": vm.name, "value": value, "stdout": run.read("stdout")}))
rmproc(vm)
'''


def test_a_detached_vm_job_run_by_the_non_root_user(prefect_cloud, user: NonRootUser):
    """addproc / detachat / rmproc unchanged: the VM's Prefect worker is started by the boot
    script through runuser (the loopback shim) and reaches the API through the forwarder."""
    names, env = prefect_cloud
    script = user.base / "detached.py"
    script.write_text(DETACHED)
    ran = user.run([sys.executable, str(script), names["localcloud-vm"], names["localcloud-nic"],
                    names["localcloud"]], timeout=600, env_extra=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    doc = json.loads(ran.stdout.strip().splitlines()[-1])
    assert doc["value"] == [42, doc["vm"]]
    assert f"running on {doc['vm']} as {user.uid}" in doc["stdout"]


def test_a_kernel_without_user_namespaces_gets_a_clear_error(tmp_path: Path, monkeypatch):
    """The refusal itself is faked (the machine's setting is not ours to change); the message
    the user gets is the local cloud's."""
    import asyncio

    from prefect_azmanagers.localcloud import sandbox
    from prefect_azmanagers.localcloud._proc import CommandError
    from prefect_azmanagers.localcloud.sandbox import modes

    async def refuse(*argv, **kwargs):
        raise CommandError(list(argv), 1, "unshare: unshare failed: Operation not permitted")

    monkeypatch.setattr(modes, "run", refuse)
    host = SandboxHost(tmp_path / "state", network="loopback")
    with pytest.raises(sandbox.SandboxError) as info:
        asyncio.run(host.start())
    message = str(info.value)
    assert "needs unprivileged user namespaces" in message and "Operation not permitted" in message
    assert "user.max_user_namespaces" in message and "run as root" in message
    assert not (tmp_path / "state" / "sandbox-host.json").exists()  # nothing reserved, nothing started

    async def too_old(*argv, **kwargs):
        raise CommandError(list(argv), 1, "unshare: unrecognized option '--keep-caps'")

    monkeypatch.setattr(modes, "run", too_old)
    with pytest.raises(sandbox.SandboxError, match="needs util-linux 2.38 or later"):
        asyncio.run(SandboxHost(tmp_path / "state", network="loopback").start())
