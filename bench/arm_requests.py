"""ARM requests to provision, list and tear down N scale-set instances, by operation.

Runs the control plane (prefect_azmanagers.azure.ScaleSet, the real aio Azure SDK) against a
fresh local cloud and reads the local cloud's request counters after each phase:

  provision  grow(N) + wait until the long-running operation finished (all instances booted)
  list       one instances() call (VMs with instance view + NICs for private IPs)
  teardown   delete_instances(all) in one request + delete_if_empty()

LRO status polls (AsyncOperation_Get / OperationResult_Get) depend on how long the operation
runs (one per Retry-After second), not on N; they are shown on their own line. The page size of
the local cloud's list answers is set to PAGE_SIZE so that paging is visible.

    .venv/bin/python bench/arm_requests.py            # N = 10 and 100
    .venv/bin/python bench/arm_requests.py 10 32      # other sizes

Prints a table and writes bench/results/arm_requests.json.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from prefect_azmanagers.azure.bootscript import boot_script, encode_custom_data
from prefect_azmanagers.azure.clients import ArmClients
from prefect_azmanagers.azure.ownership import ownership_tags
from prefect_azmanagers.azure.scaleset import ScaleSet
from prefect_azmanagers.blocks import AzureManifest
from prefect_azmanagers.localcloud import LocalCloudAdmin, start, stop
from prefect_azmanagers.templates import build_sstemplate

PAGE_SIZE = 50
POLLS = {"AsyncOperation_Get", "OperationResult_Get"}
WRITES = ("CreateOrUpdate", "Update", "Delete", "DeleteInstances")
RESULTS = Path(__file__).with_name("results") / "arm_requests.json"


def blocks(info: dict) -> tuple[AzureManifest, object]:
    manifest = AzureManifest(
        subscription_id=info["subscription_id"], resource_group=info["resource_group"],
        location=info["location"], ssh_user=info["ssh_user"],
        ssh_private_key_file=info["ssh_private_key_file"], ssh_public_key_file=info["ssh_public_key_file"],
        arm_endpoint=info["arm_endpoint"], ca_bundle=info["ca_cert"], credential="static",
        static_token=info["static_token"], known_hosts_file=info["known_hosts_file"], python=info["python"])
    template = build_sstemplate(
        "bench", subscription_id=info["subscription_id"], admin_username=info["ssh_user"],
        location=info["location"], resource_group=info["resource_group"], vnet="localcloud-vnet",
        subnet="default", image_gallery="localcloud-gallery", image_name="ubuntu",
        sku_name="Standard_D2s_v3", tempdisk="")
    return manifest, template


def delta(before: dict, after: dict) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)}


async def measure(info: dict, admin: LocalCloudAdmin, n: int) -> dict[str, dict[str, int]]:
    manifest, template = blocks(info)
    data = encode_custom_data(boot_script(admin_username=manifest.ssh_user))
    phases: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    async with ArmClients(manifest) as clients:
        async with ScaleSet(clients, manifest, template, f"bench{n}", custom_data=data,
                            tags=ownership_tags(f"bench{n}")) as scaleset:
            # The SKU list is read once per process and cached; warm it so that N=10 and N=100
            # are measured alike (the first grow of a process costs one more ResourceSkus_List).
            from prefect_azmanagers.azure.quota import sku_info
            await sku_info(clients, info["location"], "Standard_D2s_v3")

            async def phase(name: str, work) -> None:
                before, started = admin.counters()["requests"], time.monotonic()
                await work()
                seconds[name] = round(time.monotonic() - started, 1)
                phases[name] = delta(before, admin.counters()["requests"])

            async def provision() -> None:
                await scaleset.grow(n)
                await scaleset.wait_provisioned()

            listed: list = []

            async def list_once() -> None:
                listed.extend(await scaleset.instances())

            async def teardown() -> None:
                await scaleset.delete_instances([i.instance_id for i in listed])
                assert await scaleset.delete_if_empty()

            await phase("provision", provision)
            await phase("list", list_once)
            assert len(listed) == n and all(i.private_ip for i in listed), listed
            await phase("teardown", teardown)
    return {"requests": phases, "seconds": seconds}


def table(results: dict[int, dict]) -> str:
    sizes = sorted(results)
    cols = [(n, p) for n in sizes for p in ("provision", "list", "teardown")]
    ops = sorted({op for n in sizes for p in results[n]["requests"].values() for op in p})
    head = f"{'operation':<62}" + "".join(f"{f'{p} N={n}':>17}" for n, p in cols)
    lines = [head, "-" * len(head)]

    def row(label: str, pick) -> str:
        return f"{label:<62}" + "".join(f"{pick(results[n]['requests'][p]):>17}" for n, p in cols)

    for op in ops:
        if op not in POLLS:
            lines.append(row(op, lambda counts, op=op: counts.get(op, 0)))
    lines.append("-" * len(head))
    lines.append(row("writes (PUT/PATCH/POST/DELETE)",
                     lambda c: sum(v for k, v in c.items() if k.split("_", 1)[-1] in WRITES)))
    lines.append(row("reads (GET, incl. list pages)",
                     lambda c: sum(v for k, v in c.items() if k not in POLLS and k.split("_", 1)[-1] not in WRITES)))
    lines.append(row("LRO status polls (time-dependent)", lambda c: sum(c.get(k, 0) for k in POLLS)))
    lines.append(f"{'seconds':<62}" + "".join(f"{results[n]['seconds'][p]:>17}" for n, p in cols))
    return "\n".join(lines)


def main(sizes: list[int]) -> None:
    state = Path(tempfile.mkdtemp(prefix="azm-bench-"))
    info = start(state)
    results: dict[int, dict] = {}
    try:
        with LocalCloudAdmin.from_info(info) as admin:
            largest = max(sizes) * 2
            for quota in ("cores", "standardDSv3Family"):
                admin.set_quota(quota, max(largest, 256))
            admin.settings(page_size=PAGE_SIZE)
            for n in sizes:
                results[n] = asyncio.run(measure(info, admin, n))
    finally:
        stop(state)
        shutil.rmtree(state, ignore_errors=True)
    print(table(results))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"page_size": PAGE_SIZE, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10, 100])
