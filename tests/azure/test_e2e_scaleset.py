"""Scale sets end to end on the local cloud: the real aio SDK, real instances reached over SSH."""

from __future__ import annotations

import asyncio

import pytest

from prefect_azmanagers.azure.bootscript import boot_log_tail
from prefect_azmanagers.azure.ownership import CLUSTER_TAG

pytestmark = pytest.mark.e2e

HOSTILE = {"QUOTES": "it's \"quoted\"", "DOLLAR": "$HOME $(id) `id`", "MULTI": "a\nb\n"}


def test_create_grow_list_shrink_delete(lc):
    async def scenario(clients, ss):
        await ss.grow(2)
        assert ss.created
        await ss.wait_provisioned()
        first = await ss.instances()
        assert len(first) == 2
        await ss.grow(1)                       # existing scale set: PATCH capacity
        await ss.wait_provisioned()
        listed = await ss.instances()
        assert len(listed) == 3
        for inst in listed:
            assert inst.provisioning_state == "Succeeded"
            assert inst.power_state == "running"
            assert inst.private_ip and inst.vm_id and inst.computer_name.startswith(lc.name("-"))
            assert inst.priority == "Regular"
        assert len({i.private_ip for i in listed}) == 3
        status = {i["name"]: i for i in lc.admin.status()["instances"]}
        for inst in listed:
            assert status[inst.name]["private_ip"] == inst.private_ip
        await ss.delete_instances([listed[0].instance_id])
        assert sorted(i.name for i in await ss.instances()) == sorted(i.name for i in listed[1:])
        assert not await ss.delete_if_empty()  # still has instances
        await ss.delete_instances([i.instance_id for i in listed[1:]])
        assert await ss.instances() == []
        assert await ss.delete_if_empty()
        assert not [s for s in lc.admin.status()["scale_sets"] if s["name"] == ss.name]
    lc.run_with_scaleset(scenario)


def test_boot_script_env_arrives_unchanged_on_the_instance(lc):
    async def scenario(clients, ss):
        await ss.grow(1)
        await ss.wait_provisioned()
        [inst] = await ss.instances()
        async with await lc.ssh(inst.private_ip) as conn:
            for _ in range(120):
                status = (await conn.run("cat ~/.azmanagers/boot.status", check=False)).stdout.strip()
                if status:
                    break
                await asyncio.sleep(0.5)
            assert status == "ready"
            for name, value in HOSTILE.items():
                got = await conn.run(f'. ~/.azmanagers/env.sh && printf %s "${name}"', check=True)
                assert got.stdout == value
            tail = await boot_log_tail(conn, admin_username=lc.manifest.ssh_user)
        assert "hook-ran" in tail and "prefect-azmanagers boot: ready" in tail
    lc.run_with_scaleset(scenario, custom_data=lc.custom_data(env=HOSTILE, hooks=["echo hook-ran"]))


def test_existing_scaleset_is_grown_but_never_deleted(lc):
    async def scenario(clients, owner):
        await owner.grow(1)
        await owner.wait_provisioned()
        other = lc.scaleset(clients)           # a second process adopting it
        await other.grow(1)
        await other.wait_provisioned()
        assert not other.created
        assert len(await other.instances()) == 2
        await other.delete_instances([i.instance_id for i in await other.instances()])
        assert not await other.delete_if_empty()   # not ours: kept, even empty
        assert [s for s in lc.admin.status()["scale_sets"] if s["name"] == owner.name]
        assert await owner.delete_if_empty()
    lc.run_with_scaleset(scenario)


def test_spot_with_eviction_policy(lc):
    async def scenario(clients, ss):
        await ss.grow(2)
        model = (await clients.compute.virtual_machine_scale_sets.get(ss.resource_group, ss.name)).as_dict()
        profile = model["properties"]["virtualMachineProfile"]
        assert (profile["priority"], profile["evictionPolicy"]) == ("Spot", "Deallocate")
        assert profile["billingProfile"]["maxPrice"] == 0.5
        assert model["tags"][CLUSTER_TAG] == lc.prefix
        await ss.wait_provisioned()
        instances = await ss.instances()
        assert [i.priority for i in instances] == ["Spot", "Spot"]
        status = {i["name"]: i for i in lc.admin.status()["instances"]}
        assert {status[i.name]["priority"] for i in instances} == {"Spot"}
    lc.run_with_scaleset(scenario, spot=True, max_price=0.5, eviction_policy="Deallocate")


