"""The local cloud answers as recorded Azure traffic does (recorded_facts.py names each source),
checked through the real sync and aio SDK clients (raw responses via azure-core's
raw_response_hook) and, for what the SDK cannot send, raw HTTPS."""

from __future__ import annotations

import asyncio
import ssl
import uuid

import httpx
import pytest
import recorded_facts as facts
from arm_harness import Cloud, bearer, nic_body, unique
from azure.core.exceptions import HttpResponseError


def _check_common_headers(response, method: str) -> None:
    headers = response.http_response.headers
    for name, value in facts.EVERY_RESPONSE_HEADERS.items():
        assert name in headers, f"{method} {response.http_request.url}: no {name} header"
        if value is not None:
            assert headers[name] == value, (name, headers[name])
    budget = facts.READ_BUDGET_HEADER if method == "GET" else facts.WRITE_BUDGET_HEADER
    assert int(headers[budget]) > 0


def test_every_response_carries_arms_headers(cloud: Cloud):
    seen = []
    correlation = str(uuid.uuid4())
    list(cloud.compute.virtual_machine_scale_sets.list(cloud.rg, raw_response_hook=seen.append,
                                                       headers={"x-ms-correlation-request-id": correlation}))
    name = unique("confnic")
    cloud.network.network_interfaces.begin_create_or_update(cloud.rg, name, nic_body(cloud),
                                                            raw_response_hook=seen.append).result()
    try:
        with pytest.raises(HttpResponseError):
            cloud.compute.virtual_machines.get(cloud.rg, "no-such-vm", raw_response_hook=seen.append)
    finally:
        cloud.network.network_interfaces.begin_delete(cloud.rg, name).result()
    assert seen[0].http_response.headers["x-ms-correlation-request-id"] == correlation
    ids = {r.http_response.headers["x-ms-request-id"] for r in seen}
    assert len(ids) == len(seen)  # one per response
    for response in seen:
        _check_common_headers(response, response.http_request.method)

    async def aio() -> list:
        compute, network = cloud.aio_clients()
        got = []
        async with compute, network:
            async for _ in compute.virtual_machine_scale_sets.list(cloud.rg, raw_response_hook=got.append):
                pass
        return got

    for response in asyncio.run(aio()):
        _check_common_headers(response, "GET")


def _follow(cloud: Cloud, url: str) -> dict:
    verify = ssl.create_default_context(cafile=cloud.info["ca_cert"])
    return httpx.get(url, headers=bearer(cloud.info), verify=verify).json()


def test_long_running_operations_as_compute_and_network_report_them(cloud: Cloud):
    seen = []
    name = unique("confss")
    cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
        cloud.rg, name, cloud.scale_set_body(0), raw_response_hook=seen.append).result()
    try:
        created = seen[0].http_response
        assert created.status_code == 201
        for header, value in facts.COMPUTE_PUT_HEADERS.items():
            assert header in created.headers and (value is None or created.headers[header] == value)
        operation = _follow(cloud, created.headers["azure-asyncoperation"])
        assert set(operation) - {"endTime"} == facts.COMPUTE_OPERATION_MEMBERS
        assert created.headers["azure-asyncoperation"].split("?")[0].endswith(operation["name"])
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()

    seen.clear()
    nic = unique("confnic")
    cloud.network.network_interfaces.begin_create_or_update(cloud.rg, nic, nic_body(cloud),
                                                            raw_response_hook=seen.append).result()
    try:
        url = seen[0].http_response.headers["azure-asyncoperation"]
        assert "azure-asyncnotification" not in seen[0].http_response.headers  # a Compute header only
        assert _follow(cloud, url) == facts.NETWORK_OPERATION_BODY
    finally:
        cloud.network.network_interfaces.begin_delete(cloud.rg, nic).result()


