"""The agents in members' slots: start, frames and output, exits, restarts, kills, heartbeats.

A slot runs one agent at a time; each start bumps the slot's generation, so frames and exits of
an older agent are ignored. An agent that dies is restarted on the same connection up to
MAX_AGENT_RESTARTS in a row; a slot that cannot start any more is given up, and an instance
with no slot left goes through the lifecycle's `lose` (its calls go to other workers or a
replacement), never left joined and idle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable

import asyncssh

from prefect_azmanagers.cluster import versions
from prefect_azmanagers.cluster.dispatch import Dispatcher, WorkItem
from prefect_azmanagers.cluster.members import Member, MemberState, Worker, WorkerInfo, WorkerState
from prefect_azmanagers.cluster.options import ClusterOptions
from prefect_azmanagers.cluster.protocol import Frame, Kind, Payload
from prefect_azmanagers.cluster.transport import agent_command
from prefect_azmanagers.exceptions import BootFailed, ConfigurationError

if TYPE_CHECKING:
    from prefect_azmanagers.cluster.lifecycle import Access

logger = logging.getLogger("prefect_azmanagers.cluster")

AGENT_HELLO_TIMEOUT = 120.0
SETUP_TIMEOUT = 120.0  # the join setup (e.g. a warm-up) of one agent
MAX_AGENT_RESTARTS = 5  # consecutive restarts of one slot without a completed call

OutputHandler = Callable[[WorkerInfo, str, str], None]


class Slots:
    """Agents of one cluster's slots, on the cluster's loop. What happens to an instance as a
    whole (lose it, drain it) and whether the cluster is closing are the lifecycle's, passed in."""

    def __init__(self, options: ClusterOptions, access: Access, dispatcher: Dispatcher, *,
                 spawn: Callable[..., asyncio.Task], output: OutputHandler,
                 closing: Callable[[], bool], lose: Callable[..., Awaitable[None]],
                 drain: Callable[[Member, dict], Awaitable[None]],
                 workers_changed: Callable[[], None],
                 join_setup: bytes | Payload | None = None):
        self.options = options
        self.access = access
        self.dispatcher = dispatcher
        self.spawn = spawn
        self.output = output
        self.join_setup = join_setup  # a pickled callable each new agent runs before any work
        self._closing = closing
        self._lose = lose
        self._drain = drain
        self._workers_changed = workers_changed
        self._loop = asyncio.get_running_loop()
        self._versions = versions.local()

    async def start(self, worker: Worker) -> None:
        """Start the slot's agent; a start overtaken by another one (a reconnect racing a
        restart) closes the agent it made and leaves the slot to the newer start."""
        member = worker.member
        assert member.conn is not None
        if worker.feeder is not None and worker.feeder is not asyncio.current_task():
            worker.feeder.cancel()  # at most one feeder per slot, bound to the current agent
        if worker.hello is not None and not worker.hello.done():
            worker.hello.set_result(None)  # wakes an older start: it sees it was overtaken
        worker.generation += 1
        generation = worker.generation
        worker.state = WorkerState.STARTING
        hello = worker.hello = self._loop.create_future()
        worker.exited = asyncio.Event()
        options = self.options
        command = agent_command(
            self.access.python, worker_id=worker.id, concurrency=worker.concurrency,
            env=options.env, imds_url=options.imds_url if options.spot and worker.slot == 1 else None,
            launcher=self.access.launcher, warm_up=options.warm_up)
        worker.command = command
        worker.stderr_tail.clear()
        agent = await member.conn.start_agent(
            command, on_frame=partial(self._on_frame, worker, generation),
            on_stderr=partial(self._on_stderr, worker),
            on_exit=partial(self._on_agent_exit, worker, generation))
        if generation == worker.generation:
            worker.agent = agent
            started = await asyncio.wait_for(asyncio.shield(hello), AGENT_HELLO_TIMEOUT)
        if generation != worker.generation:
            agent.close()  # its exit callback carries a stale generation: ignored
            return
        versions.check(self._versions, started.get("versions"),
                       where=f"instance {member.name}", python=self.access.python)
        worker.pid, worker.pgid = started.get("pid"), started.get("pgid")
        worker.last_seen = time.monotonic()
        worker.free = asyncio.Semaphore(worker.concurrency)
        worker.state = WorkerState.IDLE
        if self.join_setup is not None:
            await self.run_setup(worker)
            if generation != worker.generation:
                return  # lost during its setup: the restart or reconnect takes over
        worker.feeder = self.spawn(self.dispatcher.feed(worker, self.usable), member.tasks)

    async def run_setup(self, worker: Worker) -> None:
        """The cluster's join setup (`AzureCluster.on_join`) on this slot's agent, ahead of
        its next call: e.g. the task runner's warm-up. Its failure is logged; the slot works
        on anyway."""
        item = self.dispatcher.new_item(self.join_setup, "the join setup", pinned=True)
        try:
            await self.dispatcher.send_to(worker, item)
            await asyncio.wait_for(asyncio.wrap_future(item.future), SETUP_TIMEOUT)
        except asyncio.CancelledError:
            if not item.future.cancelled():
                raise
        except (Exception, asyncio.TimeoutError) as exc:
            logger.warning("worker %d: its join setup failed (it joins anyway): %s",
                           worker.id, exc)

    def usable(self, worker: Worker) -> bool:
        return (not self._closing() and worker.state.running
                and worker.member.state in (MemberState.JOINING, MemberState.JOINED))

    # -- frames and output ---------------------------------------------------------------------

    def _on_frame(self, worker: Worker, generation: int, frame: Frame) -> None:
        if generation != worker.generation:
            return
        worker.last_seen = time.monotonic()
        kind = frame.kind
        if kind in (Kind.RESULT, Kind.ERROR):
            self.dispatcher.on_outcome(worker, frame)
        elif kind == Kind.OUTPUT:
            message = frame.json()
            self._emit_output(worker, message["stream"], message["line"])
        elif kind == Kind.HELLO and worker.hello is not None and not worker.hello.done():
            worker.hello.set_result(frame.json())
        elif kind == Kind.PREEMPT:
            self.spawn(self._drain(worker.member, frame.json()))

    def _on_stderr(self, worker: Worker, line: str) -> None:
        worker.stderr_tail.append(line)
        self._emit_output(worker, "stderr", line)

    def _emit_output(self, worker: Worker, stream: str, line: str) -> None:
        try:
            self.output(worker.info(), stream, line)
        except Exception:
            logger.exception("the output handler failed")

    # -- exits, restarts, losses ----------------------------------------------------------------

    def _on_agent_exit(self, worker: Worker, generation: int, reason: str) -> None:
        if generation != worker.generation:
            return
        worker.exited.set()
        if self._closing():
            worker.state = WorkerState.STOPPED
            return
        if worker.state in (WorkerState.LOST, WorkerState.STOPPED):
            return
        if worker.hello is not None and not worker.hello.done():
            tail = "\n".join(worker.stderr_tail) or "(nothing on stderr)"
            worker.hello.set_exception(BootFailed(
                f"the agent on instance {worker.member.name} exited before it started: {reason}. "
                f"Command: {worker.command}\nIts stderr:\n{tail}"))
            return
        self.lost(worker, reason)
        self.schedule_restart(worker)

    def lost(self, worker: Worker, reason: str, *, count_attempt: bool = True,
                     then_check: bool = True) -> None:
        """Mark a slot lost and re-queue (or fail, past the bound) what it was running."""
        worker.state = WorkerState.LOST
        worker.generation += 1  # late frames of the dead agent are ignored
        if worker.feeder is not None and worker.feeder is not asyncio.current_task():
            worker.feeder.cancel()
        self.dispatcher.requeue(worker, reason, count_attempt=count_attempt, then_check=then_check)

    def schedule_restart(self, worker: Worker) -> None:
        if worker.member.state is MemberState.JOINED:
            self.spawn(self._restart_slot(worker, worker.generation), worker.member.tasks)

    async def _restart_slot(self, worker: Worker, lost_generation: int) -> None:
        """Start a new agent in a slot whose agent died, on the same connection if it lives,
        unless something else (a reconnect) has restarted the slot since it was lost. A slot
        whose agent keeps dying, or cannot start any more, is given up."""
        why = "its agent died"
        while True:
            worker.restarts += 1
            if worker.restarts > MAX_AGENT_RESTARTS:
                await self._give_up_slot(worker, f"{why} ({worker.restarts - 1} restarts in a row)")
                return
            await asyncio.sleep(0.2 * worker.restarts)  # a dropped connection is noticed first
            if (worker.generation != lost_generation
                    or worker.member.state is not MemberState.JOINED or worker.member.conn is None):
                return
            try:
                await self.start(worker)
                return
            except (BootFailed, asyncio.TimeoutError) as exc:
                # it exited before it started, or never said HELLO: try again, up to the bound
                why = str(exc) or f"its agent sent no HELLO within {AGENT_HELLO_TIMEOUT:.0f} s"
                logger.warning("worker %d: agent restart failed (%s)", worker.id, why)
                worker.generation += 1  # a hung agent's exit, once closed, is ignored
                if worker.agent is not None:
                    worker.agent.close()
                worker.state, lost_generation = WorkerState.LOST, worker.generation
            except ConfigurationError as exc:  # e.g. VersionMismatch: no restart can fix it
                await self._give_up_slot(worker, str(exc))
                return
            except (asyncssh.Error, OSError) as exc:
                logger.warning("worker %d: agent restart failed (%s)", worker.id, exc)
                return  # the connection's loss takes over

    async def _give_up_slot(self, worker: Worker, why: str) -> None:
        """The slot's agent cannot run here any more; an instance with no slot left is lost
        (its calls go to other workers or a replacement), never left joined and idle."""
        worker.state = WorkerState.FAILED
        logger.error("worker %d: %s; the slot is given up", worker.id, why)
        self._workers_changed()
        member = worker.member
        if all(w.state is WorkerState.FAILED for w in member.workers):
            await self._lose(member, f"no agent can start on it any more: {why}",
                         replacement="cannot run agents")

    def check_heartbeats(self, members: Iterable[Member]) -> None:
        """Kill and restart agents silent for heartbeat_timeout while they run calls."""
        now = time.monotonic()
        timeout = self.options.heartbeat_timeout
        for member in list(members):
            for worker in member.workers:
                if worker.inflight and now - worker.last_seen > timeout:
                    worker.last_seen = now
                    self.spawn(self.kill(worker))
                    self.lost(worker, f"no message from its agent for {timeout:.0f} s")
                    self.schedule_restart(worker)

    async def kill(self, worker: Worker) -> None:
        conn = worker.member.conn
        if conn is None or worker.pgid is None:
            return
        try:
            await conn.run(f"kill -KILL -- -{int(worker.pgid)}", timeout=15)
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
            logger.warning("worker %d: could not kill its agent: %s", worker.id, exc)

    async def cancel(self, items: list[WorkItem]) -> None:
        """Cancel these calls; the agents running some of them are killed and restarted."""
        for worker in self.dispatcher.cancel(items):
            if worker.state not in (WorkerState.BUSY, WorkerState.DRAINING):
                continue
            worker.generation += 1  # its exit is ours: not a lost worker
            await self.kill(worker)
            # other calls the slot ran are re-queued; a cancel is not their loss
            self.lost(worker, "cancelled", count_attempt=False)
            self.schedule_restart(worker)
