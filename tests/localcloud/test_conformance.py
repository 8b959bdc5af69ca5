"""The local cloud answers as recorded Azure traffic does (recorded_facts.py names each source).

Every recorded request/response pair is replayed through the real sync and the real aio SDK
client (their `send_request` pipelines: authentication, headers, retries), and the answer's
status, headers and body shape are compared with the recording. Scenario tests then follow
long-running operations, etags and instance views through the typed SDK operations, both sync
and aio; raw HTTPS covers what the SDK cannot send (no Authorization header).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import ssl
import uuid
from typing import Any, Callable

import httpx
import pytest
import recorded_facts as facts
from arm_harness import Cloud, bearer, nic_body, unique, vm_body
from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from recorded_facts import ABSENT, ANY, EACH, PAIRS, Pair

MODES = ["sync", "aio"]


# ----- comparing an answer with a recorded shape ------------------------------------------------
def _fill(text: str, params: dict[str, str], escape: bool = False) -> str:
    for key, value in params.items():
        text = text.replace("{" + key + "}", re.escape(value) if escape else value)
    return text


def mismatches(actual: Any, shape: Any, params: dict[str, str], where: str = "body") -> list[str]:
    """What in `actual` does not have the recorded `shape` (recorded_facts.py explains shapes)."""
    if shape is ANY:
        return []
    if isinstance(shape, EACH):
        if not isinstance(actual, list) or not actual:
            return [f"{where}: expected a non-empty list, got {actual!r}"]
        return [m for i, item in enumerate(actual) for m in mismatches(item, shape.shape, params, f"{where}[{i}]")]
    if isinstance(shape, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {actual!r}"]
        found = []
        for key, sub in shape.items():
            if sub is ABSENT:
                found += [f"{where}.{key}: expected no such member, got {actual[key]!r}"] if key in actual else []
            elif key not in actual:
                found.append(f"{where}.{key}: missing (has {sorted(actual)})")
            else:
                found += mismatches(actual[key], sub, params, f"{where}.{key}")
        return found
    if isinstance(shape, re.Pattern):
        pattern = re.compile(_fill(shape.pattern, params, escape=True))
        ok = isinstance(actual, str) and pattern.fullmatch(actual)
        return [] if ok else [f"{where}: {actual!r} does not match {pattern.pattern!r}"]
    expected = _fill(shape, params) if isinstance(shape, str) else shape
    same_type = isinstance(actual, bool) == isinstance(expected, bool)
    return [] if same_type and actual == expected else [f"{where}: expected {expected!r}, got {actual!r}"]


def header_mismatches(headers: dict[str, str], expected: dict[str, Any], params: dict[str, str]) -> list[str]:
    return mismatches(headers, expected, params, "headers")


def common_mismatches(method: str, headers: dict[str, str], correlation: str | None = None) -> list[str]:
    """ARM's headers on every answer, the budget of the method, ids tied to the correlation id."""
    found = header_mismatches(headers, facts.EVERY_RESPONSE_HEADERS, {})
    budget = facts.BUDGET_HEADERS[method]
    if not headers.get(budget, "").isdigit():
        found.append(f"header {budget}: expected a number, got {headers.get(budget)!r}")
    routing = facts.ROUTING_ID.fullmatch(headers.get("x-ms-routing-request-id", ""))
    if routing is None or routing["correlation"] != headers.get("x-ms-correlation-request-id"):
        found.append(f"x-ms-routing-request-id {headers.get('x-ms-routing-request-id')!r} does not end with the "
                     f"correlation id {headers.get('x-ms-correlation-request-id')!r}")
    if correlation is not None and headers.get("x-ms-correlation-request-id") != correlation:
        found.append(f"x-ms-correlation-request-id: expected the client's {correlation}")
    return found


