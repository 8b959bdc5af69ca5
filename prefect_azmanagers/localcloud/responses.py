"""The ARM HTTP layer: parse and validate requests, call the models, serialize ARM documents.

Each handler takes an `ArmRequest` (path parameters, query, JSON body, the endpoint's base URL)
and returns an `ArmResponse`; refusals are `ArmError`s. Validation is strict in the way ARM is:
every body key must be camelCase (a plain snake_case dict sent by mistake is refused with 400
InvalidParameter naming the member), required fields are named when missing, and customData is
accepted but never returned.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

from prefect_azmanagers.localcloud import exceptions as errors
from prefect_azmanagers.localcloud.models import Backend, Instance, Nic, Operation, ScaleSet, check_custom_data

_CAMEL = re.compile(r"^[a-z][a-zA-Z0-9]*$")
# Maps whose keys are user data, not schema members.
_FREE_FORM = {"tags", "userAssignedIdentities", "settings", "protectedSettings"}


@dataclass
class ArmRequest:
    method: str
    params: dict[str, str]              # path parameters from urls.py
    query: dict[str, str]               # query parameters, keys lower-cased
    body: Any
    base_url: str                       # scheme://host:port of the endpoint
    path: str
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased


@dataclass
class ArmResponse:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


# ----- validation -------------------------------------------------------------------------
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


def _body_dict(req: ArmRequest, type_name: str) -> dict[str, Any]:
    if not isinstance(req.body, dict):
        raise errors.ArmError(400, "InvalidRequestContent",
                              f"The request content was invalid and could not be deserialized: expected a JSON "
                              f"object for {type_name}.")
    check_members(req.body, "", type_name)
    return req.body


def _capacity(value: Any, path: str) -> int:
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
    _capacity(require(body, "sku").get("capacity", 0), "sku.capacity")
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


def check_preconditions(req: ArmRequest, current_etag: str | None) -> None:
    """If-Match / If-None-Match on a write, as Compute honours them: 412 PreconditionFailed when
    the resource's etag (None: it does not exist) does not meet them."""
    if_match, if_none_match = req.headers.get("if-match"), req.headers.get("if-none-match")
    met = True
    if if_match is not None:
        met = current_etag is not None and (if_match.strip() == "*" or if_match.strip() == current_etag)
    if if_none_match is not None and current_etag is not None:
        met = met and if_none_match.strip() not in ("*", current_etag)
    if not met:
        raise errors.ArmError(412, "PreconditionFailed",
                              "The condition specified using HTTP conditional header(s) is not met.")


# ----- serialization ----------------------------------------------------------------------
def _status(code: str, display: str, level: str = "Info", **extra: Any) -> dict[str, Any]:
    return {"code": code, "level": level, "displayStatus": display, **extra}


_POWER_DISPLAY = {"starting": "VM starting", "running": "VM running", "stopped": "VM stopped",
                  "deallocated": "VM deallocated"}


def instance_view(inst: Instance) -> dict[str, Any]:
    statuses = []
    if inst.power_state == "deleting":
        statuses.append(_status("ProvisioningState/deleting", "Deleting"))
    elif inst.provisioning_state == "Failed" and inst.error:
        statuses.append(_status(f"ProvisioningState/failed/{inst.error['code']}", "Provisioning failed",
                                "Error", message=inst.error["message"]))
    else:
        statuses.append(_status(f"ProvisioningState/{inst.provisioning_state.lower()}",
                                f"Provisioning {inst.provisioning_state.lower()}"))
    if inst.power_state in _POWER_DISPLAY:
        statuses.append(_status(f"PowerState/{inst.power_state}", _POWER_DISPLAY[inst.power_state]))
    statuses[0]["time"] = inst.time_created
    if inst.power_state == "running":
        agent = _status("ProvisioningState/succeeded", "Ready", message="GuestAgent is running and accepting new "
                                                                         "configurations.", time=inst.time_created)
    else:
        agent = _status("ProvisioningState/Unavailable", "Not Ready", "Warning", message="VM Agent is unresponsive.")
    os_name, os_version = _HOST_OS
    return {
        "platformUpdateDomain": 0, "platformFaultDomain": 0,
        "computerName": inst.computer_name, "osName": os_name, "osVersion": os_version,
        "vmAgent": {"vmAgentVersion": "localcloud", "statuses": [agent], "extensionHandlers": []},
        "disks": [{"name": f"{inst.name}_OsDisk_1", "statuses": [
            _status("ProvisioningState/succeeded", "Provisioning succeeded", time=inst.time_created)]}],
        "hyperVGeneration": "V2",
        "statuses": statuses,
    }


