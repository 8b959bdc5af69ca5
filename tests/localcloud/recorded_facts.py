"""Facts about real Azure responses, copied (field names, codes, shapes; not the files) from
recorded traffic, each with the recording or example it came from. test_conformance.py holds the
local cloud to them through the real sync and aio SDK clients."""

from __future__ import annotations

SDK_RECORDING = ("Azure/azure-sdk-for-python sdk/compute/azure-mgmt-compute/tests/recordings/"
                 "test_mgmt_compute_vmss.test_compute_vmss_vm.yaml")

# Headers ARM sends on every response. Ids: the x-ms-* trio of a recorded ARM 401 (Azure/azure-
# powershell issue #12544, "HTTP RESPONSE" of GET /tenants); the rest on every interaction of
# SDK_RECORDING.
EVERY_RESPONSE_HEADERS = {
    "x-ms-request-id": None, "x-ms-correlation-request-id": None, "x-ms-routing-request-id": None,
    "cache-control": "no-cache", "pragma": "no-cache", "expires": "-1",
    "x-content-type-options": "nosniff", "strict-transport-security": "max-age=31536000; includeSubDomains",
}
READ_BUDGET_HEADER = "x-ms-ratelimit-remaining-subscription-reads"
WRITE_BUDGET_HEADER = "x-ms-ratelimit-remaining-subscription-writes"  # SDK_RECORDING, PUT 201s

# SDK_RECORDING, PUT virtualMachineScaleSets -> 201: headers of a Compute write that runs on
COMPUTE_PUT_HEADERS = {"azure-asyncnotification": "Enabled", "azure-asyncoperation": None}
# SDK_RECORDING, GET .../Microsoft.Compute/locations/eastus/operations/<id>: the members while it runs
COMPUTE_OPERATION_MEMBERS = {"startTime", "status", "name"}
# SDK_RECORDING, GET .../Microsoft.Network/locations/eastus/operations/<id> after the VNet PUT
NETWORK_OPERATION_BODY = {"status": "Succeeded"}
# SDK_RECORDING, GET virtualNetworks/<name>: Network GETs carry the body's etag as a header
NETWORK_GET_ETAG_HEADER = "etag"

# A NIC create response from Azure kept verbatim in azure-sdk-for-java's management-core LRO
# tests (the string sampleNicCreateSucceededResponse of lro201AsyncOperationSucceededNoPoll)
NIC_MEMBERS = {"name", "id", "etag", "location", "tags", "properties", "type"}
NIC_TYPE = "Microsoft.Network/networkInterfaces"
NIC_PROPERTY_MEMBERS = {"provisioningState", "resourceGuid", "ipConfigurations", "dnsSettings",
                        "enableAcceleratedNetworking", "enableIPForwarding", "hostedWorkloads", "tapConfigurations"}
NIC_DNS_SETTINGS = {"dnsServers": [], "appliedDnsServers": []}
IP_CONFIGURATION_MEMBERS = {"name", "id", "etag", "type", "properties"}
IP_CONFIGURATION_TYPE = "Microsoft.Network/networkInterfaces/ipConfigurations"
IP_CONFIGURATION_PROPERTY_MEMBERS = {"provisioningState", "privateIPAddress", "privateIPAllocationMethod", "subnet",
                                     "primary", "privateIPAddressVersion"}

# Front-door refusals (code, message shape):
# MicrosoftDocs azure-docs, articles/azure-resource-manager error-register-resource-provider.md
# ("Code: NoRegisteredProviderFound / Message: No registered resource provider found for location
# {location} and API version {api-version} for type {resource-type}.")
NO_PROVIDER_CODE = "NoRegisteredProviderFound"
NO_PROVIDER_MESSAGE = "No registered resource provider found for location '{location}' and API version " \
                      "'{api_version}' for type '{type}'."
# Azure/ResourceModules issue #456, Azure/aci-connector-k8s issue #13
BAD_NAMESPACE_CODE = "InvalidResourceNamespace"
BAD_NAMESPACE_MESSAGE = "The resource namespace '{namespace}' is invalid."
# An ARM mock answering as ARM does (a public Go test helper's RegisterLogin): no Authorization header
MISSING_AUTH = {"status": 401, "code": "AuthenticationFailed",
                "message": "Authentication failed. The 'Authorization' header is missing.",
                "challenge_ends": "error=\"invalid_token\", error_description=\"The authentication failed "
                                  "because of missing 'Authorization' header.\""}
# JetBrains/azure-tools-for-intellij issue #16, Azure-Samples/active-directory-dotnetcore-daemon-v2 #145
WRONG_AUDIENCE_CODE = "InvalidAuthenticationTokenAudience"

# Azure/azure-rest-api-specs specification/compute/resource-manager/Microsoft.Compute/ComputeRP/
# stable/2024-07-01/examples/virtualMachineExamples/VirtualMachine_Get_InstanceView.json
INSTANCE_VIEW_MEMBERS = {"platformUpdateDomain", "platformFaultDomain", "computerName", "osName", "osVersion",
                         "vmAgent", "disks", "hyperVGeneration", "statuses"}
VM_AGENT_MEMBERS = {"vmAgentVersion", "statuses", "extensionHandlers"}
VM_AGENT_READY = {"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Ready",
                  "message": "GuestAgent is running and accepting new configurations."}
# statuses: ProvisioningState/... carries a "time", PowerState/... does not

# Compute resources carry a counter etag: "etag": "\"1\"" in `az vm show` / `az vm list` output
# recorded in public transcripts (a Microsoft Learn sandbox's `az vm list`, a course's `az vm show`)
COMPUTE_FIRST_ETAG = '"1"'