# ----- the SDK clients, sync and aio, behind one awaitable interface -------------------------------
class Clients:
    """The real sync or aio Compute and Network clients; `await`able either way so one scenario
    runs through both."""

    def __init__(self, cloud: Cloud, mode: str):
        self.cloud, self.mode = cloud, mode
        if mode == "sync":
            self.compute, self.network = cloud.compute, cloud.network
        else:
            self.compute, self.network = cloud.aio_clients()

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.mode == "aio":
            await self.compute.close()
            await self.network.close()

    async def call(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """An operation's result; for a begin_* operation, its poller's (the SDK polls)."""
        result = operation(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if hasattr(result, "result") and hasattr(result, "polling_method"):
            result = result.result()
            if inspect.isawaitable(result):
                result = await result
        return result

    async def items(self, pager: Any) -> list[Any]:
        return [x async for x in pager] if self.mode == "aio" else list(pager)

    async def send(self, path_or_url: str, method: str = "GET", correlation: str | None = None,
                   body: Any = None) -> tuple[int, dict[str, str], str]:
        """(status, lower-cased headers, text) of a raw request through the SDK's own pipeline."""
        client = self.network if "/microsoft.network/" in path_or_url.lower() else self.compute
        headers = {"x-ms-correlation-request-id": correlation} if correlation else {}
        request = HttpRequest(method, path_or_url, headers=headers, json=body)
        response = client.send_request(request)
        if inspect.isawaitable(response):
            response = await response  # stream=False: the body is read already
        return response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.text()


def run(cloud: Cloud, mode: str, scenario: Callable[[Clients], Any]) -> Any:
    async def main() -> Any:
        async with Clients(cloud, mode) as clients:
            return await scenario(clients)

    return asyncio.run(main())


def _raw(pipeline_response: Any) -> tuple[int, dict[str, str]]:
    response = pipeline_response.http_response
    return response.status_code, {k.lower(): v for k, v in response.headers.items()}


# ----- the resources the recorded pairs read ---------------------------------------------------------
@pytest.fixture(scope="module")
def resources(arm_cloud: Cloud):
    """A Uniform scale set with one VM and a NIC, named as the pairs' {placeholders}."""
    cloud = arm_cloud
    vmss, nic = unique("confss"), unique("confnic")
    cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, vmss, cloud.scale_set_body(1)).result()
    cloud.network.network_interfaces.begin_create_or_update(cloud.rg, nic, nic_body(cloud)).result()
    [vm] = cloud.compute.virtual_machine_scale_set_vms.list(cloud.rg, vmss)
    try:
        yield {"sub": cloud.info["subscription_id"], "rg": cloud.rg, "location": cloud.location,
               "vmss": vmss, "instance": vm.instance_id, "nic": nic}
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, vmss).result()
        cloud.network.network_interfaces.begin_delete(cloud.rg, nic).result()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.name)
def test_recorded_pair(cloud: Cloud, resources: dict[str, str], pair: Pair, mode: str):
    path = _fill(pair.path, resources)
    url = f"{path}{'&' if '?' in path else '?'}api-version={pair.api_version}"
    correlation = str(uuid.uuid4())
    status, headers, text = run(cloud, mode, lambda c: c.send(url, pair.method, correlation, pair.request_body))
    body = json.loads(text) if text else None
    problems = ([] if status == pair.status else [f"status: expected {pair.status}, got {status}"])
    problems += common_mismatches(pair.method, headers, correlation)
    problems += header_mismatches(headers, pair.headers, resources)
    problems += mismatches(body, pair.body, resources)
    assert not problems, f"{pair.method} {url} ({mode}) differs from {pair.source}:\n" + "\n".join(problems)


