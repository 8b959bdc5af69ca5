"""Instance lifecycle: the I/O that carries out membership's decisions and feeds dispatch.

Per member: join (SSH with the host key pinned per vmId, the boot script's `ready`, port
forwards, `ppi` agents started by `slots.Slots`), reconnect after a dropped connection, drain
on a Preempt, the boot log's tail for diagnostics, and one way out: `lose(member, reason)`
(re-queue its calls, delete it, replace it within the budget, fail the queue if nothing is left
or coming). Also the watcher that lists the scale set, scaling, and the teardown.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable

import asyncssh

from prefect_azmanagers.cluster.adapt import AdaptivePolicy
from prefect_azmanagers.cluster.dispatch import Dispatcher
from prefect_azmanagers.cluster.members import Member, MemberState, Worker, WorkerState
from prefect_azmanagers.cluster.membership import MAX_FAILURES_IN_A_ROW, Membership, Reconciliation
from prefect_azmanagers.cluster.options import ClusterOptions
from prefect_azmanagers.cluster.progress import JoinProgress
from prefect_azmanagers.cluster.protocol import Kind, Payload
from prefect_azmanagers.cluster.scaling import AdaptiveScaling
from prefect_azmanagers.cluster.slots import OutputHandler, Slots
from prefect_azmanagers.cluster.transport import InstanceConnection, read_boot_log
from prefect_azmanagers.cluster.usage import WorkerGauge
from prefect_azmanagers.exceptions import (
    AzManagersError,
    BootFailed,
    ConfigurationError,
    HostKeyMismatch,
    InstanceGone,
    JoinTimeout,
)

if TYPE_CHECKING:
    from prefect_azmanagers.blocks import AzureManifest
    from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys

logger = logging.getLogger("prefect_azmanagers.cluster")

DRAIN_MARGIN = 5.0  # seconds before a Preempt's NotBefore by which in-flight work is re-queued
STOPPED_POWER_STATES = ("stopped", "deallocated", "deallocating", "stopping")


@dataclass(frozen=True)
class Access:
    """How the driver reaches an instance and starts agents there (fixed at start)."""

    manifest: AzureManifest
    admin: str
    client_key: asyncssh.SSHKey
    host_keys: PinnedHostKeys
    python: str
    launcher: list[str]

    async def boot_log(self, address: str, vm_id: str, *, lines: int = 50) -> str:
        """The boot log's tail over a connection of its own (pinned like every other)."""
        return await asyncio.wait_for(read_boot_log(
            address, vm_id=vm_id, host_keys=self.host_keys, port=self.manifest.ssh_port,
            username=self.admin, client_key=self.client_key, admin_username=self.admin,
            lines=lines, connect_timeout=10), 30)