def _os_release() -> tuple[str, str]:
    """(ID, VERSION_ID) of this machine's OS: an instance runs the host's (Azure reports the image's)."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            fields[key] = value.strip().strip('"')
    return fields.get("ID", "linux"), fields.get("VERSION_ID", "")


_HOST_OS = _os_release()


def _provisioning_state(inst: Instance) -> str:
    return "Deleting" if inst.power_state == "deleting" else inst.provisioning_state


def identity_doc(identity: dict[str, str] | None, tenant_id: str) -> dict[str, Any]:
    """The `identity` member of a VM / scale set document (empty when it has none)."""
    if not identity:
        return {}
    return {"identity": {"type": identity["type"], "principalId": identity["principalId"], "tenantId": tenant_id}}


def instance_doc(inst: Instance, expand_view: bool, tenant_id: str) -> dict[str, Any]:
    """A VM document: a Uniform scale set VM or a standalone/Flexible VM."""
    network = {"networkInterfaces": [
        {"id": nic_id, "properties": {"primary": n == 0}} for n, nic_id in enumerate(inst.nic_ids)]}
    props: dict[str, Any] = {
        **{k: v for k, v in inst.properties.items() if k not in ("osProfile", "networkProfile")},
        "vmId": inst.vm_id,
        "provisioningState": _provisioning_state(inst),
        "timeCreated": inst.time_created,
        "hardwareProfile": {"vmSize": inst.size},
        "osProfile": {**{k: v for k, v in inst.properties.get("osProfile", {}).items() if k != "customData"},
                      "computerName": inst.computer_name, "adminUsername": inst.admin_username},
        "networkProfile": inst.properties.get("networkProfile") if inst.scale_set_id is None else network,
    }
    doc: dict[str, Any] = {"name": inst.name, "id": inst.id, "location": inst.location, "tags": inst.tags}
    if inst.instance_id is not None:
        doc |= {"instanceId": inst.instance_id, "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
                "sku": {"name": inst.size, "tier": "Standard"}}
        props["latestModelApplied"] = True
    else:
        doc["type"] = "Microsoft.Compute/virtualMachines"
        doc["etag"] = compute_etag(inst.generation)
        doc |= identity_doc(inst.identity, tenant_id)
        props["priority"] = inst.priority
        if inst.is_spot:
            props["evictionPolicy"] = inst.eviction_policy or "Deallocate"
            props["billingProfile"] = {"maxPrice": inst.max_price if inst.max_price is not None else -1}
        if inst.scale_set_id:
            props["virtualMachineScaleSet"] = {"id": inst.scale_set_id}
    if expand_view:
        props["instanceView"] = instance_view(inst)
    doc["properties"] = props
    return doc


def scale_set_doc(ss: ScaleSet, tenant_id: str) -> dict[str, Any]:
    return {
        "id": ss.id, "name": ss.name, "type": "Microsoft.Compute/virtualMachineScaleSets",
        "location": ss.location, "tags": ss.tags, "sku": dict(ss.sku), "etag": compute_etag(ss.generation),
        **identity_doc(ss.identity, tenant_id),
        "properties": {**ss.properties, "provisioningState": ss.provisioning_state,
                       "uniqueId": ss.unique_id, "timeCreated": ss.time_created,
                       "orchestrationMode": ss.orchestration_mode},
    }


def nic_doc(nic: Nic) -> dict[str, Any]:
    ip_configs = []
    for n, ipc in enumerate(nic.properties.get("ipConfigurations", [])):
        ip_props = {k: v for k, v in (ipc.get("properties") or {}).items()}
        ip_props |= {"privateIPAllocationMethod": ip_props.get("privateIPAllocationMethod", "Dynamic"),
                     "privateIPAddressVersion": "IPv4", "primary": n == 0, "provisioningState": "Succeeded"}
        if n == 0:
            ip_props["privateIPAddress"] = nic.private_ip
        ip_config = {"id": f"{nic.id}/ipConfigurations/{ipc['name']}", "name": ipc["name"], "etag": nic_etag(nic)}
        if nic.scale_set_id is None:
            ip_config["type"] = "Microsoft.Network/networkInterfaces/ipConfigurations"
        ip_configs.append(ip_config | {"properties": ip_props})
    props = {"dnsSettings": {"dnsServers": [], "appliedDnsServers": []}, "enableIPForwarding": False,
             "hostedWorkloads": [], "tapConfigurations": []}
    props |= {k: v for k, v in nic.properties.items() if k != "ipConfigurations"}
    props |= {"provisioningState": nic.provisioning_state, "resourceGuid": nic.resource_guid,
              "ipConfigurations": ip_configs, "macAddress": nic.mac_address,
              "primary": props.get("primary", True), "nicType": "Standard"}
    if nic.virtual_machine_id:
        props["virtualMachine"] = {"id": nic.virtual_machine_id}
    doc = {"id": nic.id, "name": nic.name, "etag": nic_etag(nic), "location": nic.location,
           "tags": nic.tags, "properties": props}
    if nic.scale_set_id is None:
        doc["type"] = "Microsoft.Network/networkInterfaces"
    return doc


def compute_etag(generation: int) -> str:
    """A Compute resource's etag: its write count, quoted ("1", "2", ...)."""
    return f'"{generation}"'


