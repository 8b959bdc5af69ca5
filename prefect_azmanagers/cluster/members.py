"""The engine's records: an instance the cluster added (`Member`) and its worker slots
(`Worker`), with their states. Plain data: the parts that change them are membership
(claims, removal), dispatch (work in flight) and lifecycle (SSH, agents)."""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect_azmanagers.cluster.dispatch import WorkItem
    from prefect_azmanagers.cluster.transport import AgentProcess, InstanceConnection


class MemberState(str, enum.Enum):
    """An instance's life in the cluster, from claim to deletion."""

    JOINING = "joining"     # claimed; being connected, or reconnected after a drop
    JOINED = "joined"       # its agents run
    DRAINING = "draining"   # a Preempt came: no new work, in-flight work may finish
    REMOVING = "removing"   # its deletion was requested (a failed one is retried at close)
    GONE = "gone"           # deleted

    @property
    def live(self) -> bool:
        """Counts toward the cluster's size (not being removed)."""
        return self in (MemberState.JOINING, MemberState.JOINED, MemberState.DRAINING)


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # its instance got a Preempt: no new work
    LOST = "lost"          # its agent died or its connection dropped: being restarted
    FAILED = "failed"      # its agent cannot start again on this instance: given up
    STOPPED = "stopped"

    @property
    def running(self) -> bool:
        """Its agent is up and takes work."""
        return self in (WorkerState.IDLE, WorkerState.BUSY)


@dataclass(frozen=True)
class WorkerInfo:
    """A snapshot of one worker slot (what `AzureCluster.workers` returns)."""

    id: int
    instance: str
    ip: str
    slot: int
    state: str
    preempted: bool
    tasks_run: int
    pid: int | None  # the agent process on the instance (changes when the slot restarts)


@dataclass(frozen=True)
class InstanceInfo:
    """A snapshot of one instance of a cluster (what `AzureCluster.instances` returns)."""

    name: str
    instance_id: str
    vm_id: str
    address: str | None
    state: str
    priority: str | None
    preempted: bool
    evicted: bool


@dataclass(eq=False)
class Member:
    """An instance this cluster added, from claim to removal."""

    name: str
    instance_id: str
    vm_id: str
    requested_at: float
    address: str | None = None
    provisioning_state: str = "Creating"
    power_state: str | None = None
    state: MemberState = MemberState.JOINING
    conn: InstanceConnection | None = None
    workers: list[Worker] = field(default_factory=list)
    preempted: bool = False
    priority: str | None = None       # "Regular" | "Spot", as listed
    evicted: bool = False             # lost to a spot eviction
    last_active: float = field(default_factory=time.monotonic)  # last call sent or ended
    ended_at: float | None = None     # when its removal was requested
    failure: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task] = field(default_factory=set)

    def inflight(self) -> int:
        return sum(len(w.inflight) for w in self.workers)

    def info(self) -> InstanceInfo:
        return InstanceInfo(self.name, self.instance_id, self.vm_id, self.address,
                            self.state.value, self.priority, self.preempted, self.evicted)


@dataclass(eq=False)
class Worker:
    """One worker slot of a member: an agent process and the calls it runs."""

    id: int
    member: Member
    slot: int
    concurrency: int
    state: WorkerState = WorkerState.STARTING
    agent: AgentProcess | None = None
    generation: int = 0
    pid: int | None = None
    pgid: int | None = None
    inflight: dict[int, WorkItem] = field(default_factory=dict)
    tasks_run: int = 0
    restarts: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    hello: asyncio.Future | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    free: asyncio.Semaphore | None = None
    feeder: asyncio.Task | None = None
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    command: str = ""

    @property
    def where(self) -> str:
        return f"worker {self.id} (instance {self.member.name}, {self.member.address})"

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.id, self.member.name, self.member.address or "", self.slot,
                          self.state.value, self.member.preempted, self.tasks_run, self.pid)