# ----- long-running operations ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_long_running_operations_answer_as_recorded(cloud: Cloud, mode: str):
    """PUT, POST action and DELETE of a scale set, PUT and DELETE of a NIC: the first answer's
    headers, the operation documents and Compute's monitor URL, with the SDK's poller following
    them to the end."""
    params = {"location": cloud.location}
    rg = cloud.rg

    def check(pipeline_response: Any, method: str, status: int, expected: dict[str, Any]) -> None:
        got_status, headers = _raw(pipeline_response)
        problems = [] if got_status == status else [f"status: expected {status}, got {got_status}"]
        problems += common_mismatches(method, headers) + header_mismatches(headers, expected, params)
        assert not problems, f"{method} ({mode}):\n" + "\n".join(problems)

    async def scenario(c: Clients) -> None:
        seen: list[Any] = []
        name = unique("conflro")
        await c.call(c.compute.virtual_machine_scale_sets.begin_create_or_update, rg, name, cloud.scale_set_body(1),
                     raw_response_hook=seen.append)
        check(seen[0], "PUT", 201, {facts.NOTIFICATION: "Enabled", "azure-asyncoperation": facts.COMPUTE_ASYNC_OPERATION,
                                    "location": ABSENT, "x-ms-request-charge": ANY,
                                    "x-ms-ratelimit-remaining-resource": facts.compute_budget("CreateVMScaleSet")})
        _, headers, text = await c.send(_raw(seen[0])[1]["azure-asyncoperation"])
        operation = json.loads(text)
        assert set(operation) - {"endTime"} == facts.COMPUTE_OPERATION_MEMBERS, operation
        assert not header_mismatches(headers, {"x-ms-ratelimit-remaining-resource": facts.compute_budget("GetOperation")},
                                     params)
        [vm] = await c.items(c.compute.virtual_machine_scale_set_vms.list(rg, name))

        seen.clear()
        await c.call(c.compute.virtual_machine_scale_sets.begin_delete_instances, rg, name,
                     {"instanceIds": [vm.instance_id]}, raw_response_hook=seen.append)
        check(seen[0], "POST", 202, {"location": facts.COMPUTE_LOCATION, facts.NOTIFICATION: ABSENT,
                                     "azure-asyncoperation": facts.COMPUTE_ASYNC_OPERATION,
                                     "x-ms-ratelimit-remaining-resource": facts.compute_budget("VMScaleSetActions")})
        status, _, text = await c.send(_raw(seen[0])[1]["location"])
        assert (status, text) == (facts.COMPUTE_MONITOR_DONE, ""), "Compute's monitor URL once done"

        seen.clear()
        await c.call(c.compute.virtual_machine_scale_sets.begin_delete, rg, name, raw_response_hook=seen.append)
        check(seen[0], "DELETE", 202, {"location": facts.COMPUTE_LOCATION, facts.NOTIFICATION: "Enabled",
                                       "x-ms-ratelimit-remaining-resource": facts.compute_budget("DeleteVMScaleSet")})

        seen.clear()
        nic = unique("conflronic")
        await c.call(c.network.network_interfaces.begin_create_or_update, rg, nic, nic_body(cloud),
                     raw_response_hook=seen.append)
        check(seen[0], "PUT", 201, {"azure-asyncoperation": facts.NETWORK_ASYNC_OPERATION, facts.NOTIFICATION: "Enabled",
                                    facts.NETWORK_SERVICE_ID: ANY, "x-ms-ratelimit-remaining-resource": ABSENT})
        _, headers, text = await c.send(_raw(seen[0])[1]["azure-asyncoperation"])
        assert json.loads(text) == facts.NETWORK_OPERATION_BODY and facts.NETWORK_SERVICE_ID in headers
        seen.clear()
        await c.call(c.network.network_interfaces.begin_delete, rg, nic, raw_response_hook=seen.append)
        check(seen[0], "DELETE", 202, {"location": facts.NETWORK_LOCATION, facts.NOTIFICATION: ABSENT,
                                       facts.NETWORK_SERVICE_ID: ANY})

    run(cloud, mode, scenario)


# ----- documents ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_a_nic_write_makes_a_new_etag_the_sdk_reads(cloud: Cloud, mode: str):
    name = unique("confnic")

    async def scenario(c: Clients) -> tuple[Any, Any, Any]:
        seen: list[Any] = []
        await c.call(c.network.network_interfaces.begin_create_or_update, cloud.rg, name, nic_body(cloud))
        try:
            first = await c.call(c.network.network_interfaces.get, cloud.rg, name, raw_response_hook=seen.append)
            body = nic_body(cloud) | {"tags": {"changed": "yes"}}
            await c.call(c.network.network_interfaces.begin_create_or_update, cloud.rg, name, body)
            return first, _raw(seen[0])[1], await c.call(c.network.network_interfaces.get, cloud.rg, name)
        finally:
            await c.call(c.network.network_interfaces.begin_delete, cloud.rg, name)

    first, headers, second = run(cloud, mode, scenario)
    assert headers["etag"] == first.etag and first.ip_configurations[0].etag == first.etag
    assert first.ip_configurations[0].type == facts.IP_CONFIGURATION["type"]  # the model reads the sub-resource's
    assert first.dns_settings.internal_domain_name_suffix.endswith(".internal.cloudapp.net")
    assert second.etag != first.etag