def nic_etag(nic: Nic) -> str:
    """A NIC's weak etag (Network's shape: W/"<guid>"), new after every write."""
    return f'W/"{nic.etag}"'


def operation_doc(op: Operation, provider: str) -> dict[str, Any]:
    """An Azure-AsyncOperation status: Compute's names the operation and its times, Network's is
    the status (and error) alone."""
    doc: dict[str, Any] = {"status": op.status}
    if provider.lower() == "microsoft.compute":
        doc = {"name": op.id, "startTime": op.start_time, **doc}
        if op.end_time:
            doc["endTime"] = op.end_time
    if op.error:
        doc["error"] = op.error
    return doc


# ----- handlers ---------------------------------------------------------------------------
class ArmResponses:
    """The handlers of every ARM operation (urls.py maps paths to them)."""

    def __init__(self, backend: Backend):
        self.backend = backend

    # LRO plumbing
    def _lro_headers(self, req: ArmRequest, op: Operation, provider: str, with_location: bool) -> dict[str, str]:
        config = self.backend.config
        base = f"{req.base_url}/subscriptions/{config.subscription_id}/providers/{provider}/locations/{config.location}"
        api = req.query.get("api-version", "")
        headers = {"Azure-AsyncOperation": f"{base}/operations/{op.id}?{urlencode({'api-version': api})}"}
        if with_location:
            headers["Location"] = f"{base}/operationResults/{op.id}?{urlencode({'api-version': api})}"
        elif provider == "Microsoft.Compute":
            headers["Azure-AsyncNotification"] = "Enabled"
        if config.lro_retry_after:
            headers["Retry-After"] = str(config.lro_retry_after)
        return headers

    def _operation(self, req: ArmRequest) -> Operation:
        op = self.backend.operations.get(req.params["operation"].lower())
        if op is None:
            raise errors.not_found(f"The operation '{req.params['operation']}' was not found.")
        return op

    def get_operation(self, req: ArmRequest) -> ArmResponse:
        op = self._operation(req)
        headers = {}
        if op.status not in ("Succeeded", "Failed", "Canceled") and self.backend.config.lro_retry_after:
            headers["Retry-After"] = str(self.backend.config.lro_retry_after)
        return ArmResponse(200, operation_doc(op, req.params["provider"]), headers)

    def get_operation_result(self, req: ArmRequest) -> ArmResponse:
        op = self._operation(req)
        if op.status == "InProgress":
            headers = {"Location": f"{req.base_url}{req.path}?{urlencode(req.query)}"}
            if self.backend.config.lro_retry_after:
                headers["Retry-After"] = str(self.backend.config.lro_retry_after)
            return ArmResponse(202, None, headers)
        if op.status == "Failed" and op.error:
            return ArmResponse(400, {"error": op.error})
        return ArmResponse(204)

    # paging
    def _page(self, req: ArmRequest, items: list[Any], render: Callable[[Any], dict]) -> ArmResponse:
        size = max(1, self.backend.config.page_size)
        token = req.query.get("$skiptoken", "0")
        if not token.isdigit():
            raise errors.invalid_parameter(f"The $skiptoken '{token}' is not valid.", "$skiptoken")
        start = int(token)
        page: dict[str, Any] = {"value": [render(x) for x in items[start:start + size]]}
        if start + size < len(items):
            query = {k: v for k, v in req.query.items() if k != "$skiptoken"} | {"$skiptoken": str(start + size)}
            page["nextLink"] = f"{req.base_url}{req.path}?{urlencode(query)}"
        return ArmResponse(200, page)

    def _rg(self, req: ArmRequest) -> str:
        return req.params["resource_group"]

    # scale sets
    def put_scale_set(self, req: ArmRequest) -> ArmResponse:
        body = _body_dict(req, "VirtualMachineScaleSet")
        validate_scale_set(body)
        check_preconditions(req, self._scale_set_etag(req))
        ss, op, created = self.backend.put_scale_set(self._rg(req), req.params["vmss"], body)
        return ArmResponse(201 if created else 200, scale_set_doc(ss, self.backend.tenant_id),
                           self._lro_headers(req, op, "Microsoft.Compute", with_location=False))

    def _scale_set_etag(self, req: ArmRequest) -> str | None:
        try:
            return compute_etag(self.backend.scale_set(self._rg(req), req.params["vmss"]).generation)
        except errors.ArmError:
            return None

    def get_scale_set(self, req: ArmRequest) -> ArmResponse:
        return ArmResponse(200, scale_set_doc(self.backend.scale_set(self._rg(req), req.params["vmss"]), self.backend.tenant_id))

    def list_scale_sets(self, req: ArmRequest) -> ArmResponse:
        rg = req.params.get("resource_group")
        items = [s for s in self.backend.scale_sets.values() if rg is None or s.resource_group.lower() == rg.lower()]
        return self._page(req, items, lambda s: scale_set_doc(s, self.backend.tenant_id))

    def patch_scale_set(self, req: ArmRequest) -> ArmResponse:
        body = _body_dict(req, "VirtualMachineScaleSetUpdate")
        check_shape(body, {"sku": {"capacity": (int,)}, "tags": {}})
        if (body.get("sku") or {}).get("capacity") is not None:
            _capacity(body["sku"]["capacity"], "sku.capacity")
        check_preconditions(req, self._scale_set_etag(req))
        ss, op = self.backend.patch_scale_set(self._rg(req), req.params["vmss"], body)
        return ArmResponse(200, scale_set_doc(ss, self.backend.tenant_id), self._lro_headers(req, op, "Microsoft.Compute", with_location=False))

    def delete_scale_set(self, req: ArmRequest) -> ArmResponse:
        try:
            op = self.backend.delete_scale_set(self._rg(req), req.params["vmss"])
        except errors.ArmError as exc:
            if exc.status == 404:
                return ArmResponse(204)
            raise
        return ArmResponse(202, None, self._lro_headers(req, op, "Microsoft.Compute", with_location=True))

    def delete_scale_set_instances(self, req: ArmRequest) -> ArmResponse:
        body = _body_dict(req, "VirtualMachineScaleSetVMInstanceRequiredIDs")
        ids = require(body, "instanceIds")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise errors.invalid_parameter("instanceIds must be a list of instance id strings.", "instanceIds")
        op = self.backend.delete_scale_set_instances(self._rg(req), req.params["vmss"], ids)
        return ArmResponse(202, None, self._lro_headers(req, op, "Microsoft.Compute", with_location=True))

    def scale_set_instance_view(self, req: ArmRequest) -> ArmResponse:
        ss = self.backend.scale_set(self._rg(req), req.params["vmss"])
        counts: dict[str, int] = {}
        for inst in self.backend.scale_set_members(ss):
            code = instance_view(inst)["statuses"][0]["code"]
            counts[code] = counts.get(code, 0) + 1
        return ArmResponse(200, {
            "virtualMachine": {"statusesSummary": [{"code": c, "count": n} for c, n in counts.items()]},
            "statuses": [_status(f"ProvisioningState/{ss.provisioning_state.lower()}",
                                 f"Provisioning {ss.provisioning_state.lower()}")],
        })

    def _uniform(self, req: ArmRequest) -> ScaleSet:
        ss = self.backend.scale_set(self._rg(req), req.params["vmss"])
        if ss.orchestration_mode != "Uniform":
            raise errors.ArmError(
                400, "OperationNotAllowed",
                f"This operation is not supported for the scale set '{ss.name}' with Flexible orchestration mode. "
                "List its VMs with virtualMachines.list and the $filter 'virtualMachineScaleSet/id' eq '<id>'.")
        return ss

    def list_scale_set_vms(self, req: ArmRequest) -> ArmResponse:
        ss = self._uniform(req)
        flt = req.query.get("$filter")
        members = self.backend.scale_set_members(ss)
        if flt:
            normalized = " ".join(flt.split()).lower()
            if normalized == "properties/latestmodelapplied eq false":
                members = []
            elif normalized not in ("properties/latestmodelapplied eq true",
                                    "startswith(instanceview/statuses/code, 'powerstate') eq true"):
                raise errors.invalid_parameter(
                    f"The $filter '{flt}' is not supported. Allowed: 'startswith(instanceView/statuses/code, "
                    "'PowerState') eq true', 'properties/latestModelApplied eq true|false'.", "$filter")
        expand = req.query.get("$expand", "").lower() == "instanceview" or \
            req.query.get("$select", "").lower().startswith("instanceview")
        return self._page(req, members, lambda i: instance_doc(i, expand, self.backend.tenant_id))

    def get_scale_set_vm(self, req: ArmRequest) -> ArmResponse:
        self._uniform(req)
        inst = self.backend.scale_set_vm(self._rg(req), req.params["vmss"], req.params["instance_id"])
        return ArmResponse(200, instance_doc(inst, req.query.get("$expand", "").lower() == "instanceview", self.backend.tenant_id))

    def scale_set_vm_instance_view(self, req: ArmRequest) -> ArmResponse:
        self._uniform(req)
        return ArmResponse(200, instance_view(
            self.backend.scale_set_vm(self._rg(req), req.params["vmss"], req.params["instance_id"])))

    def delete_scale_set_vm(self, req: ArmRequest) -> ArmResponse:
        self._uniform(req)
        op = self.backend.delete_scale_set_vm(self._rg(req), req.params["vmss"], req.params["instance_id"])
        return ArmResponse(202, None, self._lro_headers(req, op, "Microsoft.Compute", with_location=True))

    def simulate_scale_set_vm_eviction(self, req: ArmRequest) -> ArmResponse:
        self.backend.simulate_eviction(
            self.backend.scale_set_vm(self._rg(req), req.params["vmss"], req.params["instance_id"]))
        return ArmResponse(204)

    def list_scale_set_nics(self, req: ArmRequest) -> ArmResponse:
        ss = self._uniform(req)
        return self._page(req, self.backend.scale_set_nics(ss), nic_doc)

    # VMs
    def put_vm(self, req: ArmRequest) -> ArmResponse:
        body = _body_dict(req, "VirtualMachine")
        validate_vm(body)
        inst, op, created = self.backend.put_vm(self._rg(req), req.params["vm"], body)
        return ArmResponse(201 if created else 200, instance_doc(inst, False, self.backend.tenant_id),
                           self._lro_headers(req, op, "Microsoft.Compute", with_location=False))

    def get_vm(self, req: ArmRequest) -> ArmResponse:
        inst = self.backend.vm(self._rg(req), req.params["vm"])
        return ArmResponse(200, instance_doc(inst, req.query.get("$expand", "").lower() == "instanceview", self.backend.tenant_id))

    def vm_instance_view(self, req: ArmRequest) -> ArmResponse:
        return ArmResponse(200, instance_view(self.backend.vm(self._rg(req), req.params["vm"])))

    def delete_vm(self, req: ArmRequest) -> ArmResponse:
        try:
            op = self.backend.delete_vm(self._rg(req), req.params["vm"])
        except errors.ArmError as exc:
            if exc.status == 404:
                return ArmResponse(204)
            raise
        return ArmResponse(202, None, self._lro_headers(req, op, "Microsoft.Compute", with_location=True))

    def simulate_vm_eviction(self, req: ArmRequest) -> ArmResponse:
        self.backend.simulate_eviction(self.backend.vm(self._rg(req), req.params["vm"]))
        return ArmResponse(204)

    def list_vms(self, req: ArmRequest) -> ArmResponse:
        flt = req.query.get("$filter")
        scale_set_id = None
        if flt:
            match = re.fullmatch(r"\s*'virtualMachineScaleSet/id'\s+eq\s+'([^']+)'\s*", flt, re.IGNORECASE)
            if not match:
                raise errors.invalid_parameter(
                    f"The $filter '{flt}' is not supported. Allowed: 'virtualMachineScaleSet/id' eq '<scale set id>'.",
                    "$filter")
            scale_set_id = match.group(1)
        rg = req.params.get("resource_group")
        if rg is None:
            items = [i for i in self.backend.instances.values() if i.instance_id is None]
        else:
            items = self.backend.vms(rg, scale_set_id)
        expand = req.query.get("$expand", "").lower() == "instanceview"
        return self._page(req, items, lambda i: instance_doc(i, expand, self.backend.tenant_id))

    # NICs
    def put_nic(self, req: ArmRequest) -> ArmResponse:
        body = _body_dict(req, "NetworkInterface")
        validate_nic(body)
        nic, op, created = self.backend.put_nic(self._rg(req), req.params["nic"], body)
        return ArmResponse(201 if created else 200, nic_doc(nic),
                           self._lro_headers(req, op, "Microsoft.Network", with_location=False))

    def get_nic(self, req: ArmRequest) -> ArmResponse:
        doc = nic_doc(self.backend.nic(self._rg(req), req.params["nic"]))
        return ArmResponse(200, doc, {"ETag": doc["etag"]})

    def delete_nic(self, req: ArmRequest) -> ArmResponse:
        try:
            op = self.backend.delete_nic(self._rg(req), req.params["nic"])
        except errors.ArmError as exc:
            if exc.status == 404:
                return ArmResponse(204)
            raise
        return ArmResponse(202, None, self._lro_headers(req, op, "Microsoft.Network", with_location=True))

    def list_nics(self, req: ArmRequest) -> ArmResponse:
        return self._page(req, self.backend.nics_in_group(self._rg(req)), nic_doc)

    # subscription-level
    def list_usages(self, req: ArmRequest) -> ArmResponse:
        config = self.backend.config
        if req.params["location"].lower() != config.location.lower():
            raise errors.ArmError(404, "LocationNotAvailableForResourceType",
                                  f"The provided location '{req.params['location']}' is not available for resource "
                                  f"type 'Microsoft.Compute/locations/usages'. List of available regions for the "
                                  f"resource type is '{config.location}'.")
        used = self.backend.usage()
        labels = {"cores": "Total Regional vCPUs", "lowPriorityCores": "Total Regional Low-priority vCPUs",
                  "virtualMachines": "Virtual Machines", "virtualMachineScaleSets": "Virtual Machine Scale Sets"}
        items = [{"unit": "Count", "currentValue": used.get(name, 0), "limit": limit,
                  "name": {"value": name, "localizedValue": labels.get(name, f"{name} vCPUs")}}
                 for name, limit in config.quotas.items()]
        return self._page(req, items, lambda x: x)

    def list_skus(self, req: ArmRequest) -> ArmResponse:
        config = self.backend.config
        items = []
        for sku in config.skus:
            restrictions = [] if not sku.restricted else [{
                "type": "Location", "values": [config.location],
                "restrictionInfo": {"locations": [config.location]}, "reasonCode": "NotAvailableForSubscription"}]
            items.append({
                "resourceType": "virtualMachines", "name": sku.name, "tier": "Standard",
                "size": sku.name.split("_", 1)[-1], "family": sku.family, "locations": [config.location],
                "locationInfo": [{"location": config.location, "zones": [], "zoneDetails": []}],
                "capabilities": [{"name": "vCPUs", "value": str(sku.vcpus)},
                                 {"name": "MemoryGB", "value": f"{sku.memory_gb:g}"},
                                 {"name": "LowPriorityCapable", "value": str(sku.spot_capable)}],
                "restrictions": restrictions,
            })
        return self._page(req, items, lambda x: x)
