"""Malformed request bodies get an ARM 4xx naming the problem, never a server error."""

from __future__ import annotations

import copy
import ssl

import httpx
import pytest
from arm_harness import Cloud, bearer, nic_body, vm_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
        ["name", "capacity", "properties", "id", "sku", "tags", "x_y", "location"]), inner, max_size=3),
    max_leaves=8,
)


def _paths(doc, prefix=()):
    """Every key path of a nested dict."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))


def _valid_body(cloud: Cloud, kind: str) -> tuple[dict, str]:
    """A valid body (nothing boots: capacity 0, or a VM whose NIC does not exist) and its path."""
    compute = f"/resourceGroups/{cloud.rg}/providers/Microsoft.Compute"
    if kind == "scale_set":
        return cloud.scale_set_body(0), f"{compute}/virtualMachineScaleSets/fuzz"
    if kind == "vm":
        return vm_body(cloud, cloud.subnet_id().split("/virtualNetworks")[0] + "/networkInterfaces/none", "fuzz"), \
            f"{compute}/virtualMachines/fuzz"
    return nic_body(cloud), f"/resourceGroups/{cloud.rg}/providers/Microsoft.Network/networkInterfaces/fuzz"


@pytest.mark.parametrize("kind", ["scale_set", "vm", "nic"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_bodies_get_4xx(cloud: Cloud, kind: str, data):
    body, path = _valid_body(cloud, kind)
    paths = list(_paths(body))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        target = body
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if isinstance(target, dict) and path[-1] in target:
            if data.draw(st.booleans()):
                del target[path[-1]]
            else:
                target[path[-1]] = data.draw(json_values)
    url = f"{cloud.info['arm_endpoint']}/subscriptions/{cloud.info['subscription_id']}{path}?api-version=2026-04-01"
    verify = ssl.create_default_context(cafile=cloud.info["ca_cert"])
    response = httpx.put(url, json=copy.deepcopy(body), headers=bearer(cloud.info), verify=verify)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"]
    else:  # a mutation that left a valid body; remove what it made
        httpx.delete(url, headers=bearer(cloud.info), verify=verify)
