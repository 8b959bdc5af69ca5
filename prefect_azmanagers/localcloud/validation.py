"""ARM's strict request validation: camelCase members only, JSON types of the members the local
cloud reads, required members named when missing (400 InvalidParameter with the path), and the
rules of the Spot, identity and orchestration fields."""

from __future__ import annotations

import re
from typing import Any

from prefect_azmanagers.localcloud import exceptions as errors
from prefect_azmanagers.localcloud.models import check_custom_data

_CAMEL = re.compile(r"^[a-z][a-zA-Z0-9]*$")
# Maps whose keys are user data, not schema members.
_FREE_FORM = {"tags", "userAssignedIdentities", "settings", "protectedSettings"}


def check_members(doc: Any, path: str, type_name: str) -> None:
    """Refuse any non-camelCase member anywhere in the body (outside free-form maps)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            member_path = f"{path}.{key}" if path else key
            if not isinstance(key, str) or not _CAMEL.match(key):
                raise errors.unknown_member(member_path, type_name)
            if key not in _FREE_FORM:
                check_members(value, member_path, type_name)
    elif isinstance(doc, list):
        for n, item in enumerate(doc):
            check_members(item, f"{path}[{n}]", type_name)


def require(doc: Any, path: str) -> Any:
    """The value at a dotted path of the body; 400 naming the path if absent."""
    value = doc
    for part in path.split("."):
        if not isinstance(value, dict) or value.get(part) in (None, "", [], {}):
            raise errors.missing_parameter(path)
        value = value[part]
    return value


def check_capacity(value: Any, path: str) -> int:
    """A scale set capacity: a non-negative integer (400 InvalidParameter otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.invalid_parameter(f"The value {value!r} of parameter '{path}' is not a non-negative integer.", path)
    return value


# The shapes of the members the local cloud reads (others are only checked for camelCase).
# A dict is an object's members, [x] a list of x, a type (tuple) a leaf.
_STR, _NUM, _BOOL = (str,), (int, float), (bool,)
_OS_PROFILE = {
    "computerNamePrefix": _STR, "computerName": _STR, "adminUsername": _STR, "customData": _STR,
    "linuxConfiguration": {"disablePasswordAuthentication": _BOOL,
                           "ssh": {"publicKeys": [{"path": _STR, "keyData": _STR}]}},
}
_SPOT = {"priority": _STR, "evictionPolicy": _STR, "billingProfile": {"maxPrice": _NUM}}
_IP_CONFIG = {"name": _STR, "properties": {"subnet": {"id": _STR}, "primary": _BOOL}}
_TOP = {"location": _STR, "tags": {}, "identity": {"type": _STR}}
SCALE_SET_SHAPE = {
    **_TOP,
    "sku": {"name": _STR, "tier": _STR, "capacity": (int,)},
    "properties": {
        "orchestrationMode": _STR,
        "priorityMixPolicy": {"baseRegularPriorityCount": (int,), "regularPriorityPercentageAboveBase": (int,)},
        "virtualMachineProfile": {
            **_SPOT,
            "osProfile": _OS_PROFILE,
            "storageProfile": {"imageReference": {}},
            "networkProfile": {"networkInterfaceConfigurations": [
                {"name": _STR, "properties": {"primary": _BOOL, "enableAcceleratedNetworking": _BOOL,
                                              "ipConfigurations": [_IP_CONFIG]}}]},
        },
    },
}
VM_SHAPE = {
    **_TOP,
    "properties": {
        **_SPOT,
        "hardwareProfile": {"vmSize": _STR},
        "osProfile": _OS_PROFILE,
        "storageProfile": {"imageReference": {}},
        "networkProfile": {"networkInterfaces": [{"id": _STR, "properties": {"deleteOption": _STR, "primary": _BOOL}}]},
    },
}
NIC_SHAPE = {**_TOP, "properties": {"enableAcceleratedNetworking": _BOOL, "ipConfigurations": [_IP_CONFIG]}}


def check_shape(doc: Any, shape: Any, path: str = "") -> None:
    """Refuse a member whose JSON type differs from what ARM expects (present members only)."""
    def refuse(expected: str) -> None:
        raise errors.invalid_parameter(
            f"The value of parameter '{path}' must be {expected}, not {type(doc).__name__} {doc!r:.40}.", path)

    if doc is None:
        return
    if isinstance(shape, dict):
        if not isinstance(doc, dict):
            refuse("an object")
        for key, sub in shape.items():
            check_shape(doc.get(key), sub, f"{path}.{key}" if path else key)
        if path.endswith("tags") and not all(isinstance(v, str) for v in doc.values()):
            refuse("an object of string values")
    elif isinstance(shape, list):
        if not isinstance(doc, list):
            refuse("an array")
        for n, item in enumerate(doc):
            check_shape(item, shape[0], f"{path}[{n}]")
    elif not isinstance(doc, shape) or (bool not in shape and isinstance(doc, bool)):
        refuse(" or ".join(t.__name__ for t in shape))


def _check_os_profile(os_profile: dict[str, Any], path: str) -> None:
    keys = ((os_profile.get("linuxConfiguration") or {}).get("ssh") or {}).get("publicKeys") or []
    for n, key in enumerate(keys):
        if not key.get("keyData"):
            raise errors.missing_parameter(f"{path}.linuxConfiguration.ssh.publicKeys[{n}].keyData")
    if "customData" in os_profile:
        check_custom_data(os_profile["customData"], f"{path}.customData")


def _check_identity(body: dict[str, Any]) -> None:
    kind = (body.get("identity") or {}).get("type")
    if kind not in (None, "None", "SystemAssigned"):
        raise errors.invalid_parameter(
            f"The identity type '{kind}' is not supported by the local cloud: use 'SystemAssigned' or 'None' "
            "(user-assigned identities need Microsoft.ManagedIdentity, which it does not model).", "identity.type")


def validate_scale_set(body: dict[str, Any]) -> None:
    check_shape(body, SCALE_SET_SHAPE)
    _check_identity(body)
    require(body, "location")
    require(body, "sku.name")
    check_capacity(require(body, "sku").get("capacity", 0), "sku.capacity")
    profile = require(body, "properties.virtualMachineProfile")
    base = "properties.virtualMachineProfile"
    require(body, f"{base}.osProfile.computerNamePrefix")
    require(body, f"{base}.osProfile.adminUsername")
    require(body, f"{base}.storageProfile.imageReference")
    configs = require(body, f"{base}.networkProfile.networkInterfaceConfigurations")
    for n, config in enumerate(configs):
        where = f"{base}.networkProfile.networkInterfaceConfigurations[{n}]"
        if not config.get("name"):
            raise errors.missing_parameter(f"{where}.name")
        ip_configs = (config.get("properties") or {}).get("ipConfigurations")
        if not ip_configs:
            raise errors.missing_parameter(f"{where}.properties.ipConfigurations")
        for m, ip_config in enumerate(ip_configs):
            if not ip_config.get("name"):
                raise errors.missing_parameter(f"{where}.properties.ipConfigurations[{m}].name")
    _check_os_profile(profile["osProfile"], f"{base}.osProfile")
    mode = body["properties"].get("orchestrationMode") or "Uniform"
    if mode not in ("Uniform", "Flexible"):
        raise errors.invalid_parameter(f"orchestrationMode '{mode}' is not Uniform or Flexible.", "properties.orchestrationMode")
    mix = body["properties"].get("priorityMixPolicy")
    if mix and mode != "Flexible":
        raise errors.invalid_parameter(
            "priorityMixPolicy is only supported for scale sets with Flexible orchestration mode.",
            "properties.priorityMixPolicy")
    if mix and not 0 <= (mix.get("regularPriorityPercentageAboveBase") or 0) <= 100:
        raise errors.invalid_parameter("regularPriorityPercentageAboveBase must be between 0 and 100.",
                                       "properties.priorityMixPolicy.regularPriorityPercentageAboveBase")
    if mix and (mix.get("baseRegularPriorityCount") or 0) < 0:
        raise errors.invalid_parameter("baseRegularPriorityCount must not be negative.",
                                       "properties.priorityMixPolicy.baseRegularPriorityCount")
    _check_priority(profile, base)


def _check_priority(props: dict[str, Any], base: str) -> None:
    priority = props.get("priority") or "Regular"
    if priority not in ("Regular", "Spot", "Low"):
        raise errors.invalid_parameter(f"priority '{priority}' is not Regular, Low or Spot.", f"{base}.priority")
    policy = props.get("evictionPolicy")
    if policy is not None and policy not in ("Delete", "Deallocate"):
        raise errors.invalid_parameter(f"evictionPolicy '{policy}' is not Delete or Deallocate.", f"{base}.evictionPolicy")
    if policy is not None and priority != "Spot":
        raise errors.invalid_parameter("evictionPolicy can only be set when priority is Spot.", f"{base}.evictionPolicy")


def validate_vm(body: dict[str, Any]) -> None:
    check_shape(body, VM_SHAPE)
    _check_identity(body)
    require(body, "location")
    require(body, "properties.hardwareProfile.vmSize")
    require(body, "properties.storageProfile.imageReference")
    require(body, "properties.osProfile.computerName")
    require(body, "properties.osProfile.adminUsername")
    refs = require(body, "properties.networkProfile.networkInterfaces")
    for n, ref in enumerate(refs):
        if not ref.get("id"):
            raise errors.missing_parameter(f"properties.networkProfile.networkInterfaces[{n}].id")
    _check_os_profile(body["properties"]["osProfile"], "properties.osProfile")
    _check_priority(body["properties"], "properties")


def validate_nic(body: dict[str, Any]) -> None:
    check_shape(body, NIC_SHAPE)
    require(body, "location")
    ipcs = require(body, "properties.ipConfigurations")
    for n, ipc in enumerate(ipcs):
        if not ipc.get("name"):
            raise errors.missing_parameter(f"properties.ipConfigurations[{n}].name")
        if not ((ipc.get("properties") or {}).get("subnet") or {}).get("id"):
            raise errors.missing_parameter(f"properties.ipConfigurations[{n}].properties.subnet.id")
