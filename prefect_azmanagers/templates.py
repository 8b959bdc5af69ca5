"""Template builders and the `~/.azmanagers` bridge: AzManagers' JSON files <-> Prefect blocks.

```python
from prefect_azmanagers.templates import build_sstemplate, import_azmanagers

build_sstemplate(
    "cbox08", subscription_id="SUB", admin_username="cvx", location="southcentralus",
    resource_group="my-rg", vnet="my-vnet", subnet="default", image_gallery="my-gallery",
    image_name="my-image", sku_name="Standard_D8s_v3",
).save("cbox08")
import_azmanagers()        # ~/.azmanagers/manifest.json + templates_*.json -> blocks, unchanged
```

The builders produce the same ARM bodies as AzManagers.jl's `build_sstemplate`,
`build_vmtemplate` and `build_nictemplate` (src/templates.jl), with one fix: the VM template's
NIC id starts `/subscriptions/` (the original writes `/subscription/`, which ARM rejects if the
id is ever used as is).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from prefect.blocks.core import Block

from prefect_azmanagers.blocks import (
    DEFAULT_TEMPDISK,
    AzureManifest,
    NICTemplate,
    ScaleSetTemplate,
    VMTemplate,
    load_manifest,
    load_nic_template,
    load_scaleset_template,
    load_vm_template,
    prefect_api_errors,
    saved_names,
    template_block_name,
)
from prefect_azmanagers.exceptions import ConfigurationError, TemplateError

__all__ = [
    "build_sstemplate",
    "build_vmtemplate",
    "build_nictemplate",
    "AzManagersConfig",
    "read_azmanagers",
    "write_azmanagers",
    "import_azmanagers",
    "export_azmanagers",
    "DEFAULT_AZMANAGERS_DIR",
]

DEFAULT_AZMANAGERS_DIR = Path("~/.azmanagers")
MANIFEST_FILE = "manifest.json"


class TemplateKind(NamedTuple):
    """One kind of template: AzManagers' file for it, its block type and that type's loader."""

    filename: str
    block_type: type[Block]
    load: Callable[[str], Block]


TEMPLATE_KINDS = {
    "scaleset": TemplateKind("templates_scaleset.json", ScaleSetTemplate, load_scaleset_template),
    "vm": TemplateKind("templates_vm.json", VMTemplate, load_vm_template),
    "nic": TemplateKind("templates_nic.json", NICTemplate, load_nic_template),
}

# manifest.json key -> AzureManifest field (AzManagers.jl's write_manifest writes these five).
MANIFEST_KEYS = {
    "resourcegroup": "resource_group",
    "subscriptionid": "subscription_id",
    "ssh_user": "ssh_user",
    "ssh_private_key_file": "ssh_private_key_file",
    "ssh_public_key_file": "ssh_public_key_file",
}

# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _check_required(builder: str, **values: Any) -> None:
    missing = [name for name, value in values.items() if not isinstance(value, str) or not value]
    if missing:
        raise TemplateError(
            f"{builder} needs non-empty strings for: {', '.join(missing)}."
        )


def _subnet_id(subscription_id: str, resource_group: str, vnet: str, subnet: str) -> str:
    return (
        f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}/providers/"
        f"Microsoft.Network/virtualNetworks/{vnet}/subnets/{subnet}"
    )


def _gallery_image_id(subscription_id: str, resource_group: str, gallery: str, image: str) -> str:
    return (
        f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}/providers/"
        f"Microsoft.Compute/galleries/{gallery}/images/{image}"
    )


def _data_disks(builder: str, data_disks: Iterable[Mapping[str, Any]], *, named: bool) -> tuple[list[dict], bool]:
    """AzManagers' data-disk list (defaults merged in, luns 1..n) and whether UltraSSD is used."""
    disks: list[dict[str, Any]] = []
    for lun, disk in enumerate(data_disks, start=1):
        if not isinstance(disk, Mapping):
            raise TemplateError(f"{builder}: data_disks[{lun - 1}] must be a dict, got {type(disk).__name__}.")
        merged: dict[str, Any] = {
            "createOption": "Empty",
            "diskSizeGB": 1023,
            "lun": 1,
            "managedDisk": {"storageAccountType": "Premium_LRS"},
        }
        merged.update(disk)
        merged["lun"] = lun
        if named:
            merged["name"] = f"scratch{lun}"
        disks.append(merged)
    ultra = any(
        isinstance(d.get("managedDisk"), Mapping) and d["managedDisk"].get("storageAccountType") == "UltraSSD_LRS"
        for d in disks
    )
    return disks, ultra