def test_nic_documents_have_the_recorded_shape(cloud: Cloud):
    name = unique("confnic")
    cloud.network.network_interfaces.begin_create_or_update(cloud.rg, name, nic_body(cloud)).result()
    try:
        seen = []
        nic = cloud.network.network_interfaces.get(cloud.rg, name, raw_response_hook=seen.append)
        doc = seen[0].http_response.json()
        assert facts.NIC_MEMBERS <= set(doc) and doc["type"] == facts.NIC_TYPE
        assert facts.NIC_PROPERTY_MEMBERS <= set(doc["properties"])
        assert doc["properties"]["dnsSettings"] == facts.NIC_DNS_SETTINGS
        [ip_config] = doc["properties"]["ipConfigurations"]
        assert facts.IP_CONFIGURATION_MEMBERS <= set(ip_config) and ip_config["type"] == facts.IP_CONFIGURATION_TYPE
        assert facts.IP_CONFIGURATION_PROPERTY_MEMBERS <= set(ip_config["properties"])
        assert doc["etag"].startswith('W/"') and ip_config["etag"] == doc["etag"]
        assert seen[0].http_response.headers[facts.NETWORK_GET_ETAG_HEADER] == doc["etag"] == nic.etag
        # the SDK's model reads the sub-resource's type and etag too
        assert nic.ip_configurations[0].type == facts.IP_CONFIGURATION_TYPE
        # a write makes a new etag
        body = nic_body(cloud) | {"tags": {"changed": "yes"}}
        cloud.network.network_interfaces.begin_create_or_update(cloud.rg, name, body).result()
        assert cloud.network.network_interfaces.get(cloud.rg, name).etag != doc["etag"]
    finally:
        cloud.network.network_interfaces.begin_delete(cloud.rg, name).result()


def test_front_door_refusals(cloud: Cloud):
    with pytest.raises(HttpResponseError) as refused:
        list(cloud.compute.virtual_machine_scale_sets.list(cloud.rg, api_version="2099-01-01"))
    assert refused.value.status_code == 400 and refused.value.error.code == facts.NO_PROVIDER_CODE
    assert refused.value.error.message.startswith(facts.NO_PROVIDER_MESSAGE.format(
        location=cloud.location, api_version="2099-01-01", type="virtualMachineScaleSets"))

    async def aio() -> HttpResponseError:
        compute, network = cloud.aio_clients()
        async with compute, network:
            with pytest.raises(HttpResponseError) as aio_refused:
                await network.network_interfaces.get(cloud.rg, "x", api_version="not-a-version")
            return aio_refused.value

    aio_error = asyncio.run(aio())
    assert aio_error.status_code == 400 and aio_error.error.code == facts.NO_PROVIDER_CODE

    verify = ssl.create_default_context(cafile=cloud.info["ca_cert"])
    base = f"{cloud.info['arm_endpoint']}/subscriptions/{cloud.info['subscription_id']}/resourceGroups/{cloud.rg}"
    bad_namespace = httpx.get(f"{base}/providers/Microsoft.Foo/bars", params={"api-version": "2024-01-01"},
                              headers=bearer(cloud.info), verify=verify)
    assert bad_namespace.status_code == 400
    assert bad_namespace.json()["error"] == {"code": facts.BAD_NAMESPACE_CODE,
                                             "message": facts.BAD_NAMESPACE_MESSAGE.format(namespace="Microsoft.Foo")}
    bad_type = httpx.get(f"{base}/providers/Microsoft.Compute/fooBars/x", params={"api-version": "2024-01-01"},
                         headers=bearer(cloud.info), verify=verify)
    assert bad_type.status_code == 400 and bad_type.json()["error"]["code"] == "InvalidResourceType"
    assert "'fooBars' could not be found in the namespace 'Microsoft.Compute'" in bad_type.json()["error"]["message"]
    anonymous = httpx.get(f"{base}/providers/Microsoft.Compute/virtualMachines", params={"api-version": "2024-01-01"},
                          verify=verify)
    assert anonymous.status_code == facts.MISSING_AUTH["status"]
    assert anonymous.json()["error"] == {"code": facts.MISSING_AUTH["code"], "message": facts.MISSING_AUTH["message"]}
    assert anonymous.headers["WWW-Authenticate"].endswith(facts.MISSING_AUTH["challenge_ends"])


