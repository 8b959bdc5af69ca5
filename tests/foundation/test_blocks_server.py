"""Blocks through a real Prefect server: save/load, loaders' errors, secrets, registration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from prefect_azmanagers.blocks import (
    AzureManifest,
    NICTemplate,
    ScaleSetTemplate,
    VMTemplate,
    aload_scaleset_template,
    load_manifest,
    load_nic_template,
    load_scaleset_template,
    load_vm_template,
    template_block_name,
)
from prefect_azmanagers.cli import app
from prefect_azmanagers.exceptions import ConfigurationError, ManifestNotFound, PrefectAPIUnreachable, TemplateNotFound
from prefect_azmanagers.templates import build_nictemplate, build_sstemplate, build_vmtemplate

from .test_builders import NIC_ARGS, SCALESET_ARGS, VM_ARGS

pytestmark = pytest.mark.usefixtures("prefect_server")

SECRET = "s3cr3t-" + uuid.uuid4().hex
TOKEN = "t0ken-" + uuid.uuid4().hex


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def secret_manifest() -> AzureManifest:
    return AzureManifest(
        subscription_id="SUB", resource_group="rg", ssh_user="cvx", credential="client_secret",
        client_id="app", tenant_id="tenant", client_secret=SECRET, static_token=TOKEN,
        ssh_private_key="-----BEGIN OPENSSH PRIVATE KEY-----\n" + SECRET + "\n",
    )


def test_each_block_round_trips_through_the_server() -> None:
    blocks = {
        unique("m"): secret_manifest(),
        "ussc/" + unique("ss"): build_sstemplate("ussc/x", **SCALESET_ARGS),
        unique("vm"): build_vmtemplate("vm", **VM_ARGS),
        unique("nic"): build_nictemplate("nic", **NIC_ARGS),
        "Team_A/" + unique("nic.v2"): build_nictemplate("nic", **NIC_ARGS),  # escapes, leading dash
    }
    loaders = {AzureManifest: load_manifest, ScaleSetTemplate: load_scaleset_template,
               VMTemplate: load_vm_template, NICTemplate: load_nic_template}
    for name, block in blocks.items():
        block.save(template_block_name(name), _sync=True)
        loaded = loaders[type(block)](name)
        assert type(loaded) is type(block)
        assert loaded.model_dump() == block.model_dump()
    manifest = load_manifest(next(iter(blocks)))
    assert manifest.client_secret.get_secret_value() == SECRET
    assert manifest.read_private_key().endswith(SECRET + "\n")


def test_loader_accepts_a_block_instance_and_the_block_name() -> None:
    template = build_sstemplate("a/b", **SCALESET_ARGS)
    assert load_scaleset_template(template) is template
    name = "team/" + unique("cbox")
    template.save(template_block_name(name), _sync=True)
    assert load_scaleset_template(template_block_name(name)).value == template.value


def test_async_loader_works_inside_an_event_loop() -> None:
    import asyncio

    name = unique("async")
    build_sstemplate(name, **SCALESET_ARGS).save(name, _sync=True)
    assert asyncio.run(aload_scaleset_template(name)).value["sku"]["name"] == "Standard_D8s_v3"


def test_unknown_template_lists_the_known_ones() -> None:
    known = "ussc/" + unique("known")
    build_nictemplate("n", **NIC_ARGS).save(template_block_name(known), _sync=True)
    with pytest.raises(TemplateNotFound) as err:
        load_nic_template("no/such-template")
    message = str(err.value)
    assert "No NIC template named 'no/such-template'" in message
    assert repr(known) in message and "template build-nic" in message


def test_missing_manifest_says_how_to_create_one() -> None:
    with pytest.raises(ManifestNotFound, match="manifest write .*localcloud start"):
        load_manifest(unique("absent"))


def test_unreachable_prefect_api_is_a_clear_error() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(PrefectAPIUnreachable, match="Cannot reach the Prefect API"):
            load_manifest("default")


def test_a_saved_block_of_the_wrong_shape_is_a_configuration_error() -> None:
    name = unique("broken")
    template = build_sstemplate(name, **SCALESET_ARGS)
    template.save(name, _sync=True)
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, ScaleSetTemplate.get_block_type_slug())
        from prefect.client.schemas.actions import BlockDocumentUpdate

        data = dict(document.data)
        data["value"] = {"location": "x"}
        client.update_block_document(document.id, BlockDocumentUpdate(data=data))
    try:
        with pytest.raises(ConfigurationError, match=r"does not have the expected shape: .*sku\.name"):
            load_scaleset_template(name)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_block_document(document.id)


def test_secrets_are_not_in_the_document_read_without_secrets() -> None:
    name = unique("secret")
    secret_manifest().save(name, _sync=True)
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            name, AzureManifest.get_block_type_slug(), include_secrets=False
        )
    dumped = json.dumps(document.data, default=str)
    assert SECRET not in dumped and TOKEN not in dumped
    assert document.data["client_id"] == "app"  # non-secret fields are there


def test_manifest_show_never_prints_secrets() -> None:
    name = unique("show")
    secret_manifest().save(name, _sync=True)
    result = CliRunner().invoke(app, ["manifest", "show", name], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "client_secret" in result.output and "tenant" in result.output
    assert SECRET not in result.output and TOKEN not in result.output


def test_manifest_write_then_overwrite_refusal() -> None:
    name = unique("written")
    args = ["manifest", "write", "--name", name, "--subscription-id", "SUB", "--resource-group", "rg",
            "--ssh-user", "cvx", "--location", "westus"]
    runner = CliRunner()
    assert runner.invoke(app, args).exit_code == 0
    assert load_manifest(name).location == "westus"
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert runner.invoke(app, [*args[:-1], "eastus", "--overwrite"]).exit_code == 0
    assert load_manifest(name).location == "eastus"


def test_manifest_write_rejects_an_incomplete_credential() -> None:
    result = CliRunner().invoke(app, ["manifest", "write", "--name", unique("bad"), "--subscription-id", "S",
                                      "--resource-group", "rg", "--ssh-user", "u", "--credential", "static"])
    assert result.exit_code == 1 and "needs static_token" in result.output


def test_template_cli_build_list_show() -> None:
    name = "cli/" + unique("cbox")
    runner = CliRunner()
    build = runner.invoke(app, [
        "template", "build-scaleset", name, "--subscription-id", "SUB", "--admin-username", "cvx",
        "--location", "southcentralus", "--resource-group", "my-rg", "--vnet", "my-vnet",
        "--subnet", "default", "--image-gallery", "my-gallery", "--image-name", "my-image",
        "--sku-name", "Standard_D8s_v3", "--tag", "team=hpc", "--data-disk", '{"diskSizeGB": 10}',
    ])
    assert build.exit_code == 0, build.output
    template = load_scaleset_template(name)
    assert template.value["tags"] == {"team": "hpc"}
    assert template.value["properties"]["virtualMachineProfile"]["storageProfile"]["dataDisks"][0]["diskSizeGB"] == 10
    listing = runner.invoke(app, ["template", "list", "--kind", "scaleset"], env={"COLUMNS": "300"})
    assert name in listing.output and template_block_name(name) in listing.output
    shown = runner.invoke(app, ["template", "show", name])
    assert json.loads(shown.output) == template.to_azmanagers()
    unknown = runner.invoke(app, ["template", "show", "cli/none", "--kind", "vm"])
    assert unknown.exit_code == 1 and "No VM template named 'cli/none'" in unknown.output


def test_collection_entry_point_registers_the_block_types() -> None:
    from prefect.blocks.core import Block
    from prefect.plugins import load_prefect_collections
    from prefect.utilities.dispatch import get_registry_for_type

    assert "prefect_azmanagers" in load_prefect_collections()
    registry = get_registry_for_type(Block)
    for block_type in (AzureManifest, ScaleSetTemplate, VMTemplate, NICTemplate):
        assert registry[block_type.get_block_type_slug()] is block_type


def test_prefect_block_register_registers_the_four_types(prefect_server) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "prefect_azmanagers"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PREFECT_API_URL=prefect_server.api_url, COLUMNS="200"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for block_type in (AzureManifest, ScaleSetTemplate, VMTemplate, NICTemplate):
        assert block_type.get_block_type_name() in result.stdout
    with get_client(sync_client=True) as client:
        slugs = {t.slug for t in client.read_block_types()}
    assert {"azmanagers-manifest", "azmanagers-scale-set-template", "azmanagers-vm-template",
            "azmanagers-nic-template"} <= slugs
