"""The azure-vm worker's pure parts: registration, the job variables' form, the VM's
environment, the boot-script fragment and the infrastructure id."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from prefect.exceptions import InfrastructureNotFound
from prefect.workers.base import BaseWorker

from prefect_azmanagers.workers import vmrun
from prefect_azmanagers.workers.azure_vm import AzureVMWorker

ISSUE_VARIABLES = ["manifest", "vm_template", "nic_template", "spot", "max_price", "customenv",
                   "env", "os_disk_size", "image_name", "image_version", "boot_timeout",
                   "keep_on_failure"]


def test_the_type_is_registered_through_prefect_collections():
    assert "azure-vm" in BaseWorker.get_all_available_worker_types()
    assert BaseWorker.get_worker_class_from_type("azure-vm") is AzureVMWorker


def test_the_base_job_template_offers_every_variable_with_a_description():
    template = AzureVMWorker.get_default_base_job_template()
    properties = template["variables"]["properties"]
    for name in ISSUE_VARIABLES:
        assert properties[name].get("description"), name
        assert template["job_configuration"][name] == "{{ " + name + " }}"
    assert properties["manifest"]["default"] == "default"
    assert properties["spot"]["default"] is False and properties["max_price"]["default"] == -1
    assert properties["boot_timeout"]["default"] == 600
    assert properties["keep_on_failure"]["default"] == 0


def test_the_vm_environment_drops_the_worker_machines_own_settings():
    env = vmrun.vm_environment(
        {"PREFECT_HOME": "/root/.prefect", "PREFECT_API_URL": "http://127.0.0.1:4200/api",
         "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT__FLOW_RUN_ID": "abc",
         "PREFECT_LOGGING_LEVEL": "DEBUG", "MY_SETTING": "it's $HOME", "UNSET": None},
        api_url="http://10.0.0.4:4200/api", admin="azureuser")
    assert env == {"PREFECT__FLOW_RUN_ID": "abc", "PREFECT_LOGGING_LEVEL": "DEBUG",
                   "MY_SETTING": "it's $HOME", "PREFECT_API_URL": "http://10.0.0.4:4200/api",
                   "HOME": "/home/azureuser", "USER": "azureuser", "LOGNAME": "azureuser",
                   "PREFECT_HOME": "/home/azureuser/.prefect"}


def test_the_manifests_blob_container_is_the_runs_default_result_storage_unless_env_names_one():
    slug = "azure-blob-storage-container/localcloud"
    env = vmrun.vm_environment({}, api_url="http://10.0.0.4:4200/api", admin="azureuser",
                               default_storage_block=slug)
    assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == slug
    own = {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "local-file-system/mine"}
    env = vmrun.vm_environment(own, api_url="http://10.0.0.4:4200/api", admin="azureuser",
                               default_storage_block=slug)
    assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == "local-file-system/mine"
    env = vmrun.vm_environment({}, api_url="http://10.0.0.4:4200/api", admin="azureuser")
    assert "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK" not in env


def test_the_engine_command_is_prefects_unless_the_job_names_another():
    run_id = uuid.uuid4()
    default = f"/opt/py/bin/python -m prefect flow-run execute {run_id}"
    assert vmrun.engine_command("/opt/py/bin/python", run_id, None) == default
    assert vmrun.engine_command("/opt/py/bin/python", run_id, "prefect flow-run execute") == default
    assert vmrun.engine_command("/opt/py/bin/python", run_id, "my-launcher --go") == "my-launcher --go"


def test_the_engine_hook_is_valid_bash_and_waits_for_the_environment_file():
    run_id = uuid.uuid4()
    hook = vmrun.engine_hook(admin="azureuser", engine=f"python3 -m prefect flow-run execute {run_id}",
                             flow_run_id=run_id, wait_seconds=600)
    subprocess.run(["bash", "-n"], input=hook, text=True, check=True)
    assert "/home/azureuser/.azmanagers/run.env" in hook
    assert "runuser -u azureuser" in hook and "nohup" in hook


def test_infrastructure_ids_are_group_slash_name():
    assert vmrun.parse_infrastructure_pid("localcloud-rg/azmrun-abcdef") == ("localcloud-rg",
                                                                             "azmrun-abcdef")
    for bad in ("", "12345", "a/b/c", "/name", "group/"):
        with pytest.raises(InfrastructureNotFound):
            vmrun.parse_infrastructure_pid(bad)


def test_importing_the_registered_module_does_not_import_the_azure_sdk():
    code = ("import sys, prefect_azmanagers.workers.azure_vm; "
            "print(any(m.startswith(('azure.', 'asyncssh')) for m in sys.modules))")
    out = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"
