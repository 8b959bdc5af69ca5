"""SSH to instances: one asyncssh connection per instance, agent processes over it, tunnels.

`InstanceConnection.open` connects with the manifest's key, pins the host key per vmId
(`known_hosts.PinnedHostKeys`), sends keepalives, and can forward driver loopback ports into
the instance (`forward_ports`: they listen on the instance's loopback only, as sshd does).
`InstanceConnection.start_agent` starts one agent process as an SSH exec channel; its stdout
carries protocol frames, its stderr plain lines, both delivered to callbacks on the event loop.
A payload's large buffers are written from the caller's objects in slices as the channel
drains: asyncssh copies what it is given, so the driver never holds a second copy of a 100 MB
argument and the event loop is never busy copying one for long.

Trust: every connection (including `read_boot_log`, for diagnostics) checks the host key
pinned per vmId and reads nothing from ~/.ssh (config, known_hosts, keys) nor the user's SSH
agent; an instance marked gone is never connected to again, and a reconnect first asks the
cloud whether the instance still exists (`still_exists`), contacting its address only if so.
What the driver holds from one
agent is bounded (MAX_FRAME, MAX_LINE), and `env` values never reach a log (AgentCommand).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import weakref
from typing import Awaitable, Callable, ClassVar, Sequence

import asyncssh

from prefect_azmanagers.azure.bootscript import boot_log_tail

from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys
from prefect_azmanagers.cluster.protocol import (
    HEADER,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    Kind,
    Payload,
    ProtocolError,
)
from prefect_azmanagers.exceptions import ConfigurationError, HostKeyMismatch, InstanceGone

AGENT_MODULE = "prefect_azmanagers.cluster.agent"
SMALL_FRAME = 1 << 16  # bodies below this are copied behind their header: one write, one packet
WRITE_SLICE = 1 << 20  # large buffers are handed to the channel this much at a time
SEND_HIGH_WATER = 4 << 20  # unsent bytes held before `send` waits (> sshd's 2 MiB window)
# What the driver holds from one agent, so a misbehaving instance cannot exhaust its memory:
MAX_FRAME = 1 << 30  # a larger frame (a result over 1 GiB) loses the worker (FrameTooLarge)
MAX_LINE = 64 << 10  # bytes of one stdout/stderr line; the rest is cut, with a marker
# AES-GCM first: asyncssh's pure-Python ChaCha20-Poly1305 costs ~110 us per packet, AES-GCM
# (one OpenSSL call) ~15 us, and every call crosses at least four packets. Both are AEAD.
ENCRYPTION_ALGS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                   "chacha20-poly1305@openssh.com", "aes256-ctr", "aes192-ctr", "aes128-ctr")


class AgentCommand(str):
    """The agent's shell command, whose `env` values are secret.

    Its text (what the exec channel sends, `.encode()`, `shlex.split`) is the real command;
    `str()`, `repr()`, f-strings and %-formatting render it as `.redacted` (`K=<redacted>` for
    each `env` value), so a log line (asyncssh logs exec commands at INFO) or an error message
    that shows the command never carries them.
    """

    redacted: str

    def __new__(cls, text: str, redacted: str) -> "AgentCommand":
        command = super().__new__(cls, text)
        command.redacted = redacted
        return command

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return repr(self.redacted)


def agent_command(python: str, *, worker_id: int, concurrency: int = 1, heartbeat: float = 10.0,
                  imds_url: str | None = None, env: dict[str, str] | None = None,
                  launcher: Sequence[str] = (), warm_up: str | None = None) -> AgentCommand:
    """The shell command that starts one agent process on an instance.

    The only place the command is built: MPI wraps it with `launcher` (e.g. `mpirun -n K
    <flags>`) and customenv swaps `python` for the interpreter of the boot-built environment.
    Every value is shell-quoted; sshd drops client-sent environment variables, so the worker
    environment travels through `env` (rendered `K=<redacted>` when the command is printed).
    `exec` makes the agent (or the launcher) the leader of the session sshd creates, so killing
    its process group stops everything the slot started.
    """
    head = ["exec", "env"]
    tail = [f"AZM_WORKER_ID={worker_id}", *launcher, python, "-u", "-m", AGENT_MODULE,
            "--concurrency", str(concurrency), "--heartbeat", str(heartbeat)]
    if imds_url:
        tail += ["--imds", imds_url]
    if warm_up:
        tail += ["--warm-up", warm_up]
    env = env or {}
    text = " ".join(shlex.quote(word)
                    for word in (*head, *(f"{name}={value}" for name, value in env.items()), *tail))
    redacted = " ".join([*head, *(f"{shlex.quote(name)}=<redacted>" for name in env),
                         *(shlex.quote(word) for word in tail)])
    return AgentCommand(text, redacted)


class _PinningClient(asyncssh.SSHClient):
    """Accepts the host key pinned for the instance, or records it on first contact."""

    def __init__(self, host_keys: PinnedHostKeys, vm_id: str, address: str,
                 on_lost: Callable[[Exception | None], None]):
        self._host_keys = host_keys
        self._vm_id = vm_id
        self._address = address
        self._on_lost = on_lost
        self.presented: asyncssh.SSHKey | None = None
        self.mismatch: HostKeyMismatch | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        try:
            self._host_keys.check(self._vm_id, key, self._address)
        except HostKeyMismatch as exc:
            self.mismatch = exc
            return False
        self.presented = key
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(exc)


def _no_known_hosts(host: str, addr: str, port: int | None) -> tuple[list, list, list]:
    # Trust nothing from files (not even ~/.ssh/known_hosts): _PinningClient decides.
    return [], [], []


def _cut_line(head: bytes, cut: int) -> str:
    """A line as text: `head` (at most the limit), and a marker when `cut` bytes were dropped."""
    text = head.decode("utf-8", "replace")
    return f"{text}... [line truncated: {cut} more bytes]" if cut else text


class AgentProcess(asyncssh.SSHClientSession[bytes]):
    """One agent process: frames from its stdout, lines from its stderr, flow-controlled writes.

    What it holds is bounded: a frame over `max_frame` bytes closes the channel (the worker is
    lost, with the reason; when it is a call's RESULT or ERROR, an ERROR frame of type
    PayloadError is delivered for that call first, so it fails instead of being re-run), and a
    stdout or stderr line keeps its first `max_line` bytes.
    """

    def __init__(self, on_frame: Callable[[Frame], None], on_stderr: Callable[[str], None],
                 on_exit: Callable[[str], None], *, max_frame: int = MAX_FRAME,
                 max_line: int = MAX_LINE):
        self._on_frame = on_frame
        self._on_stderr = on_stderr
        self._on_exit = on_exit
        self._decoder = FrameDecoder(max_frame)
        self._max_line = max_line
        self._stderr_line = bytearray()  # the stderr line being received, at most max_line
        self._stderr_cut = 0  # bytes of it dropped past max_line
        self._broken = False
        self._channel: asyncssh.SSHClientChannel[bytes] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._send_lock = asyncio.Lock()
        self._exit_reason = "the agent's channel closed"

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self._channel = chan
        chan.set_write_buffer_limits(high=SEND_HIGH_WATER)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self._stderr_received(data)
            return
        if self._broken:
            return  # what arrives before the channel closes is not read
        try:
            frames = self._decoder.feed(data)
        except FrameTooLarge as exc:
            if exc.kind in (Kind.RESULT, Kind.ERROR):  # that call fails, it is not re-run
                self._on_frame(Frame(Kind.ERROR, exc.task_id, json.dumps({
                    "type": "prefect_azmanagers.exceptions.PayloadError", "traceback": "",
                    "exception": None, "message": (
                        f"the call's {exc.kind.name.lower()} is {exc.length} bytes, over the "
                        f"driver's limit of {exc.limit} bytes: return a reference (e.g. a path "
                        "in shared storage) instead of the data")}).encode()))
            self._protocol_failed(
                f"the agent sent a {exc.kind.name} frame of {exc.length} bytes, over the "
                f"driver's limit of {exc.limit} bytes")
            return
        except ProtocolError as exc:
            self._protocol_failed(f"protocol error: {exc}")
            return
        for frame in frames:
            try:
                frame = self._bounded(frame)
            except (ValueError, AttributeError):
                self._protocol_failed("protocol error: an OUTPUT frame that is not a JSON object")
                return
            self._on_frame(frame)

    def _protocol_failed(self, reason: str) -> None:
        self._broken = True
        self._exit_reason = reason
        self.close()

    def _bounded(self, frame: Frame) -> Frame:
        if frame.kind != Kind.OUTPUT or len(frame.body) <= self._max_line:
            return frame
        message = frame.json()
        line = str(message.get("line", "")).encode("utf-8", "replace")
        if len(line) <= self._max_line:
            return frame
        message["line"] = _cut_line(line[:self._max_line], len(line) - self._max_line)
        return Frame(frame.kind, frame.task_id, json.dumps(message).encode())

    def _stderr_received(self, data: bytes) -> None:
        pieces = data.split(b"\n")  # every piece but the last ends a line
        for i, piece in enumerate(pieces):
            room = self._max_line - len(self._stderr_line)
            self._stderr_line += piece[:room]
            self._stderr_cut += max(0, len(piece) - room)
            if i < len(pieces) - 1:
                self._emit_stderr_line()

    def _emit_stderr_line(self) -> None:
        line = _cut_line(bytes(self._stderr_line), self._stderr_cut)
        self._stderr_line.clear()
        self._stderr_cut = 0
        self._on_stderr(line)

    def exit_status_received(self, status: int) -> None:
        if not self._broken:  # after a protocol failure, that failure is the reason
            self._exit_reason = f"the agent exited with status {status}"

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        if not self._broken:
            self._exit_reason = f"the agent was killed by signal {signal}"

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stderr_line or self._stderr_cut:
            self._emit_stderr_line()
        self._writable.set()
        self._on_exit(f"{self._exit_reason}" + (f" ({exc})" if exc else ""))

    async def send(self, kind: Kind, task_id: int = 0, body: bytes | Payload = b"") -> None:
        """Write one frame, waiting while the channel's send buffer is full.

        Frames never interleave. A send interrupted half-way (cancelled, channel gone) closes
        the channel: the agent's stream cannot resume inside a frame.
        """
        payload = body if isinstance(body, Payload) else Payload(body)
        prefix = payload.prefix()
        header = HEADER.pack(payload.nbytes, kind, task_id)
        async with self._send_lock:
            await self._writable.wait()
            assert self._channel is not None
            if len(prefix) < SMALL_FRAME:  # one SSH packet for a small frame
                self._channel.write(header + prefix)
                rest = payload.buffers
            else:
                self._channel.write(header)
                rest = (prefix, *payload.buffers)
            try:
                for buffer in rest:
                    view = memoryview(buffer)
                    for start in range(0, view.nbytes, WRITE_SLICE):
                        await self._writable.wait()
                        self._channel.write(view[start:start + WRITE_SLICE])
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


class ExistenceUnknown(OSError):
    """The cloud could not say whether the instance still exists (its listing failed, e.g.
    the cloud is unreachable or stopped); its address was not contacted. An OSError, so a
    caller retrying unreachable instances backs off and retries as for one."""


class InstanceConnection:
    """The SSH connection to one instance (created with `open`).

    Every connection pins the host key per vmId and ignores ~/.ssh/config, ~/.ssh/known_hosts
    and the user's SSH agent. Once `mark_gone(vm_id)` says the cloud deleted an instance, its
    connections are closed and `open` refuses it (InstanceGone), so no reconnect, keepalive or
    diagnostic keeps knocking at an address the cloud may already have given to another VM.
    With `still_exists`, `open` asks the cloud first, so nothing knocks either at an address
    whose instance the cloud can no longer vouch for (deleted unseen, or the cloud stopped).
    """

    _gone: ClassVar[set[str]] = set()  # vmIds are unique: a deleted one never comes back
    _live: ClassVar[dict[str, weakref.WeakSet["InstanceConnection"]]] = {}

    def __init__(self, conn: asyncssh.SSHClientConnection, address: str, vm_id: str):
        self._conn = conn
        self.address = address
        self.vm_id = vm_id
        self._listeners: list[asyncssh.SSHListener] = []
        self._loop = asyncio.get_running_loop()
        self._live.setdefault(vm_id, weakref.WeakSet()).add(self)

    @classmethod
    def mark_gone(cls, vm_id: str) -> None:
        """The cloud reported the instance deleted: close its connections, refuse new ones.

        Callable from any thread (each connection is closed on its own event loop).
        """
        cls._gone.add(vm_id)
        for connection in list(cls._live.pop(vm_id, ())):
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if connection._loop is running:
                connection.close()
            elif not connection._loop.is_closed():
                connection._loop.call_soon_threadsafe(connection.close)

    @classmethod
    def _refuse_gone(cls, vm_id: str, address: str) -> None:
        if vm_id in cls._gone:
            raise InstanceGone(f"instance {vm_id} ({address}) was reported gone by the cloud: "
                               "no connection is opened to its address any more")

    @classmethod
    async def open(cls, address: str, *, port: int, username: str, client_key: asyncssh.SSHKey,
                   vm_id: str, host_keys: PinnedHostKeys,
                   on_lost: Callable[[Exception | None], None] = lambda exc: None,
                   still_exists: Callable[[], Awaitable[bool | None]] | None = None,
                   connect_timeout: float = 15.0, keepalive_interval: float = 15.0,
                   keepalive_count_max: int = 4) -> "InstanceConnection":
        """Connect to an instance, checking (or, on first contact, pinning) its host key.

        `still_exists`, if given, is asked first (a fresh listing by the cloud): False marks
        the instance gone, None (the listing failed) raises ExistenceUnknown; either way its
        address is not contacted. Use it where the instance may have gone since it was last
        seen, as on a reconnect.

        Raises HostKeyMismatch if the instance presents a key other than the pinned one,
        InstanceGone once `mark_gone(vm_id)` was called, ExistenceUnknown, OSError /
        asyncssh.Error when it cannot be reached or refuses the key.
        """
        cls._refuse_gone(vm_id, address)
        if still_exists is not None:
            listed = await still_exists()
            if listed is None:
                raise ExistenceUnknown(f"instance {vm_id} ({address}): the cloud could not say "
                                       "whether it still exists (listing it failed); its address "
                                       "was not contacted")
            if not listed:
                cls.mark_gone(vm_id)
            cls._refuse_gone(vm_id, address)
        pinned = host_keys.get(vm_id)
        holder: dict[str, _PinningClient] = {}

        def factory() -> _PinningClient:
            holder["client"] = _PinningClient(host_keys, vm_id, address, on_lost)
            return holder["client"]

        options = {}
        if pinned is not None:  # ask for the pinned key's type so the server presents that key
            options["server_host_key_algs"] = [alg.decode() for alg in pinned.sig_algorithms]
        try:
            conn, _ = await asyncssh.create_connection(
                factory, address, port=port, username=username, client_keys=[client_key],
                known_hosts=_no_known_hosts, agent_path=None, config=None,
                x509_trusted_certs=None,  # no ~/.ssh/ca-bundle.crt: only the pin vouches for a host
                preferred_auth="publickey",
                connect_timeout=connect_timeout, keepalive_interval=keepalive_interval,
                keepalive_count_max=keepalive_count_max, window=8 << 20,
                encryption_algs=ENCRYPTION_ALGS, **options,
            )
        except asyncssh.HostKeyNotVerifiable:
            client = holder.get("client")
            if client is not None and client.mismatch is not None:
                raise client.mismatch from None
            raise
        client = holder["client"]
        try:
            cls._refuse_gone(vm_id, address)  # marked gone while connecting
            if client.presented is None:  # no key went through the pin check: refuse
                raise HostKeyMismatch(f"instance {vm_id} at {address} was accepted without its "
                                      "host key being checked against the pin; refused")
            host_keys.pin(vm_id, client.presented, address)
        except BaseException:
            conn.close()
            raise
        return cls(conn, address, vm_id)

    @property
    def ssh(self) -> asyncssh.SSHClientConnection:
        """The underlying asyncssh connection (for helpers such as azure.bootscript.boot_log_tail)."""
        return self._conn

    async def run(self, command: str, *, timeout: float = 30.0) -> asyncssh.SSHCompletedProcess:
        """Run a short command (no check); stdout/stderr as text."""
        return await asyncio.wait_for(self._conn.run(command, check=False), timeout)

    async def forward_ports(self, ports: Sequence[int]) -> None:
        """Make each driver loopback port P reachable at 127.0.0.1:P inside the instance.

        Raises ConfigurationError when the instance's sshd cannot listen on a port there.
        """
        for port in ports:
            try:
                listener = await self._conn.forward_remote_port("127.0.0.1", port, "127.0.0.1", port)
            except asyncssh.ChannelListenError as exc:
                raise ConfigurationError(
                    f"instance {self.address} cannot listen on its 127.0.0.1 port {port}, the end "
                    f"of the tunnel to the driver's port {port} ({exc}): the port is privileged or "
                    "taken there (on a local cloud in loopback mode, the instances share your "
                    "127.0.0.1: start it with --prefect-api-url)") from None
            self._listeners.append(listener)

    async def start_agent(self, command: str, *, on_frame: Callable[[Frame], None],
                          on_stderr: Callable[[str], None], on_exit: Callable[[str], None],
                          max_frame: int = MAX_FRAME, max_line: int = MAX_LINE) -> AgentProcess:
        """Start `command` (see `agent_command`) on an exec channel of this connection.

        `max_frame` / `max_line` bound what the driver holds from it (see AgentProcess).
        """
        _, process = await self._conn.create_session(
            lambda: AgentProcess(on_frame, on_stderr, on_exit, max_frame=max_frame,
                                 max_line=max_line), command, encoding=None)
        return process

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._conn.close()
        live = self._live.get(self.vm_id)
        if live is not None:
            live.discard(self)
            if not live:
                self._live.pop(self.vm_id, None)

    async def wait_closed(self) -> None:
        await self._conn.wait_closed()


async def read_boot_log(address: str, *, vm_id: str, host_keys: PinnedHostKeys, port: int,
                        username: str, client_key: asyncssh.SSHKey, admin_username: str,
                        lines: int = 50, connect_timeout: float = 15.0) -> str:
    """`azure.bootscript.boot_log_tail` of an instance over a connection of its own, opened
    like every other (host key pinned per vmId, or pinned on first contact; refused once gone).

    For diagnostics of an instance the caller holds no connection to. Never raises for an
    instance that cannot be read (unreachable, another host key, gone): the text says why.
    """
    try:
        connection = await InstanceConnection.open(
            address, port=port, username=username, client_key=client_key, vm_id=vm_id,
            host_keys=host_keys, connect_timeout=connect_timeout)
    except (OSError, asyncssh.Error, asyncio.TimeoutError, HostKeyMismatch, InstanceGone) as exc:
        return f"(could not read the boot log from {address} over SSH: {type(exc).__name__}: {exc})"
    try:
        return await boot_log_tail(connection.ssh, admin_username=admin_username, lines=lines)
    finally:
        connection.close()
