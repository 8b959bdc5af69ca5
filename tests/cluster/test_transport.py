"""Transport + agent against a real OpenSSH server: frames, output, host-key pinning, the
driver's bounds, redaction, and what every connection ignores or refuses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import subprocess
import types

import asyncssh
import cloudpickle
import pytest

from prefect_azmanagers.azure.bootscript import boot_log_tail
from prefect_azmanagers.cluster.errors import exception_from_error
from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys
from prefect_azmanagers.cluster.protocol import Frame, Kind, encode
from prefect_azmanagers.cluster.serialization import dumps, dumps_payload, loads
from prefect_azmanagers.cluster.transport import (
    AgentProcess,
    ExistenceUnknown,
    InstanceConnection,
    agent_command,
    read_boot_log,
)
from prefect_azmanagers.exceptions import HostKeyMismatch, InstanceGone, PayloadError

pytestmark = pytest.mark.anyio


class Collector:
    def __init__(self):
        self.frames: list[Frame] = []
        self.stderr: list[str] = []
        self.exited: asyncio.Future = asyncio.get_running_loop().create_future()
        self.arrived = asyncio.Event()

    def on_frame(self, frame):
        self.frames.append(frame)
        self.arrived.set()

    def on_exit(self, reason):
        if not self.exited.done():
            self.exited.set_result(reason)

    async def wait_for(self, predicate, timeout=120):  # agent start imports prefect: slow under load
        async def loop():
            while not any(predicate(f) for f in self.frames):
                self.arrived.clear()
                await self.arrived.wait()
        try:
            await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            raise AssertionError(f"no such frame; got {self.frames} stderr={self.stderr}") from None
        return next(f for f in self.frames if predicate(f))


async def _open(sshd, known_hosts, vm_id="vm-1", **options):
    return await InstanceConnection.open(
        sshd.address, port=sshd.port, username=sshd.username, client_key=sshd.client_key,
        vm_id=vm_id, host_keys=PinnedHostKeys(known_hosts), **options)


@contextlib.asynccontextmanager
async def _started_agent(sshd, tmp_path, command=None, **limits):
    """A connection, an agent on it that said HELLO, and what it sent; closed at the end."""
    conn = await _open(sshd, tmp_path / "known_hosts")
    try:
        got = Collector()
        agent = await conn.start_agent(command or agent_command(sshd.python, worker_id=1),
                                       on_frame=got.on_frame, on_stderr=got.stderr.append,
                                       on_exit=got.on_exit, **limits)
        await got.wait_for(lambda f: f.kind == Kind.HELLO)
        yield agent, got
    finally:
        conn.close()
        await conn.wait_closed()


def _noisy_task():
    import os
    import sys
    print("hello from the task")
    os.write(1, b"raw fd 1 write\n")
    print("to stderr", file=sys.stderr)
    return {"answer": 42}


def _failing_task():
    def inner():
        raise ValueError("bad value 7")
    inner()


async def test_agent_round_trip_output_and_remote_traceback(sshd, tmp_path):
    command = agent_command(sshd.python, worker_id=3, env={"GREETING": "it's $HOME `x`"})
    async with _started_agent(sshd, tmp_path, command) as (agent, got):
        hello = await got.wait_for(lambda f: f.kind == Kind.HELLO)
        assert hello.json()["concurrency"] == 1

        await agent.send(Kind.RUN, 1, dumps(_noisy_task))
        result = await got.wait_for(lambda f: f.kind == Kind.RESULT)
        assert result.task_id == 1 and cloudpickle.loads(result.body) == {"answer": 42}

        await agent.send(Kind.RUN, 2, dumps(_failing_task))
        error = (await got.wait_for(lambda f: f.kind == Kind.ERROR)).json()
        assert error["type"] == "builtins.ValueError" and "bad value 7" in error["message"]
        assert "in inner" in error["traceback"]
        assert isinstance(cloudpickle.loads(bytes.fromhex(error["exception"])), ValueError)

        import os  # the environment arrives unchanged, quoting intact
        await agent.send(Kind.RUN, 3, cloudpickle.dumps(
            lambda: (os.environ["GREETING"], os.environ["AZM_WORKER_ID"])))
        env = await got.wait_for(lambda f: f.kind == Kind.RESULT and f.task_id == 3)
        assert cloudpickle.loads(env.body) == ("it's $HOME `x`", "3")

        await agent.send(Kind.SHUTDOWN)
        await got.wait_for(lambda f: f.kind == Kind.BYE)
        await asyncio.wait_for(got.exited, 10)
        lines = [f.json()["line"] for f in got.frames if f.kind == Kind.OUTPUT]
        assert "hello from the task" in lines and "raw fd 1 write" in lines
        assert "to stderr" in got.stderr


async def test_host_key_pinned_per_vm_id_and_mismatch_refused(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    conn = await _open(sshd, known_hosts, vm_id="vm-a")
    conn.close()
    pinned = known_hosts.read_text().split()
    assert pinned[0] == "vm-a" and pinned[1] == "ssh-ed25519"
    # same vmId, same key: accepted, nothing appended
    conn = await _open(sshd, known_hosts, vm_id="vm-a")
    conn.close()
    assert len(known_hosts.read_text().splitlines()) == 1
    # another instance that happens to reuse the address: pinned separately
    other = asyncssh.generate_private_key("ssh-ed25519")
    known_hosts.write_text(known_hosts.read_text() + "vm-b " + other.export_public_key().decode())
    with pytest.raises(HostKeyMismatch, match="vm-b"):
        await _open(sshd, known_hosts, vm_id="vm-b")


async def test_the_address_is_contacted_only_once_the_cloud_still_lists_the_instance(
        sshd, tmp_path, monkeypatch):
    """A reconnect asks the cloud first: a listing that failed (the cloud stopped) or that no
    longer shows the instance sends nothing to its address; only a confirmed one connects."""
    knocks = []
    real_connect = asyncssh.create_connection

    async def connect(factory, host, *args, **kwargs):
        knocks.append(host)
        return await real_connect(factory, host, *args, **kwargs)

    monkeypatch.setattr(asyncssh, "create_connection", connect)
    known_hosts = tmp_path / "known_hosts"

    async def answer(listed):
        return listed

    with pytest.raises(ExistenceUnknown, match="listing it failed"):
        await _open(sshd, known_hosts, vm_id="vm-unknown", still_exists=lambda: answer(None))
    with pytest.raises(InstanceGone):
        await _open(sshd, known_hosts, vm_id="vm-deleted", still_exists=lambda: answer(False))
    with pytest.raises(InstanceGone):   # marked gone: refused without asking again
        await _open(sshd, known_hosts, vm_id="vm-deleted")
    assert knocks == []
    conn = await _open(sshd, known_hosts, vm_id="vm-listed", still_exists=lambda: answer(True))
    conn.close()
    assert knocks == [sshd.address]


async def test_agent_killed_reports_exit(sshd, tmp_path):
    async with _started_agent(sshd, tmp_path) as (_, got):
        pid = (await got.wait_for(lambda f: f.kind == Kind.HELLO)).json()["pid"]
        subprocess.run(["kill", "-9", str(pid)], check=True)
        reason = await asyncio.wait_for(got.exited, 10)
        assert "signal KILL" in reason or "status" in reason


def _digest(blob):
    import hashlib
    return hashlib.sha256(blob).hexdigest(), blob[-3:]


async def test_large_payloads_travel_out_of_band_without_interleaving(sshd, tmp_path):
    import hashlib
    import os

    command = agent_command(sshd.python, worker_id=1, concurrency=2)
    async with _started_agent(sshd, tmp_path, command) as (agent, got):
        blob = os.urandom(24 << 20)
        big = dumps_payload(lambda: _digest(blob))
        assert big.buffers[0] is blob  # written from the caller's object
        # a small frame sent while the large one is being written waits for it to end
        await asyncio.gather(agent.send(Kind.RUN, 1, big),
                             agent.send(Kind.RUN, 2, dumps(lambda: "small")))
        one = await got.wait_for(lambda f: f.task_id == 1 and f.kind in (Kind.RESULT, Kind.ERROR))
        two = await got.wait_for(lambda f: f.task_id == 2 and f.kind in (Kind.RESULT, Kind.ERROR))
        assert one.kind == Kind.RESULT, one.json()
        assert loads(one.body) == (hashlib.sha256(blob).hexdigest(), blob[-3:])
        assert loads(two.body) == "small"

        back = dumps_payload(lambda: bytes(range(256)) * (1 << 15))  # an 8 MB result
        await agent.send(Kind.RUN, 3, back)
        three = await got.wait_for(lambda f: f.task_id == 3 and f.kind == Kind.RESULT)
        assert three.body[:1] == b"\x00" and loads(three.body) == bytes(range(256)) * (1 << 15)


async def test_send_cut_short_closes_the_channel(sshd, tmp_path):
    async with _started_agent(sshd, tmp_path) as (agent, got):
        blob = bytes(256 << 20)
        sending = asyncio.ensure_future(agent.send(Kind.RUN, 1, dumps_payload(lambda: len(blob))))
        await asyncio.sleep(0)  # the send has filled the channel's buffer and waits for it to drain
        assert not sending.done()
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        # the agent never sees the rest of the frame: its input ends and it exits
        await asyncio.wait_for(got.exited, 30)
        assert not any(f.kind in (Kind.RESULT, Kind.ERROR) for f in got.frames)


def test_line_and_frame_bounds_as_bytes_arrive():
    frames, lines, exits = [], [], []
    process = AgentProcess(frames.append, lines.append, exits.append, max_line=8, max_frame=64)
    stderr = asyncssh.EXTENDED_DATA_STDERR
    process.data_received(b"abc\ndefghijklmn", stderr)  # a line split across two reads
    process.data_received(b"opq\n\nlast", stderr)
    process.data_received(encode(Kind.OUTPUT, 0, b'{"stream": "stdout", "line": "0123456789"}'), None)
    process.data_received(encode(Kind.OUTPUT, 0, b"not json, and longer than 8"), None)
    process.data_received(encode(Kind.BYE), None)  # the stream is not read after a failure
    process.connection_lost(None)
    assert lines == ["abc", "defghijk... [line truncated: 6 more bytes]", "", "last"]
    assert [f.json()["line"] for f in frames] == ["01234567... [line truncated: 2 more bytes]"]
    assert exits == ["protocol error: an OUTPUT frame that is not a JSON object"]


def _long_lines():
    import sys
    sys.stderr.write("E" * 300_000 + "\nafter\n")
    sys.stderr.flush()
    print("O" * 200_000)
    print("short")
    return "done"


async def test_long_output_lines_are_cut_with_a_marker(sshd, tmp_path):
    async with _started_agent(sshd, tmp_path, max_line=4096) as (agent, got):
        await agent.send(Kind.RUN, 1, dumps(_long_lines))
        await got.wait_for(lambda f: f.kind == Kind.RESULT)
        await agent.send(Kind.SHUTDOWN)
        await asyncio.wait_for(got.exited, 30)
        lines = [f.json()["line"] for f in got.frames if f.kind == Kind.OUTPUT]
        assert "O" * 4096 + "... [line truncated: 195904 more bytes]" in lines
        assert "short" in lines
        assert "E" * 4096 + "... [line truncated: 295904 more bytes]" in got.stderr
        assert "after" in got.stderr


async def test_a_frame_over_the_limit_loses_the_worker_with_the_reason(sshd, tmp_path):
    async with _started_agent(sshd, tmp_path, max_frame=1 << 20) as (agent, got):
        await agent.send(Kind.RUN, 1, dumps(lambda: b"x" * (512 << 10)))  # under the limit
        assert loads((await got.wait_for(lambda f: f.kind == Kind.RESULT)).body) == b"x" * (512 << 10)
        await agent.send(Kind.RUN, 2, dumps(lambda: b"x" * (2 << 20)))
        reason = await asyncio.wait_for(got.exited, 30)
        assert "RESULT frame of 2097" in reason and "over the driver's limit of 1048576 bytes" in reason
        [refused] = [f for f in got.frames if f.task_id == 2]  # the call fails, clearly
        assert refused.kind == Kind.ERROR
        error = exception_from_error(refused.json(), "worker 1")
        assert isinstance(error, PayloadError) and "result is 2097" in str(error)
        assert "over the driver's limit of 1048576 bytes: return a reference" in str(error)


async def test_env_values_are_redacted_wherever_the_command_is_shown(sshd, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="asyncssh")  # asyncssh logs each exec command at INFO
    command = agent_command(sshd.python, worker_id=1, env={"TOKEN": "s3cret 'value'", "MODE": "x"})
    shown = [str(command), repr(command), f"Command: {command}", "%s" % command,
             str(RuntimeError(f"the agent exited. Command: {command}"))]
    assert not any("s3cret" in text for text in shown)
    assert "exec env TOKEN=<redacted> MODE=<redacted> AZM_WORKER_ID=1 " in command.redacted
    async with _started_agent(sshd, tmp_path, command) as (agent, got):
        import os  # the real command went out: the value arrives
        await agent.send(Kind.RUN, 1, cloudpickle.dumps(lambda: os.environ["TOKEN"]))
        assert loads((await got.wait_for(lambda f: f.kind == Kind.RESULT)).body) == "s3cret 'value'"
    assert "TOKEN=<redacted>" in caplog.text and "s3cret" not in caplog.text


def _manifest(sshd):
    return types.SimpleNamespace(ssh_port=sshd.port, ssh_user=sshd.username,
                                 read_private_key=lambda: sshd.client_key.export_private_key().decode())


async def _read_boot_log(sshd, known_hosts, vm_id):
    return await read_boot_log(sshd.address, vm_id=vm_id, host_keys=PinnedHostKeys(known_hosts),
                               port=sshd.port, username=sshd.username, client_key=sshd.client_key,
                               admin_username="azureuser", connect_timeout=10)


@pytest.fixture
def hostile_user_ssh(tmp_path, monkeypatch):
    """A HOME whose ~/.ssh/config breaks every connection that reads it, and an SSH agent
    (SSH_AUTH_SOCK) that counts who contacts it."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host *\n  ProxyCommand false\n  User nobody\n")
    monkeypatch.setenv("HOME", str(home))
    contacts = []

    async def agent(reader, writer):
        contacts.append(1)
        writer.close()

    socket_path = str(tmp_path / "agent.sock")
    monkeypatch.setenv("SSH_AUTH_SOCK", socket_path)
    return socket_path, agent, contacts