@pytest.mark.parametrize("mode", MODES)
def test_instance_views_have_the_recorded_members(cloud: Cloud, mode: str):
    name = unique("confvm")

    async def scenario(c: Clients) -> tuple[dict, Any]:
        seen: list[Any] = []
        nic = await c.call(c.network.network_interfaces.begin_create_or_update, cloud.rg, f"{name}-nic", nic_body(cloud))
        await c.call(c.compute.virtual_machines.begin_create_or_update, cloud.rg, name, vm_body(cloud, nic.id, name))
        try:
            model = await c.call(c.compute.virtual_machines.instance_view, cloud.rg, name, raw_response_hook=seen.append)
            return seen[0].http_response.json(), model
        finally:
            await c.call(c.compute.virtual_machines.begin_delete, cloud.rg, name)

    view, model = run(cloud, mode, scenario)
    assert not mismatches(view, facts.INSTANCE_VIEW, {}), mismatches(view, facts.INSTANCE_VIEW, {})
    agent = view["vmAgent"]["statuses"][0]
    assert {k: agent[k] for k in facts.VM_AGENT_READY} == facts.VM_AGENT_READY and "time" in agent
    provisioning, power = view["statuses"]
    assert provisioning["code"] == "ProvisioningState/succeeded" and "time" in provisioning
    assert power["code"] == "PowerState/running" and "time" not in power
    assert "placementGroupId" not in view  # a standalone VM has none
    assert model.vm_agent.statuses[0].display_status == "Ready" and model.os_name == view["osName"]
    assert model.platform_fault_domain == 0 and model.disks[0].name == view["disks"][0]["name"]


@pytest.mark.parametrize("mode", MODES)
def test_expand_instance_view_adds_the_recorded_view(cloud: Cloud, resources: dict[str, str], mode: str):
    """VMSS VM list with and without $expand=instanceView (COMPUTE_RECORDING's GET ...?$expand)."""
    async def scenario(c: Clients) -> tuple[list, list, list, list]:
        raw_expanded: list[Any] = []
        raw_plain: list[Any] = []
        vms = c.compute.virtual_machine_scale_set_vms
        expanded = await c.items(vms.list(cloud.rg, resources["vmss"], expand="instanceView",
                                          raw_response_hook=raw_expanded.append))
        plain = await c.items(vms.list(cloud.rg, resources["vmss"], raw_response_hook=raw_plain.append))
        return expanded, plain, raw_expanded, raw_plain

    expanded, plain, raw_expanded, raw_plain = run(cloud, mode, scenario)
    [doc] = raw_expanded[0].http_response.json()["value"]
    shape = {"properties": {"instanceView": facts.SCALE_SET_VM_INSTANCE_VIEW}}
    assert not mismatches(doc, shape, resources), mismatches(doc, shape, resources)
    assert expanded[0].instance_view.placement_group_id == doc["properties"]["instanceView"]["placementGroupId"]
    [plain_doc] = raw_plain[0].http_response.json()["value"]
    assert "instanceView" not in plain_doc["properties"] and plain[0].instance_view is None


def test_compute_etags_count_writes(cloud: Cloud):
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
    from azure.core import MatchConditions

    name = unique("confim")
    ss = cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
        cloud.rg, name, cloud.scale_set_body(0)).result()
    try:
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


def test_a_request_without_authorization_is_refused_before_routing(cloud: Cloud):
    verify = ssl.create_default_context(cafile=cloud.info["ca_cert"])
    base = f"{cloud.info['arm_endpoint']}/subscriptions/{cloud.info['subscription_id']}/resourceGroups/{cloud.rg}"
    anonymous = httpx.get(f"{base}/providers/Microsoft.Compute/virtualMachines", params={"api-version": "2024-01-01"},
                          verify=verify)
    assert anonymous.status_code == facts.MISSING_AUTH["status"]
    assert anonymous.json()["error"] == {"code": facts.MISSING_AUTH["code"], "message": facts.MISSING_AUTH["message"]}
    assert anonymous.headers["WWW-Authenticate"].endswith(facts.MISSING_AUTH["challenge_ends"])
    assert "x-ms-ratelimit-remaining-resource" not in anonymous.headers  # no provider saw it
    authorized = httpx.get(f"{base}/providers/Microsoft.Compute/virtualMachines", params={"api-version": "2024-01-01"},
                           headers=bearer(cloud.info), verify=verify)
    assert authorized.status_code == 200
