"""AzureCluster end to end on the local cloud: real ARM SDK, real OpenSSH in network
namespaces, real agents. Plain callables only (the Prefect adapter is tested elsewhere)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import psutil
import pytest

from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.cluster.errors import RemoteError
from prefect_azmanagers.exceptions import WorkerLost
from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

pytestmark = pytest.mark.e2e


def group_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def admin(localcloud):
    with LocalCloudAdmin.from_info(localcloud) as client:
        yield client


def instances_of(admin: LocalCloudAdmin, group: str) -> list[dict]:
    return [i for i in admin.status()["instances"] if i["scale_set"] == group]


def scale_sets_named(admin: LocalCloudAdmin, group: str) -> list[dict]:
    return [s for s in admin.status()["scale_sets"] if s["name"] == group]


def ssh_connections_to(addresses: set[str]) -> list:
    return [c for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.ip in addresses]


def agent_alive(pid: int) -> bool:
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and any(
            "prefect_azmanagers.cluster.agent" in part for part in process.cmdline())
    except psutil.NoSuchProcess:
        return False


def assert_nothing_left(admin: LocalCloudAdmin, group: str, addresses: set[str],
                        agent_pids: set[int] = frozenset()) -> None:
    assert not [pid for pid in agent_pids if agent_alive(pid)]
    assert instances_of(admin, group) == []
    assert scale_sets_named(admin, group) == []
    assert ssh_connections_to(addresses) == []
    assert not [t for t in threading.enumerate() if t.name == "azm-cluster"]


def on_instance(ip: str, command: str):
    """Run a command on an instance over an SSH connection of the test's own."""
    import asyncio

    import asyncssh

    from prefect_azmanagers.blocks import load_manifest

    manifest = load_manifest("localcloud")

    async def run():
        async with asyncssh.connect(
                ip, port=manifest.ssh_port, username=manifest.ssh_user, known_hosts=None,
                config=None, agent_path=None,
                client_keys=[asyncssh.import_private_key(manifest.read_private_key())]) as conn:
            return await conn.run(command)

    return asyncio.run(run())


def square(x: int) -> int:
    return x * x


def where() -> tuple[str, int, str]:
    import socket
    return socket.gethostname(), os.getpid(), os.environ.get("AZM_WORKER_ID", "")


def fails_deep() -> None:
    def level_two():
        raise KeyError("missing thing 42")
    level_two()


class Unpicklable(Exception):
    def __init__(self, a, b):  # cloudpickle cannot rebuild it from args
        super().__init__(f"{a}/{b}")
        self.lock = threading.Lock()


def raises_unpicklable() -> None:
    raise Unpicklable(1, 2)


def chatty() -> str:
    print("line one from a task")
    print("line two from a task", flush=True)
    return "done"


@pytest.fixture
def loopback_http_server():
    """An HTTP server on the driver's 127.0.0.1 only (instances cannot reach it directly)."""
    import http.server

    from tests.httpd import QuietHandler

    class Hello(QuietHandler):
        def do_GET(self):  # noqa: N802
            self.reply(b"hello through the tunnel")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def fetch(url: str) -> str:
    import urllib.request
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10) as r:
        return r.read().decode()


def test_results_tracebacks_output_tunnel_and_clean_close(localcloud, admin, loopback_http_server):
    group = group_name("eng")
    lines: list[tuple[int, str, str]] = []
    port = loopback_http_server
    cluster = AzureCluster("localcloud-small", 2, manifest="localcloud", ppi=2, group=group,
                           progress=False, warm_up=None, join_timeout=300, waitfor=True, forward_ports=[port])
    cluster.output_handler = lambda w, stream, line: lines.append((w.id, stream, line))
    with cluster:
        workers = cluster.workers
        assert len(workers) == 4 and {w.state for w in workers} == {"idle"}
        addresses = {w.ip for w in workers}
        assert len(addresses) == 2

        futures = [cluster.submit(lambda i=i: square(i)) for i in range(40)]
        assert [f.result(timeout=120) for f in futures] == [i * i for i in range(40)]
        placements = {cluster.submit(where).result(timeout=60) for _ in range(20)}
        assert all(p[0] and p[2] for p in placements)

        with pytest.raises(KeyError, match="missing thing 42") as info:
            cluster.submit(fails_deep).result(timeout=60)
        assert "level_two" in info.value.remote_traceback

        with pytest.raises(RemoteError) as info:
            cluster.submit(raises_unpicklable).result(timeout=60)
        assert "Unpicklable" in str(info.value) and "raises_unpicklable" in info.value.remote_traceback

        assert cluster.submit(chatty).result(timeout=60) == "done"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("line two" in l[2] for l in lines):
            time.sleep(0.1)
        texts = [l[2] for l in lines if l[1] == "stdout"]
        assert "line one from a task" in texts and "line two from a task" in texts
        # the driver's loopback port is reachable on every instance, through SSH only
        url = f"http://127.0.0.1:{port}/"
        assert {cluster.submit(lambda: fetch(url)).result(timeout=60) for _ in range(8)} == {
            "hello through the tunnel"}
        if localcloud["mode"] == "isolated":
            probe = on_instance(cluster.workers[0].ip, (
                f"{localcloud['python']} -c 'import socket; socket.create_connection((\"{localcloud['prefect_api_url_for_vms'].split('//')[1].split(':')[0]}\", {port}), 3)'"))
            assert probe.exit_status != 0  # the same port on the host side is not reachable
        assert sum(w.tasks_run for w in cluster.workers) == 40 + 20 + 3 + 8
        assert len(instances_of(admin, group)) == 2
        pids = {w.pid for w in cluster.workers}
        assert all(agent_alive(pid) for pid in pids)
    assert_nothing_left(admin, group, addresses, pids)