def _os_disk(builder: str, os_disk_size: int) -> dict[str, Any]:
    if isinstance(os_disk_size, bool) or not isinstance(os_disk_size, int) or os_disk_size <= 0:
        raise TemplateError(f"{builder}: os_disk_size must be a positive number of GB, got {os_disk_size!r}.")
    return {
        "caching": "ReadWrite",
        "managedDisk": {"storageAccountType": "Standard_LRS"},
        "createOption": "FromImage",
        "diskSizeGB": os_disk_size,
    }


def _machine_profiles(
    builder: str,
    computer_name: dict[str, str],
    *,
    admin_username: str,
    image_id: str,
    os_disk_size: int,
    data_disks: Iterable[Mapping[str, Any]],
    name_data_disks: bool,
    encryption_at_host: bool,
) -> tuple[dict[str, Any], bool]:
    """The storage, OS and security profiles a VM and a scale-set model share, and whether the
    data disks need UltraSSD (`additionalCapabilities.ultraSSDEnabled`)."""
    disks, ultra = _data_disks(builder, data_disks, named=name_data_disks)
    profiles = {
        "storageProfile": {
            "imageReference": {"id": image_id},
            "osDisk": _os_disk(builder, os_disk_size),
            "dataDisks": disks,
        },
        "osProfile": {
            **computer_name,
            "adminUsername": admin_username,
            "linuxConfiguration": {"ssh": {"publicKeys": []}, "disablePasswordAuthentication": True},
        },
        "securityProfile": {"encryptionAtHost": encryption_at_host},
    }
    return profiles, ultra


def _with_tags(builder: str, value: dict[str, Any], tags: Mapping[str, str]) -> dict[str, Any]:
    if not isinstance(tags, Mapping):
        raise TemplateError(f"{builder}: tags must be a dict of strings, got {type(tags).__name__}.")
    if tags:
        value["tags"] = dict(tags)
    return value