async def test_every_ssh_connection_ignores_the_users_config_and_agent(sshd, tmp_path, hostile_user_ssh):
    socket_path, agent, contacts = hostile_user_ssh
    server = await asyncio.start_unix_server(agent, socket_path)
    try:
        known_hosts = tmp_path / "known_hosts"
        conn = await _open(sshd, known_hosts, vm_id="vm-c")
        conn.close()
        assert "== /var/log/cloud-init-output.log" in await _read_boot_log(sshd, known_hosts, "vm-c")
        tail = await boot_log_tail(sshd.address, admin_username="azureuser", manifest=_manifest(sshd),
                                   host_key=PinnedHostKeys(known_hosts).get("vm-c"), connect_timeout=10)
        assert "== /var/log/cloud-init-output.log" in tail and "== boot.status ==" in tail
    finally:
        server.close()
    assert contacts == []


async def test_boot_log_over_an_address_needs_the_pinned_key(sshd, tmp_path):
    accepted = []
    listener = await asyncio.start_server(lambda r, w: (accepted.append(1), w.close()), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        manifest = types.SimpleNamespace(**{**vars(_manifest(sshd)), "ssh_port": port})
        text = await boot_log_tail("127.0.0.1", admin_username="azureuser", manifest=manifest)
        assert "not read: no host key is pinned" in text
        assert accepted == []  # nothing was sent to an instance whose key nobody pinned
    finally:
        listener.close()
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    text = await boot_log_tail(sshd.address, admin_username="azureuser", manifest=_manifest(sshd),
                               host_key=other, connect_timeout=10)
    assert text.startswith("(could not read the boot log") and "cloud-init-output" not in text
    # read_boot_log pins on first contact, then holds the instance to that key
    known_hosts = tmp_path / "known_hosts"
    assert "== boot.status ==" in await _read_boot_log(sshd, known_hosts, "vm-d")
    known_hosts.write_text(f"vm-e {other}")
    text = await _read_boot_log(sshd, known_hosts, "vm-e")
    assert "HostKeyMismatch" in text and "cloud-init-output" not in text


async def test_an_instance_marked_gone_is_never_connected_to_again(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    lost = asyncio.get_running_loop().create_future()
    conn = await InstanceConnection.open(
        sshd.address, port=sshd.port, username=sshd.username, client_key=sshd.client_key,
        vm_id="vm-gone", host_keys=PinnedHostKeys(known_hosts),
        on_lost=lambda exc: lost.done() or lost.set_result(exc))
    other = await _open(sshd, known_hosts, vm_id="vm-stays")
    try:
        InstanceConnection.mark_gone("vm-gone")
        await asyncio.wait_for(lost, 10)  # its open connection was closed (keepalives end)
        with pytest.raises(InstanceGone, match="vm-gone.*no connection is opened"):
            await _open(sshd, known_hosts, vm_id="vm-gone")
        assert "InstanceGone" in await _read_boot_log(sshd, known_hosts, "vm-gone")
        assert (await other.run("echo still here")).stdout == "still here\n"
        # from another thread (a cluster's loop thread marking an instance of this loop gone)
        third = await _open(sshd, known_hosts, vm_id="vm-gone-too")
        closed = asyncio.ensure_future(third.wait_closed())
        await asyncio.to_thread(InstanceConnection.mark_gone, "vm-gone-too")
        await asyncio.wait_for(closed, 10)
    finally:
        other.close()
        await other.wait_closed()


def test_agent_command_quotes_everything():
    command = agent_command("/opt/my python/bin/python3", worker_id=7, concurrency=3,
                            env={"A": "x'; rm -rf / #", "B": "$(id)"}, imds_url="http://169.254.169.254",
                            launcher=["mpirun", "-n", "2"], warm_up="pkg.mod:warm")
    words = shlex.split(command)
    assert words[:2] == ["exec", "env"]
    assert "A=x'; rm -rf / #" in words and "B=$(id)" in words and "AZM_WORKER_ID=7" in words
    assert words[words.index("mpirun"):words.index("mpirun") + 4] == ["mpirun", "-n", "2", "/opt/my python/bin/python3"]
    assert words[-8:] == ["--concurrency", "3", "--heartbeat", "10.0", "--imds", "http://169.254.169.254",
                          "--warm-up", "pkg.mod:warm"]
