"""Pure pieces of the ARM side: configuration file, routing, naming and priority-mix arithmetic."""

from __future__ import annotations

import json

import pytest

from prefect_azmanagers.localcloud import AdminError, LocalCloudAdmin, LocalCloudError, start
from prefect_azmanagers.localcloud.config import CONFIG_FILE, LocalCloudConfig, load_config
from prefect_azmanagers.localcloud.models.scalesets import base36, regular_count
from prefect_azmanagers.localcloud.urls import match


def test_config_defaults_are_written_then_read_back(tmp_path):
    config = load_config(tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["location"] == config.location
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"page_size": 3, "quotas": {"cores": 8}}))
    again = load_config(tmp_path)
    assert again.page_size == 3 and again.quotas == {"cores": 8} and again.sku("standard_d2s_V3").vcpus == 2


def test_config_errors_name_the_file_and_the_problem(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"page_sise": 3}))
    with pytest.raises(ValueError, match=r"config.json: unknown setting\(s\) \['page_sise'\]"):
        load_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"skus": [{"name": "x"}]}))
    with pytest.raises(ValueError, match="malformed 'skus' entry"):
        load_config(tmp_path)


def test_routing_is_case_insensitive_and_names_operations():
    route, params = match("GET", "/SUBSCRIPTIONS/s/resourcegroups/RG/providers/microsoft.compute/"
                                 "virtualmachinescalesets/ss/virtualmachines/3/INSTANCEVIEW")
    assert route.operation == "VirtualMachineScaleSetVMs_GetInstanceView"
    assert params == {"subscription": "s", "resource_group": "RG", "vmss": "ss", "instance_id": "3"}
    other_method, _ = match("PATCH", "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/n")
    assert other_method.method == ""  # known path, wrong method: 405, not 404
    assert match("GET", "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/x") is None


def test_computer_name_suffix_and_priority_mix():
    assert [base36(n).rjust(6, "0") for n in (0, 35, 36, 46655)] == ["000000", "00000z", "000010", "000zzz"]
    mix = {"baseRegularPriorityCount": 2, "regularPriorityPercentageAboveBase": 25}
    assert [regular_count(n, mix) for n in (1, 2, 3, 6, 10)] == [1, 2, 3, 3, 4]


def test_clear_errors_without_a_running_local_cloud(tmp_path):
    with pytest.raises(AdminError, match="no running local cloud"):
        LocalCloudAdmin.from_state_dir(tmp_path)
    with pytest.raises(LocalCloudError, match="must be a loopback URL"):
        start(tmp_path, prefect_api_url="http://10.1.2.3:4200/api")
    assert LocalCloudConfig().sku("Standard_NC6").restricted
