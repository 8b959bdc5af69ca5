"""Adaptive scaling carried out: every `interval`, a Snapshot of the lifecycle's members and
queue goes to the policy (`adapt.py`, pure) and its Decision is carried out, one grow or one
removal at a time, with a progress line ("scaling 4 -> 12 instances: 96 tasks queued"). The
quota caps growth (a grow asks for what fits) instead of failing it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from prefect_azmanagers.cluster.adapt import AdaptivePolicy, InstanceView, Snapshot
from prefect_azmanagers.cluster.members import MemberState
from prefect_azmanagers.cluster.membership import MAX_FAILURES_IN_A_ROW
from prefect_azmanagers.cluster.usage import instance_hours
from prefect_azmanagers.exceptions import AzManagersError, QuotaExceeded

if TYPE_CHECKING:
    from prefect_azmanagers.cluster.lifecycle import Lifecycle

logger = logging.getLogger("prefect_azmanagers.cluster")

QUOTA_RECHECK_SECONDS = 30.0  # after the quota had no room, the next grow waits this long


class AdaptiveScaling:
    """Follows one policy until the lifecycle closes or another policy (or none) replaces it."""

    def __init__(self, lifecycle: Lifecycle, policy: AdaptivePolicy):
        self.lifecycle = lifecycle
        self.policy = policy
        self._requests: deque[tuple[float, int]] = deque()  # (when, count) of recent grows
        self._quota_full_until = 0.0  # no grow before then: the quota had no room
        self._told_failsafe = False

    async def run(self) -> None:
        lifecycle = self.lifecycle
        while lifecycle.policy is self.policy and not lifecycle.closing:
            await self.step()
            await asyncio.sleep(self.policy.adapt.interval)

    def snapshot(self, now: float) -> Snapshot:
        while self._requests and self._requests[0][0] < now - 60:
            self._requests.popleft()
        lifecycle, membership = self.lifecycle, self.lifecycle.membership
        live = membership.live()
        views = [InstanceView(
            key=m.vm_id, joined=m.state is MemberState.JOINED, inflight=m.inflight(),
            idle_for=0.0 if m.inflight() else now - m.last_active, spot=m.priority == "Spot")
            for m in live]
        return Snapshot(
            queued=len(lifecycle.dispatcher.queue), running=sum(m.inflight() for m in live),
            instances=views, requested=len(membership.claims),
            removing=sum(m.state is MemberState.REMOVING for m in membership.members.values()),
            requested_last_minute=sum(count for _, count in self._requests),
            instance_hours=sum(instance_hours(membership.members.values(), now).values()),
            per_instance=lifecycle.options.ppi * lifecycle.options.concurrency)

    async def step(self) -> None:
        """One decision of the policy, carried out."""
        lifecycle, membership, policy = self.lifecycle, self.lifecycle.membership, self.policy
        now = time.monotonic()
        snapshot = self.snapshot(now)
        decision = policy.decide(snapshot)
        current = len(snapshot.instances) + len(membership.claims)
        ppi = lifecycle.options.ppi
        if decision.budget_spent and not policy.told_budget:
            policy.told_budget = True
            logger.warning("not scaling up: %s (the cluster keeps %d instances)",
                           decision.reason, current)
        if decision.grow and membership.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            if not self._told_failsafe:
                self._told_failsafe = True
                logger.error("not scaling up any more: %d instances in a row failed to join or "
                             "were refused (last: %s); queued calls fail once nothing is left",
                             membership.failures_in_a_row, membership.last_failure)
            return  # the runaway failsafe: may_grow is False, so the queue fails when hopeless
        if decision.grow and now < self._quota_full_until:
            return  # the quota had no room a moment ago: look again later
        if decision.grow:
            await self._grow(decision.grow, current, decision.reason, now)
        elif decision.budget_spent:
            lifecycle.dispatcher.fail_if_hopeless()
        elif decision.remove:
            chosen = [m for m in membership.live() if m.vm_id in decision.remove and not m.inflight()]
            if chosen:
                logger.info("scaling %d -> %d instances: %s", current, current - len(chosen),
                            decision.reason)
                lifecycle.progress.set_total((current - len(chosen)) * ppi)
                await lifecycle.remove(chosen, "idle: scaled down")

    async def _grow(self, count: int, current: int, reason: str, now: float) -> None:
        """One grow request; the quota caps it (it grows by what fits, and says so once) rather
        than failing it. Other refusals count toward the runaway failsafe."""
        lifecycle, membership = self.lifecycle, self.lifecycle.membership
        ppi = lifecycle.options.ppi
        while count:
            logger.info("scaling %d -> %d instances: %s", current, current + count, reason)
            self._requests.append((now, count))
            lifecycle.progress.set_total((current + count) * ppi)
            try:
                await membership.grow(count)
                return
            except QuotaExceeded as exc:
                fits = exc.fits or 0
                if fits < count and (fits or membership.live()):
                    logger.warning("the quota caps this cluster at %d instances for now: %s",
                                   current + fits, exc)
                    count, reason = fits, "as many as the quota allows"
                    if not fits:
                        self._quota_full_until = now + QUOTA_RECHECK_SECONDS
                    continue
                failure: AzManagersError = exc  # no room and nothing live: the flow must hear it
            except AzManagersError as exc:
                failure = exc
            membership.provisioning_failed(failure)
            membership.failures_in_a_row += 1  # the failsafe counts refused grows
            lifecycle.dispatcher.fail_if_hopeless()
            return
