"""Membership against a fake scale set: claims, reconcile, the outlook, scaling, deletion."""

from __future__ import annotations

import asyncio
import time

import pytest

from prefect_azmanagers.azure.scaleset import Instance
from prefect_azmanagers.cluster.members import Member, MemberState, Worker
from prefect_azmanagers.cluster.membership import Membership
from prefect_azmanagers.exceptions import AllocationFailed, AzureError


class FakeScaleSet:
    """The scale-set protocol membership is written against, in memory."""

    def __init__(self, listed: list[str] = ()):
        self.listed = [instance(name) for name in listed]
        self.pending_grows = 0
        self.grown: list[int] = []
        self.deleted: list[list[str]] = []
        self.list_failures: list[Exception] = []
        self.deleted_if_empty = False

    async def instances(self) -> list[Instance]:
        if self.list_failures:
            raise self.list_failures.pop(0)
        return list(self.listed)

    async def grow(self, count: int) -> None:
        self.grown.append(count)

    async def delete_instances(self, ids: list[str]) -> None:
        self.deleted.append(list(ids))
        self.listed = [i for i in self.listed if i.instance_id not in ids]

    async def delete_if_empty(self) -> bool:
        self.deleted_if_empty = not self.listed
        return self.deleted_if_empty


def instance(name: str, ip: str | None = "10.0.0.4", state: str = "Succeeded") -> Instance:
    return Instance(name, name.rsplit("_", 1)[-1], f"vm-{name}", name, state, "running", ip,
                    "Regular")


def membership(scaleset: FakeScaleSet, *, join_timeout: float = 600, replacements: int = 2,
               deleted: list | None = None) -> Membership:
    return Membership(scaleset, name="azm", join_timeout=join_timeout, replacements=replacements,
                      replace_lost=True,
                      on_deleted=(deleted.extend if deleted is not None else lambda members: None))


def run(coro):
    return asyncio.run(coro)


def test_instances_listed_before_the_first_grow_are_foreign():
    scaleset = FakeScaleSet(["azm_0"])
    ours = membership(scaleset)

    async def scenario():
        await ours.know_existing()
        await ours.grow(1)
        scaleset.listed.append(instance("azm_1"))
        return ours.reconcile(await scaleset.instances())

    result = run(scenario())
    assert [m.name for m in result.joins] == ["azm_1"]
    assert [m.name for m in ours.members.values()] == ["azm_1"]
    assert ours.foreign == {"vm-azm_0"}
    assert scaleset.grown == [1]


def test_an_instance_without_a_claim_is_foreign_and_never_touched():
    ours = membership(FakeScaleSet())
    result = ours.reconcile([instance("azm_7")])
    assert not result.joins and "vm-azm_7" in ours.foreign and not ours.members


def test_claims_past_join_timeout_end_and_leave_nothing_coming():
    ours = membership(FakeScaleSet(), join_timeout=60)
    ours.claims.append(time.monotonic() - 30)
    assert ours.reconcile([]).dropped == 0 and ours.outlook().coming == 1
    ours.claims[0] -= 60
    assert ours.reconcile([]).dropped == 1
    assert ours.outlook().hopeless and ours.hopeless_reason() == "no instance could join"


def test_a_settled_listing_drops_only_the_claims_older_than_it():
    scaleset = FakeScaleSet()
    ours = membership(scaleset)
    before = time.monotonic()
    ours.claims.extend([before - 5, before + 3600])  # a failed grow's, then a replacement's
    result = run(ours.refresh())
    assert result.dropped == 1 and list(ours.claims) == [before + 3600]


def test_a_listing_during_a_pending_grow_drops_no_claim():
    scaleset = FakeScaleSet()
    scaleset.pending_grows = 1
    ours = membership(scaleset)
    ours.claims.append(time.monotonic() - 5)
    assert run(ours.refresh()).dropped == 0 and len(ours.claims) == 1


def test_a_grow_failure_raised_by_the_listing_is_reported_once_and_listing_goes_on():
    scaleset = FakeScaleSet(["azm_0"])
    scaleset.list_failures.append(AllocationFailed("no capacity in the region"))
    ours = membership(scaleset)
    ours.claims.append(time.monotonic())
    result = run(ours.refresh())
    assert isinstance(result.failure, AllocationFailed)
    assert [m.name for m in result.joins] == ["azm_0"]
    assert "no capacity" in str(ours.provisioning_error)


def test_vanished_members_are_reported_once_they_are_no_longer_listed():
    ours = membership(FakeScaleSet())
    ours.claims.append(time.monotonic())
    [joined] = ours.reconcile([instance("azm_0")]).joins
    joined.state = MemberState.JOINED
    assert ours.reconcile([]).vanished == [joined]
    joined.state = MemberState.REMOVING
    assert ours.reconcile([]).vanished == []


def test_reconcile_wakes_a_member_whose_address_or_state_changed():
    ours = membership(FakeScaleSet())
    ours.claims.append(time.monotonic())
    [member] = ours.reconcile([instance("azm_0", ip=None, state="Creating")]).joins
    member.changed.clear()
    ours.reconcile([instance("azm_0", ip=None, state="Creating")])
    assert not member.changed.is_set()
    ours.reconcile([instance("azm_0", ip="10.0.0.9")])
    assert member.changed.is_set() and member.address == "10.0.0.9"


