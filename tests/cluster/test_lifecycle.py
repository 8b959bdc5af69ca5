"""Lifecycle without a cloud or SSH. Its pure helpers: the drain deadline from an IMDS
NotBefore. Teardown: a normal close asks the agents to stop (they flush their Prefect logs)
before deleting; an urgent one (SIGTERM) sends the deletion first and never waits for agents,
even agents that never exit. Losing an instance: queued work is not failed as hopeless while
the lost instance's deletion is awaited and its replacement not yet asked for."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

from prefect_azmanagers.cluster.backpressure import Backpressure
from prefect_azmanagers.cluster.dispatch import Dispatcher
from prefect_azmanagers.cluster.lifecycle import Lifecycle, _seconds_until
from prefect_azmanagers.cluster.members import Member, MemberState, Worker, WorkerState
from prefect_azmanagers.cluster.options import ClusterOptions
from prefect_azmanagers.cluster.progress import JoinProgress
from prefect_azmanagers.cluster.protocol import Kind
from tests.cluster.test_membership import FakeScaleSet, instance, membership


def test_seconds_until_not_before():
    soon = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 < _seconds_until(format_datetime(soon, usegmt=True)) <= 30
    assert _seconds_until("") == 0.0 and _seconds_until("garbage") == 0.0


class StubbornAgent:
    """An agent that takes SHUTDOWN and never exits."""

    def __init__(self) -> None:
        self.sent: list[Kind] = []

    async def send(self, kind: Kind, task_id: int = 0, body: bytes = b"") -> None:
        self.sent.append(kind)

    def close(self) -> None:
        pass


def one_joined_instance(scaleset: FakeScaleSet, agent: StubbornAgent
                        ) -> tuple[Lifecycle, Dispatcher, Member]:
    """A lifecycle (no SSH, no cloud) whose cluster has one joined instance, azm_0, with one
    slot; queued work is hopeless as the lifecycle judges it, as in the cluster."""
    members = membership(scaleset)
    loop = asyncio.get_running_loop()
    lifecycle: Lifecycle | None = None
    dispatcher = Dispatcher(max_task_retries_on_lost_worker=3,
                            hopeless=lambda: lifecycle.hopeless_reason(),
                            spawn=loop.create_task, gate=Backpressure(""))
    lifecycle = Lifecycle(ClusterOptions(progress=False), None, members, dispatcher,
                          progress=JoinProgress(1, show=False), output=lambda *a: None,
                          spawn=loop.create_task, started_at=0.0)
    listed = instance("azm_0")
    member = Member(listed.name, listed.instance_id, listed.vm_id, 0.0, address="10.0.0.4",
                    state=MemberState.JOINED)
    member.workers = [Worker(1, member, 1, 1, state=WorkerState.IDLE, agent=agent)]
    members.members[listed.vm_id] = member
    return lifecycle, dispatcher, member


async def torn_down(urgent: bool) -> tuple[list[Kind], list[list[str]], list[str]]:
    scaleset = FakeScaleSet(["azm_0"])
    agent = StubbornAgent()
    lifecycle, _, _ = one_joined_instance(scaleset, agent)
    order: list[str] = []
    deleting = scaleset.delete_instances

    async def delete_instances(ids):
        order.append(f"delete after {len(agent.sent)} SHUTDOWN(s)")
        return await deleting(ids)

    scaleset.delete_instances = delete_instances
    await asyncio.wait_for(lifecycle.teardown(set(), urgent=urgent), 60)
    return agent.sent, scaleset.deleted, order


def test_an_urgent_teardown_deletes_first_and_never_waits_for_agents():
    sent, deleted, order = asyncio.run(torn_down(urgent=True))
    assert sent == [] and deleted == [["0"]] and order == ["delete after 0 SHUTDOWN(s)"]


def test_a_normal_teardown_stops_the_agents_before_deleting():
    sent, deleted, order = asyncio.run(torn_down(urgent=False))
    assert sent == [Kind.SHUTDOWN] and deleted == [["0"]]
    assert order == ["delete after 1 SHUTDOWN(s)"]


async def lost_while_work_waits() -> tuple[bool, bool, list[int]]:
    scaleset = FakeScaleSet(["azm_0"])
    lifecycle, dispatcher, member = one_joined_instance(scaleset, StubbornAgent())
    queued = dispatcher.new_item(b"", "queued call")
    dispatcher.enqueue(queued)
    deleting, started, release = scaleset.delete_instances, asyncio.Event(), asyncio.Event()

    async def slow_delete(ids):
        started.set()
        await release.wait()
        return await deleting(ids)

    scaleset.delete_instances = slow_delete
    losing = asyncio.get_running_loop().create_task(
        lifecycle.lose(member, "test: its agent died", before_joining=False))
    await asyncio.wait_for(started.wait(), 10)  # lose() now awaits the deletion
    dispatcher.fail_if_hopeless()  # as a listing's reconciliation may, meanwhile
    failed_during_removal = queued.future.done()
    release.set()
    await asyncio.wait_for(losing, 10)
    return failed_during_removal, queued.future.done(), scaleset.grown


def test_work_queued_while_a_lost_instance_is_deleted_waits_for_its_replacement():
    failed_during_removal, failed_after, grown = asyncio.run(lost_while_work_waits())
    assert not failed_during_removal  # before: "no worker is left to run it and none is coming"
    assert not failed_after and grown == [1]  # the replacement is coming: the call waits for it
