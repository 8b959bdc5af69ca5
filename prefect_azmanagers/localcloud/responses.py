"""The ARM HTTP layer: parse and validate requests, call the models, serialize ARM documents.

Each handler takes an `ArmRequest` (path parameters, query, JSON body, headers, the endpoint's base
URL) and returns an `ArmResponse`; refusals are `ArmError`s. Validation (validation.py) is strict in
the way ARM is: every body key must be camelCase (a plain snake_case dict sent by mistake is
refused with 400 InvalidParameter naming the member), required fields are named when missing, and
customData is accepted but never returned (documents.py renders the resources).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlencode

from prefect_azmanagers.localcloud import exceptions as errors
from prefect_azmanagers.localcloud.documents import (compute_etag, instance_doc, instance_view, nic_doc,
                                                     operation_doc, scale_set_doc, status_entry)
from prefect_azmanagers.localcloud.models import Backend, Operation, ScaleSet
from prefect_azmanagers.localcloud.validation import (check_capacity, check_members, check_shape, require,
                                                      validate_nic, validate_scale_set, validate_vm)


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


def _body_dict(req: ArmRequest, type_name: str) -> dict[str, Any]:
    if not isinstance(req.body, dict):
        raise errors.ArmError(400, "InvalidRequestContent",
                              f"The request content was invalid and could not be deserialized: expected a JSON "
                              f"object for {type_name}.")
    check_members(req.body, "", type_name)
    return req.body


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


# ----- handlers ---------------------------------------------------------------------------
class ArmResponses:
    """The handlers of every ARM operation (urls.py maps paths to them)."""

    def __init__(self, backend: Backend):
        self.backend = backend

    # LRO plumbing
    def _lro_headers(self, req: ArmRequest, op: Operation, provider: str, *, with_location: bool,
                     notify: bool) -> dict[str, str]:
        """Azure-AsyncOperation (and for DELETE/POST a Location) of a running write, as each provider
        words them: Compute's Location is the operation URL with `monitor=true`, Network's an
        operationResults URL. `notify`: Azure-AsyncNotification, which the recordings show on
        writes of top-level resources only (not on child resources or POST actions)."""
        config = self.backend.config
        base = f"{req.base_url}/subscriptions/{config.subscription_id}/providers/{provider}/locations/{config.location}"
        api = urlencode({'api-version': req.query.get("api-version", "")})
        headers = {"Azure-AsyncOperation": f"{base}/operations/{op.id}?{api}"}
        if with_location:
            headers["Location"] = (f"{base}/operations/{op.id}?monitor=true&{api}" if provider == "Microsoft.Compute"
                                   else f"{base}/operationResults/{op.id}?{api}")
        if notify:
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
        """The operation's status document, or with `monitor=true` (Compute's Location URL) its
        result: 200 with no body once done."""
        if req.query.get("monitor", "").lower() == "true":
            return self._operation_result(req, done_status=200)
        op = self._operation(req)
        headers = {}
        if op.status not in ("Succeeded", "Failed", "Canceled") and self.backend.config.lro_retry_after:
            headers["Retry-After"] = str(self.backend.config.lro_retry_after)
        return ArmResponse(200, operation_doc(op, req.params["provider"]), headers)

    def get_operation_result(self, req: ArmRequest) -> ArmResponse:
        """Network's Location URL (operationResults): 204 once done."""
        return self._operation_result(req, done_status=204)

    def _operation_result(self, req: ArmRequest, done_status: int) -> ArmResponse:
        op = self._operation(req)
        if op.status == "InProgress":
            headers = {"Location": f"{req.base_url}{req.path}?{urlencode(req.query)}"}
            if self.backend.config.lro_retry_after:
                headers["Retry-After"] = str(self.backend.config.lro_retry_after)
            return ArmResponse(202, None, headers)
        if op.status == "Failed" and op.error:
            return ArmResponse(400, {"error": op.error})
        return ArmResponse(done_status)

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
                           self._lro_headers(req, op, "Microsoft.Compute", with_location=False, notify=True))

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
            check_capacity(body["sku"]["capacity"], "sku.capacity")
        check_preconditions(req, self._scale_set_etag(req))
        ss, op = self.backend.patch_scale_set(self._rg(req), req.params["vmss"], body)
        return ArmResponse(200, scale_set_doc(ss, self.backend.tenant_id),
                           self._lro_headers(req, op, "Microsoft.Compute", with_location=False, notify=True))

    def delete_scale_set(self, req: ArmRequest) -> ArmResponse:
        try:
            op = self.backend.delete_scale_set(self._rg(req), req.params["vmss"])
        except errors.ArmError as exc:
            if exc.status == 404:
                return ArmResponse(204)
            raise
        return ArmResponse(202, None, self._lro_headers(req, op, "Microsoft.Compute", with_location=True, notify=True))

    def delete_scale_set_instances(self, req: ArmRequest) -> ArmResponse:
        body = _body_dict(req, "VirtualMachineScaleSetVMInstanceRequiredIDs")
        ids = require(body, "instanceIds")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise errors.invalid_parameter("instanceIds must be a list of instance id strings.", "instanceIds")
        op = self.backend.delete_scale_set_instances(self._rg(req), req.params["vmss"], ids)
        return ArmResponse(202, None, self._lro_headers(req, op, "Microsoft.Compute", with_location=True, notify=False))

    def scale_set_instance_view(self, req: ArmRequest) -> ArmResponse:
        ss = self.backend.scale_set(self._rg(req), req.params["vmss"])
        counts: dict[str, int] = {}
        for inst in self.backend.scale_set_members(ss):
            code = instance_view(inst)["statuses"][0]["code"]
            counts[code] = counts.get(code, 0) + 1
        return ArmResponse(200, {
            "virtualMachine": {"statusesSummary": [{"code": c, "count": n} for c, n in counts.items()]},
            "statuses": [status_entry(f"ProvisioningState/{ss.provisioning_state.lower()}",
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
        return ArmResponse(202, None, self._lro_headers(req, op, "Microsoft.Compute", with_location=True, notify=False))

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
                           self._lro_headers(req, op, "Microsoft.Compute", with_location=False, notify=True))

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
        return ArmResponse(202, None, self._lro_headers(req, op, "Microsoft.Compute", with_location=True, notify=True))

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
                           self._lro_headers(req, op, "Microsoft.Network", with_location=False, notify=True))

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
        return ArmResponse(202, None, self._lro_headers(req, op, "Microsoft.Network", with_location=True, notify=False))

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
