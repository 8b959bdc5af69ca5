"""Prefect blocks holding what AzManagers keeps in `~/.azmanagers`: the manifest and the templates.

```python
from prefect_azmanagers.blocks import load_manifest, load_scaleset_template

manifest = load_manifest()                              # block "default"
template = load_scaleset_template("ussc/t107/cbox08")   # AzManagers names work as they are
print(template.value["sku"]["name"], manifest.read_public_key()[:20])
```

Template names in AzManagers may contain "/" and capitals; Prefect block names may only contain
lowercase letters, digits and dashes. `template_block_name` maps one to the other by a reversible
rule (see its docstring) and the loaders apply it, so users keep the names they know.
"""

from __future__ import annotations

import asyncio
import logging
import re
import stat
from abc import ABC
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import httpx
from prefect.blocks.core import Block
from pydantic import Field, SecretStr, ValidationError, model_validator

from prefect_azmanagers.exceptions import (
    ConfigurationError,
    KeyFileError,
    ManifestNotFound,
    PrefectAPIUnreachable,
    TemplateError,
    TemplateNotFound,
)

__all__ = [
    "AzureManifest",
    "ScaleSetTemplate",
    "VMTemplate",
    "NICTemplate",
    "load_manifest",
    "load_scaleset_template",
    "load_vm_template",
    "load_nic_template",
    "aload_manifest",
    "aload_scaleset_template",
    "aload_vm_template",
    "aload_nic_template",
    "template_block_name",
    "template_name_from_block",
    "saved_names",
    "prefect_api_errors",
    "describe_validation_error",
]

logger = logging.getLogger(__name__)

DEFAULT_TEMPDISK = "sudo mkdir -m 777 /mnt/scratch\nln -s /mnt/scratch /scratch"

# --------------------------------------------------------------------------------------------
# Block names
# --------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[a-z0-9]")
_BLOCK_NAME = re.compile(r"[a-z0-9-]+")


def template_block_name(name: str) -> str:
    """The Prefect block name for an AzManagers template (or manifest) name; reversible.

    Rule, character by character:
      - `a-z`, `0-9` stay as they are;
      - `-` stays `-` and `/` becomes `--`, when the next character is `a-z` or `0-9`
        (so a run of dashes in the block name is always exactly one of these);
      - every other character (and a `-` or `/` not followed by `a-z0-9`) becomes `---` plus
        two lowercase hex digits of its code point, or `----` plus six hex digits above 0xff.

    So `localcloud-small` stays `localcloud-small`, `ussc/t107/cbox08` becomes
    `ussc--t107--cbox08`, and `Std_8` becomes `---53td---5f8`.
    `template_name_from_block` inverts it.
    """
    if not isinstance(name, str) or not name:
        raise TemplateError(f"A template name must be a non-empty string, got {name!r}.")
    out: list[str] = []
    for i, char in enumerate(name):
        followed_by_plain = i + 1 < len(name) and _PLAIN.fullmatch(name[i + 1]) is not None
        if _PLAIN.fullmatch(char):
            out.append(char)
        elif char == "-" and followed_by_plain:
            out.append("-")
        elif char == "/" and followed_by_plain:
            out.append("--")
        elif ord(char) <= 0xFF:
            out.append(f"---{ord(char):02x}")
        else:
            out.append(f"----{ord(char):06x}")
    return "".join(out)


def template_name_from_block(block_name: str) -> str:
    """The AzManagers name a block name stands for (the inverse of `template_block_name`).

    Raises TemplateError for a block name the rule cannot have produced.
    """
    out: list[str] = []
    i, n = 0, len(block_name)
    while i < n:
        char = block_name[i]
        if char != "-":
            if not _PLAIN.fullmatch(char):
                raise TemplateError(f"{block_name!r} is not a valid block name (character {char!r}).")
            out.append(char)
            i += 1
            continue
        run = len(block_name[i:]) - len(block_name[i:].lstrip("-"))
        width = {1: 0, 2: 0, 3: 2, 4: 6}.get(run)
        digits = block_name[i + run : i + run + (width or 0)]
        if width is None or len(digits) != width or not re.fullmatch(r"[0-9a-f]*", digits):
            raise TemplateError(
                f"{block_name!r} was not made by template_block_name (bad escape at position {i})."
            )
        out.append({1: "-", 2: "/"}.get(run) or chr(int(digits, 16)))
        i += run + width
    return "".join(out)


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------


