"""Quotas and SKUs: usage per quota name, the checks a create or grow must pass."""

from __future__ import annotations

from typing import Any

from prefect_azmanagers.localcloud import exceptions as errors
from prefect_azmanagers.localcloud.config import Sku
from prefect_azmanagers.localcloud.models.base import BackendBase


class Quotas(BackendBase):
    def usage(self) -> dict[str, int]:
        """Current usage per quota name (deallocated VMs do not count, as on Azure)."""
        used = {name: 0 for name in self.config.quotas}
        for inst in self.instances.values():
            if inst.power_state == "deallocated":
                continue
            sku = self.config.sku(inst.size)
            vcpus = sku.vcpus if sku else 0
            used["virtualMachines"] = used.get("virtualMachines", 0) + 1
            if inst.is_spot:
                used["lowPriorityCores"] = used.get("lowPriorityCores", 0) + vcpus
            else:
                used["cores"] = used.get("cores", 0) + vcpus
                if sku:
                    used[sku.family] = used.get(sku.family, 0) + vcpus
        used["virtualMachineScaleSets"] = len(self.scale_sets)
        return used

    def _check_quota(self, sku: Sku, regular: int, spot: int) -> None:
        used = self.usage()
        location = self.config.location
        asks: list[tuple[str, str, int]] = []
        if regular:
            asks += [(sku.family, f"{sku.family} Cores", regular * sku.vcpus),
                     ("cores", "Total Regional Cores", regular * sku.vcpus)]
        if spot:
            asks.append(("lowPriorityCores", "LowPriorityCores", spot * sku.vcpus))
        if regular + spot:
            asks.append(("virtualMachines", "Total Regional Virtual Machines", regular + spot))
        for name, label, required in asks:
            limit = self.config.quotas.get(name)
            if limit is not None and used.get(name, 0) + required > limit:
                raise errors.quota_exceeded(label, location, limit, used.get(name, 0), required)

    def _checked_sku(self, name: str, spot: bool) -> Sku:
        sku = self.config.sku(name)
        if sku is None or sku.restricted:
            raise errors.sku_not_available(name, self.config.location)
        if spot and not sku.spot_capable:
            raise errors.ArmError(
                409, "AzureSpotIsNotSupportedForThisVMSize",
                f"Azure Spot is not supported for the VM size '{sku.name}'. Choose a size that supports Spot "
                "(see the LowPriorityCapable capability of the resource SKUs).",
            )
        return sku


def check_max_price(profile: dict[str, Any]) -> None:
    """Refuse a maxPrice without Spot, or one that is neither -1 nor positive (as CRP does)."""
    max_price = (profile.get("billingProfile") or {}).get("maxPrice")
    if max_price is None:
        return
    if profile.get("priority") != "Spot":
        raise errors.invalid_parameter(
            "billingProfile.maxPrice can only be set when priority is Spot.", "billingProfile.maxPrice")
    if not (max_price == -1 or max_price > 0):
        raise errors.ArmError(
            400, "MaxPriceValueInvalid",
            f"The max price {max_price} is invalid: use -1 (never evict because of price) or a positive "
            "price in US dollars per hour.", target="billingProfile.maxPrice",
        )
