"""Adaptive scaling carried out: every `interval`, a Snapshot of the lifecycle's members and
queue goes to the policy (`adapt.py`, pure) and its Decision is carried out, one grow or one
removal at a time, with a progress line ("scaling 4 -> 12 instances: 96 calls queued")."""

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
from prefect_azmanagers.exceptions import AzManagersError

if TYPE_CHECKING:
    from prefect_azmanagers.cluster.lifecycle import Lifecycle

logger = logging.getLogger("prefect_azmanagers.cluster")


class AdaptiveScaling:
    """Follows one policy until the lifecycle closes or another policy (or none) replaces it."""

    def __init__(self, lifecycle: Lifecycle, policy: AdaptivePolicy):
        self.lifecycle = lifecycle
        self.policy = policy
        self._requests: deque[tuple[float, int]] = deque()  # (when, count) of recent grows

    async def run(self) -> None:
        lifecycle = self.lifecycle
        while lifecycle.policy is self.policy and not lifecycle.closing:
            await self._decide()
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

    async def _decide(self) -> None:
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
            return  # the runaway failsafe: the queue has been failed (may_grow is False)
        if decision.grow:
            logger.info("scaling %d -> %d instances: %s", current, current + decision.grow,
                        decision.reason)
            self._requests.append((now, decision.grow))
            lifecycle.progress.set_total((current + decision.grow) * ppi)
            try:
                await membership.grow(decision.grow)
            except AzManagersError as exc:
                membership.provisioning_failed(exc)
                membership.failures_in_a_row += 1  # the failsafe counts refused grows
                lifecycle.dispatcher.fail_if_hopeless()
        elif decision.budget_spent:
            lifecycle.dispatcher.fail_if_hopeless()
        elif decision.remove:
            chosen = [m for m in membership.live() if m.vm_id in decision.remove and not m.inflight()]
            if chosen:
                logger.info("scaling %d -> %d instances: %s", current, current - len(chosen),
                            decision.reason)
                lifecycle.progress.set_total((current - len(chosen)) * ppi)
                await lifecycle.remove(chosen, "idle: scaled down")
