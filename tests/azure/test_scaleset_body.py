"""The ARM body a ScaleSet sends: keys, customData, tags, spot, priority mix, image overrides."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from prefect_azmanagers.azure.scaleset import ScaleSet, apply_image_override
from prefect_azmanagers.blocks import AzureManifest
from prefect_azmanagers.exceptions import ConfigurationError, TemplateError
from prefect_azmanagers.templates import build_sstemplate
from tests.azure.conftest import with_provisioning

PUBKEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 test@azm"


@pytest.fixture
def manifest():
    return AzureManifest(subscription_id="SUB", resource_group="rg", ssh_user="azureuser",
                         ssh_public_key=PUBKEY)


@pytest.fixture
def template():
    return build_sstemplate("cbox08", subscription_id="SUB", admin_username="cvx", location="southcentralus",
                            resource_group="rg", vnet="vnet", subnet="default", image_gallery="gal",
                            image_name="img", sku_name="Standard_D8s_v3", tags={"team": "geo"})


def scaleset(manifest, template, **kw):
    return ScaleSet(SimpleNamespace(subscription_id="SUB"), manifest, template, "azm", custom_data="Y3VzdG9t", tags={"azmanagers-cluster": "c1"}, **with_provisioning(kw))


def test_regular_body(manifest, template):
    body = scaleset(manifest, template).body(5)
    profile = body["properties"]["virtualMachineProfile"]
    assert body["sku"]["capacity"] == 5
    assert body["tags"] == {"team": "geo", "azmanagers-cluster": "c1"}
    os_profile = profile["osProfile"]
    assert os_profile["customData"] == "Y3VzdG9t"
    assert os_profile["adminUsername"] == "azureuser"
    assert os_profile["computerNamePrefix"] == "azm-"
    assert os_profile["linuxConfiguration"]["ssh"]["publicKeys"] == [
        {"path": "/home/azureuser/.ssh/authorized_keys", "keyData": PUBKEY}]
    assert "priority" not in profile and body["properties"].get("orchestrationMode") != "Flexible"
    # the template itself is untouched
    assert template.value["sku"]["capacity"] == 2
    assert "customData" not in template.value["properties"]["virtualMachineProfile"]["osProfile"]


def test_spot_body(manifest, template):
    body = scaleset(manifest, template, spot=True, max_price=0.25, eviction_policy="Deallocate").body(3)
    profile = body["properties"]["virtualMachineProfile"]
    assert (profile["priority"], profile["evictionPolicy"], profile["billingProfile"]) == (
        "Spot", "Deallocate", {"maxPrice": 0.25})
    assert "priorityMixPolicy" not in body["properties"]


def test_priority_mix_body_is_flexible(manifest, template):
    body = scaleset(manifest, template, spot=True, spot_base_regular_priority_count=2,
                    spot_regular_percentage_above_base=25).body(10)
    props = body["properties"]
    assert props["orchestrationMode"] == "Flexible"
    assert props["priorityMixPolicy"] == {"baseRegularPriorityCount": 2, "regularPriorityPercentageAboveBase": 25}
    assert props["platformFaultDomainCount"] == 1
    assert props["virtualMachineProfile"]["networkProfile"]["networkApiVersion"] == "2020-11-01"
    for key in ("overprovision", "upgradePolicy"):
        assert key not in props


def test_new_instance_split(manifest, template):
    mix = scaleset(manifest, template, spot=True, spot_base_regular_priority_count=2,
                   spot_regular_percentage_above_base=50)
    assert mix._new_instances(0, 4) == (3, 1)
    assert mix._new_instances(4, 6) == (1, 1)
    assert scaleset(manifest, template, spot=True)._new_instances(2, 5) == (0, 3)
    assert scaleset(manifest, template)._new_instances(2, 5) == (3, 0)


def test_os_disk_and_image_overrides(manifest, template):
    body = scaleset(manifest, template, os_disk_size=200, image_name="other", image_version="1.2.3").body(1)
    storage = body["properties"]["virtualMachineProfile"]["storageProfile"]
    assert storage["osDisk"]["diskSizeGB"] == 200
    assert storage["imageReference"]["id"].endswith("/galleries/gal/images/other/versions/1.2.3")


def test_image_override_on_managed_image():
    storage = {"imageReference": {"id": "/subscriptions/S/resourceGroups/rg/providers/Microsoft.Compute/images/a"}}
    apply_image_override(storage, "b", None)
    assert storage["imageReference"]["id"].endswith("/Microsoft.Compute/images/b")
    with pytest.raises(TemplateError, match="gallery image"):
        apply_image_override(storage, None, "1.0.0")


@pytest.mark.parametrize("kw, words", [
    (dict(eviction_policy="Stop"), "eviction_policy"),
    (dict(spot=True, spot_regular_percentage_above_base=101), "0..100"),
    (dict(spot=True, spot_base_regular_priority_count=-1), ">= 0"),
    (dict(spot_base_regular_priority_count=2), "spot=True"),
])
def test_bad_parameters(manifest, template, kw, words):
    with pytest.raises(ConfigurationError, match=words):
        scaleset(manifest, template, **kw)


def test_template_without_sku(manifest, template):
    broken = template.model_copy(update={"value": {k: v for k, v in template.value.items() if k != "sku"}})
    with pytest.raises(TemplateError, match="sku.name"):
        scaleset(manifest, broken).body(1)
