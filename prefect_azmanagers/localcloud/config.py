"""The local cloud's configuration: identity, SKUs, quotas and tunables, from `config.json`.

The file lives in the state directory; on first start the defaults below are written there so
a user can see and edit them (restart to apply). Unknown keys are refused with the file's path,
so a typo does not silently fall back to a default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"


@dataclass
class Sku:
    """A VM size: its quota family, vCPUs, memory; `restricted` sizes answer SkuNotAvailable."""

    name: str
    family: str
    vcpus: int
    memory_gb: float
    spot_capable: bool = True
    restricted: bool = False


def _default_skus() -> list[Sku]:
    return [
        Sku("Standard_B1s", "standardBSFamily", 1, 1),
        Sku("Standard_B2s", "standardBSFamily", 2, 4),
        Sku("Standard_D2s_v3", "standardDSv3Family", 2, 8),
        Sku("Standard_D4s_v3", "standardDSv3Family", 4, 16),
        Sku("Standard_D8s_v3", "standardDSv3Family", 8, 32),
        Sku("Standard_F2s_v2", "standardFSv2Family", 2, 4),
        Sku("Standard_HB120rs_v3", "standardHBrsv3Family", 120, 448, spot_capable=False),
        Sku("Standard_NC6", "standardNCFamily", 6, 56, restricted=True),
    ]


def _default_quotas() -> dict[str, int]:
    return {
        "cores": 256,
        "lowPriorityCores": 128,
        "virtualMachines": 1000,
        "virtualMachineScaleSets": 100,
        "standardBSFamily": 32,
        "standardDSv3Family": 128,
        "standardFSv2Family": 64,
        "standardHBrsv3Family": 240,
        "standardNCFamily": 0,
    }


@dataclass
class LocalCloudConfig:
    """Everything tunable about the local cloud (see the module docstring for where it lives)."""

    subscription_id: str = "5eb1c0ad-0000-4000-8000-10ca1c10d000"
    resource_group: str = "localcloud-rg"
    location: str = "southcentralus"
    network: str | None = None        # "isolated" (root) | "loopback"; None: isolated as root
    address_block: str = "10.213.0.0/16"     # isolated mode: instances' private addresses
    loopback_block: str = "127.213.0.0/16"   # loopback mode: instances' 127.x.y.z addresses
    loopback_ssh_port: int = 2222            # loopback mode: every instance's SSH port
    loopback_imds_port: int = 8254           # loopback mode: every instance's IMDS port
    skus: list[Sku] = field(default_factory=_default_skus)
    quotas: dict[str, int] = field(default_factory=_default_quotas)
    page_size: int = 100              # items per page of every list operation
    lro_retry_after: int = 1          # Retry-After of async operations (0 = let the client decide)
    eviction_notice: float = 30.0     # seconds between a Preempt event and the eviction
    boot_delay: float = 0.0           # seconds every instance waits before its sshd starts

    def sku(self, name: str) -> Sku | None:
        """The SKU of that name (case-insensitive, as ARM), or None."""
        for sku in self.skus:
            if sku.name.lower() == name.lower():
                return sku
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str) -> "LocalCloudConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}")
        doc = dict(doc)
        if "skus" in doc:
            try:
                doc["skus"] = [Sku(**s) for s in doc["skus"]]
            except TypeError as exc:
                raise ValueError(f"{source}: malformed 'skus' entry: {exc}") from exc
        return cls(**doc)


def load_config(state_dir: Path) -> LocalCloudConfig:
    """Read `state_dir/config.json`, writing the defaults there first if it does not exist."""
    path = state_dir / CONFIG_FILE
    if not path.exists():
        config = LocalCloudConfig()
        path.write_text(json.dumps(config.to_json(), indent=2) + "\n")
        return config
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix it or delete it for the defaults") from exc
    return LocalCloudConfig.from_json(doc, str(path))
