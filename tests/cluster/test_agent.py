"""The agent process driven through pipes (no SSH): preempt reports, flush at shutdown,
concurrency, out-of-band buffers, MPI workers taking large arguments."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import cloudpickle

from prefect_azmanagers.cluster import serialization
from prefect_azmanagers.cluster.protocol import HEADER, FrameDecoder, Kind, encode
from prefect_azmanagers.cluster.transport import agent_command
from tests.cluster.test_protocol import _wire
from tests.httpd import QuietHandler


class _FakeIMDS(QuietHandler):
    events: list[dict] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.headers.get("Metadata") != "true":
            self.reply(b"", status=400)
        elif self.path.startswith("/metadata/instance"):
            self.reply(json.dumps({"compute": {"name": "ss_3"}}).encode())
        else:
            self.reply(json.dumps({"DocumentIncarnation": 1, "Events": self.events}).encode())


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