def build_sstemplate(
    name: str,
    *,
    subscription_id: str,
    admin_username: str,
    location: str,
    resource_group: str,
    vnet: str,
    subnet: str,
    image_gallery: str,
    image_name: str,
    sku_name: str,
    subscription_id_image: str = "",
    resource_group_vnet: str = "",
    resource_group_image: str = "",
    sku_tier: str = "Standard",
    os_disk_size: int = 60,
    data_disks: Iterable[Mapping[str, Any]] = (),
    tempdisk: str = DEFAULT_TEMPDISK,
    tags: Mapping[str, str] | None = None,
    encryption_at_host: bool = False,
) -> ScaleSetTemplate:
    """A scale-set template, as AzManagers.jl's `build_sstemplate(name; ...)` builds it.

    The image is a gallery image (`image_gallery`/`image_name`); `*_image` and
    `resource_group_vnet` default to `subscription_id` / `resource_group`. Each data disk is a
    dict merged over `{"createOption": "Empty", "diskSizeGB": 1023, "managedDisk":
    {"storageAccountType": "Premium_LRS"}}`, with luns 1..n. Save it with `.save(name)`
    (see `template_block_name` for names with "/").
    """
    builder = "build_sstemplate"
    _check_required(
        builder, name=name, subscription_id=subscription_id, admin_username=admin_username,
        location=location, resource_group=resource_group, vnet=vnet, subnet=subnet,
        image_gallery=image_gallery, image_name=image_name, sku_name=sku_name,
    )
    computer_name = name.split("/")[-1].replace("+", "plus")
    profiles, ultra = _machine_profiles(
        builder, {"computerNamePrefix": computer_name}, admin_username=admin_username,
        image_id=_gallery_image_id(
            subscription_id_image or subscription_id, resource_group_image or resource_group,
            image_gallery, image_name,
        ),
        os_disk_size=os_disk_size, data_disks=data_disks, name_data_disks=False,
        encryption_at_host=encryption_at_host,
    )
    subnet_id = _subnet_id(subscription_id, resource_group_vnet or resource_group, vnet, subnet)
    ip_configuration = {"name": computer_name, "properties": {"subnet": {"id": subnet_id}}}
    value = {
        "sku": {"tier": sku_tier, "capacity": 2, "name": sku_name},
        "location": location,
        "properties": {
            "overprovision": True,
            "singlePlacementGroup": False,
            "additionalCapabilities": {"ultraSSDEnabled": ultra},
            "virtualMachineProfile": {
                **profiles,
                "networkProfile": {
                    "networkInterfaceConfigurations": [
                        {
                            "name": computer_name,
                            "properties": {"primary": True, "ipConfigurations": [ip_configuration]},
                        }
                    ]
                },
            },
            "upgradePolicy": {"mode": "Manual"},
        },
    }
    return ScaleSetTemplate(
        subscription_id=subscription_id, resource_group=resource_group, tempdisk=tempdisk,
        value=_with_tags(builder, value, tags or {}),
    )


def build_vmtemplate(
    name: str,
    *,
    subscription_id: str,
    admin_username: str,
    location: str,
    resource_group: str,
    image_gallery: str,
    image_name: str,
    vm_size: str,
    subscription_id_image: str = "",
    resource_group_vnet: str = "",
    resource_group_image: str = "",
    nic_name: str = "cbox-nic",
    os_disk_size: int = 60,
    data_disks: Iterable[Mapping[str, Any]] = (),
    tempdisk: str = DEFAULT_TEMPDISK,
    tags: Mapping[str, str] | None = None,
    encryption_at_host: bool = False,
) -> VMTemplate:
    """A standalone-VM template, as AzManagers.jl's `build_vmtemplate(name; ...)` builds it.

    The NIC reference points at `nic_name` in `resource_group_vnet` (the detached-VM code puts
    the id of the NIC it creates there). Data disks as in `build_sstemplate`, also named
    `scratch1..n`.
    """
    builder = "build_vmtemplate"
    _check_required(
        builder, name=name, subscription_id=subscription_id, admin_username=admin_username,
        location=location, resource_group=resource_group, image_gallery=image_gallery,
        image_name=image_name, vm_size=vm_size, nic_name=nic_name,
    )
    profiles, ultra = _machine_profiles(
        builder, {"computerName": name}, admin_username=admin_username,
        image_id=_gallery_image_id(
            subscription_id_image or subscription_id, resource_group_image or resource_group,
            image_gallery, image_name,
        ),
        os_disk_size=os_disk_size, data_disks=data_disks, name_data_disks=True,
        encryption_at_host=encryption_at_host,
    )
    nic_id = (
        f"/subscriptions/{subscription_id}/resourceGroups/{resource_group_vnet or resource_group}"
        f"/providers/Microsoft.Network/networkInterfaces/{nic_name}"
    )
    value = {
        "location": location,
        "properties": {
            "additionalCapabilities": {"ultraSSDEnabled": ultra},
            "hardwareProfile": {"vmSize": vm_size},
            **profiles,
            "networkProfile": {"networkInterfaces": [{"id": nic_id, "properties": {"primary": True}}]},
        },
    }
    return VMTemplate(
        subscription_id=subscription_id, resource_group=resource_group, tempdisk=tempdisk,
        value=_with_tags(builder, value, tags or {}),
    )


