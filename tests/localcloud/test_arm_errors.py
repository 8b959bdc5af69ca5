"""ARM errors and injected faults as the real SDK surfaces them: validation, 404, quota, SKU,
AllocationFailed, boot failure, 429/503 absorbed by the SDK's retry policy, authentication."""

from __future__ import annotations

import asyncio
import ssl

import httpx
import pytest
from arm_harness import PAGE_SIZE, Cloud, bearer, unique
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError


def _vmss_names(cloud: Cloud) -> set[str]:
    return {s.name for s in cloud.compute.virtual_machine_scale_sets.list(cloud.rg)}


def test_snake_case_body_is_rejected_naming_the_member(cloud: Cloud):
    body = cloud.scale_set_body(1)
    body["properties"]["virtual_machine_profile"] = body["properties"].pop("virtualMachineProfile")
    name = unique("snake")
    with pytest.raises(HttpResponseError) as info:
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, name, body)
    assert info.value.status_code == 400
    assert info.value.error.code == "InvalidParameter"
    assert "properties.virtual_machine_profile" in info.value.error.message
    assert name not in _vmss_names(cloud)


def test_incomplete_body_names_the_missing_field(cloud: Cloud):
    body = cloud.scale_set_body(1)
    del body["properties"]["virtualMachineProfile"]["osProfile"]["adminUsername"]
    with pytest.raises(HttpResponseError) as info:
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, unique("inc"), body)
    assert info.value.error.code == "InvalidParameter"
    assert info.value.error.target == "properties.virtualMachineProfile.osProfile.adminUsername"


def test_custom_data_must_be_base64(cloud: Cloud):
    with pytest.raises(HttpResponseError) as info:
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
            cloud.rg, unique("b64"), cloud.scale_set_body(1, custom_data="echo not base64!"))
    assert info.value.error.code == "InvalidParameter" and "Base64" in info.value.error.message


def test_missing_resources_are_404(cloud: Cloud):
    with pytest.raises(ResourceNotFoundError) as info:
        cloud.compute.virtual_machine_scale_sets.get(cloud.rg, "no-such-set")
    assert info.value.error.code == "ResourceNotFound"
    with pytest.raises(ResourceNotFoundError):
        cloud.compute.virtual_machines.get(cloud.rg, "no-such-vm")
    with pytest.raises(ResourceNotFoundError):
        cloud.network.network_interfaces.get(cloud.rg, "no-such-nic")
    with pytest.raises(ResourceNotFoundError) as info:
        cloud.compute.virtual_machine_scale_sets.get("no-such-group", "x")
    assert info.value.error.code == "ResourceGroupNotFound"
    # deleting what does not exist succeeds, as on ARM (204)
    cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, "no-such-set").result()


def test_quota_exceeded_is_409_with_the_numbers(cloud: Cloud):
    cloud.admin.set_quota("standardBSFamily", 2)
    with pytest.raises(ResourceExistsError) as info:
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, unique("quota"), cloud.scale_set_body(3))
    error = info.value.error
    assert info.value.status_code == 409 and error.code == "OperationNotAllowed"
    assert "standardBSFamily Cores quota" in error.message
    assert "Current Limit: 2, Current Usage: 0, Additional Required: 3" in error.message


def test_spot_counts_against_low_priority_cores(cloud: Cloud):
    cloud.admin.set_quota("standardBSFamily", 0)  # regular cores exhausted; spot must not care
    cloud.admin.set_quota("lowPriorityCores", 1)
    spot = dict(priority="Spot", evictionPolicy="Delete", billingProfile={"maxPrice": -1})
    with pytest.raises(ResourceExistsError) as info:
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
            cloud.rg, unique("spotq"), cloud.scale_set_body(2, **spot))
    assert "LowPriorityCores quota" in info.value.error.message
    assert "Current Limit: 1" in info.value.error.message
    name = unique("spot")
    cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, name, cloud.scale_set_body(1, **spot)).result()
    try:
        usage = {u.name.value: u.current_value for u in cloud.compute.usage.list(cloud.location)}
        assert usage["lowPriorityCores"] == 1 and usage["standardBSFamily"] == 0
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()


def test_spot_requests_are_validated(cloud: Cloud):
    bad_price = dict(priority="Spot", evictionPolicy="Delete", billingProfile={"maxPrice": -5})
    with pytest.raises(HttpResponseError) as info:
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
            cloud.rg, unique("price"), cloud.scale_set_body(1, **bad_price))
    assert info.value.error.code == "MaxPriceValueInvalid"
    spot = dict(priority="Spot", evictionPolicy="Delete", billingProfile={"maxPrice": -1})
    with pytest.raises(HttpResponseError) as info:
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
            cloud.rg, unique("hb"), cloud.scale_set_body(1, sku="Standard_HB120rs_v3", **spot))
    assert info.value.error.code == "AzureSpotIsNotSupportedForThisVMSize"
    with pytest.raises(HttpResponseError) as info:
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
            cloud.rg, unique("pol"), cloud.scale_set_body(1, evictionPolicy="Delete"))
    assert info.value.error.code == "InvalidParameter" and "priority is Spot" in info.value.error.message