def test_instance_views_have_the_recorded_members(cloud: Cloud):
    from arm_harness import vm_body

    name = unique("confvm")
    nic = cloud.network.network_interfaces.begin_create_or_update(cloud.rg, f"{name}-nic", nic_body(cloud)).result()
    cloud.compute.virtual_machines.begin_create_or_update(cloud.rg, name, vm_body(cloud, nic.id, name)).result()
    try:
        seen = []
        cloud.compute.virtual_machines.instance_view(cloud.rg, name, raw_response_hook=seen.append)
        view = seen[0].http_response.json()
        assert facts.INSTANCE_VIEW_MEMBERS <= set(view)
        assert facts.VM_AGENT_MEMBERS <= set(view["vmAgent"])
        agent = view["vmAgent"]["statuses"][0]
        assert {k: agent[k] for k in facts.VM_AGENT_READY} == facts.VM_AGENT_READY and "time" in agent
        provisioning, power = view["statuses"]
        assert provisioning["code"] == "ProvisioningState/succeeded" and "time" in provisioning
        assert power["code"] == "PowerState/running" and "time" not in power
        assert view["disks"][0]["statuses"][0]["code"] == "ProvisioningState/succeeded"

        async def aio():
            compute, network = cloud.aio_clients()
            async with compute, network:
                return await compute.virtual_machines.instance_view(cloud.rg, name)

        model = asyncio.run(aio())  # the SDK's model reads them
        assert model.vm_agent.statuses[0].display_status == "Ready" and model.os_name == view["osName"]
        assert model.platform_fault_domain == 0 and model.disks[0].name == view["disks"][0]["name"]
    finally:
        cloud.compute.virtual_machines.begin_delete(cloud.rg, name).result()


def test_compute_etags_count_writes(cloud: Cloud):
    from arm_harness import vm_body

    name = unique("confet")
    nic = cloud.network.network_interfaces.begin_create_or_update(cloud.rg, f"{name}-nic", nic_body(cloud)).result()
    vm = cloud.compute.virtual_machines.begin_create_or_update(cloud.rg, name, vm_body(cloud, nic.id, name)).result()
    ss_name = unique("confetss")
    ss = cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
        cloud.rg, ss_name, cloud.scale_set_body(0)).result()
    try:
        assert vm.etag == facts.COMPUTE_FIRST_ETAG and ss.etag == facts.COMPUTE_FIRST_ETAG
        body = vm_body(cloud, nic.id, name) | {"tags": {"changed": "yes"}}
        assert cloud.compute.virtual_machines.begin_create_or_update(cloud.rg, name, body).result().etag == '"2"'
        cloud.compute.virtual_machine_scale_sets.begin_update(cloud.rg, ss_name, {"tags": {"a": "b"}}).result()
        assert cloud.compute.virtual_machine_scale_sets.get(cloud.rg, ss_name).etag == '"2"'
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, ss_name).result()
        cloud.compute.virtual_machines.begin_delete(cloud.rg, name).result()


def test_if_match_guards_scale_set_writes(cloud: Cloud):
    """A capacity write with the etag it read succeeds; with a stale one it gets 412 and changes
    nothing (what concurrent writers rely on); If-None-Match: * refuses to overwrite."""
    name = unique("confim")
    ss = cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
        cloud.rg, name, cloud.scale_set_body(0)).result()
    try:
        from azure.core import MatchConditions

        unchanged = dict(etag=ss.etag, match_condition=MatchConditions.IfNotModified)  # If-Match: "1"
        cloud.compute.virtual_machine_scale_sets.begin_update(cloud.rg, name, {"tags": {"n": "1"}},
                                                              **unchanged).result()
        with pytest.raises(HttpResponseError) as stale:
            cloud.compute.virtual_machine_scale_sets.begin_update(cloud.rg, name, {"sku": {"capacity": 1}},
                                                                  **unchanged)
        assert stale.value.status_code == 412 and stale.value.error.code == "PreconditionFailed"
        assert cloud.compute.virtual_machine_scale_sets.get(cloud.rg, name).sku.capacity == 0
        with pytest.raises(HttpResponseError) as exists:
            cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
                cloud.rg, name, cloud.scale_set_body(0), match_condition=MatchConditions.IfMissing)
        assert exists.value.status_code == 412
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()
