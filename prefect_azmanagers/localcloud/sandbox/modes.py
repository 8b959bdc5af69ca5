"""The two network modes of the sandboxes, as strategies SandboxHost calls at fixed points.

`IsolatedMode` (root): a network namespace per instance on the local cloud's virtual network,
a local account for the admin user, IMDS bound at 169.254.169.254 inside the namespace, the boot
script as root. `LoopbackMode` (no root): a 127.x.y.z address per instance on the host's
network, a user + mount + UTS namespace whose /etc/passwd names the local cloud's user
adminUsername, IMDS on the instance's address at an unprivileged port, the boot script as that
user. Everything else an instance is (sandbox dir, sshd, boot script, IMDS documents) is the
host's, the same in both modes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket

from prefect_azmanagers.localcloud import accounts, loopback, netns, sshd
from prefect_azmanagers.localcloud._hoststate import host_lock
from prefect_azmanagers.localcloud._proc import CommandError, end_namespace_processes, pids_in_namespace, run
from prefect_azmanagers.localcloud.fsview import PythonTrees, runuser_shim, setup_script
from prefect_azmanagers.localcloud.imds import NetnsBinder
from prefect_azmanagers.localcloud.sandbox.common import SandboxBootError, SandboxError, SandboxInstance

ISOLATED_IMDS_URL = f"http://{netns.IMDS_ADDRESS}"
LOOPBACK_UID = 1000  # who a root-run loopback instance's user is inside (never 0: sshd must not be root)
_COMMON_TOOLS = {"unshare": "util-linux", "nsenter": "util-linux", sshd.SSHD: "openssh-server",
                 "ssh-keygen": "openssh-client"}


class NetworkMode:
    """How instances are addressed, isolated and entered (one subclass per mode)."""

    name: str
    ssh_port: int
    tools: dict[str, str]  # program -> Debian package
    sshd_exit_hint = ""  # said when an instance's sshd exits at boot
    network: netns.VirtualNetwork | loopback.LoopbackNetwork | None = None

    def __init__(self, trees: PythonTrees):
        self.trees = trees

    def check_tools(self) -> None:
        missing = [f"{tool} (Debian package {pkg})" for tool, pkg in self.tools.items() if shutil.which(tool) is None]
        if missing:
            raise SandboxError(f"the local cloud's sandboxes ({self.name} mode) need: {', '.join(missing)}")

    async def create_network(self, cloud_id: str, previous: object) -> None:
        """Make (or reserve) the addresses the instances get."""
        raise NotImplementedError

    async def destroy_network(self, cloud_id: str) -> None:
        """Undo create_network and whatever the mode made machine-wide (accounts)."""
        raise NotImplementedError

    def imds_url(self, inst: SandboxInstance) -> str:
        raise NotImplementedError

    def instance_env(self, inst: SandboxInstance) -> dict[str, str]:
        """Variables every SSH session and the boot script get (sshd.IMDS_URL_VARIABLE: where
        the instance's IMDS is)."""
        return {sshd.IMDS_URL_VARIABLE: self.imds_url(inst)}

    async def admin_ids(self, admin: str, cloud_id: str) -> tuple[int, int]:
        """uid, gid that own the admin user's home (and run the sshd sessions)."""
        raise NotImplementedError

    async def bind_loopback(self, inst: SandboxInstance, port: int) -> socket.socket | None:
        """A listening socket on the instance's own 127.0.0.1:port, for a host service the
        instance reaches at the driver's address (Blob Storage); None where the instance
        shares the driver's loopback already."""
        return None

    async def attach(self, inst: SandboxInstance, vm_name: str) -> tuple[str, socket.socket]:
        """Put the instance on the network; its MAC and a listening socket for its IMDS."""
        raise NotImplementedError

    def sshd_command(self, inst: SandboxInstance, admin: str, computer_name: str, sshd_argv: list[str],
                     marker: str) -> tuple[list[str], str]:
        """The words that enter the instance's namespaces and the setup script run there."""
        raise NotImplementedError

    def after_sshd(self, inst: SandboxInstance) -> None:
        """Called once sshd answers (its process is in the instance's namespaces)."""

    def boot_script_entry(self, admin: str) -> tuple[list[str], dict[str, str]]:
        """nsenter's namespace flags for the boot script, and the environment it adds."""
        raise NotImplementedError

    def netns_name(self, inst: SandboxInstance) -> str | None:
        return None

    def pids(self, inst: SandboxInstance) -> list[int]:
        raise NotImplementedError

    async def teardown(self, inst: SandboxInstance, grace: float) -> None:
        """End the instance's namespaces (and the processes in them)."""
        raise NotImplementedError


class IsolatedMode(NetworkMode):
    name = "isolated"
    ssh_port = 22
    tools = {**_COMMON_TOOLS, "ip": "iproute2", "useradd": "passwd", "userdel": "passwd"}

    def __init__(self, trees: PythonTrees, address_block):
        if os.geteuid() != 0:
            raise SandboxError(
                "the isolated network mode needs root (a network namespace, veth link and local "
                "account per instance); run the local cloud as root, or use --network loopback")
        super().__init__(trees)
        self.address_block = address_block
        self._binder: NetnsBinder | None = None

    async def create_network(self, cloud_id: str, previous) -> None:
        async with host_lock():
            subnet = await netns.choose_subnet(self.address_block, previous)
            self.network = netns.VirtualNetwork(cloud_id, subnet)
            await self.network.create()
        self._binder = NetnsBinder()

    async def destroy_network(self, cloud_id: str) -> None:
        if self.network is not None:
            await self.network.destroy()
            self.network = None
        await accounts.release_all(cloud_id, netns.is_running)
        if self._binder is not None:
            self._binder.close()
            self._binder = None

    def imds_url(self, inst: SandboxInstance) -> str:
        return ISOLATED_IMDS_URL

    async def admin_ids(self, admin: str, cloud_id: str) -> tuple[int, int]:
        account = await accounts.acquire(admin, cloud_id)
        return account.pw_uid, account.pw_gid

    async def attach(self, inst: SandboxInstance, vm_name: str) -> tuple[str, socket.socket]:
        inst.netns_file = await self.network.add_instance(inst.index)
        out = await run("ip", "-n", self.network.instance_ns(inst.index), "-j", "link", "show", "eth0")
        mac = json.loads(out)[0]["address"]
        return mac, await self._binder.bind(inst.netns_file, netns.IMDS_ADDRESS, 80)

    async def bind_loopback(self, inst: SandboxInstance, port: int) -> socket.socket:
        return await self._binder.bind(inst.netns_file, "127.0.0.1", port)

    def sshd_command(self, inst, admin, computer_name, sshd_argv, marker):
        setup = setup_script(inst.sandbox, admin, computer_name, self.trees, sshd_argv, marker=marker)
        return ["ip", "netns", "exec", self.network.instance_ns(inst.index),
                "unshare", "--mount", "--uts", "--propagation", "private"], setup

    def boot_script_entry(self, admin: str) -> tuple[list[str], dict[str, str]]:
        return ["-m", "-u", "-n"], {}

    def netns_name(self, inst: SandboxInstance) -> str | None:
        return self.network.instance_ns(inst.index) if self.network is not None else None

    def pids(self, inst: SandboxInstance) -> list[int]:
        return pids_in_namespace(inst.netns_file, "net") if inst.netns_file is not None else []

    async def teardown(self, inst: SandboxInstance, grace: float) -> None:
        if self.network is not None:
            await self.network.remove_instance(inst.index, grace)
        inst.netns_file = None


class LoopbackMode(NetworkMode):
    name = "loopback"
    tools = {**_COMMON_TOOLS, "setpriv": "util-linux"}
    sshd_exit_hint = " (another program may hold the port: set loopback_ssh_port in config.json)"

    def __init__(self, trees: PythonTrees, loopback_block, ssh_port: int, imds_port: int):
        super().__init__(trees)
        self.loopback_block = loopback_block
        self.ssh_port = ssh_port
        self.imds_port = imds_port
        # the ids of the local cloud's user inside instances (see accounts.py)
        self.inner_ids = (os.geteuid() or LOOPBACK_UID, os.getegid() or LOOPBACK_UID)

    async def create_network(self, cloud_id: str, previous) -> None:
        await _check_user_namespaces(*self.inner_ids)
        try:
            self.network = loopback.reserve(self.loopback_block, previous)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SandboxError(str(exc)) from None

    async def destroy_network(self, cloud_id: str) -> None:
        if self.network is not None:
            self.network.release()
            self.network = None

    def imds_url(self, inst: SandboxInstance) -> str:
        return f"http://{inst.ip}:{self.imds_port}"

    def instance_env(self, inst: SandboxInstance) -> dict[str, str]:
        # azure-identity's ManagedIdentityCredential reads IMDS's address from this variable
        return {**super().instance_env(inst), "AZURE_POD_IDENTITY_AUTHORITY_HOST": self.imds_url(inst)}

    async def admin_ids(self, admin: str, cloud_id: str) -> tuple[int, int]:
        accounts.check_name(admin)
        return os.geteuid(), os.getegid()

    async def attach(self, inst: SandboxInstance, vm_name: str) -> tuple[str, socket.socket]:
        try:
            imds_socket = socket.create_server((inst.ip, self.imds_port))
        except OSError as exc:
            raise SandboxBootError(
                f"instance {vm_name}: cannot serve IMDS on {inst.ip}:{self.imds_port} "
                f"({exc}); set another loopback_imds_port in config.json") from None
        return _loopback_mac(inst.key), imds_socket

    def sshd_command(self, inst, admin, computer_name, sshd_argv, marker):
        passwd, group = accounts.loopback_identity(admin, *self.inner_ids)
        (inst.sandbox / "passwd").write_text(passwd)
        (inst.sandbox / "group").write_text(group)
        (inst.sandbox / "runuser").write_text(runuser_shim(admin))
        (inst.sandbox / "runuser").chmod(0o755)
        # the setup script keeps the user namespace's capabilities (to mount); sshd and
        # everything it starts has none
        setup = setup_script(
            inst.sandbox, admin, computer_name, self.trees,
            ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--", *sshd_argv], marker=marker,
            extra_binds={"passwd": "/etc/passwd", "group": "/etc/group", "runuser": "/usr/sbin/runuser"})
        return _loopback_unshare(*self.inner_ids), setup

    def after_sshd(self, inst: SandboxInstance) -> None:
        # sshd (the same pid as the setup script) is in the instance's mount namespace now
        inst.mount_ns = os.open(f"/proc/{inst.sshd.pid}/ns/mnt", os.O_RDONLY)

    def boot_script_entry(self, admin: str) -> tuple[list[str], dict[str, str]]:
        return ["-U", "-m", "-u", "--preserve-credentials"], dict(HOME=f"/home/{admin}", USER=admin, LOGNAME=admin)

    def pids(self, inst: SandboxInstance) -> list[int]:
        return pids_in_namespace(f"/proc/self/fd/{inst.mount_ns}", "mnt") if inst.mount_ns is not None else []

    async def teardown(self, inst: SandboxInstance, grace: float) -> None:
        if inst.mount_ns is not None:
            await end_namespace_processes(f"/proc/self/fd/{inst.mount_ns}", grace, "mnt")
            os.close(inst.mount_ns)
            inst.mount_ns = None


def _loopback_mac(key: str) -> str:
    """A stable MAC for an instance without a link of its own (Azure's OUI 00:0d:3a)."""
    tail = hashlib.sha1(key.encode()).hexdigest()[:6]
    return "00:0d:3a:" + ":".join(tail[i:i + 2] for i in range(0, 6, 2))


def _loopback_unshare(uid: int, gid: int) -> list[str]:
    """unshare's words for a loopback instance: its user (mapped to uid, gid inside), mount and
    UTS namespaces; capabilities kept for the setup script."""
    return ["unshare", "--user", f"--map-user={uid}", f"--map-group={gid}", "--keep-caps",
            "--mount", "--uts", "--propagation", "private"]


async def _check_user_namespaces(uid: int, gid: int) -> None:
    """SandboxError naming the limitation when unshare or the kernel cannot make an instance's
    namespaces."""
    try:
        await run(*_loopback_unshare(uid, gid), "--", "true")
    except CommandError as exc:
        if "unrecognized option" in exc.stderr:
            raise SandboxError(
                "the loopback mode needs util-linux 2.38 or later (unshare --map-user, "
                f"--keep-caps): {exc.stderr.strip()}") from None
        raise SandboxError(
            "the loopback mode needs unprivileged user namespaces (each instance gets its own "
            "filesystem view: /home/<admin>, /tmp, /var/log, /etc/ssh), and this system refuses "
            f"them ({exc.stderr.strip()}); allow them (sysctl user.max_user_namespaces > 0, "
            "kernel.unprivileged_userns_clone=1 on Debian kernels, "
            "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu) or run as root") from None


def make_mode(network: str | None, trees: PythonTrees, *, address_block, loopback_block, loopback_ssh_port: int,
              loopback_imds_port: int) -> NetworkMode:
    """The mode named (default: isolated as root, loopback otherwise)."""
    name = network or ("isolated" if os.geteuid() == 0 else "loopback")
    if name == "isolated":
        return IsolatedMode(trees, address_block)
    if name == "loopback":
        return LoopbackMode(trees, loopback_block, loopback_ssh_port, loopback_imds_port)
    raise SandboxError(f"unknown network mode {network!r}: use 'isolated' (root) or 'loopback'")


__all__ = ["IsolatedMode", "LoopbackMode", "NetworkMode", "make_mode"]