def build_nictemplate(
    name: str,
    *,
    subscription_id: str,
    resource_group_vnet: str,
    vnet: str,
    subnet: str,
    location: str,
    accelerated: bool = True,
) -> NICTemplate:
    """A NIC template, as AzManagers.jl's `build_nictemplate(name; ...)` builds it.

    `accelerated=False` for VM sizes without accelerated networking. `name` is where the
    template will be saved; the body itself does not contain it (as in the original).
    """
    _check_required(
        "build_nictemplate", name=name, subscription_id=subscription_id,
        resource_group_vnet=resource_group_vnet, vnet=vnet, subnet=subnet, location=location,
    )
    value = {
        "properties": {
            "enableAcceleratedNetworking": accelerated,
            "ipConfigurations": [
                {
                    "name": "ipConfig1",
                    "properties": {
                        "subnet": {"id": _subnet_id(subscription_id, resource_group_vnet, vnet, subnet)}
                    },
                }
            ],
        },
        "location": location,
    }
    return NICTemplate(value=value)


# --------------------------------------------------------------------------------------------
# ~/.azmanagers <-> blocks
# --------------------------------------------------------------------------------------------


@dataclass
class AzManagersConfig:
    """The content of an `~/.azmanagers` folder, as blocks keyed by their AzManagers names."""

    manifest: AzureManifest | None = None
    scalesets: dict[str, ScaleSetTemplate] = field(default_factory=dict)
    vms: dict[str, VMTemplate] = field(default_factory=dict)
    nics: dict[str, NICTemplate] = field(default_factory=dict)

    def templates(self, kind: str) -> dict[str, Any]:
        """The templates of `kind` ("scaleset", "vm" or "nic")."""
        return {"scaleset": self.scalesets, "vm": self.vms, "nic": self.nics}[kind]


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigurationError(f"Cannot read {path}: {reason}.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None


def read_azmanagers(directory: str | os.PathLike[str] = DEFAULT_AZMANAGERS_DIR) -> AzManagersConfig:
    """Read an AzManagers folder (missing files are simply absent); malformed ones raise."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ConfigurationError(f"{root} is not a directory; pass the folder holding manifest.json.")
    config = AzManagersConfig()
    manifest_path = root / MANIFEST_FILE
    if manifest_path.exists():
        config.manifest = _manifest_from_json(manifest_path, _read_json(manifest_path))
    for kind, (filename, block_type, _) in TEMPLATE_KINDS.items():
        path = root / filename
        if not path.exists():
            continue
        entries = _read_json(path)
        if not isinstance(entries, dict):
            raise TemplateError(f"{path} must hold an object {{name: template}}, got {type(entries).__name__}.")
        for name, entry in entries.items():
            if not name:
                raise TemplateError(f"{path} has a template with an empty name.")
            try:
                config.templates(kind)[name] = block_type.from_azmanagers(name, entry)
            except TemplateError as exc:
                raise TemplateError(f"{path}: {exc}") from None
    return config


def _manifest_from_json(path: Path, document: Any) -> AzureManifest:
    if not isinstance(document, dict):
        raise ConfigurationError(f"{path} must hold a JSON object, got {type(document).__name__}.")
    fields = {MANIFEST_KEYS[k]: v for k, v in document.items() if k in MANIFEST_KEYS and v != ""}
    missing = [k for k in ("subscriptionid", "resourcegroup", "ssh_user") if MANIFEST_KEYS[k] not in fields]
    if missing:
        raise ConfigurationError(f"{path} has no {', '.join(missing)}; write them with AzManagers' write_manifest.")
    bad = [k for k, v in document.items() if k in MANIFEST_KEYS and not isinstance(v, str)]
    if bad:
        raise ConfigurationError(f"{path}: {', '.join(bad)} must be strings.")
    return AzureManifest(**fields)


def _write_json(path: Path, document: Any, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=1)
        handle.write("\n")
    os.chmod(path, mode)


def write_azmanagers(config: AzManagersConfig, directory: str | os.PathLike[str] = DEFAULT_AZMANAGERS_DIR) -> list[Path]:
    """Write `config` as AzManagers' files (folder 0700, manifest 0600); returns the files written.

    Template files with no templates are not written, so an existing file is never emptied.
    """
    root = Path(directory).expanduser()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    if config.manifest is not None:
        manifest = config.manifest
        document = {key: getattr(manifest, attr) for key, attr in MANIFEST_KEYS.items()}
        _write_json(root / MANIFEST_FILE, document, 0o600)
        written.append(root / MANIFEST_FILE)
    for kind, (filename, _, _) in TEMPLATE_KINDS.items():
        templates = config.templates(kind)
        if templates:
            _write_json(root / filename, {n: t.to_azmanagers() for n, t in templates.items()}, 0o644)
            written.append(root / filename)
    return written


def import_azmanagers(
    directory: str | os.PathLike[str] = DEFAULT_AZMANAGERS_DIR,
    *,
    manifest_name: str = "default",
    overwrite: bool = False,
    api_url: str | None = None,
) -> AzManagersConfig:
    """Save the folder's manifest and templates as Prefect blocks; returns what was saved.

    Block names follow `template_block_name`; the manifest is saved as `manifest_name`.
    `api_url` targets another Prefect API than the current one. Everything is validated before
    anything is saved; an existing block is an error unless `overwrite`.
    """
    config = read_azmanagers(directory)
    if config.manifest is None and not any(config.templates(kind) for kind in TEMPLATE_KINDS):
        raise ConfigurationError(
            f"{directory} holds none of {MANIFEST_FILE}, "
            f"{', '.join(k.filename for k in TEMPLATE_KINDS.values())}: nothing to import."
        )
    with _prefect_api(api_url), prefect_api_errors(f"import {directory}"):
        existing = _existing_block_names(config, manifest_name) if not overwrite else []
        if existing:
            raise ConfigurationError(
                f"These blocks exist already: {', '.join(existing)}. Pass overwrite=True "
                f"(CLI: --overwrite) to replace them."
            )
        if config.manifest is not None:
            config.manifest.save(template_block_name(manifest_name), overwrite=True, _sync=True)
        for kind in TEMPLATE_KINDS:
            for name, template in config.templates(kind).items():
                template.save(template_block_name(name), overwrite=True, _sync=True)
    return config


def export_azmanagers(
    directory: str | os.PathLike[str] = DEFAULT_AZMANAGERS_DIR,
    *,
    manifest_name: str = "default",
    api_url: str | None = None,
) -> list[Path]:
    """Write the saved manifest `manifest_name` and all template blocks as AzManagers' files.

    A saved template that is not a valid template any more is a ConfigurationError naming it.
    """
    with _prefect_api(api_url), prefect_api_errors(f"export to {directory}"):
        config = AzManagersConfig()
        if manifest_name in saved_names(AzureManifest):
            config.manifest = load_manifest(manifest_name)
        for kind, (_, block_type, load) in TEMPLATE_KINDS.items():
            for name in saved_names(block_type):
                config.templates(kind)[name] = load(name)
    return write_azmanagers(config, directory)


def _existing_block_names(config: AzManagersConfig, manifest_name: str) -> list[str]:
    existing = []
    if config.manifest is not None and manifest_name in saved_names(AzureManifest):
        existing.append(f"manifest {manifest_name!r}")
    for kind, (_, block_type, _) in TEMPLATE_KINDS.items():
        known = saved_names(block_type)
        existing += [f"{kind} template {n!r}" for n in config.templates(kind) if n in known]
    return existing


def _prefect_api(api_url: str | None):
    """A context in which Prefect talks to `api_url` (or the current API when None)."""
    from contextlib import nullcontext

    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: api_url}) if api_url else nullcontext()