class AzureManifest(Block):
    """Where and as whom AzManagers works: subscription, resource group, credentials, SSH keys.

    The port of AzManagers' `~/.azmanagers/manifest.json`. Create one with
    `prefect-azmanagers manifest write ...` (or `prefect-azmanagers localcloud start`, which saves
    one named `localcloud` pointing at the offline local cloud).

    Example:
        ```python
        from prefect_azmanagers import AzureManifest

        AzureManifest(
            subscription_id="00000000-0000-0000-0000-000000000000",
            resource_group="my-rg",
            ssh_user="cvx",
        ).save("default")
        manifest = AzureManifest.load("default")
        ```
    """

    _block_type_name = "AzManagers Manifest"
    _block_type_slug = "azmanagers-manifest"
    _documentation_url = "https://github.com/ChevronETC/AzManagers.jl"

    subscription_id: str = Field(description="Azure subscription id.")
    resource_group: str = Field(description="Resource group for scale sets and VMs.")
    location: str | None = Field(default=None, description="Default Azure region (optional).")
    ssh_user: str = Field(description="Admin user name on the instances.")
    ssh_private_key_file: str = Field(
        default="~/.ssh/azmanagers_rsa", description="Private key used to reach the instances."
    )
    ssh_public_key_file: str = Field(
        default="~/.ssh/azmanagers_rsa.pub", description="Public key installed on the instances."
    )
    ssh_private_key: SecretStr | None = Field(
        default=None, description="Private key material; takes precedence over the file."
    )
    ssh_public_key: str | None = Field(
        default=None, description="Public key material; takes precedence over the file."
    )
    ssh_port: int = Field(default=22, ge=1, le=65535, description="SSH port on the instances.")
    arm_endpoint: str = Field(
        default="https://management.azure.com", description="Azure Resource Manager endpoint."
    )
    ca_bundle: str | None = Field(
        default=None, description="CA bundle to verify the ARM endpoint (the local cloud's)."
    )
    credential: Literal["default", "client_secret", "managed_identity", "static"] = Field(
        default="default",
        description="'default' (DefaultAzureCredential), 'client_secret' (a service principal), "
        "'managed_identity' (the VM's own identity, from IMDS), or 'static' (a token).",
    )
    client_id: str | None = Field(
        default=None,
        description="Service principal id (client_secret), or a user-assigned identity's (managed_identity).",
    )
    tenant_id: str | None = Field(default=None, description="Tenant id (client_secret).")
    client_secret: SecretStr | None = Field(default=None, description="Service principal secret.")
    authority_host: str | None = Field(
        default=None,
        description="Microsoft Entra authority host (default login.microsoftonline.com; the local "
        "cloud's endpoint for its own token service).",
    )
    static_token: SecretStr | None = Field(
        default=None, description="Bearer token for credential 'static' (the local cloud's)."
    )
    prefect_api_url_for_vms: str | None = Field(
        default=None, description="Prefect API URL as the VMs reach it (detached VMs)."
    )
    known_hosts_file: str = Field(
        default="~/.azmanagers/known_hosts", description="Pinned SSH host keys of the instances."
    )
    python: str = Field(default="python3", description="Python interpreter on the instances.")
    blob_container: str | None = Field(
        default=None,
        description="Name of a saved prefect-azure AzureBlobStorageContainer block: the default "
                    "result storage of task runs on the workers (results and cache records, read "
                    "from anywhere) and where detached jobs store their results. Workers load it "
                    "from the Prefect API, so its credential never travels in customData.",
    )

    @property
    def result_storage_slug(self) -> str | None:
        """`blob_container` as Prefect's result-storage setting names a block."""
        return f"azure-blob-storage-container/{self.blob_container}" if self.blob_container else None

    def known_hosts_path(self) -> Path:
        """The known-hosts file, with `~` expanded."""
        return Path(self.known_hosts_file).expanduser()

    def read_private_key(self) -> str:
        """The private key (OpenSSH/PEM text): the material if set, else the file's content.

        Refuses a key file that group or others may read, as OpenSSH does.
        """
        if self.ssh_private_key is not None:
            return self.ssh_private_key.get_secret_value()
        path = Path(self.ssh_private_key_file).expanduser()
        mode = _stat_key_file(path, "private")
        if mode & 0o077:
            raise KeyFileError(
                f"Permissions {stat.S_IMODE(mode):04o} for private key {path} are too open: it must "
                f"not be accessible by group or others (OpenSSH refuses it too). "
                f"Fix: chmod 600 {path}"
            )
        return _read_key_file(path, "private")

    def read_public_key(self) -> str:
        """The public key line (`ssh-rsa AAAA... comment`): the material if set, else the file's."""
        if self.ssh_public_key is not None:
            return self.ssh_public_key.strip()
        path = Path(self.ssh_public_key_file).expanduser()
        _stat_key_file(path, "public")
        return _read_key_file(path, "public").strip()

    @model_validator(mode="after")
    def _check_credential_fields(self) -> AzureManifest:
        missing = {
            "client_secret": [f for f in ("client_id", "tenant_id", "client_secret") if not getattr(self, f)],
            "static": [f for f in ("static_token",) if not getattr(self, f)],
        }.get(self.credential, [])
        if missing:
            raise ValueError(
                f"credential={self.credential!r} needs {', '.join(missing)}; set them or use "
                f"credential='default'"
            )
        return self


