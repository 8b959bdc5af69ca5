"""Spot with a regular fallback: a spot scale set and, behind it, a regular-priority one that
new instances go to once the cluster has fallen back (after repeated evictions).

Uniform scale sets cannot change priority after creation, so the fallback is a second scale
set, `<name>-regular`, made from the same template on its first grow. Both are listed as one:
the regular set's instance ids read `regular/<id>` so that a deletion reaches the right set.
It offers what membership needs (`cluster.membership.ScaleSetLike`) plus `fall_back()`.
"""

from __future__ import annotations

import dataclasses
import logging

from prefect_azmanagers.azure.scaleset import Instance, ScaleSet

logger = logging.getLogger("prefect_azmanagers.azure")

REGULAR_PREFIX = "regular/"


class SpotWithFallback:
    """Grows into `spot` until `fall_back()`, then into `regular`."""

    def __init__(self, spot: ScaleSet, regular: ScaleSet):
        self.spot, self.regular = spot, regular
        self.fallen_back = False
        self.resource_group = spot.resource_group
        self.name = spot.name

    def fall_back(self) -> None:
        self.fallen_back = True

    @property
    def pending_grows(self) -> int:
        return self.spot.pending_grows + self.regular.pending_grows

    async def instances(self) -> list[Instance]:
        listed = await self.spot.instances()
        if self.fallen_back:
            listed += [dataclasses.replace(i, instance_id=REGULAR_PREFIX + i.instance_id)
                       for i in await self.regular.instances()]
        return listed

    async def grow(self, count: int) -> None:
        await (self.regular if self.fallen_back else self.spot).grow(count)

    async def delete_instances(self, instance_ids: list[str]) -> list[str]:
        regular = [i[len(REGULAR_PREFIX):] for i in instance_ids if i.startswith(REGULAR_PREFIX)]
        spot = [i for i in instance_ids if not i.startswith(REGULAR_PREFIX)]
        gone = await self.spot.delete_instances(spot)
        return gone + [REGULAR_PREFIX + i for i in await self.regular.delete_instances(regular)]

    async def simulate_eviction(self, instance_id: str) -> None:
        if instance_id.startswith(REGULAR_PREFIX):
            await self.regular.simulate_eviction(instance_id[len(REGULAR_PREFIX):])
        else:
            await self.spot.simulate_eviction(instance_id)

    async def delete_if_empty(self) -> bool:
        spot = await self.spot.delete_if_empty()
        regular = await self.regular.delete_if_empty()
        return spot and regular

    async def close(self) -> None:
        await self.spot.close()
        await self.regular.close()
