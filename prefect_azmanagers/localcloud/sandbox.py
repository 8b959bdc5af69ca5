"""VM sandboxes: what an instance of the local cloud is, from outside and from inside.

Two network modes (`network=`; by default isolated as root, loopback otherwise).

Isolated mode (root; CI and the development machine): each instance is a network namespace
with its own private IP on the local cloud's virtual network (netns.py), an OpenSSH sshd on
that IP (sshd.py) running in a mount namespace that gives it a VM's filesystem layout
(fsview.py), its customData run once by bash as root at boot (as cloud-init does) with output
in /var/log/cloud-init-output.log, and IMDS at http://169.254.169.254 (imds.py). Every process
started through SSH or by the boot script lives in the instance's namespaces, cannot reach the
host's 127.0.0.1, and is ended when the instance is killed or deleted. The Prefect API reaches
instances through one forwarded port on the network's gateway (tcpforward.py); admin accounts
are shared machine-wide with other local clouds (accounts.py); a running host holds its state
dir, so a second one cannot mistake its instances for leftovers.

Loopback mode (no root needed): each instance has its own address in 127.x.y.z (loopback.py)
on the host's network, an OpenSSH sshd run as the local cloud's own user on an unprivileged
port (`ssh_port`, the same for every instance), in a user + mount + UTS namespace giving the
same filesystem layout (the instance's /etc/passwd names that user adminUsername); its
customData runs once by bash as that user (there is no root on such an instance); IMDS listens
on the instance's address at `loopback_imds_port`. Instances share the host's network: they can
reach the driver's 127.0.0.1 and each other (the Prefect API still has its forwarder, on the
first address of the cloud's block: a port tunnelled over SSH to an instance's 127.0.0.1 would
collide with the driver's own).
Every SSH session, and the boot script, has the instance's IMDS URL in AZMANAGERS_IMDS_URL
(sshd.IMDS_URL_VARIABLE), in both modes. It needs unprivileged user namespaces.

A sandbox makes paths, network reachability and process lifetime match a VM's; it is not a
security boundary (the boot script is root on this machine, /usr and /etc are the host's).

```python
host = SandboxHost(state_dir, prefect_api_url="http://127.0.0.1:4200/api")
await host.start()
ip = host.allocate(vm_id)              # for the NIC, at once
await host.boot(InstanceSpec(key=vm_id, name="ss_0", computer_name="ss000000",
                             admin_username="azureuser", public_keys=[pubkey],
                             custom_data=b64script, metadata={"vmId": vm_id, ...}))
# ssh -i key azureuser@ip works now; the boot script may still be running
await host.stop()                      # nothing of it is left running or listening
```
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from prefect_azmanagers.localcloud import accounts, loopback, netns, sshd
from prefect_azmanagers.localcloud._hoststate import host_lock
from prefect_azmanagers.localcloud._proc import (CLEAN_ENV, CommandError, children_of,
                                                 end_namespace_processes, pids_in_namespace, run)
from prefect_azmanagers.localcloud.fsview import PythonTrees, runuser_shim, setup_script
from prefect_azmanagers.localcloud.imds import IMDSServer, InstanceMetadata, NetnsBinder, network_document
from prefect_azmanagers.localcloud.tcpforward import TCPForwarder

logger = logging.getLogger(__name__)

SSH_READY_TIMEOUT = 60.0  # seconds from sshd start to its banner (16 boots share 2 cores)
DELETE_GRACE = 2.0  # seconds between SIGTERM and SIGKILL on an orderly delete
MODES = ("isolated", "loopback")
ISOLATED_IMDS_URL = f"http://{netns.IMDS_ADDRESS}"
LOOPBACK_UID = 1000  # who a root-run loopback instance's user is inside (never 0: sshd must not be root)
_COMMON_TOOLS = {"unshare": "util-linux", "nsenter": "util-linux", sshd.SSHD: "openssh-server",
                 "ssh-keygen": "openssh-client"}
_REQUIRED_TOOLS = {
    "isolated": {**_COMMON_TOOLS, "ip": "iproute2", "useradd": "passwd", "userdel": "passwd"},
    "loopback": {**_COMMON_TOOLS, "setpriv": "util-linux"},
}


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
class _Instance:
    key: str
    index: int
    ip: str
    sandbox: Path
    metadata: InstanceMetadata
    state: str = "allocated"  # allocated | booting | running | failed | killed
    netns_file: Path | None = None
    sshd: asyncio.subprocess.Process | None = None
    boot_script: asyncio.subprocess.Process | None = None
    imds: IMDSServer | None = None
    host_key: str | None = None
    mount_ns: int | None = None  # loopback mode: an fd on the instance's mount namespace
    boot_task: asyncio.Task | None = None
    reaper: asyncio.Task | None = None
    logs: list = field(default_factory=list)  # open log files handed to the processes


class SandboxHost:
    """Creates, boots, faults and removes the local cloud's VM sandboxes (see module doc)."""

    def __init__(self, state_dir: Path, *, network: str | None = None,
                 address_block: str = "10.213.0.0/16", loopback_block: str = "127.213.0.0/16",
                 loopback_ssh_port: int = 2222, loopback_imds_port: int = 8254,
                 prefect_api_url: str | None = None,
                 on_event_ack: Callable[[str, str], None] | None = None):
        self.state_dir = Path(state_dir).resolve()
        self.address_block = ipaddress.ip_network(address_block)
        self.loopback_block = ipaddress.ip_network(loopback_block)
        self.prefect_api_url = prefect_api_url
        self.on_event_ack = on_event_ack
        self.mode = network or ("isolated" if os.geteuid() == 0 else "loopback")
        if self.mode not in MODES:
            raise SandboxError(f"unknown network mode {network!r}: use 'isolated' (root) or 'loopback'")
        if self.mode == "isolated" and os.geteuid() != 0:
            raise SandboxError(
                "the isolated network mode needs root (a network namespace, veth link and local "
                "account per instance); run the local cloud as root, or use --network loopback")
        for name, port in (("loopback_ssh_port", loopback_ssh_port), ("loopback_imds_port", loopback_imds_port)):
            if not 1024 <= port <= 65535:
                raise SandboxError(f"{name} {port} is not an unprivileged port (1024-65535)")
        # SSH port of every instance (what the manifest's ssh_port must be)
        self.ssh_port = 22 if self.mode == "isolated" else loopback_ssh_port
        self._imds_port = loopback_imds_port
        # loopback mode: the ids of the local cloud's user inside instances (see accounts.py)
        self._inner_ids = (os.geteuid() or LOOPBACK_UID, os.getegid() or LOOPBACK_UID)
        self.prefect_api_url_for_vms: str | None = None
        # one id per state dir: names this cloud's namespaces, links and account usage
        self.cloud_id = hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:8]
        self._sandboxes = self.state_dir / "sandboxes"
        self._record = self.state_dir / "sandbox-host.json"
        self._instances: dict[str, _Instance] = {}
        self._network: netns.VirtualNetwork | loopback.LoopbackNetwork | None = None
        self._last_index = 0
        self._state_dir_lock: int | None = None
        self._binder: NetnsBinder | None = None
        self._forwarder: TCPForwarder | None = None
        self._trees = PythonTrees.of_this_interpreter()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Remove what an earlier run with this state dir left (namespaces, links, processes,
        sandboxes), then create the network (isolated: namespaces and the Prefect API
        forwarder; loopback: reserve addresses)."""
        missing = [f"{tool} (Debian package {pkg})" for tool, pkg in _REQUIRED_TOOLS[self.mode].items()
                   if shutil.which(tool) is None]
        if missing:
            raise SandboxError(f"the local cloud's sandboxes ({self.mode} mode) need: {', '.join(missing)}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._hold_state_dir()
        try:
            await self._remove_leftovers()
            self._sandboxes.mkdir(mode=0o700)
            if self.mode == "isolated":
                async with host_lock():
                    subnet = await netns.choose_subnet(self.address_block, self._previous_subnet())
                    self._network = netns.VirtualNetwork(self.cloud_id, subnet)
                    await self._network.create()
                self._binder = NetnsBinder()
            else:
                await _check_user_namespaces(*self._inner_ids)
                try:
                    self._network = loopback.reserve(self.loopback_block, self._previous_subnet())
                except (OSError, ValueError, RuntimeError) as exc:
                    raise SandboxError(str(exc)) from None
            if self.prefect_api_url:
                await self._start_forwarder(self.prefect_api_url)
            self._record.write_text(json.dumps({"subnet": str(self._network.subnet), "mode": self.mode}))
        except BaseException:
            await self.stop()
            raise

    async def remove_leftovers(self) -> None:
        """Remove what a crashed run with this state dir left (its processes, namespaces,
        links, sandboxes), without starting anything."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._hold_state_dir()
        try:
            await self._remove_leftovers()
        finally:
            os.close(self._state_dir_lock)
            self._state_dir_lock = None

    async def _remove_leftovers(self) -> None:
        """Both modes' leftovers (a state dir may have been used in either); call holding the
        state dir."""
        removed = [f"process {pid}" for pid in await loopback.kill_leftovers(self.cloud_id)]
        if os.geteuid() == 0:
            removed += await netns.remove_leftovers(self.cloud_id)
            await accounts.release_all(self.cloud_id, netns.is_running)
        if removed:
            logger.info("removed leftovers of an earlier run: %s", ", ".join(removed))
        await asyncio.to_thread(shutil.rmtree, self._sandboxes, True)

    def _hold_state_dir(self) -> None:
        """Lock the state dir for this host's lifetime (released by stop() or the process's
        death): a second local cloud on it would take the running one's instances for leftovers."""
        fd = os.open(self.state_dir / "sandbox-host.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SandboxError(
                f"another local cloud is running with the state dir {self.state_dir}; stop it "
                "first (prefect-azmanagers localcloud stop --state-dir ...) or use another state dir"
            ) from None
        self._state_dir_lock = fd

    async def stop(self) -> None:
        """Delete every instance; remove the network, the forwarder and the accounts this
        local cloud created. Nothing of it is left running or listening."""
        results = await asyncio.gather(*(self.delete(key) for key in list(self._instances)),
                                       return_exceptions=True)
        if self._forwarder is not None:
            await self._forwarder.close()
            self._forwarder = None
        self.prefect_api_url_for_vms = None
        if isinstance(self._network, netns.VirtualNetwork):
            await self._network.destroy()
        elif isinstance(self._network, loopback.LoopbackNetwork):
            self._network.release()
        self._network = None
        if self.mode == "isolated":
            await accounts.release_all(self.cloud_id, netns.is_running)
        if self._binder is not None:
            self._binder.close()
            self._binder = None
        if self._state_dir_lock is not None:
            os.close(self._state_dir_lock)
            self._state_dir_lock = None
        for error in results:
            if isinstance(error, BaseException):
                raise error

    def _previous_subnet(self) -> ipaddress.IPv4Network | None:
        try:
            return ipaddress.ip_network(json.loads(self._record.read_text())["subnet"])
        except (OSError, ValueError, KeyError):
            return None

    def imds_url(self, key: str) -> str:
        """Where the instance reaches its IMDS (what AZMANAGERS_IMDS_URL says inside it)."""
        inst = self._instance(key)
        return ISOLATED_IMDS_URL if self.mode == "isolated" else f"http://{inst.ip}:{self._imds_port}"

    async def _start_forwarder(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise SandboxError(f"prefect_api_url {url!r} has no host; pass e.g. http://127.0.0.1:4200/api")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self._forwarder = TCPForwarder(parts.hostname, port)
        host, bound = await self._forwarder.start(self._network.gateway, port)
        netloc = f"{host}:{bound}"
        self.prefect_api_url_for_vms = urlunsplit(parts._replace(netloc=netloc))

    # -- instances -------------------------------------------------------------------------

    def allocate(self, key: str) -> str:
        """Reserve the instance's private IP (idempotent per key) and return it."""
        if key in self._instances:
            return self._instances[key].ip
        if self._network is None:
            raise SandboxError("SandboxHost.start() must be awaited before allocate()")
        # round robin, as Azure does not hand a just-freed address out again at once
        used = {inst.index for inst in self._instances.values()}
        after_last = sorted(self._network.instance_indexes, key=lambda i: (i <= self._last_index, i))
        index = next((i for i in after_last if i not in used), None)
        if index is None:
            raise SandboxError(f"no free address left in {self._network.subnet}")
        self._last_index = index
        inst = _Instance(key=key, index=index, ip=self._network.address(index),
                         sandbox=self._sandboxes / key,
                         metadata=InstanceMetadata(compute={}, network={}))
        self._instances[key] = inst
        return inst.ip

    async def boot(self, spec: InstanceSpec) -> None:
        """Boot the instance; returns once its sshd accepts connections (the boot script may
        still run). Raises SandboxBootError, after removing what was started, on failure or
        when the instance is killed or deleted while booting."""
        self.allocate(spec.key)
        inst = self._instances[spec.key]
        if inst.state != "allocated":
            raise SandboxBootError(f"instance {spec.name} ({spec.key}) was already booted ({inst.state})")
        inst.state = "booting"
        inst.boot_task = asyncio.create_task(self._boot(inst, spec))
        try:
            await asyncio.shield(inst.boot_task)
        except asyncio.CancelledError:
            if not inst.boot_task.cancelled():  # our caller was cancelled: stop booting too
                inst.boot_task.cancel()
                with contextlib.suppress(BaseException):
                    await inst.boot_task
                await self._teardown(inst, grace=0)
                inst.state = "failed"
                raise
            raise SandboxBootError(f"instance {spec.name} was removed while booting") from None
        except BaseException as exc:
            await self._teardown(inst, grace=0)
            inst.state = "failed"
            if isinstance(exc, SandboxBootError):
                raise
            raise SandboxBootError(f"instance {spec.name} failed to boot: {exc}") from exc
        finally:
            inst.boot_task = None
        inst.state = "running"

    async def _boot(self, inst: _Instance, spec: InstanceSpec) -> None:
        script = _decode_custom_data(spec)
        admin = spec.admin_username
        if self.mode == "isolated":
            account = await accounts.acquire(admin, self.cloud_id)
            uid, gid = account.pw_uid, account.pw_gid
        else:
            accounts.check_name(admin)
            uid, gid = os.geteuid(), os.getegid()
        layout = _make_sandbox_dirs(inst.sandbox, uid, gid)
        (inst.sandbox / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{inst.ip}\t{spec.computer_name}\n")
        try:
            inst.host_key = await sshd.prepare(
                layout["ssh"], layout["home"], inst.ip, self.ssh_port, admin, uid, gid,
                spec.public_keys, comment=f"root@{spec.computer_name}", imds_url=self.imds_url(inst.key))
        except ValueError as exc:
            raise SandboxBootError(f"instance {spec.name}: {exc}") from None
        if self.mode == "isolated":
            inst.netns_file = await self._network.add_instance(inst.index)
            mac = await self._mac_of(inst)
            imds_socket = await self._binder.bind(inst.netns_file, netns.IMDS_ADDRESS, 80)
        else:
            mac = _loopback_mac(inst.key)
            try:
                imds_socket = socket.create_server((inst.ip, self._imds_port))
            except OSError as exc:
                raise SandboxBootError(
                    f"instance {spec.name}: cannot serve IMDS on {inst.ip}:{self._imds_port} "
                    f"({exc}); set another loopback_imds_port in config.json") from None
        inst.metadata.compute = dict(spec.metadata)
        inst.metadata.network = network_document(
            inst.ip, str(self._network.subnet.network_address), self._network.subnet.prefixlen, mac)
        inst.imds = IMDSServer(inst.key, inst.metadata, self.on_event_ack)
        await inst.imds.start(imds_socket)
        if spec.boot_delay > 0:
            await asyncio.sleep(spec.boot_delay)
        auth_log = (layout["log"] / "auth.log").open("ab")
        inst.logs.append(auth_log)
        sshd_argv = [sshd.SSHD, "-D", "-e", "-f", "/etc/ssh/sshd_config"]
        marker = loopback.instance_marker(self.cloud_id, inst.index)
        if self.mode == "isolated":
            setup = setup_script(inst.sandbox, admin, spec.computer_name, self._trees, sshd_argv,
                                 marker=marker)
            argv = ["ip", "netns", "exec", self._network.instance_ns(inst.index),
                    "unshare", "--mount", "--uts", "--propagation", "private"]
        else:
            passwd, group = accounts.loopback_identity(admin, *self._inner_ids)
            (inst.sandbox / "passwd").write_text(passwd)
            (inst.sandbox / "group").write_text(group)
            (inst.sandbox / "runuser").write_text(runuser_shim(admin))
            (inst.sandbox / "runuser").chmod(0o755)
            # the setup script keeps the user namespace's capabilities (to mount); sshd and
            # everything it starts has none
            setup = setup_script(
                inst.sandbox, admin, spec.computer_name, self._trees,
                ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--", *sshd_argv], marker=marker,
                extra_binds={"passwd": "/etc/passwd", "group": "/etc/group", "runuser": "/usr/sbin/runuser"})
            argv = _loopback_unshare(*self._inner_ids)
        inst.sshd = await asyncio.create_subprocess_exec(
            *argv, "--", "/bin/sh", "-c", setup,
            stdin=asyncio.subprocess.DEVNULL, stdout=auth_log, stderr=auth_log,
            env=CLEAN_ENV, cwd="/")
        await self._wait_for_ssh(inst, spec)
        if self.mode == "loopback":  # sshd (same pid as the setup script) is in it now
            inst.mount_ns = os.open(f"/proc/{inst.sshd.pid}/ns/mnt", os.O_RDONLY)
        if script is not None:
            await self._run_boot_script(inst, layout, script, admin)

    async def _mac_of(self, inst: _Instance) -> str:
        out = await run("ip", "-n", self._network.instance_ns(inst.index), "-j", "link", "show", "eth0")
        return json.loads(out)[0]["address"]

    async def _wait_for_ssh(self, inst: _Instance, spec: InstanceSpec) -> None:
        """Until sshd answers with its SSH banner on the instance's IP."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SSH_READY_TIMEOUT
        while True:
            if inst.sshd.returncode is not None:
                hint = (" (another program may hold the port: set loopback_ssh_port in config.json)"
                        if self.mode == "loopback" else "")
                raise SandboxBootError(
                    f"instance {spec.name}: sshd exited with status {inst.sshd.returncode}{hint}; "
                    f"its log ({inst.sandbox / 'log' / 'auth.log'}) ends with:\n"
                    + _tail(inst.sandbox / "log" / "auth.log"))
            with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                reader, writer = await asyncio.wait_for(asyncio.open_connection(inst.ip, self.ssh_port), 2)
                try:
                    banner = await asyncio.wait_for(reader.readexactly(8), 5)
                finally:
                    writer.close()
                if banner == b"SSH-2.0-":
                    return
            if loop.time() > deadline:
                raise SandboxBootError(
                    f"instance {spec.name}: sshd did not accept connections on {inst.ip}:{self.ssh_port} "
                    f"within {SSH_READY_TIMEOUT:.0f} s; its log ends with:\n"
                    + _tail(inst.sandbox / "log" / "auth.log"))
            await asyncio.sleep(0.02)

    async def _run_boot_script(self, inst: _Instance, layout: dict[str, Path], script: bytes,
                               admin: str) -> None:
        """Start customData as cloud-init does: once, by bash, in the instance's namespaces,
        output appended to /var/log/cloud-init-output.log; as root (isolated mode) or as the
        admin user (loopback mode: no root there). Not awaited."""
        user_data = layout["run"] / "cloud-init" / "user-data"
        user_data.parent.mkdir(mode=0o700, exist_ok=True)
        user_data.write_bytes(script)
        user_data.chmod(0o700)
        output = (layout["log"] / "cloud-init-output.log").open("ab")
        inst.logs.append(output)
        env = {**CLEAN_ENV, sshd.IMDS_URL_VARIABLE: self.imds_url(inst.key)}
        if self.mode == "isolated":
            namespaces = ["-m", "-u", "-n"]
        else:
            namespaces = ["-U", "-m", "-u", "--preserve-credentials"]
            env.update(HOME=f"/home/{admin}", USER=admin, LOGNAME=admin)
        inst.boot_script = await asyncio.create_subprocess_exec(
            "nsenter", "-t", str(inst.sshd.pid), *namespaces, "--wd=/", "--",
            "/bin/bash", "/run/cloud-init/user-data",
            stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output, env=env, cwd="/")
        inst.reaper = asyncio.create_task(_note_boot_script_exit(inst.boot_script, output))

    # -- scheduled events ------------------------------------------------------------------

    def post_scheduled_event(self, key: str, event: dict) -> None:
        """Publish (or replace, by EventId) a scheduled event in the instance's IMDS."""
        self._instance(key).metadata.post_event(event)

    def clear_scheduled_events(self, key: str) -> None:
        self._instance(key).metadata.clear_events()

    # -- faults and removal ----------------------------------------------------------------

    async def kill(self, key: str) -> None:
        """Abruptly end the instance: SIGKILL every process in it (sshd included) and remove
        its namespace. Its sandbox directory and IP stay until delete()."""
        inst = self._instance(key)
        await self._cancel_boot(inst)
        await self._teardown(inst, grace=0)
        inst.state = "killed"

    async def drop_ssh(self, key: str) -> None:
        """Cut every live SSH connection of the instance (sshd's per-connection processes);
        the instance and its listening sshd stay."""
        inst = self._instance(key)
        if inst.sshd is None or inst.sshd.returncode is not None:
            return
        for session in children_of(inst.sshd.pid):
            for pid in [*children_of(session), session]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def delete(self, key: str) -> None:
        """Orderly removal (SIGTERM, then SIGKILL after DELETE_GRACE s): processes, namespace,
        sandbox directory, address. Idempotent."""
        inst = self._instances.get(key)
        if inst is None:
            return
        await self._cancel_boot(inst)
        await self._teardown(inst, grace=DELETE_GRACE)
        await asyncio.to_thread(shutil.rmtree, inst.sandbox, True)
        self._instances.pop(key, None)

    def describe(self, key: str) -> dict:
        """State of an instance for status and admin views."""
        inst = self._instance(key)
        return {
            "key": inst.key,
            "ip": inst.ip,
            "state": inst.state,
            "sandbox": str(inst.sandbox),
            "netns": (self._network.instance_ns(inst.index)
                      if isinstance(self._network, netns.VirtualNetwork) else None),
            "ssh_port": self.ssh_port,
            "imds_url": self.imds_url(inst.key),
            "pids": self._pids(inst),
            "sshd_pid": inst.sshd.pid if inst.sshd and inst.sshd.returncode is None else None,
            "host_key": inst.host_key,
        }

    def _pids(self, inst: _Instance) -> list[int]:
        if inst.netns_file is not None:
            return pids_in_namespace(inst.netns_file, "net")
        if inst.mount_ns is not None:
            return pids_in_namespace(f"/proc/self/fd/{inst.mount_ns}", "mnt")
        return []

    def _instance(self, key: str) -> _Instance:
        try:
            return self._instances[key]
        except KeyError:
            raise SandboxError(f"no instance {key!r} in this local cloud") from None

    async def _cancel_boot(self, inst: _Instance) -> None:
        task = inst.boot_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _teardown(self, inst: _Instance, grace: float) -> None:
        """End everything running for the instance; keep its address and sandbox dir."""
        if inst.imds is not None:  # its socket would keep the namespace alive
            await inst.imds.close()
            inst.imds = None
        if isinstance(self._network, netns.VirtualNetwork):
            await self._network.remove_instance(inst.index, grace)
        inst.netns_file = None
        if inst.mount_ns is not None:
            await end_namespace_processes(f"/proc/self/fd/{inst.mount_ns}", grace, "mnt")
            os.close(inst.mount_ns)
            inst.mount_ns = None
        for proc in (inst.sshd, inst.boot_script):
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # normally already ended with its namespace
                await proc.wait()
        if inst.reaper is not None:
            await inst.reaper
            inst.reaper = None
        for log in inst.logs:
            log.close()
        inst.logs.clear()


def _decode_custom_data(spec: InstanceSpec) -> bytes | None:
    if not spec.custom_data:
        return None
    try:
        return base64.b64decode(spec.custom_data, validate=True)
    except (binascii.Error, ValueError):
        raise SandboxBootError(
            f"instance {spec.name}: customData is not valid base64 (ARM expects the boot "
            "script base64-encoded in osProfile.customData)") from None


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


def _make_sandbox_dirs(sandbox: Path, uid: int, gid: int) -> dict[str, Path]:
    """The instance's disk: home, tmp, mnt, log, ssh, run, hosts (see fsview.SANDBOX_BINDS)."""
    modes = {"home": 0o755, "tmp": 0o1777, "mnt": 0o755, "log": 0o755, "ssh": 0o755,
             "run": 0o755, "run/sshd": 0o755, "run/lock": 0o1777}
    sandbox.mkdir(mode=0o700, parents=True, exist_ok=True)
    layout = {}
    for name, mode in modes.items():
        path = sandbox / name
        path.mkdir(exist_ok=True)
        path.chmod(mode)  # mkdir's mode is filtered by the umask
        layout[name] = path
    os.chown(layout["home"], uid, gid)
    return layout


async def _note_boot_script_exit(proc: asyncio.subprocess.Process, output) -> None:
    status = await proc.wait()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000")
    with contextlib.suppress(OSError, ValueError):
        output.write(f"azmanagers localcloud: boot script finished at {when}, exit status {status}\n".encode())
        output.flush()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
