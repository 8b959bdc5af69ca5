"""The template builders against AzManagers' reference JSON (tests/foundation/data/azmanagers)."""

from __future__ import annotations

import copy
import json

import pytest

from prefect_azmanagers.exceptions import TemplateError
from prefect_azmanagers.templates import build_nictemplate, build_sstemplate, build_vmtemplate

from .conftest import REFERENCE_DIR

SCALESET_ARGS = dict(
    subscription_id="SUB", admin_username="cvx", location="southcentralus",
    resource_group="my-rg", vnet="my-vnet", subnet="default", image_gallery="my-gallery",
    image_name="my-image", sku_name="Standard_D8s_v3",
)
VM_ARGS = dict(
    subscription_id="SUB", admin_username="cvx", location="southcentralus",
    resource_group="my-rg", image_gallery="my-gallery", image_name="my-image",
    vm_size="Standard_D8s_v3",
)
NIC_ARGS = dict(
    subscription_id="SUB", resource_group_vnet="my-rg", vnet="my-vnet", subnet="default",
    location="southcentralus",
)


def reference(filename: str, name: str) -> dict:
    return json.loads((REFERENCE_DIR / filename).read_text())[name]


def test_scaleset_builder_reproduces_the_reference_example() -> None:
    expected = copy.deepcopy(reference("templates_scaleset.json", "cbox08"))
    # The reference example predates two keys AzManagers.jl's build_sstemplate now always adds.
    expected["value"]["properties"]["additionalCapabilities"] = {"ultraSSDEnabled": False}
    expected["value"]["properties"]["virtualMachineProfile"]["securityProfile"] = {"encryptionAtHost": False}

    assert build_sstemplate("cbox08", **SCALESET_ARGS).to_azmanagers() == expected


def test_scaleset_builder_with_slash_name_disks_and_tags_matches_reference() -> None:
    built = build_sstemplate(
        "ussc/t107/v4/amd/cbox176", **{**SCALESET_ARGS, "sku_name": "Standard_HB176rs_v4"},
        os_disk_size=128, data_disks=[{}], tags={"project": "t107"},
    )
    assert built.to_azmanagers() == reference("templates_scaleset.json", "ussc/t107/v4/amd/cbox176")


def test_vm_builder_matches_reference_except_the_fixed_nic_id() -> None:
    expected = copy.deepcopy(reference("templates_vm.json", "cbox"))
    nic = expected["value"]["properties"]["networkProfile"]["networkInterfaces"][0]
    # AzManagers.jl writes "/subscription/" here; ARM ids start "/subscriptions/".
    assert nic["id"].startswith("/subscription/SUB/")
    nic["id"] = nic["id"].replace("/subscription/", "/subscriptions/", 1)

    assert build_vmtemplate("cbox", **VM_ARGS).to_azmanagers() == expected


def test_nic_builder_reproduces_the_reference() -> None:
    assert build_nictemplate("cbox-nic", **NIC_ARGS).to_azmanagers() == reference("templates_nic.json", "cbox-nic")
    body = build_nictemplate("cbox-nic", **NIC_ARGS, accelerated=False).value
    assert body["properties"]["enableAcceleratedNetworking"] is False


def test_optional_resource_groups_and_image_subscription_are_used() -> None:
    value = build_sstemplate(
        "c", **SCALESET_ARGS, subscription_id_image="IMGSUB", resource_group_image="img-rg",
        resource_group_vnet="net-rg",
    ).value["properties"]["virtualMachineProfile"]
    assert value["storageProfile"]["imageReference"]["id"] == (
        "/subscriptions/IMGSUB/resourceGroups/img-rg/providers/Microsoft.Compute/galleries/my-gallery/images/my-image"
    )
    subnet_id = value["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]["ipConfigurations"][0][
        "properties"]["subnet"]["id"]
    assert subnet_id.startswith("/subscriptions/SUB/resourceGroups/net-rg/")


def test_data_disks_merge_defaults_number_luns_and_detect_ultrassd() -> None:
    vm = build_vmtemplate(
        "cbox", **VM_ARGS,
        data_disks=[{"diskSizeGB": 10}, {"managedDisk": {"storageAccountType": "UltraSSD_LRS"}, "lun": 9}],
    ).value["properties"]
    assert vm["storageProfile"]["dataDisks"] == [
        {"createOption": "Empty", "diskSizeGB": 10, "lun": 1, "managedDisk": {"storageAccountType": "Premium_LRS"},
         "name": "scratch1"},
        {"createOption": "Empty", "diskSizeGB": 1023, "lun": 2, "managedDisk": {"storageAccountType": "UltraSSD_LRS"},
         "name": "scratch2"},
    ]
    assert vm["additionalCapabilities"] == {"ultraSSDEnabled": True}


def test_computer_name_prefix_is_the_last_path_segment_with_plus_spelled_out() -> None:
    profile = build_sstemplate("ussc/hb+120", **SCALESET_ARGS).value["properties"]["virtualMachineProfile"]
    assert profile["osProfile"]["computerNamePrefix"] == "hbplus120"


def test_missing_required_arguments_are_named() -> None:
    args = {**SCALESET_ARGS, "vnet": "", "sku_name": ""}
    with pytest.raises(TemplateError, match="build_sstemplate needs non-empty strings for: vnet, sku_name"):
        build_sstemplate("c", **args)
    with pytest.raises(TypeError, match="subnet"):
        build_nictemplate("n", **{k: v for k, v in NIC_ARGS.items() if k != "subnet"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"os_disk_size": 0}, "os_disk_size must be a positive"),
        ({"data_disks": ["big"]}, r"data_disks\[0\] must be a dict"),
        ({"tags": ["a"]}, "tags must be a dict"),
    ],
)
def test_bad_optional_arguments_say_what_is_wrong(kwargs: dict, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        build_sstemplate("c", **SCALESET_ARGS, **kwargs)
