"""`prefect-azmanagers manifest|template|import-azmanagers|export-azmanagers|keygen`.

The configuration AzManagers keeps in `~/.azmanagers`, as Prefect blocks: write and show the
manifest, build and inspect templates, move `~/.azmanagers` in and out, create an SSH key pair.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import SecretStr, ValidationError
from rich.console import Console
from rich.table import Table

from prefect_azmanagers import templates
from prefect_azmanagers.blocks import (
    DEFAULT_TEMPDISK,
    AzureManifest,
    describe_validation_error,
    load_manifest,
    prefect_api_errors,
    saved_names,
    template_block_name,
    template_name_from_block,
)
from prefect_azmanagers.cli.common import exit_with_error
from prefect_azmanagers.exceptions import KeyFileError
from prefect_azmanagers.templates import (
    DEFAULT_AZMANAGERS_DIR,
    TEMPLATE_KINDS,
    build_nictemplate,
    build_sstemplate,
    build_vmtemplate,
)

console = Console()

manifest_app = typer.Typer(no_args_is_help=True, help="The manifest: subscription, resource group, SSH keys.")
template_app = typer.Typer(no_args_is_help=True, help="Scale-set, VM and NIC templates.")


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
        exit_with_error(f"Invalid manifest: {describe_validation_error(exc)}")
    _save(manifest, template_block_name(name), overwrite)
    console.print(f"Saved manifest {name!r}.")


@manifest_app.command("show")
def manifest_show(name: str = typer.Argument("default", help="Manifest name.")) -> None:
    """Show a manifest; secrets are never printed.

    Example: prefect-azmanagers manifest show default
    """
    manifest = load_manifest(name)
    table = Table("field", "value", title=f"manifest {name!r}")
    for field in AzureManifest.model_fields:
        if field != "block_type_slug":
            value = getattr(manifest, field)
            table.add_row(field, "********" if isinstance(value, SecretStr) else str(value))
    console.print(table)


@template_app.command("list")
def template_list(
    kind: Optional[str] = typer.Option(None, help="scaleset | vm | nic (default: all)."),
) -> None:
    """List the saved templates by their AzManagers names.

    Example: prefect-azmanagers template list --kind scaleset
    """
    table = Table("kind", "name", "block name")
    for kind_name in _selected_kinds(kind):
        for template_name, block_name in saved_names(TEMPLATE_KINDS[kind_name].block_type).items():
            table.add_row(kind_name, template_name, block_name)
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
    template = TEMPLATE_KINDS[kind_name].load(name)
    console.print_json(json.dumps(template.to_azmanagers()))


def _selected_kinds(kind: str | None) -> list[str]:
    if kind is None:
        return list(TEMPLATE_KINDS)
    if kind not in TEMPLATE_KINDS:
        exit_with_error(f"Unknown template kind {kind!r}: use one of {', '.join(TEMPLATE_KINDS)}.")
    return [kind]


def _save(block, block_name: str, overwrite: bool) -> None:
    """Save `block`; an existing block of that name is an error unless `overwrite`."""
    try:
        with prefect_api_errors(f"save {template_name_from_block(block_name)!r}"):
            block.save(block_name, overwrite=overwrite, _sync=True)
    except ValueError as exc:
        if "already in use" in str(exc):
            exit_with_error(
                f"A {type(block).__name__} named {template_name_from_block(block_name)!r} exists; "
                f"pass --overwrite to replace it."
            )
        raise


def _parse_tags(tags: list[str]) -> dict[str, str]:
    parsed = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            exit_with_error(f"--tag {tag!r} must look like key=value.")
        parsed[key] = value
    return parsed


def _parse_disks(disks: list[str]) -> list[dict]:
    parsed = []
    for disk in disks:
        try:
            document = json.loads(disk)
        except json.JSONDecodeError as exc:
            exit_with_error(f"--data-disk {disk!r} is not JSON ({exc.msg}); e.g. '{{\"diskSizeGB\": 1023}}'.")
        parsed.append(document)
    return parsed


# The builders' options, each defined once (the keywords of AzManagers' build_*template).
SubscriptionId = Annotated[str, typer.Option(help="Subscription the resources are created in.")]
AdminUsername = Annotated[str, typer.Option(help="Admin user on the instances.")]
Location = Annotated[str, typer.Option(help="Azure region, e.g. southcentralus.")]
ResourceGroup = Annotated[str, typer.Option(help="Resource group the resources are created in.")]
Vnet = Annotated[str, typer.Option(help="Virtual network the instances are attached to.")]
Subnet = Annotated[str, typer.Option(help="Subnet of --vnet.")]
ImageGallery = Annotated[str, typer.Option(help="Compute gallery holding the image.")]
ImageName = Annotated[str, typer.Option(help="Image definition in the gallery.")]
VmSize = Annotated[str, typer.Option(help="VM size, e.g. Standard_D8s_v3.")]
SubscriptionIdImage = Annotated[str, typer.Option(help="Defaults to --subscription-id.")]
DefaultsToResourceGroup = Annotated[str, typer.Option(help="Defaults to --resource-group.")]
OsDiskSize = Annotated[int, typer.Option(help="OS disk size in GB.")]
DataDisk = Annotated[list[str], typer.Option(help='Data disk as JSON, repeatable: \'{"diskSizeGB": 1023}\'.')]
TempDisk = Annotated[str, typer.Option(help="Boot-script lines preparing the temp disk.")]
Tag = Annotated[list[str], typer.Option(help="Resource tag key=value, repeatable.")]
EncryptionAtHost = Annotated[bool, typer.Option(help="Encrypt the VM's disks and caches at the host.")]
Save = Annotated[bool, typer.Option(help="Save the template as a block (otherwise only print it).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing template.")]


@template_app.command("build-scaleset")
def template_build_scaleset(
    name: Annotated[str, typer.Argument(help="Template name, e.g. ussc/cbox08.")],
    subscription_id: SubscriptionId,
    admin_username: AdminUsername,
    location: Location,
    resource_group: ResourceGroup,
    vnet: Vnet,
    subnet: Subnet,
    image_gallery: ImageGallery,
    image_name: ImageName,
    sku_name: VmSize,
    subscription_id_image: SubscriptionIdImage = "",
    resource_group_vnet: DefaultsToResourceGroup = "",
    resource_group_image: DefaultsToResourceGroup = "",
    sku_tier: Annotated[str, typer.Option(help="Scale-set SKU tier.")] = "Standard",
    os_disk_size: OsDiskSize = 60,
    data_disk: DataDisk = [],
    tempdisk: TempDisk = DEFAULT_TEMPDISK,
    tag: Tag = [],
    encryption_at_host: EncryptionAtHost = False,
    save: Save = True,
    overwrite: Overwrite = False,
) -> None:
    """Build a scale-set template (AzManagers' build_sstemplate) and save it.

    Example: prefect-azmanagers template build-scaleset ussc/cbox08 --subscription-id SUB
    --admin-username cvx --location southcentralus --resource-group my-rg --vnet my-vnet
    --subnet default --image-gallery my-gallery --image-name my-image --sku-name Standard_D8s_v3
    """
    template = build_sstemplate(
        name, subscription_id=subscription_id, admin_username=admin_username, location=location,
        resource_group=resource_group, vnet=vnet, subnet=subnet, image_gallery=image_gallery,
        image_name=image_name, sku_name=sku_name, subscription_id_image=subscription_id_image,
        resource_group_vnet=resource_group_vnet, resource_group_image=resource_group_image,
        sku_tier=sku_tier, os_disk_size=os_disk_size, data_disks=_parse_disks(data_disk),
        tempdisk=tempdisk, tags=_parse_tags(tag), encryption_at_host=encryption_at_host,
    )
    _finish_build(template, name, save, overwrite)


@template_app.command("build-vm")
def template_build_vm(
    name: Annotated[str, typer.Argument(help="Template name, e.g. cbox.")],
    subscription_id: SubscriptionId,
    admin_username: AdminUsername,
    location: Location,
    resource_group: ResourceGroup,
    image_gallery: ImageGallery,
    image_name: ImageName,
    vm_size: VmSize,
    subscription_id_image: SubscriptionIdImage = "",
    resource_group_vnet: DefaultsToResourceGroup = "",
    resource_group_image: DefaultsToResourceGroup = "",
    nic_name: Annotated[str, typer.Option(help="NIC the VM is attached through.")] = "cbox-nic",
    os_disk_size: OsDiskSize = 60,
    data_disk: DataDisk = [],
    tempdisk: TempDisk = DEFAULT_TEMPDISK,
    tag: Tag = [],
    encryption_at_host: EncryptionAtHost = False,
    save: Save = True,
    overwrite: Overwrite = False,
) -> None:
    """Build a VM template (AzManagers' build_vmtemplate) and save it.

    Example: prefect-azmanagers template build-vm cbox --subscription-id SUB --admin-username cvx
    --location southcentralus --resource-group my-rg --image-gallery my-gallery
    --image-name my-image --vm-size Standard_D8s_v3
    """
    template = build_vmtemplate(
        name, subscription_id=subscription_id, admin_username=admin_username, location=location,
        resource_group=resource_group, image_gallery=image_gallery, image_name=image_name,
        vm_size=vm_size, subscription_id_image=subscription_id_image,
        resource_group_vnet=resource_group_vnet, resource_group_image=resource_group_image,
        nic_name=nic_name, os_disk_size=os_disk_size, data_disks=_parse_disks(data_disk),
        tempdisk=tempdisk, tags=_parse_tags(tag), encryption_at_host=encryption_at_host,
    )
    _finish_build(template, name, save, overwrite)


@template_app.command("build-nic")
def template_build_nic(
    name: Annotated[str, typer.Argument(help="Template name, e.g. cbox-nic.")],
    subscription_id: SubscriptionId,
    resource_group_vnet: Annotated[str, typer.Option(help="Resource group of --vnet.")],
    vnet: Vnet,
    subnet: Subnet,
    location: Location,
    accelerated: Annotated[bool, typer.Option(help="Accelerated networking.")] = True,
    save: Save = True,
    overwrite: Overwrite = False,
) -> None:
    """Build a NIC template (AzManagers' build_nictemplate) and save it.

    Example: prefect-azmanagers template build-nic cbox-nic --subscription-id SUB
    --resource-group-vnet my-rg --vnet my-vnet --subnet default --location southcentralus
    """
    template = build_nictemplate(
        name, subscription_id=subscription_id, resource_group_vnet=resource_group_vnet,
        vnet=vnet, subnet=subnet, location=location, accelerated=accelerated,
    )
    _finish_build(template, name, save, overwrite)


def _finish_build(template, name: str, save: bool, overwrite: bool) -> None:
    console.print_json(json.dumps(template.to_azmanagers()))
    if save:
        _save(template, template_block_name(name), overwrite)
        console.print(f"Saved {type(template).__name__} {name!r} (block {template_block_name(name)!r}).")


def import_azmanagers(
    directory: Path = typer.Option(DEFAULT_AZMANAGERS_DIR, "--dir", help="The AzManagers folder."),
    manifest_name: str = typer.Option("default", help="Block name for manifest.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing blocks."),
) -> None:
    """Import ~/.azmanagers (manifest.json, templates_*.json) as Prefect blocks, unchanged.

    Example: prefect-azmanagers import-azmanagers --dir ~/.azmanagers
    """
    config = templates.import_azmanagers(directory, manifest_name=manifest_name, overwrite=overwrite)
    table = Table("kind", "name", "block name", title=f"imported from {directory}")
    if config.manifest is not None:
        table.add_row("manifest", manifest_name, template_block_name(manifest_name))
    for kind in TEMPLATE_KINDS:
        for name in config.templates(kind):
            table.add_row(kind, name, template_block_name(name))
    console.print(table)


def export_azmanagers(
    directory: Path = typer.Option(DEFAULT_AZMANAGERS_DIR, "--dir", help="The AzManagers folder."),
    manifest_name: str = typer.Option("default", help="Manifest block written as manifest.json."),
) -> None:
    """Write the manifest and template blocks as AzManagers' JSON files.

    Example: prefect-azmanagers export-azmanagers --dir /tmp/azmanagers
    """
    for path in templates.export_azmanagers(directory, manifest_name=manifest_name):
        console.print(f"wrote {path}")


def keygen(
    private_key_file: Path = typer.Option(
        Path("~/.ssh/azmanagers_rsa"), "--file", help="Private key path; the public key gets .pub."
    ),
    bits: int = typer.Option(3072, min=3072, help="RSA key size (Azure accepts RSA for Linux VMs)."),
) -> None:
    """Create the RSA key pair the manifest points at (private key 0600); never overwrites.

    Example: prefect-azmanagers keygen --file ~/.ssh/azmanagers_rsa
    """
    private_path, public_path = generate_key_pair(private_key_file, bits=bits)
    console.print(f"Created {private_path} (0600) and {public_path}.")


def generate_key_pair(private_key_file: Path, *, bits: int = 3072) -> tuple[Path, Path]:
    """Write a new RSA key pair (OpenSSH format) at `private_key_file` and `<it>.pub`.

    Refuses to overwrite either file: an existing key may be installed on running VMs.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private_path = Path(private_key_file).expanduser()
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(
                f"{path} exists; refusing to overwrite a key that may be in use. "
                f"Remove it first or choose another --file."
            )
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_bytes = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    private_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{private_path} appeared while generating the key; not overwritten.") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_bytes)
    comment = f" azmanagers@{socket.gethostname()}".encode()
    try:
        public_path.write_bytes(public_bytes + comment + b"\n")
    except OSError:
        private_path.unlink()
        raise
    return private_path, public_path