class Lifecycle:
    """Joins, agents, losses and removal of one cluster's members, on the cluster's loop."""

    def __init__(self, options: ClusterOptions, access: Access, membership: Membership,
                 dispatcher: Dispatcher, *, progress: JoinProgress, output: OutputHandler,
                 spawn: Callable[..., asyncio.Task], started_at: float,
                 fall_back: Callable[[], None] | None = None,
                 join_setup: bytes | Payload | None = None):
        self.options = options
        self.access = access
        self.membership = membership
        self.dispatcher = dispatcher
        self.progress = progress
        self.spawn = spawn
        self.started_at = started_at
        self.closing = False
        self._fall_back = fall_back  # spot_fallback: new instances regular from then on
        self.gauge = WorkerGauge()
        self.policy: AdaptivePolicy | None = None  # adaptive capacity (None: fixed n)
        self.slots = Slots(options, access, dispatcher, spawn=spawn, output=output,
                           closing=lambda: self.closing, lose=self.lose, drain=self._drain,
                           workers_changed=self._workers_changed, join_setup=join_setup)
        self._loop = asyncio.get_running_loop()
        self._worker_ids = itertools.count(1)
        self._removals: set[asyncio.Task] = set()
        self._arranging_replacements = 0  # losses between an instance's removal and its replacement

    async def replace_join_setup(self, setup: bytes | Payload) -> None:
        """Agents that start from now run `setup`; the running ones run it next."""
        self.slots.join_setup = setup
        for member in self.membership.members.values():
            for worker in member.workers:
                if self.slots.usable(worker):
                    self.spawn(self.slots.run_setup(worker), member.tasks)

    # -- watching the scale set -------------------------------------------------------------

    async def watch(self) -> None:
        """List the scale set's instances; act on what changed; check heartbeats."""
        delay = 1.0
        while not self.closing:
            reconciliation = await self.membership.refresh()
            if reconciliation is not None:
                self.carry_out(reconciliation)
            self.slots.check_heartbeats(self.membership.members.values())
            busy = self.membership.outlook().coming
            delay = 1.0 if busy else min(delay * 2, 10.0)
            self.membership.wake.clear()
            try:
                await asyncio.wait_for(self.membership.wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def carry_out(self, reconciliation: Reconciliation) -> None:
        for member in reconciliation.discards:
            self.spawn(self.remove([member], "scaled down"))
        for member in reconciliation.joins:
            self.spawn(self.join(member), member.tasks)
        for member in reconciliation.vanished:
            InstanceConnection.mark_gone(member.vm_id)  # never connect to its address again
            member.evicted = member.priority == "Spot"
            self.spawn(self.lose(member, "the instance was deleted or evicted"))
        if reconciliation.dropped or reconciliation.failure is not None:
            self.dispatcher.fail_if_hopeless()

    # -- joining ----------------------------------------------------------------------------

    async def join(self, member: Member) -> None:
        timeout = self.options.join_timeout
        remaining = member.requested_at + timeout - time.monotonic()
        try:
            await asyncio.wait_for(self._bring_up(member), max(remaining, 1.0))
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            reason = (f"did not join within {timeout:.0f} s (provisioning state "
                      f"{member.provisioning_state}, address {member.address or 'none yet'})")
            await self._join_failed(member, reason)
        except (HostKeyMismatch, ConfigurationError) as exc:  # another instance fares no better
            await self._join_failed(member, str(exc), replace=False)
        except (BootFailed, InstanceGone, asyncssh.Error, OSError) as exc:
            await self._join_failed(member, str(exc))

    async def _bring_up(self, member: Member) -> None:
        from prefect_azmanagers.azure.bootscript import READY_STATUS_PATH

        while member.provisioning_state != "Succeeded" or not member.address:
            if member.provisioning_state.lower() == "failed":
                raise BootFailed(f"instance {member.name}: provisioning failed")
            member.changed.clear()
            await member.changed.wait()
        member.conn = await self._connect(member, retry=True)
        status_path = READY_STATUS_PATH.format(admin=self.access.admin)
        while True:
            result = await member.conn.run(f"cat {status_path} 2>/dev/null", timeout=60)
            status = str(result.stdout or "").strip()
            if status == "ready":
                break
            if status.startswith("failed"):
                raise BootFailed(f"instance {member.name}: boot script {status}")
            await asyncio.sleep(1.0)
        if self.options.forward_ports:
            await member.conn.forward_ports(self.options.forward_ports)
        member.workers = [Worker(next(self._worker_ids), member, slot, self.options.concurrency)
                          for slot in range(1, self.options.ppi + 1)]
        await asyncio.gather(*(self.slots.start(w) for w in member.workers))
        member.state = MemberState.JOINED
        self._announce_joined(member)

    def _announce_joined(self, member: Member) -> None:
        # An instance's workers join together; their lines count up one by one ("3/4", "4/4")
        joined = self.membership.joined_workers()
        count = joined - sum(w.state.running for w in member.workers)
        for worker in member.workers:
            count = min(count + 1, joined)
            self.progress.worker_joined(worker.id, member.name, member.address or "",
                                        worker.slot, time.monotonic() - self.started_at, count)
        self.gauge.set(joined)
        self.membership.joined(member)
        self.membership.changed.set()

    async def _connect(self, member: Member, *, retry: bool) -> InstanceConnection:
        """SSH to the instance; with `retry`, keep trying while sshd is not up yet."""
        while True:
            try:
                return await InstanceConnection.open(
                    member.address, port=self.access.manifest.ssh_port,
                    username=self.access.admin, client_key=self.access.client_key,
                    vm_id=member.vm_id, host_keys=self.access.host_keys,
                    still_exists=None if retry else partial(self._still_listed, member),
                    on_lost=partial(self._connection_lost, member))
            except (HostKeyMismatch, InstanceGone):
                raise
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
                if not retry:
                    raise
                logger.debug("instance %s not reachable yet: %s", member.name, exc)
                await asyncio.sleep(1.0)

    async def _still_listed(self, member: Member) -> bool | None:
        """Does a fresh listing still show the instance? None: listing failed, or raised a
        grow's failure (asked before a reconnect: nothing knocks at an address the cloud cannot
        vouch for)."""
        reconciliation = await self.membership.refresh()
        if reconciliation is not None:
            self.carry_out(reconciliation)
        if reconciliation is None or reconciliation.failure is not None:
            return None
        return member not in reconciliation.vanished

    async def _join_failed(self, member: Member, reason: str, *, replace: bool = True) -> None:
        tail = await self.boot_tail(member)
        member.failure = f"{reason}\n{tail}"
        logger.warning("instance %s did not join: %s\n%s", member.name, reason, tail)
        await self.lose(member, f"it did not join: {reason}",
                        replacement="did not join" if replace else None, before_joining=True)

    async def boot_tail(self, member: Member) -> str:
        """The end of the instance's boot log, for error messages."""
        from prefect_azmanagers.azure.bootscript import boot_log_tail

        admin = self.access.admin
        try:
            if member.conn is not None:
                return await asyncio.wait_for(boot_log_tail(member.conn.ssh, admin_username=admin), 30)
            if member.address:
                return await self.access.boot_log(member.address, member.vm_id)
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            return f"(boot log unavailable: {exc})"
        return f"(no boot log: the instance never got an address; state {member.provisioning_state})"

    async def wait_for_workers(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        membership = self.membership
        while membership.joined_workers() < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not membership.outlook().coming:
                raise JoinTimeout(await self._join_report(count, timeout))
            membership.changed.clear()
            try:
                await asyncio.wait_for(membership.changed.wait(), min(remaining, 5.0))
            except asyncio.TimeoutError:
                pass

    async def _join_report(self, count: int, timeout: float) -> str:
        membership = self.membership
        lines = [f"{membership.joined_workers()} of {count} workers joined within {timeout:.0f} s "
                 f"(scale set {membership.name})."]
        for member in membership.members.values():
            if member.state is MemberState.JOINING:
                lines.append(f"- instance {member.name} ({member.address or 'no address'}) has "
                             f"not joined; state {member.provisioning_state}.\n"
                             + await self.boot_tail(member))
            elif member.failure:
                lines.append(f"- instance {member.name}: {member.failure}")
        if membership.claims:
            lines.append(f"- {len(membership.claims)} requested instances never appeared in the "
                         "scale set.")
        if membership.provisioning_error:
            lines.append(f"- provisioning failed: {membership.provisioning_error}")
        lines.append("Raise join_timeout if instances boot slowly, or fix the boot failure shown.")
        return "\n".join(lines)

    def _connection_lost(self, member: Member, exc: Exception | None) -> None:
        # A joining member's join task sees its own failure.
        if self.closing or member.state is not MemberState.JOINED:
            return
        self._loop.call_soon(lambda: self.spawn(self._reconnect(member, exc)))

    async def _reconnect(self, member: Member, exc: Exception | None) -> None:
        """The SSH connection dropped: lose its slots, then reconnect and restart them, or
        treat the instance as gone."""
        reason = f"the SSH connection dropped ({exc or 'closed by the instance'})"
        member.state = MemberState.JOINING
        for worker in member.workers:
            if worker.state not in (WorkerState.LOST, WorkerState.STOPPED):
                self.slots.lost(worker, reason)
        self._workers_changed()
        member.conn = None
        for attempt in range(5):
            if self.closing or member.state is not MemberState.JOINING:
                return
            if member.power_state in STOPPED_POWER_STATES:
                member.evicted = member.priority == "Spot"  # a spot VM stopped under us
                await self.lose(member, f"{reason}; the instance is {member.power_state}")
                return
            try:
                member.conn = await self._connect(member, retry=False)
                break
            except (HostKeyMismatch, InstanceGone) as refused:
                await self.lose(member, str(refused))
                return
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as error:
                logger.info("instance %s: reconnect attempt %d failed: %s", member.name,
                            attempt + 1, error)
                await asyncio.sleep(2.0 * (attempt + 1))
        else:
            await self.lose(member, f"{reason}, and reconnecting failed")
            return
        if self.options.forward_ports:
            try:
                await member.conn.forward_ports(self.options.forward_ports)
            except ConfigurationError as error:
                await self.lose(member, str(error))
                return
        for worker in member.workers:
            worker.restarts = 0
        starts = await asyncio.gather(*(self.slots.start(w) for w in member.workers),
                                      return_exceptions=True)
        member.state = MemberState.JOINED
        for worker, outcome in zip(member.workers, starts):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                # restarted up to the bound, then given up (and the instance lost with its
                # last slot), never left joined with no agent while the queue waits
                logger.warning("worker %d: agent start after the reconnect failed (%s)",
                               worker.id, outcome)
                worker.state = WorkerState.LOST
                self.slots.schedule_restart(worker)
        self._announce_joined(member)

    async def _drain(self, member: Member, event: dict) -> None:
        """A Preempt for this instance: stop feeding it, let in-flight calls finish until
        shortly before NotBefore, then re-queue the rest and give the instance up."""
        if member.preempted:
            return
        member.preempted = member.evicted = True
        if member.state is MemberState.JOINED:
            member.state = MemberState.DRAINING
        for worker in member.workers:
            if worker.state.running:
                worker.state = WorkerState.DRAINING
        deadline = _seconds_until(event.get("not_before", "")) - DRAIN_MARGIN
        logger.warning("instance %s will be evicted (event %s, NotBefore %s): draining",
                       member.name, event.get("event_id"), event.get("not_before") or "now")
        until = time.monotonic() + max(deadline, 0.0)
        while time.monotonic() < until and member.inflight():
            await asyncio.sleep(0.2)
        await self.lose(member, f"its spot instance {member.name} is being evicted",
                        replacement="was evicted")

    async def lose(self, member: Member, reason: str, *, replacement: str | None = "was lost",
                   before_joining: bool = False) -> None:
        """The one way out for an instance: its slots' calls re-queued, its deletion, a
        replacement (`instance X <replacement>`, within the budget and the runaway failsafe;
        None for a failure that another instance would repeat), and the queue failed if
        nothing is left or coming (with `reason` as the last failure)."""
        if not member.state.live:
            return
        for worker in member.workers:  # the queue is checked once the replacement is asked for
            if worker.state not in (WorkerState.LOST, WorkerState.FAILED, WorkerState.STOPPED):
                self.slots.lost(worker, reason, then_check=False)
        logger.warning("instance %s lost: %s", member.name, reason)
        self.membership.failed(member, reason, before_joining=before_joining)
        # Until its replacement is asked for, queued work is not hopeless (another check may
        # run while the deletion is awaited).
        self._arranging_replacements += replacement is not None
        try:
            await self.remove([member], reason)
            if member.evicted:  # known once the deletion found it gone, at the latest
                self._count_eviction()
            if replacement is not None:
                await self._replace(1, f"instance {member.name} {replacement}")
        finally:
            self._arranging_replacements -= replacement is not None
        self.dispatcher.fail_if_hopeless()
        self.membership.changed.set()

    def _count_eviction(self) -> None:
        evictions = sum(m.evicted for m in self.membership.members.values())
        if self._fall_back is not None and evictions >= self.options.spot_fallback_after:
            self._fall_back()
            self._fall_back = None
            logger.warning("%d spot evictions: new instances are regular priority from now on "
                           "(spot_fallback=True; scale set %s-regular)", evictions,
                           self.membership.name)

    async def _replace(self, count: int, why: str) -> None:
        if self.policy is not None:
            return  # adaptive: lost capacity comes back only while there is work for it
        if self.closing or not self.membership.take_replacements(count, why):
            return
        try:
            await self.membership.grow(count)
        except AzManagersError as exc:
            self.membership.provisioning_failed(exc)
            self.dispatcher.fail_if_hopeless()

    def _workers_changed(self) -> None:
        joined = self.membership.joined_workers()
        self.progress.update(joined)
        self.gauge.set(joined)

    # -- adaptive capacity -----------------------------------------------------------------------

    async def adapt(self, policy: AdaptivePolicy | None) -> None:
        """Follow the work with `policy` (None: stop, keep the instances there are)."""
        self.policy = policy
        if policy is not None:
            await AdaptiveScaling(self, policy).run()

    def hopeless_reason(self) -> str | None:
        """Why queued work can never run: None while an instance is joined or coming, a
        replacement is being arranged, or an adaptive policy may still add one."""
        return None if self.may_grow() else self.membership.hopeless_reason()

    def may_grow(self) -> bool:
        """Capacity may still come (so queued work is not hopeless while nothing is joined): a
        lost instance's replacement is being arranged, or the adaptive policy will add some
        when work waits (not while closing, nor past the runaway failsafe)."""
        if self._arranging_replacements:
            return True
        return (self.policy is not None and not self.closing
                and self.membership.failures_in_a_row < MAX_FAILURES_IN_A_ROW
                and not self.policy.told_budget)

    # -- removal, cancel, scale -----------------------------------------------------------------

    async def remove(self, members: list[Member], reason: str) -> None:
        """Stop these instances' agents and delete the instances in one request."""
        members = [m for m in members if m.state.live]
        if not members:
            return
        for member in members:
            member.state = MemberState.REMOVING
            member.ended_at = time.monotonic()
            for task in list(member.tasks):
                if task is not asyncio.current_task():
                    task.cancel()
            for worker in member.workers:
                if worker.inflight:
                    self.slots.lost(worker, reason)
                worker.state = WorkerState.STOPPED
            if member.conn is not None:
                member.conn.close()
        # The deletion is its own task: cancelling the caller (e.g. close() cancelling a join)
        # does not abandon a request half made; the teardown waits for these before its sweep.
        deletion = self._loop.create_task(self.membership.delete(members))
        self._removals.add(deletion)
        deletion.add_done_callback(self._removals.discard)
        try:
            await asyncio.shield(deletion)
        finally:
            self._workers_changed()
            self.membership.changed.set()

    async def scale(self, n: int) -> None:
        plan = self.membership.plan_scale(n)
        self.progress.set_total(n * self.options.ppi)
        if plan.grow:
            await self.membership.grow(plan.grow)
        if plan.remove:
            await self.remove(plan.remove, "scaled down")

    # -- teardown -------------------------------------------------------------------------------

    async def teardown(self, tasks: set[asyncio.Task], *, urgent: bool = False) -> None:
        """Stop the agents (they flush their Prefect logs) and background `tasks`, then delete
        every instance added; `urgent` skips the agents: the deletion goes out first."""
        self.closing = True
        self.progress.stop()
        self.dispatcher.cancel_everything()
        workers = [] if urgent else [
            w for m in self.membership.members.values()
            if m.state in (MemberState.JOINED, MemberState.DRAINING)
            for w in m.workers if w.agent is not None and not w.exited.is_set()]
        for worker in workers:
            try:
                await asyncio.wait_for(worker.agent.send(Kind.SHUTDOWN), 5)
            except (asyncssh.Error, OSError, asyncio.TimeoutError):
                pass
        if workers:
            await asyncio.wait([asyncio.ensure_future(w.exited.wait()) for w in workers], timeout=10)
        current = asyncio.current_task()
        others = [t for t in tasks if t is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await asyncio.gather(*self._removals, return_exceptions=True)
        for member in self.membership.members.values():
            if member.conn is not None and member.state is not MemberState.GONE:
                member.conn.close()
        await self.membership.delete_everything()


def _seconds_until(http_date: str) -> float:
    """Seconds from now to an IMDS NotBefore ("Mon, 19 Sep 2016 18:29:47 GMT"); 0 if empty."""
    if not http_date:
        return 0.0
    try:
        return email.utils.parsedate_to_datetime(http_date).timestamp() - time.time()
    except (TypeError, ValueError):
        return 0.0