def _stat_key_file(path: Path, kind: str) -> int:
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(
            f"The SSH {kind} key file {path} does not exist. Create a key pair with "
            f"`prefect-azmanagers keygen`, or point the manifest's ssh_{kind}_key_file at yours."
        ) from None
    except OSError as exc:
        raise KeyFileError(f"Cannot access the SSH {kind} key file {path}: {exc.strerror}.") from None


def _read_key_file(path: Path, kind: str) -> str:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text key file"
        raise KeyFileError(f"Cannot read the SSH {kind} key file {path}: {reason}.") from None
    if not text.strip():
        raise KeyFileError(f"The SSH {kind} key file {path} is empty.")
    return text


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


def _require(document: Any, path: str, kind: type) -> None:
    """Raise ValueError unless `document` has a value of type `kind` at the dotted `path`."""
    node = document
    for depth, key in enumerate(path.split(".")):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(path.split(".")[:depth]) or "the template"
            raise ValueError(f"value.{path} is missing (no {key!r} in {where})")
        node = node[key]
    if not isinstance(node, kind):
        raise ValueError(f"value.{path} must be a {kind.__name__}, got {type(node).__name__}")


class _MachineTemplate(Block, ABC):
    """Fields shared by scale-set and VM templates (AzManagers' template wrapper)."""

    _required_paths: ClassVar[tuple[tuple[str, type], ...]] = ()

    subscription_id: str = Field(description="Subscription the resources are created in.")
    resource_group: str = Field(description="Resource group the resources are created in.")
    tempdisk: str = Field(
        default=DEFAULT_TEMPDISK, description="Boot-script lines that prepare the temporary disk."
    )
    value: dict[str, Any] = Field(description="The ARM request body (camelCase), as in AzManagers.")

    @model_validator(mode="after")
    def _check_value_shape(self) -> _MachineTemplate:
        for path, kind in self._required_paths:
            _require(self.value, path, kind)
        return self

    def to_azmanagers(self) -> dict[str, Any]:
        """The entry as AzManagers writes it in templates_scaleset.json / templates_vm.json."""
        return {
            "subscriptionid": self.subscription_id,
            "resourcegroup": self.resource_group,
            "tempdisk": self.tempdisk,
            "value": self.value,
        }

    @classmethod
    def from_azmanagers(cls, name: str, entry: Any) -> _MachineTemplate:
        """Build the block from an AzManagers JSON entry; TemplateError names `name` if malformed."""
        if not isinstance(entry, dict):
            raise TemplateError(
                f"Template {name!r} must be an object with subscriptionid, resourcegroup, tempdisk "
                f"and value; got {type(entry).__name__}."
            )
        missing = [k for k in ("subscriptionid", "resourcegroup", "value") if k not in entry]
        if missing:
            raise TemplateError(f"Template {name!r} has no {', '.join(missing)}.")
        return _validated(
            cls,
            name,
            subscription_id=entry["subscriptionid"],
            resource_group=entry["resourcegroup"],
            tempdisk=entry.get("tempdisk", DEFAULT_TEMPDISK),
            value=entry["value"],
        )


