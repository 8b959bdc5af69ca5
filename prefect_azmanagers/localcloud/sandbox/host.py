"""SandboxHost: creates, boots, faults and removes the local cloud's VM sandboxes (see the
package docstring); what differs between the network modes is its `NetworkMode` (modes.py)."""

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
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from prefect_azmanagers.localcloud import accounts, loopback, netns, sshd
from prefect_azmanagers.localcloud._proc import CLEAN_ENV, children_of
from prefect_azmanagers.localcloud.fsview import PythonTrees
from prefect_azmanagers.localcloud.imds import IMDSServer, InstanceMetadata, network_document
from prefect_azmanagers.localcloud.sandbox.common import (InstanceSpec, SandboxBootError, SandboxError,
                                                          SandboxInstance, tail)
from prefect_azmanagers.localcloud.sandbox.modes import make_mode
from prefect_azmanagers.localcloud.tcpforward import TCPForwarder

logger = logging.getLogger("prefect_azmanagers.localcloud.sandbox")

SSH_READY_TIMEOUT = 60.0  # seconds from sshd start to its banner (16 boots share 2 cores)
DELETE_GRACE = 2.0  # seconds between SIGTERM and SIGKILL on an orderly delete


class SandboxHost:
    """Creates, boots, faults and removes the local cloud's VM sandboxes (see module doc)."""

    def __init__(self, state_dir: Path, *, network: str | None = None,
                 address_block: str = "10.213.0.0/16", loopback_block: str = "127.213.0.0/16",
                 loopback_ssh_port: int = 2222, loopback_imds_port: int = 8254,
                 prefect_api_url: str | None = None,
                 on_event_ack: Callable[[str, str], None] | None = None,
                 token_for: Callable[[str, str], dict | None] | None = None):
        self.state_dir = Path(state_dir).resolve()
        self.prefect_api_url = prefect_api_url
        self.on_event_ack = on_event_ack
        self.token_for = token_for  # IMDS's managed-identity tokens: (key, resource) -> response or None
        self._mode = make_mode(network, PythonTrees.of_this_interpreter(),
                               address_block=ipaddress.ip_network(address_block),
                               loopback_block=ipaddress.ip_network(loopback_block),
                               loopback_ssh_port=loopback_ssh_port, loopback_imds_port=loopback_imds_port)
        for name, port in (("loopback_ssh_port", loopback_ssh_port), ("loopback_imds_port", loopback_imds_port)):
            if not 1024 <= port <= 65535:
                raise SandboxError(f"{name} {port} is not an unprivileged port (1024-65535)")
        self.mode = self._mode.name
        # SSH port of every instance (what the manifest's ssh_port must be)
        self.ssh_port = self._mode.ssh_port
        self.prefect_api_url_for_vms: str | None = None
        # one id per state dir: names this cloud's namespaces, links and account usage
        self.cloud_id = hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:8]
        self._sandboxes = self.state_dir / "sandboxes"
        self._record = self.state_dir / "sandbox-host.json"
        self._instances: dict[str, SandboxInstance] = {}
        self._last_index = 0
        self._state_dir_lock: int | None = None
        self._forwarder: TCPForwarder | None = None
        # ports of services on the driver's 127.0.0.1 that instances reach at that same address
        # (Blob Storage, as every machine reaches Azure's public endpoint)
        self.loopback_services: list[int] = []

    @property
    def _network(self) -> netns.VirtualNetwork | loopback.LoopbackNetwork | None:
        return self._mode.network

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Remove what an earlier run with this state dir left (namespaces, links, processes,
        sandboxes), then create the network (isolated: namespaces and the Prefect API
        forwarder; loopback: reserve addresses)."""
        self._mode.check_tools()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._hold_state_dir()
        try:
            await self._remove_leftovers()
            self._sandboxes.mkdir(mode=0o700)
            await self._mode.create_network(self.cloud_id, self._previous_subnet())
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
        await self._mode.destroy_network(self.cloud_id)
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
        return self._mode.imds_url(self._instance(key))

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
        inst = SandboxInstance(key=key, index=index, ip=self._network.address(index),
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

    async def _boot(self, inst: SandboxInstance, spec: InstanceSpec) -> None:
        script = _decode_custom_data(spec)
        admin = spec.admin_username
        uid, gid = await self._mode.admin_ids(admin, self.cloud_id)
        layout = _make_sandbox_dirs(inst.sandbox, uid, gid)
        (inst.sandbox / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{inst.ip}\t{spec.computer_name}\n")
        try:
            inst.host_key = await sshd.prepare(
                layout["ssh"], layout["home"], inst.ip, self.ssh_port, admin, uid, gid,
                spec.public_keys, comment=f"root@{spec.computer_name}", env=self._mode.instance_env(inst))
        except ValueError as exc:
            raise SandboxBootError(f"instance {spec.name}: {exc}") from None
        mac, imds_socket = await self._mode.attach(inst, spec.name)
        inst.metadata.compute = dict(spec.metadata)
        inst.metadata.network = network_document(
            inst.ip, str(self._network.subnet.network_address), self._network.subnet.prefixlen, mac)
        inst.imds = IMDSServer(inst.key, inst.metadata, self.on_event_ack, self.token_for)
        await inst.imds.start(imds_socket)
        for port in self.loopback_services:
            if (sock := await self._mode.bind_loopback(inst, port)) is not None:
                forwarder = TCPForwarder("127.0.0.1", port)
                inst.forwarders.append(forwarder)
                await forwarder.start_on(sock)
        if spec.boot_delay > 0:
            await asyncio.sleep(spec.boot_delay)
        auth_log = (layout["log"] / "auth.log").open("ab")
        inst.logs.append(auth_log)
        sshd_argv = [sshd.SSHD, "-D", "-e", "-f", "/etc/ssh/sshd_config"]
        argv, setup = self._mode.sshd_command(inst, admin, spec.computer_name, sshd_argv,
                                              loopback.instance_marker(self.cloud_id, inst.index))
        inst.sshd = await asyncio.create_subprocess_exec(
            *argv, "--", "/bin/sh", "-c", setup,
            stdin=asyncio.subprocess.DEVNULL, stdout=auth_log, stderr=auth_log,
            env=CLEAN_ENV, cwd="/")
        await self._wait_for_ssh(inst, spec)
        self._mode.after_sshd(inst)
        if script is not None:
            await self._run_boot_script(inst, layout, script, admin)

    async def _wait_for_ssh(self, inst: SandboxInstance, spec: InstanceSpec) -> None:
        """Until sshd answers with its SSH banner on the instance's IP."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SSH_READY_TIMEOUT
        while True:
            if inst.sshd.returncode is not None:
                raise SandboxBootError(
                    f"instance {spec.name}: sshd exited with status {inst.sshd.returncode}"
                    f"{self._mode.sshd_exit_hint}; its log ({inst.sandbox / 'log' / 'auth.log'}) ends with:\n"
                    + tail(inst.sandbox / "log" / "auth.log"))
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
                    + tail(inst.sandbox / "log" / "auth.log"))
            await asyncio.sleep(0.02)

    async def _run_boot_script(self, inst: SandboxInstance, layout: dict[str, Path], script: bytes,
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
        namespaces, extra_env = self._mode.boot_script_entry(admin)
        env = {**CLEAN_ENV, **self._mode.instance_env(inst), **extra_env}
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
            "netns": self._mode.netns_name(inst),
            "ssh_port": self.ssh_port,
            "imds_url": self._mode.imds_url(inst),
            "pids": self._mode.pids(inst),
            "sshd_pid": inst.sshd.pid if inst.sshd and inst.sshd.returncode is None else None,
            "host_key": inst.host_key,
        }

    def _instance(self, key: str) -> SandboxInstance:
        try:
            return self._instances[key]
        except KeyError:
            raise SandboxError(f"no instance {key!r} in this local cloud") from None

    async def _cancel_boot(self, inst: SandboxInstance) -> None:
        task = inst.boot_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _teardown(self, inst: SandboxInstance, grace: float) -> None:
        """End everything running for the instance; keep its address and sandbox dir."""
        if inst.imds is not None:  # its socket would keep the namespace alive
            await inst.imds.close()
            inst.imds = None
        for forwarder in inst.forwarders:  # so would theirs
            await forwarder.close()
        inst.forwarders.clear()
        await self._mode.teardown(inst, grace)
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
