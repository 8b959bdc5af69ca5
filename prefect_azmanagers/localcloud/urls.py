"""Routing of ARM paths to handlers, case-insensitive as ARM is, named by REST operationId.

The operationId (e.g. `VirtualMachineScaleSets_CreateOrUpdate`) is what the request counters
and the admin API's per-operation faults use.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from prefect_azmanagers.localcloud.exceptions import ArmError

_SUB = r"/subscriptions/(?P<subscription>[^/]+)"
_RG = _SUB + r"/resourceGroups/(?P<resource_group>[^/]+)"
_C = _RG + r"/providers/Microsoft\.Compute"
_N = _RG + r"/providers/Microsoft\.Network"
_VMSS = _C + r"/virtualMachineScaleSets/(?P<vmss>[^/]+)"
_VMSS_VM = _VMSS + r"/virtualMachines/(?P<instance_id>[^/]+)"
_VM = _C + r"/virtualMachines/(?P<vm>[^/]+)"
_NIC = _N + r"/networkInterfaces/(?P<nic>[^/]+)"
_OPS = _SUB + r"/providers/(?P<provider>Microsoft\.(?:Compute|Network))/locations/(?P<location>[^/]+)"


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    operation: str        # REST operationId
    handler: str          # method name on responses.ArmResponses


_TABLE = [
    ("PUT", _VMSS, "VirtualMachineScaleSets_CreateOrUpdate", "put_scale_set"),
    ("GET", _VMSS, "VirtualMachineScaleSets_Get", "get_scale_set"),
    ("PATCH", _VMSS, "VirtualMachineScaleSets_Update", "patch_scale_set"),
    ("DELETE", _VMSS, "VirtualMachineScaleSets_Delete", "delete_scale_set"),
    ("GET", _C + r"/virtualMachineScaleSets", "VirtualMachineScaleSets_List", "list_scale_sets"),
    ("GET", _SUB + r"/providers/Microsoft\.Compute/virtualMachineScaleSets", "VirtualMachineScaleSets_ListAll",
     "list_scale_sets"),
    ("POST", _VMSS + r"/delete", "VirtualMachineScaleSets_DeleteInstances", "delete_scale_set_instances"),
    ("GET", _VMSS + r"/instanceView", "VirtualMachineScaleSets_GetInstanceView", "scale_set_instance_view"),
    ("GET", _VMSS + r"/virtualMachines", "VirtualMachineScaleSetVMs_List", "list_scale_set_vms"),
    ("GET", _VMSS_VM, "VirtualMachineScaleSetVMs_Get", "get_scale_set_vm"),
    ("DELETE", _VMSS_VM, "VirtualMachineScaleSetVMs_Delete", "delete_scale_set_vm"),
    ("GET", _VMSS_VM + r"/instanceView", "VirtualMachineScaleSetVMs_GetInstanceView", "scale_set_vm_instance_view"),
    ("POST", _VMSS_VM + r"/simulateEviction", "VirtualMachineScaleSetVMs_SimulateEviction",
     "simulate_scale_set_vm_eviction"),
    ("GET", _VMSS + r"/networkInterfaces", "NetworkInterfaces_ListVirtualMachineScaleSetNetworkInterfaces",
     "list_scale_set_nics"),
    ("PUT", _VM, "VirtualMachines_CreateOrUpdate", "put_vm"),
    ("GET", _VM, "VirtualMachines_Get", "get_vm"),
    ("DELETE", _VM, "VirtualMachines_Delete", "delete_vm"),
    ("GET", _VM + r"/instanceView", "VirtualMachines_InstanceView", "vm_instance_view"),
    ("POST", _VM + r"/simulateEviction", "VirtualMachines_SimulateEviction", "simulate_vm_eviction"),
    ("GET", _C + r"/virtualMachines", "VirtualMachines_List", "list_vms"),
    ("GET", _SUB + r"/providers/Microsoft\.Compute/virtualMachines", "VirtualMachines_ListAll", "list_vms"),
    ("PUT", _NIC, "NetworkInterfaces_CreateOrUpdate", "put_nic"),
    ("GET", _NIC, "NetworkInterfaces_Get", "get_nic"),
    ("DELETE", _NIC, "NetworkInterfaces_Delete", "delete_nic"),
    ("GET", _N + r"/networkInterfaces", "NetworkInterfaces_List", "list_nics"),
    ("GET", _SUB + r"/providers/Microsoft\.Compute/locations/(?P<location>[^/]+)/usages", "Usage_List",
     "list_usages"),
    ("GET", _SUB + r"/providers/Microsoft\.Compute/skus", "ResourceSkus_List", "list_skus"),
    ("GET", _OPS + r"/operations/(?P<operation>[^/]+)", "AsyncOperation_Get", "get_operation"),
    ("GET", _OPS + r"/operationResults/(?P<operation>[^/]+)", "OperationResult_Get", "get_operation_result"),
]

ROUTES = [Route(m, re.compile(p + r"/?", re.IGNORECASE), op, h) for m, p, op, h in _TABLE]


def match(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """The route and path parameters for a request, or None. A known path with another method
    returns the route with method "" so the caller can answer 405 rather than 404."""
    path_known = None
    for route in ROUTES:
        found = route.pattern.fullmatch(path)
        if found is None:
            continue
        if route.method == method:
            return route, found.groupdict()
        path_known = path_known or (Route("", route.pattern, route.operation, ""), found.groupdict())
    return path_known


NAMESPACES = ("microsoft.compute", "microsoft.network")
_API_VERSION = re.compile(r"(\d{4})-(\d{2})-(\d{2})(-preview)?")


def resource_type(path: str) -> tuple[str, str] | None:
    """(namespace, type) of an ARM path, e.g. ('Microsoft.Compute',
    'virtualMachineScaleSets/virtualMachines'); None for a path without a provider."""
    found = re.search(r"/providers/([^/]+)((?:/[^/]+)*)", path, re.IGNORECASE)
    if found is None:
        return None
    parts = [p for p in found.group(2).split("/") if p]
    return found.group(1), "/".join(parts[0::2])


def front_door(method: str, path: str, api_version: str | None, location: str) -> ArmError | None:
    """What ARM refuses before any provider sees the request (after authentication): a missing
    or unknown api-version, an unknown namespace or type, a method the path does not have."""
    if api_version is None:
        return ArmError(400, "MissingApiVersionParameter",
                        "The api-version query parameter (?api-version=) is required for all requests.")
    kind = resource_type(path)
    if kind is not None and kind[0].lower() not in NAMESPACES:
        return ArmError(400, "InvalidResourceNamespace", f"The resource namespace '{kind[0]}' is invalid.")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    known = _API_VERSION.fullmatch(api_version)
    if known is None or api_version[:10] > today:
        supported = f"YYYY-MM-DD or YYYY-MM-DD-preview, up to {today}"
        if kind is None:  # ARM's own resources (subscriptions, resource groups): no provider to name
            return ArmError(400, "InvalidApiVersionParameter", f"The api-version '{api_version}' is invalid. "
                                                               f"The supported versions are '{supported}'.")
        return ArmError(400, "NoRegisteredProviderFound",
                        f"No registered resource provider found for location '{location}' and API version "
                        f"'{api_version}' for type '{kind[1]}'. The supported api-versions are '{supported}'. "
                        f"The supported locations are '{location}'.")
    found = match(method, path)
    if found is None:
        if kind is None:
            return ArmError(404, "InvalidResourceType",
                            f"The resource type for '{method} {path}' could not be found.")
        return ArmError(400, "InvalidResourceType", f"The resource type '{kind[1]}' could not be found in the "
                                                    f"namespace '{kind[0]}' for api version '{api_version}'.")
    if not found[0].method:
        return ArmError(405, "MethodNotAllowed", f"The requested resource does not support http method '{method}'.")
    return None
