"""Lifecycle.teardown without a cloud: a normal close asks the agents to stop (they flush their
Prefect logs) before deleting; an urgent one (SIGTERM) sends the deletion first and never waits
for agents, even agents that never exit."""

from __future__ import annotations

import asyncio

from prefect_azmanagers.cluster.backpressure import Backpressure
from prefect_azmanagers.cluster.dispatch import Dispatcher
from prefect_azmanagers.cluster.lifecycle import Lifecycle
from prefect_azmanagers.cluster.members import Member, MemberState, Worker, WorkerState
from prefect_azmanagers.cluster.options import ClusterOptions
from prefect_azmanagers.cluster.progress import JoinProgress
from prefect_azmanagers.cluster.protocol import Kind
from tests.cluster.test_membership import FakeScaleSet, instance, membership


class StubbornAgent:
    """An agent that takes SHUTDOWN and never exits."""

    def __init__(self) -> None:
        self.sent: list[Kind] = []

    async def send(self, kind: Kind, task_id: int = 0, body: bytes = b"") -> None:
        self.sent.append(kind)

    def close(self) -> None:
        pass


async def torn_down(urgent: bool) -> tuple[list[Kind], list[list[str]], list[str]]:
    scaleset = FakeScaleSet(["azm_0"])
    members = membership(scaleset)
    loop = asyncio.get_running_loop()
    dispatcher = Dispatcher(max_task_retries_on_lost_worker=3, hopeless=lambda: None,
                            spawn=loop.create_task, gate=Backpressure(""))
    lifecycle = Lifecycle(ClusterOptions(progress=False), None, members, dispatcher,
                          progress=JoinProgress(1, show=False), output=lambda *a: None,
                          spawn=loop.create_task, started_at=0.0)
    listed = instance("azm_0")
    member = Member(listed.name, listed.instance_id, listed.vm_id, 0.0, address="10.0.0.4",
                    state=MemberState.JOINED)
    agent = StubbornAgent()
    member.workers = [Worker(1, member, 1, 1, state=WorkerState.IDLE, agent=agent)]
    members.members[listed.vm_id] = member
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
