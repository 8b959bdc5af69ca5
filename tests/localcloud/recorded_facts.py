"""Facts about real Azure responses, copied (field names, codes, shapes; not the files) from
recorded traffic and the REST specs' examples, each naming the file it came from. PAIRS are
request/response pairs replayed against the local cloud through the real sync and aio SDK
clients (test_conformance.py); the other facts feed its scenario tests.

A response shape is a dict of the members that must be there: a value is compared exactly,
ANY accepts any value, ABSENT requires the member to be missing, a compiled pattern must match
the whole string, EACH(shape) applies a shape to every element of a list. In strings and patterns,
{rg}, {vmss}, {instance}, {nic}, {location} and {sub} stand for the resources under test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

ANY = object()
ABSENT = object()


@dataclass(frozen=True)
class EACH:
    shape: Any


# ----- sources ----------------------------------------------------------------------------------
_PY = "Azure/azure-sdk-for-python sdk/"
COMPUTE_RECORDING = _PY + "compute/azure-mgmt-compute/tests/recordings/test_mgmt_compute_vmss.test_compute_vmss_vm.yaml"
NETWORK_RECORDING = _PY + "network/azure-mgmt-network/tests/recordings/test_mgmt_network.test_network_interface_card.yaml"
# an unscrubbed Compute GET (the python recordings drop the id, correlation and read-budget headers)
JS_COMPUTE_GET = ("Azure/azure-sdk-for-js sdk/compute/arm-compute-v2/recordings/node/my_test/"
                  "recording_availability_get_test.js")
_COMPUTE_EXAMPLES = ("Azure/azure-rest-api-specs specification/compute/resource-manager/Microsoft.Compute/"
                     "ComputeRP/stable/2024-07-01/examples/")
VM_INSTANCE_VIEW_EXAMPLE = _COMPUTE_EXAMPLES + "virtualMachineExamples/VirtualMachine_Get_InstanceView.json"
VM_GET_EXAMPLE = _COMPUTE_EXAMPLES + "virtualMachineExamples/VirtualMachine_Get.json"
VMSS_VM_GET_EXAMPLE = _COMPUTE_EXAMPLES + "virtualMachineScaleSetExamples/VirtualMachineScaleSetVM_Get_WithVMSizeProperties.json"
NIC_GET_EXAMPLE = ("Azure/azure-rest-api-specs specification/network/resource-manager/Microsoft.Network/stable/"
                   "2024-05-01/examples/NetworkInterfaceGet.json")
NESTED_TYPE_ISSUES = "Azure/azure-sdk-for-python issues #798 and #32029 (NoRegisteredProviderFound quoted)"
NO_PROVIDER_DOC = ("MicrosoftDocs/azure-docs articles/azure-resource-manager/troubleshooting/"
                   "error-register-resource-provider.md")
BAD_API_VERSION_ISSUES = "Azure/azure-cli issue #28038, Azure/azure-sdk-for-python issue #975 (quoted)"
BAD_NAMESPACE_ISSUES = "Azure/ResourceModules issue #456, Azure/aci-connector-k8s issue #13 (quoted)"
UNVERIFIED = "unverified: no recording or example found"

# ----- headers ----------------------------------------------------------------------------------
# On every ARM response. Ids and the read budget: JS_COMPUTE_GET; the rest on every interaction of
# COMPUTE_RECORDING and NETWORK_RECORDING.
EVERY_RESPONSE_HEADERS = {
    "x-ms-request-id": ANY, "x-ms-correlation-request-id": ANY, "x-ms-routing-request-id": ANY,
    "cache-control": "no-cache", "pragma": "no-cache", "expires": "-1",
    "x-content-type-options": "nosniff", "strict-transport-security": "max-age=31536000; includeSubDomains",
}
# JS_COMPUTE_GET: "SOUTHEASTASIA:20210310T082533Z:<the correlation id>"
ROUTING_ID = re.compile(r"[A-Z]+:\d{8}T\d{6}Z:(?P<correlation>[0-9a-f-]{36})")
# the subscription's budget by method: reads JS_COMPUTE_GET; writes (PUT, POST) and deletes both
# python recordings ("x-ms-ratelimit-remaining-subscription-deletes: '14999'" on VMSS DELETE)
BUDGET_HEADERS = {"GET": "x-ms-ratelimit-remaining-subscription-reads",
                  "PUT": "x-ms-ratelimit-remaining-subscription-writes",
                  "POST": "x-ms-ratelimit-remaining-subscription-writes",
                  "DELETE": "x-ms-ratelimit-remaining-subscription-deletes"}


def compute_budget(policy: str) -> re.Pattern[str]:
    """x-ms-ratelimit-remaining-resource of a Compute answer (COMPUTE_RECORDING, e.g.
    'Microsoft.Compute/GetVMScaleSetVM3Min;997,Microsoft.Compute/GetVMScaleSetVM30Min;4997')."""
    return re.compile(rf"Microsoft\.Compute/{policy}3Min;\d+,Microsoft\.Compute/{policy}30Min;\d+")


NETWORK_SERVICE_ID = "x-ms-arm-service-request-id"  # every Network answer of both recordings

# ----- long-running operations (COMPUTE_RECORDING unless said otherwise) -----------------------
_OPS = r"https://[^/]+/subscriptions/[^/]+/providers/{provider}/locations/{location}/"
COMPUTE_ASYNC_OPERATION = re.compile(_OPS.format(provider=r"Microsoft\.Compute", location="{location}")
                                     + r"operations/[0-9a-f-]{36}\?api-version=[0-9a-z-]+")
# DELETE and POST actions (restart, powerOff, start, deallocate, POST /delete, VMSS-VM and VMSS DELETE)
COMPUTE_LOCATION = re.compile(_OPS.format(provider=r"Microsoft\.Compute", location="{location}")
                              + r"operations/[0-9a-f-]{36}\?monitor=true&api-version=[0-9a-z-]+")
COMPUTE_MONITOR_DONE = 200       # ... and that URL answers 200 with an empty body once done
COMPUTE_OPERATION_MEMBERS = {"startTime", "status", "name"}  # + endTime once done
NETWORK_ASYNC_OPERATION = re.compile(_OPS.format(provider=r"Microsoft\.Network", location="{location}")
                                     + r"operations/[0-9a-f-]{36}\?api-version=[0-9a-z-]+")
# NETWORK_RECORDING, NIC DELETE -> 202
NETWORK_LOCATION = re.compile(_OPS.format(provider=r"Microsoft\.Network", location="{location}")
                              + r"operationResults/[0-9a-f-]{36}\?api-version=[0-9a-z-]+")
NETWORK_OPERATION_BODY = {"status": "Succeeded"}
# Azure-AsyncNotification: Enabled on writes of top-level resources: VMSS PUT 201 and VMSS DELETE
# 202, and the VNet PUT 201 (api 2020-07-01), of COMPUTE_RECORDING; absent on the subnet PUT (a
# child), VMSS-VM PUT/DELETE and every POST action. NETWORK_RECORDING (2019) has it nowhere, the
# NIC DELETE included: Network DELETEs follow it.
NOTIFICATION = "azure-asyncnotification"

# ----- documents ----------------------------------------------------------------------------------
# VM_GET_EXAMPLE and VMSS_VM_GET_EXAMPLE: a Compute resource's etag counts its writes
COMPUTE_FIRST_ETAG = '"1"'
# VM_INSTANCE_VIEW_EXAMPLE; statuses: ProvisioningState/... carries a "time", PowerState/... not
INSTANCE_VIEW = {"platformUpdateDomain": ANY, "platformFaultDomain": ANY, "computerName": ANY, "osName": ANY,
                 "osVersion": ANY, "vmAgent": {"vmAgentVersion": ANY, "statuses": ANY, "extensionHandlers": ANY},
                 "disks": EACH({"name": ANY, "statuses": ANY}), "hyperVGeneration": ANY, "statuses": ANY}
VM_AGENT_READY = {"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Ready",
                  "message": "GuestAgent is running and accepting new configurations."}
# COMPUTE_RECORDING, GET .../virtualmachines/1/instanceView: a scale-set VM's view adds its group
SCALE_SET_VM_INSTANCE_VIEW = INSTANCE_VIEW | {"placementGroupId": re.compile(r"[0-9a-f-]{36}")}
# COMPUTE_RECORDING, GET .../virtualmachines/1?$expand=instanceView (etag: VMSS_VM_GET_EXAMPLE)
SCALE_SET_VM = {
    "name": "{vmss}_{instance}", "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
    "id": re.compile(r"/subscriptions/[^/]+/resourceGroups/{rg}/providers/Microsoft\.Compute/"
                     r"virtualMachineScaleSets/{vmss}/virtualMachines/{instance}"),
    "location": "{location}", "instanceId": "{instance}", "sku": {"name": ANY, "tier": "Standard"},
    "etag": COMPUTE_FIRST_ETAG,
    "properties": {
        "latestModelApplied": True, "modelDefinitionApplied": "VirtualMachineScaleSet", "vmId": ANY,
        "provisioningState": "Succeeded", "osProfile": {"computerName": ANY, "adminUsername": ANY},
        "networkProfile": {"networkInterfaces": EACH({"id": re.compile(
            r"/subscriptions/.+/virtualMachineScaleSets/{vmss}/virtualMachines/{instance}/networkInterfaces/.+")})},
    },
}
SCALE_SET = {"name": "{vmss}", "type": "Microsoft.Compute/virtualMachineScaleSets", "location": "{location}",
             "sku": {"name": ANY, "tier": "Standard", "capacity": ANY},
             "properties": {"provisioningState": "Succeeded", "uniqueId": ANY, "upgradePolicy": {"mode": "Manual"}}}
# NETWORK_RECORDING, NIC PUT 201 / GET 200 / list (also NIC_GET_EXAMPLE, with macAddress and primary)
IP_CONFIGURATION = {
    "name": ANY, "id": re.compile(r"/subscriptions/.+/networkInterfaces/{nic}/ipConfigurations/.+"),
    "etag": re.compile(r'W/"[0-9a-f-]{36}"'), "type": "Microsoft.Network/networkInterfaces/ipConfigurations",
    "properties": {"provisioningState": "Succeeded", "privateIPAddress": ANY, "privateIPAllocationMethod": "Dynamic",
                   "subnet": {"id": ANY}, "primary": True, "privateIPAddressVersion": "IPv4"},
}
NIC = {
    "name": "{nic}", "type": "Microsoft.Network/networkInterfaces", "location": "{location}",
    "id": re.compile(r"/subscriptions/[^/]+/resourceGroups/{rg}/providers/Microsoft\.Network/networkInterfaces/{nic}"),
    "etag": re.compile(r'W/"[0-9a-f-]{36}"'),
    "properties": {
        "provisioningState": "Succeeded", "resourceGuid": re.compile(r"[0-9a-f-]{36}"),
        "ipConfigurations": EACH(IP_CONFIGURATION),
        "dnsSettings": {"dnsServers": [], "appliedDnsServers": [],
                        "internalDomainNameSuffix": re.compile(r"[a-z0-9]{26}\.[a-z]{2}\.internal\.cloudapp\.net")},
        "enableAcceleratedNetworking": False, "enableIPForwarding": False, "hostedWorkloads": [],
        "tapConfigurations": [], "macAddress": re.compile(r"([0-9A-F]{2}-){5}[0-9A-F]{2}"), "primary": True,
    },
}

# ----- errors -------------------------------------------------------------------------------------
# NO_PROVIDER_DOC (shape), NESTED_TYPE_ISSUES (the type is the nested one: 'virtualMachineScaleSets/networkInterfaces')
NO_PROVIDER_MESSAGE = re.compile(r"No registered resource provider found for location '{location}' and API version "
                                 r"'2099-01-01' for type '{type}'\. The supported api-versions are '.+'\. "
                                 r"The supported locations are '.+'\.")
# no Authorization header: UNVERIFIED (the earlier source, a Go test helper's ARM mock, is not locatable)
MISSING_AUTH = {"status": 401, "code": "AuthenticationFailed",
                "message": "Authentication failed. The 'Authorization' header is missing.",
                "challenge_ends": "error=\"invalid_token\", error_description=\"The authentication failed "
                                  "because of missing 'Authorization' header.\""}


@dataclass(frozen=True)
class Pair:
    """One recorded request (method, path template, api-version, body) and what Azure answered
    (status, a subset of the headers: a value, ANY, a pattern or ABSENT; the body's shape)."""

    name: str
    source: str
    method: str
    path: str
    api_version: str
    status: int
    headers: dict[str, Any] = field(default_factory=dict)
    body: Any = ANY
    request_body: Any = None


_RG = "/subscriptions/{sub}/resourceGroups/{rg}/providers"
_VMSS = _RG + "/Microsoft.Compute/virtualMachineScaleSets/{vmss}"

PAIRS = [
    Pair("scale set GET", COMPUTE_RECORDING, "GET", _VMSS, "2020-06-01", 200,
         {"x-ms-ratelimit-remaining-resource": compute_budget("GetVMScaleSet")}, SCALE_SET),
    Pair("scale-set VM GET with $expand=instanceView", f"{COMPUTE_RECORDING}; {VMSS_VM_GET_EXAMPLE} (etag)", "GET",
         _VMSS + "/virtualmachines/{instance}?$expand=instanceView", "2020-06-01", 200,
         {"x-ms-ratelimit-remaining-resource": compute_budget("GetVMScaleSetVM"), "x-ms-request-charge": ANY},
         SCALE_SET_VM | {"properties": SCALE_SET_VM["properties"] | {"instanceView": SCALE_SET_VM_INSTANCE_VIEW}}),
    Pair("scale-set VM GET", COMPUTE_RECORDING, "GET", _VMSS + "/virtualmachines/{instance}", "2020-06-01", 200,
         {"x-ms-ratelimit-remaining-resource": compute_budget("GetVMScaleSetVM")},
         SCALE_SET_VM | {"properties": SCALE_SET_VM["properties"] | {"instanceView": ABSENT}}),
    Pair("scale-set VM instance view", COMPUTE_RECORDING, "GET", _VMSS + "/virtualmachines/{instance}/instanceView",
         "2020-06-01", 200, {"x-ms-ratelimit-remaining-resource": compute_budget("GetVMScaleSetVM")},
         SCALE_SET_VM_INSTANCE_VIEW),
    Pair("instance view of a scale-set VM that is not there", COMPUTE_RECORDING, "GET",
         _VMSS + "/virtualmachines/999/instanceView", "2020-06-01", 404,
         {"x-ms-ratelimit-remaining-resource": compute_budget("GetVMScaleSetVM")},
         {"error": {"code": "NotFound", "message": "The entity was not found in this Azure location."}}),
    Pair("NIC GET", f"{NETWORK_RECORDING}; {NIC_GET_EXAMPLE} (macAddress, primary)", "GET",
         _RG + "/Microsoft.Network/networkInterfaces/{nic}", "2019-07-01", 200,
         {NETWORK_SERVICE_ID: ANY, "etag": re.compile(r'W/"[0-9a-f-]{36}"'), NOTIFICATION: ABSENT}, NIC),
    Pair("NIC list", NETWORK_RECORDING, "GET", _RG + "/Microsoft.Network/networkInterfaces", "2019-07-01", 200,
         {NETWORK_SERVICE_ID: ANY}, {"value": EACH({k: NIC[k] for k in ("type", "etag", "properties")})}),
    Pair("future api-version", NO_PROVIDER_DOC, "GET", _RG + "/Microsoft.Compute/virtualMachineScaleSets",
         "2099-01-01", 400, {},
         {"error": {"code": "NoRegisteredProviderFound",
                    "message": re.compile(NO_PROVIDER_MESSAGE.pattern.replace("{type}", "virtualMachineScaleSets"))}}),
    Pair("future api-version on a nested type", NESTED_TYPE_ISSUES, "GET", _VMSS + "/networkInterfaces",
         "2099-01-01", 400, {},
         {"error": {"code": "NoRegisteredProviderFound", "message": re.compile(
             NO_PROVIDER_MESSAGE.pattern.replace("{type}", "virtualMachineScaleSets/networkInterfaces"))}}),
    Pair("unknown api-version of a resource group", BAD_API_VERSION_ISSUES, "GET", "/subscriptions/{sub}/resourceGroups/{rg}",
         "2099-01-01", 400, {},
         {"error": {"code": "InvalidApiVersionParameter",
                    "message": re.compile(r"The api-version '2099-01-01' is invalid\. The supported versions are '.+'\.")}}),
    Pair("unknown namespace", BAD_NAMESPACE_ISSUES, "GET", _RG + "/Microsoft.Foo/bars", "2024-01-01", 400, {},
         {"error": {"code": "InvalidResourceNamespace", "message": "The resource namespace 'Microsoft.Foo' is invalid."}}),
    Pair("unknown type in a known namespace", UNVERIFIED, "GET", _RG + "/Microsoft.Compute/fooBars/x", "2024-01-01", 400,
         {}, {"error": {"code": "InvalidResourceType", "message": re.compile(
             r"The resource type 'fooBars' could not be found in the namespace 'Microsoft\.Compute' .*")}}),
]
