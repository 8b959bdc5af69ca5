"""The local cloud's resource records (dataclasses persisted in the Store) and ARM ids."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from prefect_azmanagers.localcloud.sandbox import InstanceSpec

TERMINAL = {"Succeeded", "Failed", "Canceled"}


def utcnow_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class InstanceSandboxes(Protocol):
    """What the backend needs from SandboxHost (see docs/architecture.md, "Local cloud")."""

    def allocate(self, key: str) -> str: ...
    async def boot(self, spec: InstanceSpec) -> None: ...
    def post_scheduled_event(self, key: str, event: dict) -> None: ...
    def clear_scheduled_events(self, key: str) -> None: ...
    async def kill(self, key: str) -> None: ...
    async def drop_ssh(self, key: str) -> None: ...
    async def delete(self, key: str) -> None: ...
    def describe(self, key: str) -> dict: ...


def compute_prefix(subscription: str, resource_group: str) -> str:
    return f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Compute"


def network_prefix(subscription: str, resource_group: str) -> str:
    return f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Network"


@dataclass
class ScaleSet:
    name: str
    resource_group: str
    location: str
    sku: dict[str, Any]                 # name, tier, capacity (the target)
    properties: dict[str, Any]          # as sent, customData removed
    custom_data: str | None
    tags: dict[str, str]
    unique_id: str
    time_created: str
    id: str
    provisioning_state: str = "Creating"
    next_instance_id: int = 0
    identity: dict[str, str] | None = None  # SystemAssigned: principalId, clientId (members share it)
    generation: int = 1                 # Compute's etag ("\"1\"", one more per write)

    @property
    def orchestration_mode(self) -> str:
        return self.properties.get("orchestrationMode", "Uniform")

    @property
    def vm_profile(self) -> dict[str, Any]:
        return self.properties.get("virtualMachineProfile", {})


@dataclass
class Instance:
    """A VM: a Uniform scale set's instance (instance_id set) or a Flexible/standalone VM."""

    name: str
    id: str
    resource_group: str
    location: str
    vm_id: str
    computer_name: str
    admin_username: str
    public_keys: list[str]
    custom_data: str | None
    size: str
    priority: str                       # "Regular" | "Spot"
    eviction_policy: str | None
    max_price: float | None
    tags: dict[str, str]
    properties: dict[str, Any]          # VM properties as sent/derived, customData removed
    nic_ids: list[str]
    time_created: str
    scale_set_id: str | None = None
    instance_id: str | None = None      # Uniform only
    provisioning_state: str = "Creating"
    power_state: str = "starting"       # starting | running | stopped | deallocated | deleting
    error: dict[str, Any] | None = None
    identity: dict[str, str] | None = None  # SystemAssigned: principalId, clientId
    generation: int = 1                 # Compute's etag ("\"1\"", one more per write)

    @property
    def is_spot(self) -> bool:
        return self.priority == "Spot"


@dataclass
class Nic:
    name: str
    id: str
    resource_group: str
    location: str
    properties: dict[str, Any]
    tags: dict[str, str]
    resource_guid: str
    mac_address: str
    private_ip: str
    address_key: str                    # the sandbox allocation that holds private_ip
    virtual_machine_id: str | None = None
    scale_set_id: str | None = None     # set for a Uniform instance's NIC
    provisioning_state: str = "Succeeded"
    etag: str = field(default_factory=lambda: str(uuid.uuid4()))  # a new one on every write


@dataclass
class Operation:
    """An ARM long-running operation as its Azure-AsyncOperation URL reports it."""

    id: str
    name: str
    start_time: str = field(default_factory=utcnow_iso)
    status: str = "InProgress"
    end_time: str | None = None
    error: dict[str, Any] | None = None


@dataclass
class Faults:
    """Injected faults (admin API): each counter is consumed by the requests/LROs it hits."""

    throttle: int = 0
    throttle_retry_after: int = 1
    throttle_operation: str | None = None
    fail: int = 0
    fail_retry_after: int | None = None
    fail_operation: str | None = None
    allocation_failures: int = 0
    boot_failures: int = 0


def system_identity(body: dict[str, Any]) -> dict[str, str] | None:
    """A new SystemAssigned managed identity if the body asks for one (identity.type)."""
    if ((body.get("identity") or {}).get("type") or "None") != "SystemAssigned":
        return None
    return {"type": "SystemAssigned", "principalId": str(uuid.uuid4()), "clientId": str(uuid.uuid4())}


def creation_order(inst: Instance) -> tuple[int, str]:
    return (int(inst.instance_id) if inst.instance_id is not None else 0, inst.time_created)


def new_mac() -> str:
    return "00-0D-3A-" + "-".join(f"{b:02X}" for b in secrets.token_bytes(3))


def public_keys(os_profile: dict[str, Any]) -> list[str]:
    ssh = (os_profile.get("linuxConfiguration") or {}).get("ssh") or {}
    return [k["keyData"].strip() for k in ssh.get("publicKeys") or [] if k.get("keyData")]
