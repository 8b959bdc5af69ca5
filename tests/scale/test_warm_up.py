"""Cold start: an agent warms up before it says HELLO, and `WorkerWarmUp` readies a worker
process under the driver's settings before its first task (issue 12, "No cold start").

The agent runs as the driver starts it (a child process speaking frames on its stdin/stdout,
no SSH); `WorkerWarmUp` runs in a fresh interpreter against the session's real Prefect server.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import time

import cloudpickle
import httpx
import pytest

from prefect_azmanagers.cluster import serialization
from prefect_azmanagers.cluster.protocol import HEADER, FrameDecoder, Kind, encode

WARM_MODULE = textwrap.dedent("""
    import os, sys

    def noisy():
        print("warm-up print")           # Python's stdout
        os.write(1, b"warm-up raw fd 1\\n")  # the file descriptor itself (C code, children)

    def boom():
        raise RuntimeError("warm-up exploded")
""")


def _agent(tmp_path, *args: str) -> subprocess.Popen:
    (tmp_path / "warmmod.py").write_text(WARM_MODULE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    return subprocess.Popen([sys.executable, "-m", "prefect_azmanagers.cluster.agent", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)


def _first_frame(agent: subprocess.Popen) -> tuple[int, dict]:
    length, kind, _ = HEADER.unpack(agent.stdout.read(HEADER.size))
    return kind, json.loads(agent.stdout.read(length))


def _stop(agent: subprocess.Popen) -> str:
    agent.stdin.close()
    agent.wait(30)
    return agent.stderr.read().decode()


def _first_frame_and_stderr(tmp_path, warm_up: str) -> tuple[Kind, dict, str]:
    """An agent with this warm-up: its first frame, then its stderr once stopped."""
    agent = _agent(tmp_path, "--warm-up", warm_up)
    try:
        kind, hello = _first_frame(agent)
    finally:
        stderr = _stop(agent)
    return kind, hello, stderr


def test_what_a_warm_up_prints_goes_to_stderr_not_into_the_protocol(tmp_path):
    kind, hello, stderr = _first_frame_and_stderr(tmp_path, "warmmod:noisy")
    assert kind == Kind.HELLO
    assert hello["warm_up_s"] >= 0
    assert "warm-up print" in stderr and "warm-up raw fd 1" in stderr


def test_a_failing_warm_up_is_reported_and_the_slot_still_joins(tmp_path):
    kind, _, stderr = _first_frame_and_stderr(tmp_path, "warmmod:boom")
    assert kind == Kind.HELLO
    assert "warm-up warmmod:boom failed" in stderr and "RuntimeError: warm-up exploded" in stderr


def test_a_warm_up_without_a_function_is_refused(tmp_path):
    agent = _agent(tmp_path, "--warm-up", "warmmod")
    stderr = _stop(agent)
    assert agent.returncode == 2
    assert "--warm-up takes MODULE:FUNCTION or none, got 'warmmod'" in stderr


PROBE = ("sorted(m for m in ('prefect.task_engine', 'prefect.events.worker', 'prefect_dask') "
         "if m in __import__('sys').modules)")


def _modules_before_first_task(agent: subprocess.Popen) -> list[str]:
    """What the agent had imported when its first call (a builtin: it imports nothing) ran."""
    kind, _ = _first_frame(agent)
    assert kind == Kind.HELLO
    agent.stdin.write(encode(Kind.RUN, 1, serialization.dumps(functools.partial(eval, PROBE))))
    agent.stdin.flush()
    decoder, frames = FrameDecoder(), []
    while not any(f.kind == Kind.RESULT for f in frames):
        data = os.read(agent.stdout.fileno(), 65536)
        assert data, "the agent closed its stdout"
        frames += decoder.feed(data)
    result = next(f for f in frames if f.kind == Kind.RESULT)
    return serialization.loads(result.body)


def test_the_task_runners_warm_up_imports_the_engine_and_the_prefect_collections(tmp_path):
    from prefect_azmanagers.cluster.options import PREFECT_WARM_UP

    agent = _agent(tmp_path, "--warm-up", PREFECT_WARM_UP)
    try:
        modules = _modules_before_first_task(agent)
    finally:
        _stop(agent)
    # prefect-dask (a test extra) is a `prefect.collections` entry point: loaded with them
    assert modules == ["prefect.events.worker", "prefect.task_engine", "prefect_dask"]


@pytest.mark.parametrize("args", [(), ("--warm-up", "none")], ids=["default", "none"])
def test_without_a_warm_up_the_agent_stays_light(tmp_path, args):
    agent = _agent(tmp_path, *args)
    try:
        modules = _modules_before_first_task(agent)
    finally:
        _stop(agent)
    assert modules == []


WORKER = textwrap.dedent("""
    import os, sys, cloudpickle
    warm = cloudpickle.loads(sys.stdin.buffer.read())
    warm()
    from prefect_azmanagers import _remote_task
    from prefect.settings import get_current_settings
    cached = _remote_task._settings_cache
    assert cached is not None and cached[0] == warm.settings, "settings not hydrated"
    print(os.getpid())
