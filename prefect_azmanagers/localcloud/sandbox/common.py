"""What SandboxHost and its network modes share: the errors, a VM's boot request, an instance's
runtime record."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from prefect_azmanagers.localcloud.imds import IMDSServer, InstanceMetadata


class SandboxError(RuntimeError):
    """The sandbox host cannot do what was asked (not started, unknown instance, no address)."""


class SandboxBootError(SandboxError):
    """An instance did not come up; the message says why and shows the tail of its logs."""


@dataclass
class InstanceSpec:
    """What the control plane knows of a VM when it boots it (from the ARM request)."""

    key: str  # the instance's vmId
    name: str  # VM name
    computer_name: str
    admin_username: str
    public_keys: list[str]  # OpenSSH public key lines from osProfile
    custom_data: str | None  # base64, as sent in ARM
    metadata: dict  # IMDS "compute" document
    boot_delay: float = 0.0


@dataclass
class SandboxInstance:
    """One instance as the host runs it: address, sandbox dir, processes, IMDS."""

    key: str
    index: int
    ip: str
    sandbox: Path
    metadata: InstanceMetadata
    state: str = "allocated"  # allocated | booting | running | failed | killed
    netns_file: Path | None = None  # isolated mode: the instance's network namespace
    sshd: asyncio.subprocess.Process | None = None
    boot_script: asyncio.subprocess.Process | None = None
    imds: IMDSServer | None = None
    forwarders: list = field(default_factory=list)  # TCPForwarders of loopback services into it
    host_key: str | None = None
    mount_ns: int | None = None  # loopback mode: an fd on the instance's mount namespace
    boot_task: asyncio.Task | None = None
    reaper: asyncio.Task | None = None
    logs: list = field(default_factory=list)  # open log files handed to the processes


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