def test_priority_mix_uses_flexible_orchestration(lc):
    async def scenario(clients, ss):
        await ss.grow(3)
        model = (await clients.compute.virtual_machine_scale_sets.get(ss.resource_group, ss.name)).as_dict()
        assert model["properties"]["orchestrationMode"] == "Flexible"
        assert model["properties"]["priorityMixPolicy"] == {
            "baseRegularPriorityCount": 1, "regularPriorityPercentageAboveBase": 50}
        await ss.wait_provisioned()
        instances = await ss.instances()
        assert len(instances) == 3 and all(i.private_ip for i in instances)
        # base 1 regular; of the 2 above it 50% regular -> 2 regular, 1 spot
        assert sorted(i.priority for i in instances) == ["Regular", "Regular", "Spot"]
        await ss.delete_instances([instances[0].instance_id])
        assert len(await ss.instances()) == 2
    lc.run_with_scaleset(scenario, spot=True, spot_base_regular_priority_count=1,
                         spot_regular_percentage_above_base=50)


def test_concurrent_grows_add_up(lc):
    async def scenario(clients, ss):
        await asyncio.gather(ss.grow(1), ss.grow(2))
        await ss.wait_provisioned()
        assert len(await ss.instances()) == 3
    lc.run_with_scaleset(scenario)


def test_cleanup_never_deletes_a_scale_set_a_live_cluster_holds_on_any_host(lc):
    """Scale sets made by `someone@elsewhere` (whose pid this host cannot check): the one whose
    lease is fresh is in use and kept; the one whose lease expired is an orphan."""
    import time as clock

    from prefect_azmanagers.azure.lease import LEASE_TAG, TTL
    from prefect_azmanagers.azure.ownership import CREATOR_TAG, find_orphans, ownership_tags

    async def scenario(clients):
        elsewhere = {**ownership_tags(lc.prefix), CREATOR_TAG: "someone@elsewhere",
                     "azmanagers-created": "2000-01-01T00:00:00+00:00"}
        live = lc.scaleset(clients, "live", tags=elsewhere, lease_holder="c-live")
        stale = lc.scaleset(clients, "stale", tags={
            **elsewhere, LEASE_TAG: f"c-gone {clock.time() - TTL:.0f}"})
        try:
            await live.grow(1)
            await stale.grow(1)
            found = {o.name for o in await find_orphans(clients, lc.manifest.resource_group,
                                                        all_creators=True)}
            assert stale.name in found and live.name not in found
        finally:
            await live.delete()
            await stale.delete()

    lc.run(scenario)


def test_two_clusters_taking_one_existing_scale_set_at_once_exactly_one_wins(lc):
    """Two clusters name one pre-existing scale set (no lease on it) at the same moment: the
    lease is written with If-Match on the etag each read, so one takes it and grows, the other
    is refused with ScaleSetInUse and adds nothing (read-then-PATCH let both take it)."""
    from prefect_azmanagers.azure.lease import LEASE_TAG, read_lease
    from prefect_azmanagers.exceptions import ScaleSetInUse

    async def scenario(clients, owner):
        await owner.grow(1)                    # made by a process that holds no lease
        contenders = [lc.scaleset(clients, lease_holder=f"c-{who}") for who in ("a", "b")]
        try:
            outcomes = await asyncio.gather(*(c.grow(1) for c in contenders), return_exceptions=True)
            refused = [o for o in outcomes if isinstance(o, ScaleSetInUse)]
            assert len(refused) == 1 and outcomes.count(None) == 1, outcomes
            winner = contenders[outcomes.index(None)]
            assert "is in use by cluster " + winner.lease_holder in str(refused[0])
            await winner.wait_provisioned()
            model = (await clients.compute.virtual_machine_scale_sets.get(owner.resource_group, owner.name)).as_dict()
            assert read_lease(model["tags"]).holder == winner.lease_holder
            assert model["sku"]["capacity"] == 2   # the owner's instance and the winner's, no more
        finally:
            for contender in contenders:
                await contender.close()
        tags = (await clients.compute.virtual_machine_scale_sets.get(owner.resource_group, owner.name)).tags
        assert LEASE_TAG not in (tags or {})   # the winner dropped its lease at close
    lc.run_with_scaleset(scenario)