def sleepy(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_elastic_start_then_scale_up_and_down(localcloud, admin, caplog):
    group = group_name("elastic")
    caplog.set_level("INFO", logger="prefect_azmanagers.cluster")
    with AzureCluster("localcloud-small", 1, manifest="localcloud", group=group,
                      progress=False, warm_up=None, join_timeout=300) as cluster:
        assert cluster.workers == []  # start() returned before any instance booted
        futures = [cluster.submit(lambda i=i: sleepy(i, 0.05)) for i in range(10)]
        assert [f.result(timeout=300) for f in futures] == list(range(10))
        assert len(cluster.workers) == 1
        joined = [r.getMessage() for r in caplog.records if " joined (" in r.getMessage()]
        worker = cluster.workers[0]
        assert joined and joined[0].startswith(
            f"worker {worker.id} joined (1/1): instance {worker.instance}, {worker.ip}, slot 1, ")

        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=300)
        addresses = {w.ip for w in cluster.workers}
        assert len(addresses) == 2 and len(instances_of(admin, group)) == 2
        futures = [cluster.submit(lambda i=i: sleepy(i, 0.5)) for i in range(8)]
        assert [f.result(timeout=120) for f in futures] == list(range(8))
        assert all(w.tasks_run > 0 for w in cluster.workers)

        cluster.scale(1)
        assert len(instances_of(admin, group)) == 1 and len(cluster.workers) == 1
        assert cluster.submit(lambda: "still working").result(timeout=60) == "still working"
    assert_nothing_left(admin, group, addresses)


def test_agent_killed_and_ssh_dropped_mid_task_are_requeued(localcloud, admin):
    group = group_name("faults")
    with AzureCluster("localcloud-small", 2, manifest="localcloud", ppi=2, group=group,
                      progress=False, warm_up=None, join_timeout=300, waitfor=True) as cluster:
        addresses = {w.ip for w in cluster.workers}
        futures = [cluster.submit(lambda i=i: sleepy(i, 4)) for i in range(12)]
        wait_until(lambda: sum(w.state == "busy" for w in cluster.workers) == 4, 60, "4 busy workers")
        victim, other = (i for i in cluster.instances)
        killed = next(w for w in cluster.workers if w.instance == victim.name)
        # kill -9 the agent process (from outside the engine, over a separate SSH session)
        result = on_instance(victim.address, f"kill -9 -- -{killed.pid}")
        assert result.exit_status == 0
        # and cut every SSH connection of the other instance
        admin.drop_ssh(other.name)
        assert [f.result(timeout=180) for f in futures] == list(range(12))
        wait_until(lambda: len([w for w in cluster.workers if w.state == "idle"]) == 4, 120,
                   "every slot back")

        # past the bound, a lost call fails with WorkerLost naming the worker and why
        cluster.max_task_retries_on_lost_worker = 0
        with pytest.raises(WorkerLost, match=r"worker \d+ \(instance .*killed by signal KILL"):
            cluster.submit(lambda: os.kill(os.getpid(), signal.SIGKILL)).result(timeout=120)
        # a task that raises is its own failure, never re-run
        attempts_marker = f"/tmp/attempts-{uuid.uuid4().hex}"

        def count_and_fail():
            with open(attempts_marker, "a") as handle:
                handle.write("x")
            raise RuntimeError("task failure, not a lost worker")

        with pytest.raises(RuntimeError, match="task failure"):
            cluster.submit(count_and_fail).result(timeout=60)
        wait_until(lambda: len([w for w in cluster.workers if w.state == "idle"]) == 4, 120,
                   "every slot back")
        runs = [cluster.submit(lambda: open(attempts_marker).read() if os.path.exists(attempts_marker) else "")
                for _ in range(8)]
        assert sorted(f.result(timeout=60) for f in runs)[-1] == "x"

        # an instance killed outright: its calls are re-queued, it is deleted and replaced
        cluster.max_task_retries_on_lost_worker = 3
        futures = [cluster.submit(lambda i=i: sleepy(i, 4)) for i in range(8)]
        wait_until(lambda: sum(w.state == "busy" for w in cluster.workers) == 4, 60, "4 busy workers")
        admin.kill(victim.name)
        assert [f.result(timeout=300) for f in futures] == list(range(8))
        cluster.wait_for_workers(4, timeout=300)
        assert victim.name not in {w.instance for w in cluster.workers}
        addresses |= {w.ip for w in cluster.workers}
        pids = {w.pid for w in cluster.workers}
    assert_nothing_left(admin, group, addresses, pids)


