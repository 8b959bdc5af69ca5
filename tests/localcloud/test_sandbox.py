"""SandboxHost in isolated mode (root): instances reached with the stock OpenSSH client, their
boot script, IMDS, network isolation, faults and cleanup. The SandboxHost is the unit under test
here; the ARM endpoint's own tests reach it through the real Azure SDK."""

from __future__ import annotations

import base64
import json
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from prefect_azmanagers.localcloud import netns
from prefect_azmanagers.localcloud.sandbox import InstanceSpec, SandboxBootError, SandboxError, SandboxHost
from sandbox_harness import LoopbackService, LoopThread, cmdline, make_key, pin_host_key, ssh, ssh_argv

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="isolated mode needs root (CI runs as root)")

PYTHON = sys.executable
IMDS = "http://169.254.169.254"


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {"good": make_key(d, "good"), "other": make_key(d, "other"), "dir": d}


@pytest.fixture(scope="module")
def service():
    svc = LoopbackService()
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def acks():
    return []


@pytest.fixture(scope="module")
def host(loop, tmp_path_factory, service, acks):
    """One SandboxHost for the module, its Prefect API URL pointing at a loopback service."""
    h = SandboxHost(tmp_path_factory.mktemp("state"), prefect_api_url=service.url,
                    on_event_ack=lambda key, event_id: acks.append((key, event_id)))
    loop.run(h.start())
    yield h
    loop.run(h.stop())


class Booted:
    """A booted instance plus what a test needs to reach it."""

    def __init__(self, host: SandboxHost, spec: InstanceSpec, keys: dict):
        self.host, self.spec, self.key = host, spec, keys["good"]
        info = host.describe(spec.key)
        self.ip = info["ip"]
        self.known_hosts = pin_host_key(keys["dir"], self.ip, info["host_key"])

    def ssh(self, command: str, *options: str, key: Path | None = None) -> subprocess.CompletedProcess:
        return ssh(self.ip, key or self.key, self.known_hosts, command, *options)

    def check(self, command: str) -> str:
        result = self.ssh(command)
        assert result.returncode == 0, f"{command!r} failed ({result.returncode}): {result.stderr}"
        return result.stdout


def spec_for(keys, script: str | None = None, **overrides) -> InstanceSpec:
    vm_id = str(uuid.uuid4())
    fields = dict(
        key=vm_id, name=f"ss_{vm_id[:4]}", computer_name=f"ss{vm_id[:6]}", admin_username="azureuser",
        public_keys=[Path(f"{keys['good']}.pub").read_text()],
        custom_data=base64.b64encode(script.encode()).decode() if script is not None else None,
        metadata={"name": f"ss_{vm_id[:4]}", "vmId": vm_id, "vmScaleSetName": "ss",
                  "location": "localcloud", "priority": "Spot"},
    )
    fields.update(overrides)
    return InstanceSpec(**fields)


@pytest.fixture
def boot(host, loop, keys):
    """Boot instances for one test; whatever the test leaves is deleted after it."""
    booted = []

    def _boot(script: str | None = None, **overrides) -> Booted:
        spec = spec_for(keys, script, **overrides)
        host.allocate(spec.key)
        booted.append(spec.key)
        loop.run(host.boot(spec))
        return Booted(host, spec, keys)

    yield _boot
    for key in booted:
        loop.run(host.delete(key))


