"""How instances are made: priority (spot and its mix with regular) and image overrides.

Declared once and shared: the task runner and `AzureCluster` take these as keywords
(`ClusterOptions` extends this class), and `ScaleSet` takes the object itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prefect_azmanagers.exceptions import ConfigurationError


@dataclass(frozen=True)
class ProvisioningOptions:
    """Priority and image of new instances (AzManagers' `addprocs` keywords of the same names).

    Attributes:
        spot: Spot priority (evictable, cheaper).
        max_price: the most to pay per hour for a spot instance; -1 pays up to the regular price.
        spot_base_regular_priority_count: with spot, this many instances stay regular.
        spot_regular_percentage_above_base: with spot, this percentage above the base is regular.
        os_disk_size: OS disk size in GB (the template's otherwise).
        image_name, image_version: a gallery image (or version of the template's) to boot.
    """

    spot: bool = False
    max_price: float = -1
    spot_base_regular_priority_count: int = 0
    spot_regular_percentage_above_base: int = 0
    os_disk_size: int | None = None
    image_name: str | None = None
    image_version: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spot, bool):
            raise ConfigurationError(f"spot must be True or False, got {self.spot!r}")
        if isinstance(self.max_price, bool) or not isinstance(self.max_price, (int, float)) \
                or not math.isfinite(self.max_price) or (self.max_price != -1 and self.max_price <= 0):
            raise ConfigurationError(
                f"max_price must be -1 (pay up to the regular price) or a positive price per "
                f"hour, got {self.max_price!r}")
        _whole("spot_regular_percentage_above_base", self.spot_regular_percentage_above_base, 0, 100)
        _whole("spot_base_regular_priority_count", self.spot_base_regular_priority_count, 0)
        if (self.spot_base_regular_priority_count or self.spot_regular_percentage_above_base) \
                and not self.spot:
            raise ConfigurationError(
                "A priority mix (spot_base_regular_priority_count / "
                "spot_regular_percentage_above_base) mixes spot with regular instances: pass "
                "spot=True too.")
        if self.max_price != -1 and not self.spot:
            raise ConfigurationError("max_price applies to spot instances only: pass spot=True too.")
        if self.os_disk_size is not None and (isinstance(self.os_disk_size, bool) or not (
                isinstance(self.os_disk_size, int) and 1 <= self.os_disk_size <= 4095)):
            raise ConfigurationError(
                f"os_disk_size must be a size in GB within 1..4095, got {self.os_disk_size!r}")
        for name in ("image_name", "image_version"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ConfigurationError(f"{name} must be a non-empty string or None, got {value!r}")

    @property
    def priority_mix(self) -> bool:
        """Spot mixed with regular instances (a Flexible scale set with priorityMixPolicy)."""
        return self.spot and (self.spot_base_regular_priority_count > 0
                              or self.spot_regular_percentage_above_base > 0)


def _whole(name: str, value: object, low: int, high: int | None = None) -> None:
    """ConfigurationError naming `name` and its range unless `value` is an int (not a bool)
    within low..high."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        allowed = f"within {low}..{high}" if high is not None else f">= {low}"
        raise ConfigurationError(f"{name} must be an integer {allowed}, got {value!r}")