def test_the_outlook_counts_joined_and_coming():
    ours = membership(FakeScaleSet())
    ours.claims.append(time.monotonic())
    for name, state in (("a", MemberState.JOINED), ("b", MemberState.JOINING),
                        ("c", MemberState.DRAINING), ("d", MemberState.GONE)):
        ours.members[name] = Member(name, name, name, 0.0, state=state)
    outlook = ours.outlook()
    assert (outlook.joined, outlook.coming, outlook.hopeless) == (1, 2, False)
    assert ours.hopeless_reason() is None


def test_the_replacement_budget_is_spent_and_then_refused():
    ours = membership(FakeScaleSet(), replacements=2)
    assert ours.take_replacements(1, "lost") and ours.take_replacements(1, "lost")
    assert not ours.take_replacements(1, "lost") and ours.replacements_left == 0


def test_replacing_stops_after_three_instances_in_a_row_fail_before_joining_and_a_join_resets_it():
    ours = membership(FakeScaleSet(), replacements=10)
    a, b, c = (Member(n, n, n, 0.0) for n in "abc")
    ours.failed(a, "boot failed", before_joining=True)
    ours.failed(b, "agent lost", before_joining=False)   # a joined member's loss does not count
    ours.failed(b, "boot failed", before_joining=True)
    assert ours.take_replacements(1, "lost")   # two in a row: still replaced
    ours.failed(c, "boot failed: exit 3", before_joining=True)
    assert not ours.take_replacements(1, "lost")   # the third in a row: the failsafe
    assert ours.replacements_left == 9 and ours.last_failure == "instance c: boot failed: exit 3"
    ours.joined(a)   # an instance joined: not a deterministic failure after all
    assert ours.take_replacements(1, "lost") and ours.replacements_left == 8


def test_scaling_down_removes_joining_members_first_then_the_least_busy():
    ours = membership(FakeScaleSet())
    for name, state in (("busy", MemberState.JOINED), ("idle", MemberState.JOINED),
                        ("new", MemberState.JOINING)):
        ours.members[name] = Member(name, name, name, 0.0, state=state)
    busy = ours.members["busy"]
    busy.workers = [Worker(1, busy, 1, 1, inflight={7: object()})]
    assert ours.plan_scale(3).grow == 0
    assert [m.name for m in ours.plan_scale(1).remove] == ["new", "idle"]
    assert ours.plan_scale(5).grow == 2


def test_scaling_below_the_listed_members_discards_instances_on_arrival():
    ours = membership(FakeScaleSet())
    ours.claims.extend([time.monotonic()] * 2)
    plan = ours.plan_scale(0)
    assert plan.remove == [] and ours.discard_on_arrival == 2
    result = ours.reconcile([instance("azm_0"), instance("azm_1")])
    assert len(result.discards) == 2 and not result.joins


def test_close_deletes_the_known_instances_when_claiming_the_requested_ones_fails():
    scaleset = FakeScaleSet()
    scaleset.list_failures = [AzureError("listing the scale set failed")] * 4
    deleted: list[Member] = []
    ours = membership(scaleset, deleted=deleted)
    joined = Member("azm_0", "0", "vm-0", time.monotonic(), state=MemberState.JOINED)
    ours.members = {joined.name: joined}
    ours.claims.append(time.monotonic())  # a requested instance not listed yet
    with pytest.raises(AzureError, match="listing the scale set failed"):
        run(ours.delete_everything())
    assert scaleset.deleted == [["0"]] and joined.state is MemberState.GONE
    assert deleted == [joined]


def test_delete_everything_claims_requested_instances_and_deletes_the_empty_scale_set():
    scaleset = FakeScaleSet()
    ours = membership(scaleset)
    run(ours.grow(2))
    scaleset.listed = [instance("azm_0"), instance("azm_1")]
    run(ours.delete_everything())
    assert sorted(scaleset.deleted[0]) == ["0", "1"] and scaleset.deleted_if_empty


def test_a_grow_interrupted_after_its_request_went_out_is_deleted_at_close():
    """Ctrl-C while the grow's request is answered (seen once: the interrupt cancelled the
    start, the cluster forgot the request, and its scale set outlived it)."""
    scaleset = FakeScaleSet()
    ours = membership(scaleset)

    async def interrupted() -> None:
        async def answered_too_late(count: int) -> None:
            scaleset.listed = [instance("azm_0"), instance("azm_1")]  # ARM made them
            await asyncio.sleep(3600)

        scaleset.grow = answered_too_late
        growing = asyncio.get_running_loop().create_task(ours.grow(2))
        await asyncio.sleep(0.05)
        growing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await growing
        await ours.delete_everything()

    run(interrupted())
    assert sorted(scaleset.deleted[0]) == ["0", "1"] and scaleset.deleted_if_empty


def test_a_scale_set_made_again_reuses_names_but_its_instances_are_claimed_anew():
    """A failed grow's cleanup deletes the emptied scale set; the replacement makes it again
    and its first instance is named `_0` again: a new VM that takes the replacement's claim."""
    ours = membership(FakeScaleSet())
    ours.claims.append(time.monotonic())
    [first] = ours.reconcile([instance("azm_0")]).joins
    first.state = MemberState.GONE
    ours.claims.append(time.monotonic())
    again = Instance("azm_0", "0", "vm-new", "azm_0", "Creating", None, None, "Regular")
    [second] = ours.reconcile([again]).joins
    assert second is not first and second.vm_id == "vm-new" and not ours.claims