def _wait_for(predicate, timeout: float = 30, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {message}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running (a killed process may stay a zombie until init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _listening(address: str) -> bool:
    return address in subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout


def _netns_names() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()


def test_ssh_accepts_the_os_profile_key_only(boot, keys):
    vm = boot()
    assert vm.check("whoami").strip() == "azureuser"
    refused = vm.ssh("true", key=keys["other"])
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    as_root = ssh(vm.ip, keys["good"], vm.known_hosts, "true", user="root")
    assert as_root.returncode == 255


def test_custom_data_runs_once_as_root_with_its_output_logged(boot):
    vm = boot("#!/bin/bash\n"
              "echo boot-says-hello\n"
              "echo ran >> /var/log/boot-runs\n"
              "id -u > /home/azureuser/boot-uid\n"
              "echo ready > /home/azureuser/.azmanagers-marker\n")
    # the instance's /var/log is its sandbox's log/ directory: watch it from outside
    outside = Path(vm.host.describe(vm.spec.key)["sandbox"]) / "log" / "cloud-init-output.log"
    _wait_for(lambda: "exit status 0" in outside.read_text(), message="the boot script's end")
    inside = vm.check("cat /var/log/cloud-init-output.log; echo ---; cat /home/azureuser/boot-uid "
                      "/home/azureuser/.azmanagers-marker /var/log/boot-runs")
    log, files = inside.split("---\n")
    assert "boot-says-hello" in log and log == outside.read_text()
    assert files.splitlines() == ["0", "ready", "ran"]  # as root, once


def test_boot_script_background_processes_live_until_delete(host, loop, boot):
    vm = boot("#!/bin/bash\nsetsid sleep 1000 > /dev/null 2>&1 < /dev/null &\necho started\n")
    log = Path(host.describe(vm.spec.key)["sandbox"]) / "log" / "cloud-init-output.log"
    _wait_for(lambda: "exit status 0" in log.read_text(), message="the boot script's end")
    # the script can end before its background child has exec'd sleep: wait for the exec
    sleepers: list[int] = []

    def sleeper_started() -> bool:
        sleepers[:] = [p for p in host.describe(vm.spec.key)["pids"] if cmdline(p).startswith(b"sleep\0")]
        return bool(sleepers)

    _wait_for(sleeper_started, timeout=10, message="the boot script's background sleep among the instance's pids")
    loop.run(host.delete(vm.spec.key))
    assert not any(_alive(p) for p in sleepers)


def test_ssh_commands_see_a_vm_not_the_driver(boot):
    vm = boot()
    probe = (
        "import json, os, sys, prefect, prefect_azmanagers; "
        "print(json.dumps({'cwd': os.getcwd(), 'home': os.environ.get('HOME'), "
        "'env': sorted(os.environ), 'path': sys.path, 'prefect': prefect.__version__, "
        "'root': os.path.isdir('/root/.azmanagers'), 'repo_tests': os.path.exists('"
        + str(Path(__file__).resolve().parents[1]) + "')}))"
    )
    facts = json.loads(vm.check(f"{PYTHON} -c \"{probe}\""))
    assert facts["cwd"] == facts["home"] == "/home/azureuser"
    assert not {"PYTHONPATH", "PREFECT_API_URL", "PREFECT_HOME", "VIRTUAL_ENV"} & set(facts["env"])
    assert os.getcwd() not in facts["path"]
    assert facts["repo_tests"] is False  # the driver's repository is not visible on a VM
    assert facts["prefect"]
    # the interpreter is shared read-only: an instance cannot change the driver's environment
    touched = vm.ssh(f"touch {Path(sys.prefix) / 'azlc-probe'}")
    assert touched.returncode != 0 and "Read-only" in touched.stderr
    assert not (Path(sys.prefix) / "azlc-probe").exists()


def test_imds_instance_metadata_and_its_rules(boot):
    vm = boot()
    url = f"{IMDS}/metadata/instance?api-version=2021-02-01"
    doc = json.loads(vm.check(f"curl -sf -H Metadata:true '{url}'"))
    assert doc["compute"] == vm.spec.metadata
    assert doc["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"] == vm.ip
    text = vm.check(f"curl -sf -H Metadata:true '{IMDS}/metadata/instance/compute/name?api-version=2021-02-01&format=text'")
    assert text == vm.spec.metadata["name"]
    no_header = vm.check(f"curl -s -o /dev/null -w '%{{http_code}}' '{url}'")
    assert no_header == "400"
    no_version = vm.check(f"curl -s -H Metadata:true '{IMDS}/metadata/instance'")
    assert "api-version was not specified" in json.loads(no_version)["error"]
    assert vm.check("echo $AZMANAGERS_IMDS_URL").strip() == IMDS  # sessions are told where IMDS is


def test_scheduled_events_post_clear_and_acknowledge(host, boot, acks):
    vm = boot()
    events_url = f"{IMDS}/metadata/scheduledevents?api-version=2020-07-01"
    get_events = f"curl -sf -H Metadata:true '{events_url}'"
    before = json.loads(vm.check(get_events))
    assert before["Events"] == []
    assert vm.check(f"curl -s -o /dev/null -w '%{{http_code}}' '{events_url}'") == "400"
    event = {"EventId": str(uuid.uuid4()), "EventType": "Preempt", "ResourceType": "VirtualMachine",
             "Resources": [vm.spec.name], "EventStatus": "Scheduled",
             "NotBefore": "Tue, 24 Nov 2026 23:59:00 GMT", "Description": "", "EventSource": "Platform"}
    host.post_scheduled_event(vm.spec.key, event)
    during = json.loads(vm.check(get_events))
    assert during["Events"] == [event]
    assert during["DocumentIncarnation"] > before["DocumentIncarnation"]
    ack = json.dumps({"StartRequests": [{"EventId": event["EventId"]}]})
    vm.check(f"curl -sf -X POST -H Metadata:true -d '{ack}' '{events_url}'")
    _wait_for(lambda: (vm.spec.key, event["EventId"]) in acks, 10, "the approval to reach the host")
    bogus = json.dumps({"StartRequests": [{"EventId": "not-an-event"}]})
    assert vm.check(f"curl -s -o /dev/null -w '%{{http_code}}' -X POST -H Metadata:true "
                    f"-d '{bogus}' '{events_url}'") == "400"
    host.clear_scheduled_events(vm.spec.key)
    after = json.loads(vm.check(get_events))
    assert after["Events"] == [] and after["DocumentIncarnation"] > during["DocumentIncarnation"]


def test_instance_cannot_reach_driver_loopback_but_reaches_prefect_url_for_vms(host, boot, service):
    vm = boot()
    # the driver's loopback service answers on the host...
    assert subprocess.run(["curl", "-sf", service.url], capture_output=True, text=True).stdout == "driver-loopback-ok"
    # ...but not from the instance: its 127.0.0.1 is its own
    direct = vm.ssh(f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' {service.url}")
    assert direct.returncode != 0 and direct.stdout == "000"
    assert host.prefect_api_url_for_vms and "127.0.0.1" not in host.prefect_api_url_for_vms
    assert vm.check(f"curl -sf -m 10 {host.prefect_api_url_for_vms}") == "driver-loopback-ok"


def test_remote_port_forwarding_reaches_driver_loopback(boot, service):
    vm = boot()
    forwarded = vm.ssh("curl -sf -m 10 http://127.0.0.1:18765/api",
                       "-o", "ExitOnForwardFailure=yes", "-R", f"18765:127.0.0.1:{service.port}")
    assert forwarded.returncode == 0, forwarded.stderr
    assert forwarded.stdout == "driver-loopback-ok"


def test_env_sent_by_the_client_is_dropped_except_locale(boot):
    vm = boot()
    out = vm.ssh("echo ${AZLC_SECRET:-unset} ${LC_AZLC:-unset}", "-o", "SendEnv=AZLC_SECRET LC_AZLC")
    # ssh only sends variables it has; give it both through its environment
    result = subprocess.run(
        ssh_argv(vm.ip, vm.key, vm.known_hosts, "azureuser", "-o", "SendEnv=AZLC_SECRET LC_AZLC")
        + ["echo ${AZLC_SECRET:-unset} ${LC_AZLC:-unset}"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, AZLC_SECRET="s", LC_AZLC="l"))
    assert out.returncode == 0
    assert result.stdout.split() == ["unset", "l"]


def test_drop_ssh_cuts_live_sessions_and_keeps_the_instance(host, loop, boot):
    vm = boot()
    session = subprocess.Popen(ssh_argv(vm.ip, vm.key, vm.known_hosts) + ["echo up; sleep 300"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert session.stdout.readline().strip() == "up"
        loop.run(host.drop_ssh(vm.spec.key))
        assert session.wait(30) == 255  # the client saw its connection die
    finally:
        session.kill()
        session.wait()
    assert vm.check("echo again").strip() == "again"
    assert host.describe(vm.spec.key)["state"] == "running"


def test_kill_ends_everything_but_keeps_address_and_disk(host, loop, boot):
    vm = boot("#!/bin/bash\nsetsid sleep 1000 > /dev/null 2>&1 < /dev/null &\n")
    before = host.describe(vm.spec.key)
    loop.run(host.kill(vm.spec.key))
    after = host.describe(vm.spec.key)
    assert after["state"] == "killed" and after["ip"] == vm.ip and after["pids"] == []
    assert not any(_alive(p) for p in before["pids"])
    assert before["netns"] not in _netns_names()
    port = f"i{before['netns'].rsplit('-', 1)[1]}"  # its veth end on the local cloud's bridge
    bridge = subprocess.run(["ip", "-n", f"azlc-{host.cloud_id}-vnet", "-o", "link"],
                            capture_output=True, text=True, check=True).stdout
    assert f" {port}@" not in bridge and " br0:" in bridge
    assert not _listening(f"{vm.ip}:22")
    assert Path(after["sandbox"], "log").is_dir()
    loop.run(host.delete(vm.spec.key))
    assert not Path(after["sandbox"]).exists()


def test_boot_delay_keeps_ssh_down_until_it_passed(host, loop, keys):
    spec = spec_for(keys, boot_delay=3)
    ip = host.allocate(spec.key)
    pending = loop.submit(host.boot(spec))
    try:
        time.sleep(0.5)
        assert host.describe(spec.key)["state"] == "booting"
        with pytest.raises(OSError):
            socket.create_connection((ip, 22), timeout=2).close()
        pending.result(60)
        assert host.describe(spec.key)["state"] == "running"
        socket.create_connection((ip, 22), timeout=5).close()
    finally:
        loop.run(host.delete(spec.key))


def test_delete_while_booting_fails_the_boot_and_leaves_nothing(host, loop, keys):
    spec = spec_for(keys, boot_delay=30)
    host.allocate(spec.key)
    pending = loop.submit(host.boot(spec))
    _wait_for(lambda: host.describe(spec.key)["netns"] in _netns_names(), message="the namespace")
    netns = host.describe(spec.key)["netns"]
    loop.run(host.delete(spec.key))
    with pytest.raises(SandboxBootError, match="removed while booting"):
        pending.result(30)
    assert netns not in _netns_names()


@pytest.mark.parametrize("overrides, message", [
    ({"custom_data": "not base64!"}, "customData is not valid base64"),
    ({"public_keys": []}, "publicKeys must hold at least one key"),
    ({"public_keys": ["ssh-ed25519 AAAA x\nssh-rsa BBBB injected"]}, "one OpenSSH public key line"),
    ({"admin_username": "root"}, "system account"),
    ({"admin_username": "Bad User"}, "not a valid Linux user name"),
])
def test_bad_specs_fail_the_boot_with_a_clear_error(host, loop, keys, overrides, message):
    spec = spec_for(keys, **overrides)
    host.allocate(spec.key)
    try:
        with pytest.raises(SandboxBootError, match=message):
            loop.run(host.boot(spec))
        info = host.describe(spec.key)
        assert info["state"] == "failed" and info["pids"] == []
        assert info["netns"] not in _netns_names()
    finally:
        loop.run(host.delete(spec.key))


def test_stop_leaves_nothing_and_next_start_removes_a_crashed_runs_leftovers(loop, keys, tmp_path, service):
    state = tmp_path / "state"
    admin = f"azlc{uuid.uuid4().hex[:8]}"
    try:
        crashed = SandboxHost(state, prefect_api_url=service.url)
        loop.run(crashed.start())
        spec = spec_for(keys, "#!/bin/bash\nsetsid sleep 1000 > /dev/null 2>&1 < /dev/null &\n")
        crashed.allocate(spec.key)
        loop.run(crashed.boot(spec))
        left = crashed.describe(spec.key)
        with pytest.raises(SandboxError, match="another local cloud is running with the state dir"):
            loop.run(SandboxHost(state).start())
        # the refused start touched nothing
        assert left["netns"] in _netns_names() and _alive(left["sshd_pid"])
        left = crashed.describe(spec.key)
        # a crash: the process dies without stop(); its sockets and its state dir lock die with it
        loop.run(crashed._instances[spec.key].imds.close())
        loop.run(crashed._forwarder.close())
        os.close(crashed._state_dir_lock)

        fresh = SandboxHost(state, prefect_api_url=service.url)
        loop.run(fresh.start())
        try:
            assert left["netns"] not in _netns_names()
            assert not any(_alive(p) for p in left["pids"])
            assert not Path(left["sandbox"]).exists()
            spec2 = spec_for(keys, admin_username=admin)
            fresh.allocate(spec2.key)
            loop.run(fresh.boot(spec2))
            vm2 = Booted(fresh, spec2, keys)
            assert ssh(vm2.ip, vm2.key, vm2.known_hosts, "whoami", user=spec2.admin_username).stdout.strip() \
                == spec2.admin_username
            pwd.getpwnam(spec2.admin_username)  # created for the instance
            live = fresh.describe(spec2.key)
            forwarder = urlsplit(fresh.prefect_api_url_for_vms).netloc
            assert _listening(forwarder)
        finally:
            loop.run(fresh.stop())
        prefix = f"azlc-{fresh.cloud_id}-"
        assert not [n for n in _netns_names() if n.startswith(prefix)]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert f"azl{fresh.cloud_id}" not in links
        assert not any(_alive(p) for p in live["pids"])
        assert not _listening(f"{live['ip']}:22")
        with pytest.raises(KeyError):  # the account it created is removed with it
            pwd.getpwnam(spec2.admin_username)
        assert fresh.prefect_api_url_for_vms is None and not _listening(forwarder)
    finally:  # whatever failed above, leave nothing of either run behind
        loop.run(netns.remove_leftovers(SandboxHost(state).cloud_id))
        subprocess.run(["userdel", admin], capture_output=True)


def test_sixteen_instances_boot_in_parallel(host, loop, keys, capsys):
    """All 16 reachable over SSH, each at its own address; prints the figures for the report."""
    specs = [spec_for(keys) for _ in range(16)]
    ips = [host.allocate(s.key) for s in specs]
    assert len(set(ips)) == 16

    async def boot_all():
        import asyncio
        await asyncio.gather(*(host.boot(s) for s in specs))

    try:
        started = time.monotonic()
        loop.run(boot_all())
        elapsed = time.monotonic() - started
        resolve = "import socket; n = socket.gethostname(); print(n, socket.gethostbyname(n))"
        seen = {Booted(host, s, keys).check(f"{PYTHON} -c '{resolve}'; ip -4 -o addr show dev eth0")
                for s in specs}
        # each knows its computerName, which resolves to its own address
        assert {tuple(out.split()[:2]) for out in seen} == set(zip((s.computer_name for s in specs), ips))
        assert {out.split()[5].split("/")[0] for out in seen} == set(ips)
        pids = [host.describe(s.key)["pids"] for s in specs]
        rss = [_memory_kib(p, "Rss") for p in pids]
        pss = [_memory_kib(p, "Pss") for p in pids]
        with capsys.disabled():
            print(f"\n[sandbox figures] 16 instances booted in parallel in {elapsed:.2f} s; "
                  f"idle memory per instance: RSS {sum(rss) / 16 / 1024:.1f} MiB "
                  f"(max {max(rss) / 1024:.1f}), PSS {sum(pss) / 16 / 1024:.1f} MiB")
    finally:
        for s in specs:
            loop.run(host.delete(s.key))


def _memory_kib(pids: list[int], field: str) -> int:
    """Sum of `field` ("Rss" or "Pss": shared pages divided among their users) over `pids`."""
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (ProcessLookupError, FileNotFoundError):  # exited since it was listed: the end of
            continue                                      # a check's SSH session, say; no memory
        for line in rollup.splitlines():
            if line.startswith(f"{field}:"):
                total += int(line.split()[1])
    return total


def test_addresses_are_handed_out_round_robin_until_the_block_is_full(loop, tmp_path):
    small = SandboxHost(tmp_path / "state", address_block="10.213.255.248/29")
    loop.run(small.start())
    try:
        ips = [small.allocate(f"vm{i}") for i in range(5)]  # .250-.254: .249 is the gateway
        assert ips == [f"10.213.255.{n}" for n in range(250, 255)]
        assert small.allocate("vm0") == ips[0]  # idempotent per key
        with pytest.raises(SandboxError, match="no free address"):
            small.allocate("vm5")
        loop.run(small.delete("vm1"))
        assert small.allocate("vm5") == ips[1]
    finally:
        loop.run(small.stop())


def test_state_dir_under_root_with_shell_metacharacters(loop, keys):
    """The default state dir lives under /root, which instances must not see; paths are quoted."""
    state = Path("/root") / f".azlc-test {uuid.uuid4().hex[:6]} 'q' $(x)"
    h = SandboxHost(state)
    loop.run(h.start())
    try:
        spec = spec_for(keys, "#!/bin/bash\necho booted-under-root\n")
        h.allocate(spec.key)
        loop.run(h.boot(spec))
        vm = Booted(h, spec, keys)
        # /root is traversable (the interpreter lives below it) but the state dir is not there
        probe = f"test -e {shlex.quote(str(state))} && echo visible || echo hidden"
        assert vm.check(probe).strip() == "hidden"
        assert state.exists()
        log = Path(h.describe(spec.key)["sandbox"]) / "log" / "cloud-init-output.log"
        _wait_for(lambda: "booted-under-root" in log.read_text(), message="the boot script's output")
    finally:
        loop.run(h.stop())
        shutil.rmtree(state, ignore_errors=True)


def test_accounts_are_shared_between_local_clouds_and_removed_by_the_last(loop, tmp_path, monkeypatch):
    from prefect_azmanagers.localcloud import accounts

    # a private usage registry: the machine's one records the local clouds running right now
    monkeypatch.setattr(accounts, "_USERS_DIR", tmp_path / "users")
    name = f"azlc{uuid.uuid4().hex[:8]}"
    running = {"cloud-a", "cloud-b"}
    try:
        loop.run(accounts.acquire(name, "cloud-a"))
        loop.run(accounts.acquire(name, "cloud-b"))  # exists now: b only records its use
        assert loop.run(accounts.release_all("cloud-a", lambda c: c in running)) == []
        pwd.getpwnam(name)  # b still uses it
        running.discard("cloud-b")  # b crashed without stop: its use no longer counts
        assert loop.run(accounts.release_all("cloud-c", lambda c: c in running)) == [name]
        with pytest.raises(KeyError):
            pwd.getpwnam(name)
        subprocess.run(["useradd", "--no-create-home", name], check=True)  # password "!": locked
        with pytest.raises(accounts.AccountError, match="is locked"):
            loop.run(accounts.acquire(name, "cloud-a"))
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_instances_use_a_real_prefect_server_through_the_forwarder(loop, keys, tmp_path, prefect_server):
    """What a detached VM's worker does: the Prefect client on the instance, pointed at
    prefect_api_url_for_vms, talks to the driver's loopback Prefect server."""
    h = SandboxHost(tmp_path / "state", prefect_api_url=prefect_server.api_url)
    loop.run(h.start())
    try:
        spec = spec_for(keys)
        h.allocate(spec.key)
        loop.run(h.boot(spec))
        vm = Booted(h, spec, keys)
        assert vm.ssh(f"curl -s -m 5 {prefect_server.api_url}/health").returncode != 0  # loopback: no
        client = ("import asyncio\n"
                  "from prefect.client.orchestration import get_client\n"
                  "async def main():\n"
                  "    async with get_client() as c:\n"
                  "        print((await c.hello()).status_code, c.api_url)\n"
                  "asyncio.run(main())\n")
        out = vm.check(f"PREFECT_API_URL={shlex.quote(h.prefect_api_url_for_vms)} "
                       f"{PYTHON} -c {shlex.quote(client)}")
        assert out.split()[0] == "200" and out.split()[1].rstrip("/") == h.prefect_api_url_for_vms.rstrip("/")
    finally:
        loop.run(h.stop())