def test_spot_eviction_drains_and_requeues(localcloud, admin):
    group = group_name("spot")
    admin.settings(eviction_notice=10)
    try:
        with AzureCluster("localcloud-small", 2, manifest="localcloud", spot=True, group=group,
                          progress=False, warm_up=None, join_timeout=300, waitfor=True) as cluster:
            addresses = {w.ip for w in cluster.workers}
            futures = [cluster.submit(lambda i=i: sleepy(i, 8)) for i in range(6)]
            wait_until(lambda: sum(w.state == "busy" for w in cluster.workers) == 2, 60, "busy workers")
            victim = cluster.instances[0]
            cluster.simulate_eviction(victim.name)
            wait_until(lambda: any(w.preempted for w in cluster.workers), 30, "the Preempt")
            assert [f.result(timeout=300) for f in futures] == list(range(6))
            # the evicted instance was given up and replaced by a new one
            cluster.wait_for_workers(2, timeout=300)
            assert victim.name not in {w.instance for w in cluster.workers}
            addresses |= {w.ip for w in cluster.workers}
    finally:
        admin.settings(eviction_notice=30)
    assert_nothing_left(admin, group, addresses)


def write_pid_and_sleep(path: str) -> None:
    with open(path, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(300)


def test_cancel_stops_remote_work(localcloud, admin):
    group = group_name("cancel")
    with AzureCluster("localcloud-small", 1, manifest="localcloud", ppi=2, group=group,
                      progress=False, warm_up=None, join_timeout=300, waitfor=True,
                      heartbeat_timeout=20) as cluster:
        addresses = {w.ip for w in cluster.workers}
        ip = cluster.workers[0].ip
        pidfiles = [f"/tmp/cancel-{uuid.uuid4().hex}" for _ in range(3)]
        running = [cluster.submit(lambda p=p: write_pid_and_sleep(p)) for p in pidfiles[:2]]
        # queued behind them; it may start on the slot the first cancel restarts (an agent
        # with no warm-up is back in ~0.1 s), and is cancelled either way
        queued = cluster.submit(lambda: write_pid_and_sleep(pidfiles[2]))

        def remote_alive(path: str) -> str:
            # a killed process stays a zombie until sshd reaps it: count zombies as gone
            probe = (f"test -s {path} || {{ echo none; exit; }}; "
                     f"grep -qs '^State:[[:space:]]*[RSDT]' /proc/$(cat {path})/status "
                     "&& echo alive || echo gone")
            return on_instance(ip, probe).stdout.strip()

        wait_until(lambda: all(remote_alive(p) == "alive" for p in pidfiles[:2]), 60, "tasks running")
        cluster.cancel(running[0])
        assert running[0].cancelled()
        wait_until(lambda: remote_alive(pidfiles[0]) == "gone", 10, "the cancelled call to stop")
        assert remote_alive(pidfiles[1]) == "alive"
        cluster.cancel_all()
        assert running[1].cancelled() and queued.cancelled()
        wait_until(lambda: remote_alive(pidfiles[1]) == "gone"
                   and remote_alive(pidfiles[2]) in ("none", "gone"), 10, "every call to stop")
        wait_until(lambda: len([w for w in cluster.workers if w.state == "idle"]) == 2, 120, "slots back")
        assert cluster.submit(lambda: 7).result(timeout=60) == 7

        # a hung agent (SIGSTOP: no heartbeat) is killed after heartbeat_timeout, its call re-queued
        future = cluster.submit(lambda: sleepy("survived", 2))
        wait_until(lambda: any(w.state == "busy" for w in cluster.workers), 60, "a busy worker")
        hung = next(w for w in cluster.workers if w.state == "busy")
        on_instance(ip, f"kill -STOP {hung.pid}")
        assert future.result(timeout=120) == "survived"
        wait_until(lambda: not agent_alive(hung.pid), 30, "the hung agent killed")
        pids = {w.pid for w in cluster.workers}
    assert_nothing_left(admin, group, addresses, pids)
