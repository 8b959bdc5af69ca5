"""Unit tests of the engine's pure parts: framing, pickling of local code, remote errors,
pinned host keys, command building, and the agent process driven through pipes (no SSH)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import pickle
import shlex
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from unittest import mock

import asyncssh
import cloudpickle
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefect_azmanagers.cluster import protocol, serialization
from prefect_azmanagers.cluster.lifecycle import _seconds_until
from prefect_azmanagers.cluster.errors import RemoteError, exception_from_error
from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys
from prefect_azmanagers.cluster.protocol import (
    HEADER,
    BufferKind,
    FrameDecoder,
    Kind,
    Payload,
    ProtocolError,
    encode,
    load_payload,
)
from prefect_azmanagers.cluster.transport import agent_command
from prefect_azmanagers.exceptions import HostKeyMismatch, PayloadError


@given(st.lists(st.tuples(st.sampled_from(list(Kind)), st.integers(0, 2**63), st.binary(max_size=300)),
                max_size=8),
       st.integers(1, 50))
def test_frames_survive_any_chunking(frames, chunk):
    stream = b"".join(encode(k, t, b) for k, t, b in frames)
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        got += decoder.feed(stream[i:i + chunk])
    assert [(f.kind, f.task_id, f.body) for f in got] == frames


def _stream_of(frames):
    return b"".join(encode(k, t, b) for k, t, b in frames)


@given(st.lists(st.tuples(st.sampled_from(list(Kind)), st.integers(0, 2**63), st.binary(max_size=300)),
                max_size=8),
       st.lists(st.integers(1, 120), min_size=1, max_size=40))
def test_gathered_bodies_survive_any_chunking(frames, cuts):
    stream = _stream_of(frames)
    decoder = FrameDecoder()
    got, start, i = [], 0, 0
    with mock.patch.object(protocol, "LARGE_BODY", 16):  # most bodies are gathered chunk-wise
        while start < len(stream):
            step = cuts[i % len(cuts)]
            got += decoder.feed(stream[start:start + step])
            start, i = start + step, i + 1
    assert [(f.kind, f.task_id, f.body) for f in got] == frames
    assert all(type(f.body) is bytes for f in got)


def test_corrupted_stream_is_refused():
    with pytest.raises(ProtocolError, match="unknown message kind"):
        FrameDecoder().feed(HEADER.pack(0, 99, 0))
    with pytest.raises(ProtocolError, match="not plausible"):
        FrameDecoder().feed(HEADER.pack(1 << 50, Kind.RUN, 0))


@pytest.mark.parametrize("chunk", [7, 4093, 65536, (1 << 20) + 7, 1 << 30])
def test_large_bodies_split_across_reads(chunk):
    big = os.urandom(3 << 20)  # gathered chunk by chunk (more than LARGE_BODY missing)
    frames = [(Kind.HELLO, 0, b"{}"), (Kind.RESULT, 7, big), (Kind.OUTPUT, 0, b"x"),
              (Kind.RESULT, 8, big[:70000]), (Kind.BYE, 0, b"")]
    stream = _stream_of(frames)
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        got += decoder.feed(stream[i:i + chunk])
    assert [(f.kind, f.task_id, f.body) for f in got] == frames
    assert all(type(f.body) is bytes for f in got)


class _Viewed:
    """Pickles its data as a pickle-5 buffer, as numpy arrays do."""

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return _Viewed, (pickle.PickleBuffer(self.data),)


def _wire(payload: Payload) -> bytes:
    return payload.prefix() + b"".join(bytes(memoryview(b)) for b in payload.buffers)


def test_payload_keeps_large_buffers_out_of_the_pickle():
    big, mutable = os.urandom(1 << 20), bytearray(os.urandom(1 << 17))
    value = {"a": big, "again": big, "b": mutable, "small": b"s" * 100,
             "ro": _Viewed(os.urandom(1 << 17)), "rw": _Viewed(bytearray(1 << 17))}
    payload = serialization.dumps_payload(value)
    assert len(payload.pickle) < 4096  # nothing large was copied into the stream
    assert payload.buffers[0] is big and len(payload.buffers) == 4  # `big` travels once
    assert payload.kinds == (BufferKind.BYTES, BufferKind.BYTEARRAY, BufferKind.BYTES,
                             BufferKind.BYTEARRAY)
    body = _wire(payload)
    assert body[:1] == b"\x00" and len(body) == payload.nbytes

    in_process = load_payload(payload)
    assert in_process["a"] is big and in_process["again"] is big  # no copy at all
    received = serialization.loads(body)  # as the driver gets a RESULT body
    for got in (in_process, received):
        assert got["a"] == big and got["again"] is got["a"] and got["small"] == b"s" * 100
        assert type(got["b"]) is bytearray and got["b"] == mutable
        assert type(got["ro"].data) is bytes and got["ro"].data == value["ro"].data
        assert type(got["rw"].data) is bytearray and got["rw"].data == value["rw"].data


def test_payload_without_large_buffers_is_a_plain_pickle():
    payload = serialization.dumps_payload({"x": b"y" * 1000})
    assert payload.buffers == () and payload.prefix() == payload.pickle
    assert payload.pickle[:1] == b"\x80" and payload.nbytes == len(payload.pickle)
    assert cloudpickle.loads(_wire(payload)) == {"x": b"y" * 1000}  # readers of plain pickles
    assert serialization.loads(serialization.dumps([1, 2])) == [1, 2]


def test_payload_read_from_a_stream_fills_one_object_per_buffer():
    big, mutable = os.urandom(1 << 20), bytearray(os.urandom(1 << 17))
    payload = serialization.dumps_payload((big, mutable))
    body = _wire(payload)
    stream = io.BufferedReader(io.BytesIO(body + b"next frame"), buffer_size=4096)
    read = Payload.read(stream, len(body))
    assert read is not None and [type(b) for b in read.buffers] == [bytes, bytearray]
    got = load_payload(read)
    assert got == (big, mutable) and got[0] is read.buffers[0]  # rebuilt without a copy
    assert stream.read() == b"next frame"
    plain = serialization.dumps_payload("plain")
    assert Payload.read(io.BufferedReader(io.BytesIO(plain.pickle)), plain.nbytes) == plain

    truncated = io.BufferedReader(io.BytesIO(body[:-10]))
    assert Payload.read(truncated, len(body)) is None  # end of input inside the frame
    with pytest.raises(ProtocolError, match="does not match the frame"):
        Payload.read(io.BufferedReader(io.BytesIO(body)), len(body) + 1)


def test_a_payload_inside_a_payload_travels_without_copies():
    blob, rw = os.urandom(1 << 20), _Viewed(bytearray(os.urandom(1 << 17)))
    inner = serialization.dumps_payload({"blob": blob, "rw": rw})  # e.g. one task parameter
    outer = serialization.dumps_payload({"parameter": inner})
    assert len(outer.pickle) < 4096 and len(outer.buffers) == 2
    body = _wire(outer)
    read = Payload.read(io.BufferedReader(io.BytesIO(body)), len(body))
    got = serialization.loads(serialization.loads(read)["parameter"])
    assert got["blob"] == blob and got["blob"] is read.buffers[0]
    assert got["rw"].data == rw.data and got["rw"].data is read.buffers[1]


def test_malformed_payloads_are_refused():
    body = _wire(serialization.dumps_payload(os.urandom(1 << 17)))
    with pytest.raises(ProtocolError, match="malformed payload"):
        Payload.parse(body[:-1])
    with pytest.raises(ProtocolError, match="malformed payload"):
        Payload.parse(b"\x00\x01")
    stream = io.BytesIO()
    pickler = pickle.Pickler(stream)
    pickler.persistent_id = lambda obj: 5 if obj == "ref" else None  # there is no buffer 5
    pickler.dump(["ref"])
    with pytest.raises(pickle.UnpicklingError, match="missing buffer 5"):
        load_payload(Payload(stream.getvalue(), (b"x",), (BufferKind.BYTES,)))


def test_local_modules_travel_by_value(tmp_path, monkeypatch):
    (tmp_path / "my_local_helpers.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_local_helpers

    payload = serialization.dumps(lambda: my_local_helpers.triple(14))
    # a fresh interpreter that cannot import the module still runs the callable
    code = "import sys, cloudpickle; print(cloudpickle.loads(sys.stdin.buffer.read())())"
    result = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True,
                            cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.stdout.strip() == b"42", result.stderr.decode()
    # installed and standard-library modules stay by reference
    assert not serialization.is_local_module(json)
    assert not serialization.is_local_module(asyncssh)
    assert serialization.is_local_module(my_local_helpers)


def test_unpicklable_callable_is_a_payload_error_naming_it():
    lock = threading.Lock()
    with pytest.raises(PayloadError, match="callable 'uses_lock'.*lock"):
        serialization.dumps(lambda: lock, what="callable 'uses_lock'")


def test_remote_errors_rebuild_the_original_type_or_a_remote_error():
    body = {"type": "builtins.ValueError", "message": "bad", "traceback": "Traceback...\nValueError: bad",
            "exception": cloudpickle.dumps(ValueError("bad")).hex()}
    exc = exception_from_error(body, "worker 3")
    assert isinstance(exc, ValueError) and exc.remote_traceback.endswith("ValueError: bad")
    assert any("worker 3" in note for note in exc.__notes__)
    body["exception"] = None
    exc = exception_from_error(body, "worker 3")
    assert isinstance(exc, RemoteError) and "ValueError: bad" in str(exc)
    body["type"] = "prefect_azmanagers.exceptions.PayloadError"
    assert isinstance(exception_from_error(body, "worker 3"), PayloadError)


def test_pinned_host_keys(tmp_path):
    store = PinnedHostKeys(tmp_path / "sub" / "known_hosts")
    first, second = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    assert store.get("vm-1") is None and store.check("vm-1", first, "10.0.0.4") is False
    store.pin("vm-1", first, "10.0.0.4")
    store.pin("vm-2", second, "10.0.0.4")  # same address, another instance
    assert oct((tmp_path / "sub" / "known_hosts").stat().st_mode & 0o777) == "0o600"
    assert store.check("vm-1", first, "10.0.0.4") and store.check("vm-2", second, "10.0.0.4")
    with pytest.raises(HostKeyMismatch, match="vm-1 at 10.0.0.9.*delete the line"):
        store.check("vm-1", second, "10.0.0.9")
    store.forget({"vm-1"})
    assert store.get("vm-1") is None and store.get("vm-2") is not None


def test_agent_command_quotes_everything():
    command = agent_command("/opt/my python/bin/python3", worker_id=7, concurrency=3,
                            env={"A": "x'; rm -rf / #", "B": "$(id)"}, imds_url="http://169.254.169.254",
                            launcher=["mpirun", "-n", "2"])
    words = shlex.split(command)
    assert words[:2] == ["exec", "env"]
    assert "A=x'; rm -rf / #" in words and "B=$(id)" in words and "AZM_WORKER_ID=7" in words
    assert words[words.index("mpirun"):words.index("mpirun") + 4] == ["mpirun", "-n", "2", "/opt/my python/bin/python3"]
    assert words[-6:] == ["--concurrency", "3", "--heartbeat", "10.0", "--imds", "http://169.254.169.254"]


def test_seconds_until_not_before():
    soon = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 < _seconds_until(format_datetime(soon, usegmt=True)) <= 30
    assert _seconds_until("") == 0.0 and _seconds_until("garbage") == 0.0


class _FakeIMDS(http.server.BaseHTTPRequestHandler):
    events: list[dict] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.headers.get("Metadata") != "true":
            self.send_response(400)
            self.end_headers()
            return
        if self.path.startswith("/metadata/instance"):
            doc = {"compute": {"name": "ss_3"}}
        else:
            doc = {"DocumentIncarnation": 1, "Events": self.events}
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _FrameReader:
    def __init__(self, stream):
        self.stream = stream
        self.decoder = FrameDecoder()

    def until(self, predicate):
        frames = []
        while not any(predicate(f) for f in frames):
            data = os.read(self.stream.fileno(), 65536)
            if not data:
                break
            frames += self.decoder.feed(data)
        return frames


def test_agent_reports_preempt_for_its_vm_and_flushes_on_shutdown(tmp_path):
    _FakeIMDS.events = [
        {"EventId": "other", "EventType": "Preempt", "Resources": ["ss_9"], "NotBefore": ""},
        {"EventId": "reboot", "EventType": "Reboot", "Resources": ["ss_3"], "NotBefore": ""},
        {"EventId": "mine", "EventType": "Preempt", "Resources": ["ss_3"],
         "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT"},
    ]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeIMDS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    marker = tmp_path / "flushed"
    try:
        command = agent_command(sys.executable, worker_id=1,
                                imds_url=f"http://127.0.0.1:{server.server_address[1]}")
        agent = subprocess.Popen(["bash", "-c", command], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def register():
            from prefect_azmanagers.cluster.agent import register_flush_hook
            register_flush_hook(lambda: marker.write_text("yes"))
            return "registered"

        agent.stdin.write(encode(Kind.RUN, 5, serialization.dumps(register)))
        agent.stdin.flush()
        reader = _FrameReader(agent.stdout)
        frames = reader.until(lambda f: f.kind == Kind.PREEMPT)
        preempts = [f.json() for f in frames if f.kind == Kind.PREEMPT]
        assert preempts == [{"event_id": "mine", "not_before": "Mon, 19 Sep 2016 18:29:47 GMT"}]
        if not any(f.kind == Kind.RESULT for f in frames):
            frames += reader.until(lambda f: f.kind == Kind.RESULT)
        assert any(f.kind == Kind.RESULT and cloudpickle.loads(f.body) == "registered" for f in frames)
        agent.stdin.write(encode(Kind.SHUTDOWN))
        agent.stdin.flush()
        frames = reader.until(lambda f: f.kind == Kind.BYE)
        assert frames[-1].kind == Kind.BYE and marker.read_text() == "yes"
        assert agent.wait(10) == 0
    finally:
        server.shutdown()


def _meet_the_other_call():
    import sys
    import threading
    barrier = sys.__dict__.setdefault("azm_test_barrier", threading.Barrier(2))
    barrier.wait(timeout=60)  # returns only if both calls run at the same time
    return threading.current_thread().name


def test_agent_concurrency_runs_calls_side_by_side():
    agent = subprocess.Popen(["bash", "-c", agent_command(sys.executable, worker_id=1, concurrency=2)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        payload = serialization.dumps(_meet_the_other_call)
        agent.stdin.write(encode(Kind.RUN, 1, payload) + encode(Kind.RUN, 2, payload))
        agent.stdin.flush()
        reader = _FrameReader(agent.stdout)
        frames = reader.until(lambda f: f.kind == Kind.HELLO)
        done = (Kind.RESULT, Kind.ERROR)
        results = [f for f in frames if f.kind in done]
        while len(results) < 2:
            results += [f for f in reader.until(lambda f: f.kind in done) if f.kind in done]
        assert [f.kind for f in results] == [Kind.RESULT, Kind.RESULT], [f.body[:200] for f in results]
        assert sorted(f.task_id for f in results) == [1, 2]
        assert len({cloudpickle.loads(f.body) for f in results}) == 2  # two threads
    finally:
        agent.kill()
        agent.wait()


def _digest_and_echo(blob, mutable):
    import hashlib
    return hashlib.sha256(blob).hexdigest(), bytes(mutable) * 2


def test_agent_takes_and_returns_out_of_band_buffers():
    agent = subprocess.Popen(["bash", "-c", agent_command(sys.executable, worker_id=1)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        blob, mutable = os.urandom(5 << 20), bytearray(os.urandom(3 << 20))
        payload = serialization.dumps_payload(lambda: _digest_and_echo(blob, mutable))
        assert len(payload.buffers) == 2
        agent.stdin.write(HEADER.pack(payload.nbytes, Kind.RUN, 1) + _wire(payload))
        agent.stdin.write(encode(Kind.RUN, 2, serialization.dumps(lambda: "small")))
        agent.stdin.flush()
        reader = _FrameReader(agent.stdout)
        frames = reader.until(lambda f: f.task_id == 2 and f.kind == Kind.RESULT)
        results = {f.task_id: f.body for f in frames if f.kind == Kind.RESULT}
        errors = [f.json() for f in frames if f.kind == Kind.ERROR]
        assert not errors, errors
        assert results[1][:1] == b"\x00"  # the 6 MB result came back out of band too
        assert serialization.loads(results[1]) == (hashlib.sha256(blob).hexdigest(),
                                                   bytes(mutable) * 2)
        assert serialization.loads(results[2]) == "small"
    finally:
        agent.kill()
        agent.wait()


def _rank_and_tail(blob):
    from prefect_azmanagers.mpi import comm
    return comm().Get_rank(), len(blob), blob[-2:]


def test_mpi_workers_take_out_of_band_arguments():
    from prefect_azmanagers.cluster.mpi import launcher

    words = launcher(2)
    if os.geteuid() == 0:
        words.insert(1, "--allow-run-as-root")
    agent = subprocess.Popen(["bash", "-c", agent_command(sys.executable, worker_id=1, launcher=words)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        blob = os.urandom(3 << 20)
        payload = serialization.dumps_payload(lambda: _rank_and_tail(blob))
        assert payload.buffers
        agent.stdin.write(HEADER.pack(payload.nbytes, Kind.RUN, 1) + _wire(payload))
        agent.stdin.flush()
        frames = _FrameReader(agent.stdout).until(lambda f: f.kind in (Kind.RESULT, Kind.ERROR))
        answer = next(f for f in frames if f.kind in (Kind.RESULT, Kind.ERROR))
        assert answer.kind == Kind.RESULT, answer.json()["message"]
        assert serialization.loads(answer.body) == (0, len(blob), blob[-2:])
    finally:
        os.killpg(agent.pid, 9)
        agent.wait()
