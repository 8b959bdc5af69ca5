"""`prefect-azmanagers manifest|template|import-azmanagers|export-azmanagers|keygen`.

The configuration AzManagers keeps in `~/.azmanagers`, as Prefect blocks: write and show the
manifest, build and inspect templates, move `~/.azmanagers` in and out, create an SSH key pair.
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from prefect_azmanagers.blocks import (
    AzureManifest,
    NICTemplate,
    ScaleSetTemplate,
    VMTemplate,
    load_manifest,
    load_nic_template,
    load_scaleset_template,
    load_vm_template,
    template_block_name,
    template_name_from_block,
)
from prefect_azmanagers.cli import exit_with_error
from prefect_azmanagers.exceptions import TemplateError

console = Console()

manifest_app = typer.Typer(no_args_is_help=True, help="The manifest: subscription, resource group, SSH keys.")
template_app = typer.Typer(no_args_is_help=True, help="Scale-set, VM and NIC templates.")

_KINDS = {
    "scaleset": (ScaleSetTemplate, load_scaleset_template),
    "vm": (VMTemplate, load_vm_template),
    "nic": (NICTemplate, load_nic_template),
}


@manifest_app.command("write")
def manifest_write(
    subscription_id: str = typer.Option(..., help="Azure subscription id."),
    resource_group: str = typer.Option(..., help="Resource group for scale sets and VMs."),
    ssh_user: str = typer.Option(..., help="Admin user on the instances."),
    name: str = typer.Option("default", help="Block name of the manifest."),
    location: Optional[str] = typer.Option(None, help="Default Azure region."),
    ssh_private_key_file: str = typer.Option("~/.ssh/azmanagers_rsa", help="Private key file."),
    ssh_public_key_file: str = typer.Option("~/.ssh/azmanagers_rsa.pub", help="Public key file."),
    ssh_port: int = typer.Option(22, help="SSH port on the instances."),
    arm_endpoint: str = typer.Option("https://management.azure.com", help="ARM endpoint."),
    ca_bundle: Optional[str] = typer.Option(None, help="CA bundle for the ARM endpoint."),
    credential: str = typer.Option("default", help="default | client_secret | static."),
    client_id: Optional[str] = typer.Option(None, help="Service principal id (client_secret)."),
    tenant_id: Optional[str] = typer.Option(None, help="Tenant id (client_secret)."),
    client_secret: Optional[str] = typer.Option(
        None, envvar="AZURE_CLIENT_SECRET", help="Service principal secret (or $AZURE_CLIENT_SECRET)."
    ),
    static_token: Optional[str] = typer.Option(None, help="Bearer token (credential static)."),
    prefect_api_url_for_vms: Optional[str] = typer.Option(None, help="Prefect API URL as VMs reach it."),
    known_hosts_file: str = typer.Option("~/.azmanagers/known_hosts", help="Pinned host keys."),
    python: str = typer.Option("python3", help="Python interpreter on the instances."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing manifest."),
) -> None:
    """Save a manifest block (AzManagers' write_manifest).

    Example: prefect-azmanagers manifest write --subscription-id SUB --resource-group my-rg --ssh-user cvx
    """
    from pydantic import ValidationError

    try:
        manifest = AzureManifest(
            subscription_id=subscription_id, resource_group=resource_group, ssh_user=ssh_user,
            location=location, ssh_private_key_file=ssh_private_key_file,
            ssh_public_key_file=ssh_public_key_file, ssh_port=ssh_port, arm_endpoint=arm_endpoint,
            ca_bundle=ca_bundle, credential=credential, client_id=client_id, tenant_id=tenant_id,
            client_secret=client_secret, static_token=static_token,
            prefect_api_url_for_vms=prefect_api_url_for_vms, known_hosts_file=known_hosts_file,
            python=python,
        )
    except ValidationError as exc:
        exit_with_error(f"Invalid manifest: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    _save(manifest, template_block_name(name), overwrite)
    console.print(f"Saved manifest {name!r}.")


@manifest_app.command("show")
def manifest_show(name: str = typer.Argument("default", help="Manifest name.")) -> None:
    """Show a manifest; secrets are never printed.

    Example: prefect-azmanagers manifest show default
    """
    manifest = load_manifest(name)
    table = Table("field", "value", title=f"manifest {name!r}")
    for field, value in manifest.model_dump(exclude={"block_type_slug"}).items():
        secret = type(getattr(manifest, field)).__name__ == "SecretStr"
        table.add_row(field, "********" if secret and value is not None else str(value))
    console.print(table)


@template_app.command("list")
def template_list(
    kind: Optional[str] = typer.Option(None, help="scaleset | vm | nic (default: all)."),
) -> None:
    """List the saved templates by their AzManagers names.

    Example: prefect-azmanagers template list --kind scaleset
    """
    from prefect_azmanagers.blocks import _known_names

    table = Table("kind", "name", "block name")
    for kind_name in _selected_kinds(kind):
        for template_name in _known_names(_KINDS[kind_name][0]):
            table.add_row(kind_name, template_name, template_block_name(template_name))
    console.print(table)


@template_app.command("show")
def template_show(
    name: str = typer.Argument(..., help="Template name, e.g. ussc/cbox08."),
    kind: str = typer.Option("scaleset", help="scaleset | vm | nic."),
) -> None:
    """Print a template as AzManagers' JSON entry.

    Example: prefect-azmanagers template show ussc/cbox08 --kind scaleset
    """
    (kind_name,) = _selected_kinds(kind)
    template = _KINDS[kind_name][1](name)
    console.print_json(json.dumps(template.to_azmanagers()))


def _selected_kinds(kind: str | None) -> list[str]:
    if kind is None:
        return list(_KINDS)
    if kind not in _KINDS:
        exit_with_error(f"Unknown template kind {kind!r}: use one of {', '.join(_KINDS)}.")
    return [kind]


def _save(block, block_name: str, overwrite: bool) -> None:
    """Save `block`; an existing block of that name is an error unless `overwrite`."""
    try:
        block.save(block_name, overwrite=overwrite, _sync=True)
    except ValueError as exc:
        if "already in use" in str(exc):
            exit_with_error(
                f"A {type(block).__name__} named {template_name_from_block(block_name)!r} exists; "
                f"pass --overwrite to replace it."
            )
        raise