""")


@pytest.mark.e2e
def test_worker_warm_up_hydrates_the_settings_and_reaches_the_api(prefect_server, tmp_path):
    from prefect_azmanagers._prefect_compat import serialize_settings
    from prefect_azmanagers._remote_task import WorkerWarmUp

    warm = WorkerWarmUp(serialize_settings())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "worker-home")  # nothing but what the driver sent
    done = subprocess.run([sys.executable, "-c", WORKER], input=cloudpickle.dumps(warm),
                          capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    pid = done.stdout.decode().split()[-1]
    # the event it sent is in the API: its events connection was open under the driver's URL
    deadline, found = time.monotonic() + 60, []
    while not found and time.monotonic() < deadline:
        answer = httpx.post(f"{prefect_server.api_url}/events/filter", json={
            "filter": {"event": {"name": ["prefect-azmanagers.worker.ready"]},
                       "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 50}, timeout=10)
        answer.raise_for_status()
        found = [e for e in answer.json()["events"]
                 if e["resource"]["prefect.resource.id"].endswith(f".{pid}")]
        time.sleep(0.5)
    assert found, "the worker's ready event never reached the API"


WORKER_WITH_STORAGE = textwrap.dedent("""
    import os, sys, time, cloudpickle
    warm = cloudpickle.loads(sys.stdin.buffer.read())
    warm()
    print("warmed", flush=True)
    while not os.path.exists(sys.argv[1]):  # the test deletes the block meanwhile
        time.sleep(0.1)
    from prefect.results import get_default_result_storage
    from prefect_azmanagers._remote_task import _settings_context
    with _settings_context(warm.settings):  # as each task run enters it
        print(get_default_result_storage().basepath, flush=True)
""")


@pytest.mark.e2e
def test_worker_warm_up_loads_the_result_storage_block_before_the_first_task(prefect_server,
                                                                            tmp_path):
    """The first task run finds the block loaded: it is not read from the API again (here it
    no longer exists when the task would read it)."""
    import uuid

    from prefect.filesystems import LocalFileSystem

    from prefect_azmanagers._prefect_compat import serialize_settings
    from prefect_azmanagers._remote_task import WorkerWarmUp

    name = f"warm-storage-{uuid.uuid4().hex[:6]}"
    block_id = LocalFileSystem(basepath=str(tmp_path / "results")).save(name)
    driver = serialize_settings()  # shared with every later caller in this process: copied
    sections = driver["settings"]
    settings = dict(driver, settings=dict(sections, results=dict(
        sections.get("results", {}), default_storage_block=f"local-file-system/{name}")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "worker-home")
    go = tmp_path / "go"
    worker = subprocess.Popen([sys.executable, "-c", WORKER_WITH_STORAGE, str(go)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env)
    try:
        worker.stdin.write(cloudpickle.dumps(WorkerWarmUp(settings)))
        worker.stdin.close()
        line = worker.stdout.readline().strip()
        if line != b"warmed":
            worker.kill()  # its stderr ends only with it
            pytest.fail(f"the warm-up did not finish ({line!r}): "
                        f"{worker.stderr.read().decode()[-3000:]}")
        httpx.delete(f"{prefect_server.api_url}/block_documents/{block_id}",
                     timeout=10).raise_for_status()
        go.touch()
        worker.wait(60)
        out, err = worker.stdout.read(), worker.stderr.read()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, err.decode()[-3000:]
    assert out.decode().strip() == str(tmp_path / "results")
