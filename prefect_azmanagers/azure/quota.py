"""Quota check before asking Azure for capacity: vCPUs of the SKU x instances vs the limits.

Azure counts regular VMs against their family's quota (e.g. `standardDSv3Family`) and the total
regional quota (`cores`), and spot VMs against `lowPriorityCores` only. The check reads the SKU
list (cached per ArmClients) and the region's usages (two paged GETs), and either passes, waits a
bounded time for capacity to free up, or raises QuotaExceeded with the numbers. The original
AzManagers looped forever and did not check the total regional quota.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from prefect_azmanagers.azure.errors import arm_errors
from prefect_azmanagers.exceptions import QuotaExceeded, SkuNotAvailable

logger = logging.getLogger("prefect_azmanagers.azure")

QUOTA_POLL_SECONDS = 30.0


@dataclass(frozen=True)
class Sku:
    name: str
    family: str
    vcpus: int


@dataclass(frozen=True)
class Usage:
    name: str
    current: int
    limit: int


@dataclass(frozen=True)
class Shortfall:
    quota: str       # usage name, e.g. "standardDSv3Family", "cores", "lowPriorityCores"
    limit: int
    current: int
    required: int    # vCPUs the request adds

    def __str__(self) -> str:
        return (f"{self.quota}: limit {self.limit}, in use {self.current}, this request needs "
                f"{self.required} more (short by {self.current + self.required - self.limit})")


def priority_split(capacity: int, base_regular: int, regular_percentage: int) -> tuple[int, int]:
    """(regular, spot) instance counts of a priority-mix scale set at `capacity`, as Azure fills it.

    The first `base_regular` are regular; of the rest, `regular_percentage` percent (rounded up)
    are regular and the others spot.
    """
    base = min(capacity, base_regular)
    above = capacity - base
    regular_above = math.ceil(above * regular_percentage / 100)
    return base + regular_above, above - regular_above


def shortfalls(sku: Sku, usages: dict[str, Usage], *, regular: int, spot: int) -> list[Shortfall]:
    """The quotas too small for `regular` more regular and `spot` more spot instances of `sku`."""
    needs = {
        sku.family: regular * sku.vcpus,
        "cores": regular * sku.vcpus,
        "lowPriorityCores": spot * sku.vcpus,
    }
    short = []
    for name, required in needs.items():
        usage = usages.get(name.lower())
        if required <= 0 or usage is None:
            continue
        if usage.current + required > usage.limit:
            short.append(Shortfall(usage.name, usage.limit, usage.current, required))
    return short


def instances_that_fit(sku: Sku, usages: dict[str, Usage], *, regular: int, spot: int) -> int:
    """The most of `regular` + `spot` instances (kept in that proportion) the quotas allow now."""
    total = regular + spot
    for count in range(total, 0, -1):
        part_regular = math.ceil(regular * count / total)
        if not shortfalls(sku, usages, regular=part_regular, spot=count - part_regular):
            return count
    return 0


async def sku_info(clients: Any, location: str, sku_name: str) -> Sku:
    """vCPUs and family of a VM size in a region; SkuNotAvailable if absent or restricted there."""
    key = (location.lower(), sku_name.lower())
    if key in clients.sku_cache:
        return clients.sku_cache[key]
    with arm_errors(f"list the VM sizes of {location}"):
        async for item in clients.compute.resource_skus.list(filter=f"location eq '{location}'"):
            raw = item.as_dict()
            if raw.get("resourceType") != "virtualMachines" or raw.get("name", "").lower() != key[1]:
                continue
            locations = [loc.lower() for loc in raw.get("locations") or []]
            if locations and key[0] not in locations:
                continue
            restricted = [r for r in raw.get("restrictions") or []
                          if r.get("type") == "Location" and r.get("reasonCode")]
            if restricted:
                raise SkuNotAvailable(
                    f"VM size {sku_name} is restricted in {location} for this subscription "
                    f"({restricted[0]['reasonCode']}). Pick another size or region in the template.",
                    code="SkuNotAvailable")
            caps = {c.get("name"): c.get("value") for c in raw.get("capabilities") or []}
            sku = Sku(raw["name"], raw.get("family") or "", int(caps.get("vCPUs") or 0))
            clients.sku_cache[key] = sku
            return sku
    raise SkuNotAvailable(
        f"VM size {sku_name} is not offered in {location} (not in the region's SKU list). "
        "Check the template's sku name (e.g. Standard_D8s_v3) and location.", code="SkuNotAvailable")


async def usages(clients: Any, location: str) -> dict[str, Usage]:
    """The region's compute usages, keyed by lower-cased usage name."""
    found: dict[str, Usage] = {}
    with arm_errors(f"read the compute quota usages of {location}"):
        async for item in clients.compute.usage.list(location):
            raw = item.as_dict()
            name = (raw.get("name") or {}).get("value") or ""
            found[name.lower()] = Usage(name, int(raw.get("currentValue", 0)), int(raw.get("limit", 0)))
    return found


async def ensure_quota(clients: Any, location: str, sku_name: str, *, regular: int, spot: int,
                       wait: float = 0.0) -> None:
    """Pass if the region has quota for the instances; else wait up to `wait` s, then QuotaExceeded."""
    if regular <= 0 and spot <= 0:
        return
    sku = await sku_info(clients, location, sku_name)
    deadline = time.monotonic() + wait
    while True:
        found = await usages(clients, location)
        short = shortfalls(sku, found, regular=regular, spot=spot)
        if not short:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        logger.info("Quota short for %s x%d in %s (%s); waiting up to %.0f s more",
                    sku_name, regular + spot, location, "; ".join(map(str, short)), remaining)
        await asyncio.sleep(min(QUOTA_POLL_SECONDS, remaining))
    waited = f" after waiting {wait:.0f} s" if wait > 0 else ""
    raise QuotaExceeded(
        f"Not enough quota in {location} for {regular} regular + {spot} spot {sku_name} "
        f"({sku.vcpus} vCPUs each){waited}: " + "; ".join(map(str, short)) +
        ". Request an increase (Azure portal: Subscriptions > Usage + quotas), ask for fewer "
        "instances, free capacity, or pass quota_wait to wait for it.", code="QuotaExceeded",
        fits=instances_that_fit(sku, found, regular=regular, spot=spot))