class ScaleSetTemplate(_MachineTemplate):
    """An AzManagers scale-set template: the VMSS body workers are provisioned from.

    `value` is the ARM VirtualMachineScaleSet body exactly as AzManagers keeps it in
    `~/.azmanagers/templates_scaleset.json`; build one with `build_sstemplate`.

    Example:
        ```python
        from prefect_azmanagers import build_sstemplate

        build_sstemplate(
            "cbox08", subscription_id="SUB", admin_username="cvx", location="southcentralus",
            resource_group="my-rg", vnet="my-vnet", subnet="default",
            image_gallery="my-gallery", image_name="my-image", sku_name="Standard_D8s_v3",
        ).save("cbox08")
        ```
    """

    _block_type_name = "AzManagers Scale Set Template"
    _block_type_slug = "azmanagers-scale-set-template"
    _required_paths = (
        ("location", str),
        ("sku.name", str),
        ("properties.virtualMachineProfile.osProfile.adminUsername", str),
        ("properties.virtualMachineProfile.storageProfile", dict),
        ("properties.virtualMachineProfile.networkProfile", dict),
    )


class VMTemplate(_MachineTemplate):
    """An AzManagers VM template: the body of a standalone (detached) VM.

    `value` is the ARM VirtualMachine body exactly as AzManagers keeps it in
    `~/.azmanagers/templates_vm.json`; build one with `build_vmtemplate` (as in the
    `ScaleSetTemplate` example). A loaded template is a plain body that can be changed in place.

    Example:
        ```python
        from prefect_azmanagers import addproc
        from prefect_azmanagers.blocks import load_vm_template

        template = load_vm_template("cbox")
        template.value["properties"]["hardwareProfile"]["vmSize"] = "Standard_D16s_v3"
        vm = addproc(template, "cbox-nic")      # a detached VM of the larger size
        ```
    """

    _block_type_name = "AzManagers VM Template"
    _block_type_slug = "azmanagers-vm-template"
    _required_paths = (
        ("location", str),
        ("properties.hardwareProfile.vmSize", str),
        ("properties.osProfile.adminUsername", str),
        ("properties.storageProfile", dict),
        ("properties.networkProfile", dict),
    )


class NICTemplate(Block):
    """An AzManagers NIC template: the network interface a detached VM is attached through.

    `value` is the ARM NetworkInterface body exactly as in `~/.azmanagers/templates_nic.json`;
    build one with `build_nictemplate`.

    Example:
        ```python
        from prefect_azmanagers import build_nictemplate

        build_nictemplate(
            "cbox-nic", subscription_id="SUB", resource_group_vnet="my-rg",
            vnet="my-vnet", subnet="default", location="southcentralus",
        ).save("cbox-nic")
        ```
    """

    _block_type_name = "AzManagers NIC Template"
    _block_type_slug = "azmanagers-nic-template"

    value: dict[str, Any] = Field(description="The ARM network-interface body (camelCase).")

    @model_validator(mode="after")
    def _check_value_shape(self) -> NICTemplate:
        _require(self.value, "location", str)
        _require(self.value, "properties.ipConfigurations", list)
        return self

    def to_azmanagers(self) -> dict[str, Any]:
        """The entry as AzManagers writes it in templates_nic.json (the raw body)."""
        return self.value

    @classmethod
    def from_azmanagers(cls, name: str, entry: Any) -> NICTemplate:
        """Build the block from an AzManagers JSON entry; TemplateError names `name` if malformed."""
        return _validated(cls, name, value=entry)


_B = TypeVar("_B", bound=Block)