def test_sku_not_available(cloud: Cloud):
    with pytest.raises(ResourceExistsError) as info:
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
            cloud.rg, unique("sku"), cloud.scale_set_body(1, sku="Standard_NC6"))
    assert info.value.error.code == "SkuNotAvailable"


def test_allocation_failed_surfaces_as_error_code(cloud: Cloud):
    name = unique("alloc")
    cloud.admin.fail_next_lro()
    poller = cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, name, cloud.scale_set_body(2))
    with pytest.raises(HttpResponseError) as info:
        poller.result()
    assert info.value.error.code == "AllocationFailed"
    try:
        assert cloud.compute.virtual_machine_scale_sets.get(cloud.rg, name).provisioning_state == "Failed"
        states = {vm.provisioning_state for vm in cloud.compute.virtual_machine_scale_set_vms.list(cloud.rg, name)}
        assert states == {"Failed"}
        mine = [i for i in cloud.admin.status()["instances"] if i["scale_set"] == name]
        assert len(mine) == 2 and all(i["power_state"] == "stopped" for i in mine)  # never booted
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()
    assert name not in _vmss_names(cloud)


def test_boot_failure_fails_the_instance_and_the_operation(cloud: Cloud):
    name = unique("bootf")
    cloud.admin.boot_fail(1)
    with pytest.raises(HttpResponseError) as info:
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, name, cloud.scale_set_body(1)).result()
    assert info.value.error.code == "OSProvisioningTimedOut"
    try:
        view = cloud.compute.virtual_machine_scale_set_vms.get_instance_view(cloud.rg, name, "0")
        assert view.statuses[0].code == "ProvisioningState/failed/OSProvisioningTimedOut"
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()


def test_throttling_is_absorbed_by_the_sdk_retry(cloud: Cloud):
    cloud.admin.reset_counters()
    cloud.admin.throttle(2, retry_after=1, operation="ResourceSkus_List")
    skus = list(cloud.compute.resource_skus.list())
    assert any(s.name == "Standard_D2s_v3" for s in skus)
    pages = -(-len(skus) // PAGE_SIZE)
    assert cloud.admin.counters()["requests"]["ResourceSkus_List"] == 2 + pages  # two 429s retried


def test_throttled_response_has_crp_shape(cloud: Cloud):
    cloud.admin.throttle(1, retry_after=7)
    verify = ssl.create_default_context(cafile=cloud.info["ca_cert"])
    url = (f"{cloud.info['arm_endpoint']}/subscriptions/{cloud.info['subscription_id']}/providers/"
           "Microsoft.Compute/skus?api-version=2021-07-01")
    response = httpx.get(url, headers=bearer(cloud.info), verify=verify)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert "HighCostGet30Min;0" in response.headers["x-ms-ratelimit-remaining-resource"]
    error = response.json()["error"]
    assert error["code"] == "OperationNotAllowed" and error["details"][0]["code"] == "TooManyRequests"


def test_service_unavailable_is_retried_aio(cloud: Cloud):
    cloud.admin.reset_counters()
    cloud.admin.fail_next(1, operation="Usage_List")

    async def scenario():
        compute, network = cloud.aio_clients()
        async with compute, network:
            return [u.name.value async for u in compute.usage.list(cloud.location)]

    names = asyncio.run(scenario())
    assert {"cores", "lowPriorityCores", "standardDSv3Family"} <= set(names)
    assert cloud.admin.counters()["requests"]["Usage_List"] >= 2


def test_authorization_required_and_paths_case_insensitive(cloud: Cloud):
    verify = ssl.create_default_context(cafile=cloud.info["ca_cert"])
    path = (f"/subscriptions/{cloud.info['subscription_id']}/resourcegroups/{cloud.rg.upper()}/providers/"
            "microsoft.compute/VIRTUALMACHINESCALESETS?api-version=2026-04-01")
    anonymous = httpx.get(cloud.info["arm_endpoint"] + path, verify=verify)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "AuthenticationFailed"
    ok = httpx.get(cloud.info["arm_endpoint"] + path, headers=bearer(cloud.info), verify=verify)
    assert ok.status_code == 200 and "value" in ok.json()
    no_version = httpx.get(cloud.info["arm_endpoint"] + path.split("?")[0], headers=bearer(cloud.info),
                           verify=verify)
    assert no_version.status_code == 400 and no_version.json()["error"]["code"] == "MissingApiVersionParameter"


def test_usages_and_resource_skus(cloud: Cloud):
    usages = {u.name.value: u for u in cloud.compute.usage.list(cloud.location)}
    assert usages["cores"].limit > 0 and usages["cores"].unit == "Count"
    skus = {s.name: s for s in cloud.compute.resource_skus.list()}
    vcpus = {c.name: c.value for c in skus["Standard_D4s_v3"].capabilities}["vCPUs"]
    assert vcpus == "4" and skus["Standard_D4s_v3"].family == "standardDSv3Family"
    assert skus["Standard_NC6"].restrictions[0].reason_code == "NotAvailableForSubscription"
