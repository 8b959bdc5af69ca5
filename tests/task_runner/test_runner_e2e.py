"""AzureScaleSetTaskRunner end to end: flows on local-cloud scale-set workers (real ARM SDK,
real OpenSSH in network namespaces, real agents) against a real Prefect server.

The local cloud runs in isolated mode: an instance cannot reach the driver's loopback, so every
task state and log that reaches the API went through the SSH tunnel the runner asked for.
This test module is not installed on the instances: its tasks travel by value.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_SERVER_DATABASE_PASSWORD, temporary_settings

from prefect_azmanagers.cluster.options import PREFECT_WARM_UP
from prefect_azmanagers.localcloud.admin import LocalCloudAdmin
from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

from .tasks import add, async_double, square

pytestmark = pytest.mark.e2e

AGENT_MODULE = "prefect_azmanagers.cluster.agent"


def runner(group: str, n: int = 2, **options) -> AzureScaleSetTaskRunner:
    options.setdefault("join_timeout", 300)
    return AzureScaleSetTaskRunner("localcloud-small", n, manifest="localcloud", group=group,
                                   **options)


def new_group(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def instances_of(admin: LocalCloudAdmin, group: str) -> list[dict]:
    return [i for i in admin.status()["instances"] if i["scale_set"] == group]


def agents_tagged(tag: str) -> list[psutil.Process]:
    """Agent processes started for one runner (the runner's env carries the tag)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if AGENT_MODULE in " ".join(proc.info["cmdline"] or ()) and \
                    proc.environ().get("AZM_TEST_TAG") == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def assert_nothing_left(admin: LocalCloudAdmin, group: str, tag: str) -> None:
    assert instances_of(admin, group) == []
    assert [s for s in admin.status()["scale_sets"] if s["name"] == group] == []
    assert agents_tagged(tag) == []
    assert not [t for t in threading.enumerate() if t.name == "azm-cluster"]


def task_runs_of(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def logs_of(flow_run_id, *, wait_for: str, timeout: float = 30) -> list:
    """The flow run's logs, once one containing `wait_for` arrived (logs are batched)."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        if any(wait_for in log.message for log in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(0.5)


@task(log_prints=True)
def where(x):
    import socket

    print(f"task {x} on {socket.gethostname()} says hello")
    time.sleep(1)  # 8 of these on 4 slots (2 instances x ppi 2) keep every slot busy at once
    return socket.gethostname(), os.environ.get("AZM_WORKER_ID")


@task
def fails_deep(x):
    def level_two():
        raise KeyError(f"missing thing {x}")

    level_two()


@task
def children(n):
    return sum(square.map(range(n)).result())


def test_flow_results_api_records_logs_edges_and_clean_teardown(localcloud, admin):
    group, tag = new_group("tr"), uuid.uuid4().hex

    # waitfor: both instances have joined before the first task, so the placements below must
    # use both (elastically, the first instance to join could otherwise run everything)
    @flow(task_runner=runner(group, 2, ppi=2, waitfor=True, env={"AZM_TEST_TAG": tag}))
    def pipeline():
        squares = square.map(range(12))
        doubled = async_double.submit(21)
        total = add.submit(squares[3], doubled)
        later = where.submit(1, wait_for=[total])
        nested = children.submit(5)
        placements = where.map(range(8))
        return (FlowRunContext.get().flow_run.id, [f.result() for f in squares],
                doubled.result(), total.result(), later.result(), nested.result(),
                {p.result()[0] for p in placements},
                {"total": total.task_run_id, "sq3": squares[3].task_run_id,
                 "doubled": doubled.task_run_id, "later": later.task_run_id})

    flow_run_id, squares, doubled, total, later, nested, hosts, ids = pipeline()
    assert squares == [i * i for i in range(12)] and doubled == 42 and total == 51
    assert nested == sum(i * i for i in range(5))
    assert later[1] and len(hosts) == 2  # both instances ran tasks

    runs = {r.id: r for r in task_runs_of(flow_run_id)}
    # 12 + 1 + 1 + 1 + 1 (children) + 5 (its nested squares) + 8
    assert len(runs) == 29 and all(r.state.is_completed() for r in runs.values())
    assert {i.id for i in runs[ids["total"]].task_inputs["a"]} == {ids["sq3"]}
    assert {i.id for i in runs[ids["total"]].task_inputs["b"]} == {ids["doubled"]}
    assert {i.id for i in runs[ids["later"]].task_inputs["wait_for"]} == {ids["total"]}

    logs = logs_of(flow_run_id, wait_for="says hello")
    task_logs = [log for log in logs if log.task_run_id is not None]
    assert any("says hello" in log.message for log in task_logs)  # print() in a remote task
    assert any("Finished in state Completed" in log.message for log in task_logs)
    # the joins (all before the first submit, with waitfor) are in the flow run's own log
    flow_lines = [log.message for log in logs if log.task_run_id is None]
    counts = sorted(re.search(r"joined \((\d+)/4\)", line)[1] for line in flow_lines if " joined (" in line)
    assert counts == ["1", "2", "3", "4"], flow_lines  # one line per worker, counting up
    assert_nothing_left(admin, group, tag)


def test_failing_task_fails_flow_with_remote_traceback(localcloud, admin):
    group, tag = new_group("trf"), uuid.uuid4().hex

    @flow(task_runner=runner(group, 1, env={"AZM_TEST_TAG": tag}))
    def failing():
        return fails_deep.submit(7).result()

    state = failing(return_state=True)
    assert state.is_failed()
    with pytest.raises(KeyError, match="missing thing 7") as info:
        state.result()
    notes = "\n".join(info.value.__notes__)
    assert "Remote traceback" in notes and "in level_two" in notes
    assert_nothing_left(admin, group, tag)


@task
def slow_square(x, seconds=4.0):
    time.sleep(seconds)
    return x * x


def running_task_runs(flow_run_id) -> int:
    return sum(1 for r in task_runs_of(flow_run_id) if r.state and r.state.is_running())


class when_running(threading.Thread):
    """In the background: once `count` task runs of the flow run are Running, call `action`;
    `join()` re-raises what the action raised."""

    def __init__(self, flow_run_ids: list, count: int, action, timeout: float = 240):
        super().__init__(daemon=True)
        self.flow_run_ids, self.count, self.action, self.timeout = flow_run_ids, count, action, timeout
        self.context = contextvars.copy_context()  # the test's Prefect settings (API URL)
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                if self.flow_run_ids and self.context.run(
                        running_task_runs, self.flow_run_ids[0]) >= self.count:
                    self.context.run(self.action)
                    return
            except BaseException as exc:  # noqa: BLE001 - reported by join()
                self.error = exc
                return
            time.sleep(0.3)

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


def test_waitfor_blocks_until_every_worker_joined(localcloud, admin):
    group, tag = new_group("trw"), uuid.uuid4().hex

    @flow(task_runner=runner(group, 2, ppi=2, waitfor=True, env={"AZM_TEST_TAG": tag}))
    def waited():
        joined = len(FlowRunContext.get().task_runner.cluster.workers)  # before any submit
        warm_ups = {" ".join(agent.cmdline()).partition("--warm-up ")[2].split(" ")[0]
                    for agent in agents_tagged(tag)}
        return joined, warm_ups, sum(square.map(range(10)).result())

    # every agent imported Prefect's task engine before it joined (the runner's warm_up)
    assert waited() == (4, {PREFECT_WARM_UP}, sum(i * i for i in range(10)))
    assert_nothing_left(admin, group, tag)


def test_agent_killed_mid_run_work_is_rerun_and_flow_completes(localcloud, admin):
    group, tag = new_group("trk"), uuid.uuid4().hex
    flow_run_ids: list = []
    killed: list[int] = []

    def kill_one_agent():
        victim = agents_tagged(tag)[0]
        killed.append(victim.pid)
        victim.send_signal(signal.SIGKILL)

    @flow(task_runner=runner(group, 2, env={"AZM_TEST_TAG": tag}))
    def survives():
        flow_run_ids.append(FlowRunContext.get().flow_run.id)
        return slow_square.map(range(6)).result()

    watcher = when_running(flow_run_ids, 2, kill_one_agent)
    state = survives(return_state=True)
    watcher.join()
    assert killed, "no agent was killed: the flow never had two running tasks"
    assert state.is_completed() and state.result() == [i * i for i in range(6)]
    assert not psutil.pid_exists(killed[0]) or \
        psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert_nothing_left(admin, group, tag)


def test_spot_eviction_mid_run_work_is_rerun_and_flow_completes(localcloud, admin):
    from prefect_azmanagers.azure.clients import ArmClients
    from prefect_azmanagers.blocks import load_manifest

    group, tag = new_group("trs"), uuid.uuid4().hex
    flow_run_ids: list = []
    evicted: list[str] = []

    def evict_one_instance():
        victim = instances_of(admin, group)[0]

        async def evict():
            async with ArmClients(load_manifest("localcloud")) as arm:
                await arm.compute.virtual_machine_scale_set_vms.simulate_eviction(
                    victim["resource_group"], group, victim["name"].rsplit("_", 1)[1])

        asyncio.run(evict())
        evicted.append(victim["name"])

    @flow(task_runner=runner(group, 2, spot=True, env={"AZM_TEST_TAG": tag}))
    def survives_eviction():
        flow_run_ids.append(FlowRunContext.get().flow_run.id)
        return slow_square.map(range(6)).result()

    watcher = when_running(flow_run_ids, 2, evict_one_instance)
    state = survives_eviction(return_state=True)
    watcher.join()
    assert evicted, "no instance was evicted: the flow never had two running tasks"
    assert state.is_completed() and state.result() == [i * i for i in range(6)]
    assert evicted[0] not in {i["name"] for i in instances_of(admin, group)}
    assert_nothing_left(admin, group, tag)


CANCELLED_FLOW = '''
import sys, time
from prefect import flow, task
from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

@task
def sleeper(x):
    time.sleep(600)
    return x

@flow(task_runner=AzureScaleSetTaskRunner("localcloud-small", 1, manifest="localcloud", ppi=2,
      group=sys.argv[1], env={"AZM_TEST_TAG": sys.argv[2]}, join_timeout=300))
def long_flow():
    return sleeper.map(range(4)).result()

long_flow()
'''


def test_sigterm_cancels_remote_work_and_tears_down(localcloud, admin, prefect_server, tmp_path):
    group, tag = new_group("trc"), uuid.uuid4().hex
    script = tmp_path / "long_flow.py"
    script.write_text(CANCELLED_FLOW)
    proc = subprocess.Popen([sys.executable, str(script), group, tag], cwd=tmp_path,
                            env=dict(os.environ, PREFECT_API_URL=prefect_server.api_url),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        busy: list[psutil.Process] = []
        while time.monotonic() < deadline and proc.poll() is None:
            busy = [p for p in agents_tagged(tag) if p.cpu_times() is not None]
            if len(busy) == 2 and _sleeping_task_runs(group) >= 2:
                break
            time.sleep(0.5)
        assert len(busy) == 2, f"the flow never ran two remote tasks:\n{_output(proc)}"
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        gone, alive = psutil.wait_procs(busy, timeout=30)
        assert alive == [], "remote work still running after the flow was cancelled"
        assert_nothing_left(admin, group, tag)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _sleeping_task_runs(group: str) -> int:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    return sum(1 for r in runs if r.name.startswith("sleeper") and r.state and r.state.is_running())


def _output(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        return "(still running)"
    return proc.stdout.read()[-3000:] if proc.stdout else ""


def final_state(future):
    future.wait()
    return future.state


USER_MODULE = '''
from prefect import task
from prefect.cache_policies import INPUTS
from prefect.runtime import task_run

CALLS = []


@task(retries=2, retry_delay_seconds=0)
def flaky(x):
    if task_run.run_count < 3:
        raise RuntimeError(f"attempt {task_run.run_count} fails")
    return ("flaky", x, task_run.run_count)


@task(cache_policy=INPUTS, persist_result=True)
def expensive(x):
    import os
    return ("computed", x, os.getpid())
'''


@task
def server_secret_seen() -> str | None:
    """The Prefect server's database password as the worker's settings have it."""
    from prefect.settings import get_current_settings

    password = get_current_settings().server.database.password
    return None if password is None else password.get_secret_value()


def test_shared_cluster_user_module_retries_and_caching(localcloud, admin, prefect_server,
                                                        tmp_path, monkeypatch):
    """A module that exists only on the driver runs on the workers; Prefect's retries and
    caching behave as with a local runner; one AzureCluster serves two flows."""
    from prefect_azmanagers.cluster.cluster import AzureCluster

    (tmp_path / "azm_user_tasks.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import azm_user_tasks

    group, tag = new_group("trx"), uuid.uuid4().hex
    cluster = AzureCluster("localcloud-small", 1, manifest="localcloud", group=group,
                           env={"AZM_TEST_TAG": tag}, forward_ports=[prefect_server.port],
                           progress=False, join_timeout=300)
    with cluster:
        @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
        def first():
            return (azm_user_tasks.flaky.submit(5).result(),
                    final_state(azm_user_tasks.expensive.submit(9)))

        @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
        def second():
            return final_state(azm_user_tasks.expensive.submit(9)), server_secret_seen.submit().result()

        flaky, computed = first()
        assert flaky == ("flaky", 5, 3)  # two Prefect retries on the worker, then success
        assert computed.is_completed() and computed.name == "Completed"
        assert len(cluster.workers) == 1  # the cluster outlives the first flow
        # The server's own settings stay on the driver: its database password never travels.
        with temporary_settings(updates={PREFECT_SERVER_DATABASE_PASSWORD: "not-for-workers"}):
            cached, secret_on_worker = second()
        assert cached.name == "Cached" and cached.result() == computed.result()
        assert secret_on_worker is None
    assert_nothing_left(admin, group, tag)


def test_waitfor_times_out_naming_instances_that_cannot_boot(localcloud, admin):
    from prefect_azmanagers.exceptions import JoinTimeout

    group, tag = new_group("trt"), uuid.uuid4().hex
    before = admin.status()["settings"]["boot_delay"]
    admin.settings(boot_delay=3600)
    try:
        @flow(task_runner=runner(group, 1, waitfor=True, join_timeout=20,
                                 env={"AZM_TEST_TAG": tag}))
        def never_starts():
            return square.submit(1).result()

        with pytest.raises(JoinTimeout, match=f"{group}_") as info:
            never_starts()
        assert "1" in str(info.value)  # how many workers were expected
    finally:
        admin.settings(boot_delay=before)
    assert_nothing_left(admin, group, tag)