def _validated(cls: type[_B], name: str, **fields: Any) -> _B:
    try:
        return cls(**fields)
    except ValidationError as exc:
        raise TemplateError(f"{cls.__name__} {name!r} is malformed: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line account of a pydantic error: `field.path: message; ...`."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


@contextmanager
def prefect_api_errors(action: str) -> Iterator[None]:
    """Turn "the Prefect API cannot be reached" during `action` into PrefectAPIUnreachable."""
    try:
        yield
    except httpx.TransportError as exc:
        from prefect.settings import PREFECT_API_URL

        raise PrefectAPIUnreachable(
            f"Cannot reach the Prefect API ({PREFECT_API_URL.value() or 'ephemeral'}) to {action}: "
            f"{exc or type(exc).__name__}. Start a server (`prefect server start`) or set PREFECT_API_URL."
        ) from None


def saved_names(block_type: type[Block]) -> dict[str, str]:
    """The saved blocks of `block_type`: AzManagers name -> block name, sorted by name.

    A block saved under a name the rule cannot have produced is listed under its block name.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with prefect_api_errors(f"list the {block_type.get_block_type_name()} blocks"):
        with get_client(sync_client=True) as client:
            try:
                documents = client.read_block_documents_by_type(
                    block_type.get_block_type_slug(), include_secrets=False
                )
            except ObjectNotFound:
                return {}
    names = {}
    for document in documents:
        try:
            names[template_name_from_block(document.name)] = document.name
        except TemplateError:
            names[document.name] = document.name
    return dict(sorted(names.items()))


def _load(cls: type[_B], name_or_block: str | _B, what: str, not_found: type[Exception], how: str) -> _B:
    if isinstance(name_or_block, cls):
        return name_or_block
    if not isinstance(name_or_block, str):
        raise ConfigurationError(
            f"Expected a {cls.__name__} or the name of one, got {type(name_or_block).__name__}."
        )
    candidates = [template_block_name(name_or_block)]
    if _BLOCK_NAME.fullmatch(name_or_block) and name_or_block not in candidates:
        candidates.append(name_or_block)  # already a block name, e.g. copied from the UI
    for block_name in candidates:
        logger.debug("Loading %s %r from block %r", what, name_or_block, block_name)
        try:
            with prefect_api_errors(f"load the {what} {name_or_block!r}"):
                return cls.load(block_name, _sync=True)
        except RuntimeError as exc:  # Prefect wraps a failed validation in RuntimeError
            if not isinstance(exc.__cause__, ValidationError):
                raise
            raise ConfigurationError(
                f"The {what} block {block_name!r} does not have the expected shape: "
                f"{describe_validation_error(exc.__cause__)}. Save it again (e.g. with "
                f"`prefect-azmanagers import-azmanagers --overwrite`)."
            ) from None
        except ValueError as exc:
            if "Unable to find block document" not in str(exc):
                raise
    listing = ", ".join(repr(n) for n in saved_names(cls)) or "none"
    raise not_found(f"No {what} named {name_or_block!r} (known: {listing}). {how}")


def load_manifest(name_or_block: str | AzureManifest = "default") -> AzureManifest:
    """The manifest block `name_or_block` (returned as is if it is already a manifest)."""
    return _load(
        AzureManifest,
        name_or_block,
        "manifest",
        ManifestNotFound,
        "Create it with `prefect-azmanagers manifest write --name NAME --subscription-id ... "
        "--resource-group ... --ssh-user ...`, import ~/.azmanagers with "
        "`prefect-azmanagers import-azmanagers`, or start the offline cloud with "
        "`prefect-azmanagers localcloud start` (manifest 'localcloud').",
    )


_TEMPLATE_HOW = (
    "Save one with `prefect-azmanagers template build-{kind} NAME ...` or import ~/.azmanagers "
    "with `prefect-azmanagers import-azmanagers`."
)


def load_scaleset_template(name_or_block: str | ScaleSetTemplate) -> ScaleSetTemplate:
    """The scale-set template `name_or_block` (an AzManagers name such as "ussc/cbox08" works)."""
    return _load(
        ScaleSetTemplate, name_or_block, "scale-set template", TemplateNotFound,
        _TEMPLATE_HOW.format(kind="scaleset"),
    )


def load_vm_template(name_or_block: str | VMTemplate) -> VMTemplate:
    """The VM template `name_or_block`."""
    return _load(
        VMTemplate, name_or_block, "VM template", TemplateNotFound, _TEMPLATE_HOW.format(kind="vm")
    )


def load_nic_template(name_or_block: str | NICTemplate) -> NICTemplate:
    """The NIC template `name_or_block`."""
    return _load(
        NICTemplate, name_or_block, "NIC template", TemplateNotFound, _TEMPLATE_HOW.format(kind="nic")
    )


async def aload_manifest(name_or_block: str | AzureManifest = "default") -> AzureManifest:
    """`load_manifest` for async code (runs in a worker thread; the event loop is not blocked)."""
    return await asyncio.to_thread(load_manifest, name_or_block)


async def aload_scaleset_template(name_or_block: str | ScaleSetTemplate) -> ScaleSetTemplate:
    """`load_scaleset_template` for async code."""
    return await asyncio.to_thread(load_scaleset_template, name_or_block)


async def aload_vm_template(name_or_block: str | VMTemplate) -> VMTemplate:
    """`load_vm_template` for async code."""
    return await asyncio.to_thread(load_vm_template, name_or_block)


async def aload_nic_template(name_or_block: str | NICTemplate) -> NICTemplate:
    """`load_nic_template` for async code."""
    return await asyncio.to_thread(load_nic_template, name_or_block)
