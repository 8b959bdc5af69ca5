"""Membership: which instances of the scale set are this cluster's, and how many are coming.

Written against a small scale-set protocol (`ScaleSetLike`, what `azure.scaleset.ScaleSet`
offers), in the manner of Ray's NodeProvider, so it is unit-tested with a fake scale set and no
SSH. It decides; the lifecycle (`cluster/lifecycle.py`) carries its decisions out: a listing's
`Reconciliation` names the members to join, to discard and that vanished.

Claims: each grow adds one claim (its request time) per instance asked for; a listed instance
the cluster does not know takes the oldest claim, or is foreign (never touched). Claims end when
met, past `join_timeout`, or when a listing that started with no grow pending does not meet
them (their grow failed) -- never all at once, so a replacement's instance is not taken for a
foreign one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from prefect_azmanagers.cluster.members import Member, MemberState
from prefect_azmanagers.exceptions import AzManagersError, AzureError

if TYPE_CHECKING:
    from prefect_azmanagers.azure.scaleset import Instance

logger = logging.getLogger("prefect_azmanagers.cluster")

MAX_FAILURES_IN_A_ROW = 3  # instances lost before joining, in a row, before replacing stops


def identity(instance: Instance) -> str:
    """What tells one VM from every other: its vmId (names are reused by a scale set made
    again under the same name)."""
    return instance.vm_id or f"{instance.name}#{instance.instance_id}"


class ScaleSetLike(Protocol):
    """What membership needs of a scale set."""

    @property
    def pending_grows(self) -> int: ...

    async def instances(self) -> list[Instance]: ...

    async def grow(self, count: int) -> None: ...

    async def delete_instances(self, instance_ids: list[str]) -> list[str] | None:
        """Returns the ids that were gone already (None: not known)."""

    async def delete_if_empty(self) -> bool: ...


@dataclass
class Reconciliation:
    """What a listing asks the lifecycle to do."""

    joins: list[Member] = field(default_factory=list)     # new members: connect them
    discards: list[Member] = field(default_factory=list)  # new members scaled away already
    vanished: list[Member] = field(default_factory=list)  # no longer listed: lost
    dropped: int = 0                                      # claims that will not be met
    failure: AzureError | None = None                     # a grow's failure, raised by the listing


@dataclass(frozen=True)
class Outlook:
    """The one answer to "is anything left or coming": joined instances, and instances coming
    (claims not met yet plus members still joining)."""

    joined: int
    coming: int

    @property
    def hopeless(self) -> bool:
        """No instance can run work now or later."""
        return not self.joined and not self.coming


@dataclass(frozen=True)
class ScalePlan:
    grow: int                # instances to request
    remove: list[Member]     # members to delete now


class Membership:
    """The cluster's instances of one scale set: claims, reconcile, replacement budget and
    scaling arithmetic. Lives on the cluster's event loop."""

    def __init__(self, scaleset: ScaleSetLike, *, name: str, join_timeout: float,
                 replacements: int, replace_lost: bool,
                 on_deleted: Callable[[list[Member]], None] = lambda members: None):
        self.scaleset = scaleset
        self.on_deleted = on_deleted  # e.g. forget their pinned host keys
        self.name = name
        self.join_timeout = join_timeout
        self.replace_lost = replace_lost
        self.max_replacements = replacements
        self.replacements_left = replacements
        # Keyed by identity (`identity(instance)`), not by name: a scale set deleted and made
        # again (a failed grow's cleanup, then a replacement) reuses its instances' names.
        self.members: dict[str, Member] = {}
        self.foreign: set[str] = set()  # identities of the scale set's instances not ours
        self.claims: deque[float] = deque()  # request times of instances not listed yet
        self.discard_on_arrival = 0
        self.provisioning_error: AzManagersError | None = None
        self.last_failure: str | None = None  # why the latest instance was lost
        self.failures_in_a_row = 0  # instances lost before any instance joined since
        self.changed = asyncio.Event()  # membership changed: wakes waiters for workers
        self.wake = asyncio.Event()  # a grow was sent: list again soon
        self._growing = 0  # grow calls whose request is not sent yet

    # -- growing ---------------------------------------------------------------------------

    async def know_existing(self) -> None:
        """Instances listed before the first grow are someone else's."""
        self.foreign = {identity(i) for i in await self.scaleset.instances()}

    async def grow(self, count: int) -> None:
        """Claim `count` instances and request them in one grow."""
        now = time.monotonic()
        self.claims.extend([now] * count)
        self._growing += 1  # claimed, not yet among the scale set's pending grows
        try:
            await self.scaleset.grow(count)
        except asyncio.CancelledError:
            # Interrupted (Ctrl-C during start): the request may be out already, so its
            # instances stay claimed and a close lists, claims and deletes them.
            raise
        except BaseException:
            for _ in range(count):
                self.claims.pop()
            raise
        finally:
            self._growing -= 1
        self.wake.set()

    def joined(self, member: Member) -> None:
        """A member joined: the instances are not failing deterministically."""
        self.failures_in_a_row = 0

    def failed(self, member: Member, reason: str, *, before_joining: bool) -> None:
        """A member is lost for `reason`; one lost before it (or any since) joined counts
        toward the runaway failsafe."""
        self.last_failure = f"instance {member.name}: {reason}"
        if before_joining:
            self.failures_in_a_row += 1

    def take_replacements(self, count: int, why: str) -> bool:
        """Spend `count` of the replacement budget, if replacing is on, the budget lasts and
        instances are not failing one after another (the runaway failsafe: a broken image
        or boot script is not replaced over and over)."""
        if not self.replace_lost:
            return False
        if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            logger.error("%s; not replaced: %d instances in a row failed before joining "
                         "(the last: %s). Fix the image, boot script or options and start "
                         "again.", why, self.failures_in_a_row, self.last_failure)
            return False
        if self.replacements_left < count:
            logger.warning("%s; not replaced (max_replacements=%d reached)", why,
                           self.max_replacements)
            return False
        self.replacements_left -= count
        logger.info("%s; requesting %d replacement instance(s)", why, count)
        return True

    def no_grow_pending(self) -> bool:
        """Every grow requested so far has finished: a listing started now shows all it made."""
        return not self._growing and not self.scaleset.pending_grows

    # -- listing ---------------------------------------------------------------------------

    async def refresh(self) -> Reconciliation | None:
        """List the instances and reconcile; None when listing failed (try again later)."""
        # A listing that starts when no grow is pending shows every instance requested before
        # it: claims older than it will never be met (their grow failed).
        settled = self.no_grow_pending()
        listed_at = time.monotonic()
        failure: AzureError | None = None
        try:
            instances = await self.scaleset.instances()
        except AzureError as exc:
            # Either a grow failed (raised once: the next listing works) or listing fails.
            failure = exc
            try:
                instances = await self.scaleset.instances()
            except Exception as again:
                logger.warning("listing the instances of %s failed: %s", self.name, again)
                instances = None
        except Exception as exc:  # network trouble listing: keep trying with backoff
            logger.warning("listing the instances of %s failed: %s", self.name, exc)
            instances = None
        result = None
        if instances is not None:
            result = self.reconcile(instances)
            if settled:
                result.dropped += self.drop_claims_before(
                    listed_at, "will not come: their grow ended without them")
        if failure is not None:
            self.provisioning_failed(failure)
            result = result or Reconciliation()
            result.failure = failure
        return result

    def reconcile(self, instances: list[Instance]) -> Reconciliation:
        """Take a listing: claim new instances, update known ones, notice vanished ones."""
        result = Reconciliation(dropped=self.drop_claims_before(
            time.monotonic() - self.join_timeout, "never appeared within join_timeout"))
        seen = set()
        for inst in instances:
            key = identity(inst)
            seen.add(key)
            member = self.members.get(key)
            if member is None:
                if key in self.foreign:
                    continue
                if not self.claims:
                    self.foreign.add(key)
                    continue
                member = Member(inst.name, inst.instance_id, inst.vm_id, self.claims.popleft(),
                                priority=inst.priority)
                self.members[key] = member
                if self.discard_on_arrival:
                    self.discard_on_arrival -= 1
                    result.discards.append(member)
                else:
                    result.joins.append(member)
            member.power_state = inst.power_state
            if (inst.private_ip, inst.provisioning_state) != (member.address,
                                                              member.provisioning_state):
                member.address = inst.private_ip
                member.provisioning_state = inst.provisioning_state
                member.changed.set()
        result.vanished = [m for key, m in self.members.items()
                           if key not in seen and m.state.live]
        return result

    def drop_claims_before(self, moment: float, why: str) -> int:
        """Claims made before `moment` will not be met: forget them. Returns how many."""
        dropped = 0
        while self.claims and self.claims[0] < moment:
            self.claims.popleft()
            dropped += 1
        if dropped:
            logger.warning("%d requested instance(s) of %s %s", dropped, self.name, why)
            self.changed.set()
        return dropped

    def provisioning_failed(self, exc: AzManagersError) -> None:
        """A grow failed (e.g. AllocationFailed): the next settled listing drops the claims it
        will not meet (claims of other grows stay, or their instances would be taken for
        someone else's and outlive the cluster)."""
        logger.error("provisioning scale set %s failed: %s", self.name, exc)
        self.provisioning_error = exc
        self.wake.set()
        self.changed.set()

    # -- counting ---------------------------------------------------------------------------

    def outlook(self) -> Outlook:
        joined = sum(m.state is MemberState.JOINED for m in self.members.values())
        joining = sum(m.state is MemberState.JOINING for m in self.members.values())
        return Outlook(joined=joined, coming=len(self.claims) + joining)

    def hopeless_reason(self) -> str | None:
        """Why no work can run any more, or None while some instance is joined or coming."""
        if not self.outlook().hopeless:
            return None
        return str(self.provisioning_error or self.last_failure or "no instance could join")

    def live(self) -> list[Member]:
        return [m for m in self.members.values() if m.state.live]

    def joined_workers(self) -> int:
        """Worker slots running an agent on joined instances."""
        return sum(1 for m in self.members.values() if m.state is MemberState.JOINED
                   for w in m.workers if w.state.running)

    def plan_scale(self, n: int) -> ScalePlan:
        """Grow to or shrink to n instances: joining members go first, then the least busy."""
        live = self.live()
        current = len(live) + len(self.claims) - self.discard_on_arrival
        if n >= current:
            return ScalePlan(grow=n - current, remove=[])
        excess = current - n
        order = {MemberState.JOINING: 0, MemberState.JOINED: 1, MemberState.DRAINING: 2}
        live.sort(key=lambda m: (order[m.state], m.inflight()))
        chosen = live[:excess]
        self.discard_on_arrival += excess - len(chosen)
        return ScalePlan(grow=0, remove=chosen)

    # -- deleting ---------------------------------------------------------------------------

    async def delete(self, members: list[Member]) -> None:
        """Delete these members' instances in one request; they are gone once it succeeded
        (a failed removal stays REMOVING, and `delete_everything` retries it)."""
        gone = set(await self.scaleset.delete_instances([m.instance_id for m in members]) or ())
        for member in members:
            member.state = MemberState.GONE
            # a spot VM that vanished before our deletion: an eviction (with the Delete policy)
            member.evicted |= member.instance_id in gone and member.priority == "Spot"
        self.on_deleted(members)

    async def claim_requested(self) -> None:
        """Claim the instances requested but not listed yet, so that they are deleted too.

        ARM lists an instance as soon as its grow is accepted, so this returns after a listing
        or two, not after the boot (Ctrl-C while instances boot is quick)."""
        failures = 0
        while self.claims:
            settled = self.no_grow_pending()
            try:
                instances = await self.scaleset.instances()
            except AzureError as exc:  # a grow's failure (raised once), or listing fails
                failures += 1
                if failures > 3:
                    raise
                logger.info("listing %s during close: %s", self.name, exc)
                continue
            self.reconcile(instances)
            if settled or not self.claims:
                return
            await asyncio.sleep(1.0)

    async def delete_everything(self) -> None:
        """Delete every instance this cluster added, then the scale set if it is empty. The instances already known are deleted even when claiming the
        requested ones fails (that failure is raised after: instances still unlisted may be
        left)."""
        claim_failure: AzureError | None = None
        try:
            await self.claim_requested()
        except AzureError as exc:
            claim_failure = exc
        members = [m for m in self.members.values() if m.state is not MemberState.GONE]
        for member in members:
            member.state = MemberState.REMOVING
        if members:
            await self.delete(members)
        await self.scaleset.delete_if_empty()
        if claim_failure is not None:
            raise claim_failure
