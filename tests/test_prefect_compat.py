"""Fails when a private Prefect name the project relies on moves or changes shape.

Every private name lives in prefect_azmanagers/_prefect_compat.py (checked against prefect
3.9.1); these tests pin the behaviour the project needs from each.
"""

from __future__ import annotations

import importlib.metadata
import uuid

from prefect import flow, tags, task
from prefect.context import serialize_context
from prefect.futures import PrefectConcurrentFuture
from prefect.task_runners import ThreadPoolTaskRunner

from prefect_azmanagers import _prefect_compat as compat


def test_prefect_version_is_the_checked_one():
    installed = importlib.metadata.version("prefect")
    assert installed.startswith(compat.PREFECT_VERSION_CHECKED.rsplit(".", 1)[0]), (
        f"prefect {installed} installed; _prefect_compat was checked against "
        f"{compat.PREFECT_VERSION_CHECKED}: re-check every name in it"
    )


def test_task_run_ids_are_time_ordered_uuid7():
    first, second = compat.new_task_run_id(), compat.new_task_run_id()
    assert isinstance(first, uuid.UUID) and first.version == 7
    assert first.int >> 80 <= second.int >> 80  # 48-bit millisecond timestamp first


def ours() -> dict:
    return {**compat.flow_run_scoped_context(compat.serialize_settings()),
            **compat.task_scoped_context()}


def test_context_in_two_parts_equals_serialize_context(prefect_server):
    """Outside and inside a flow and a task, with tags: the same dict Prefect builds."""
    assert ours() == serialize_context()

    @task
    def inner():
        with tags("t1"):
            return ours(), serialize_context()

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=1))
    def outer():
        future: PrefectConcurrentFuture = inner.submit()
        return future.result()

    mine, prefects = outer()
    assert mine.keys() == prefects.keys()
    for key in prefects:
        if key == "flow_run_context":
            continue  # holds the Flow object: compared by identity-free fields below
        assert mine[key] == prefects[key], key
    assert mine["flow_run_context"].keys() == prefects["flow_run_context"].keys()
    assert mine["flow_run_context"]["flow_run"] == prefects["flow_run_context"]["flow_run"]
    assert mine["tags_context"]["current_tags"] == {"t1"}
    assert mine["task_run_context"]["task_run"]["name"].startswith("inner")


def test_settings_context_identity_changes_with_temporary_settings():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = compat.current_settings_context()
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        inside = compat.current_settings_context()
        assert inside is not before
        assert compat.serialize_settings()["settings"]["api"]["url"] == "http://127.0.0.1:9/api"
    assert compat.current_settings_context() is before


def test_engine_context_is_the_flow_runs(prefect_server):
    @flow
    def identity():
        return compat.current_engine_context() is compat.current_engine_context(), \
            compat.current_engine_context().flow_run.id

    same, flow_run_id = identity()
    assert same and flow_run_id is not None
    assert compat.current_engine_context() is None


def test_flow_stand_in_keeps_what_workers_use_and_drops_the_body():
    import threading

    import cloudpickle

    lock = threading.Lock()

    def on_done(flow, flow_run, state):
        return lock

    @flow(name="original", retries=2, on_completion=[on_done])
    def original(x: int = 1):
        with lock:  # an unpicklable global of the body
            return x

    stand_in = compat.flow_stand_in(original)
    assert (stand_in.name, stand_in.retries, stand_in.task_runner, stand_in.isasync) == \
        ("original", 2, original.task_runner, False)
    assert stand_in.on_completion_hooks == [] and original.on_completion_hooks == [on_done]
    assert original.fn is not stand_in.fn and original.fn(3) == 3
    copy = cloudpickle.loads(cloudpickle.dumps(stand_in))
    assert copy.name == "original"


def test_task_run_identity_is_the_task_engines(prefect_server):
    """Name and dynamic key of a task run the runner creates match what Prefect's engine gives
    a task run (default name and a `task_run_name` template)."""
    from prefect.client.orchestration import get_client

    @task
    def plain(x):
        return x

    @task(task_run_name="plain-of-{x}")
    def named(x):
        return x

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=1))
    def both():
        return plain.submit(3).task_run_id, named.submit(4).task_run_id

    plain_id, named_id = both()
    with get_client(sync_client=True) as client:
        by_engine = client.read_task_run(plain_id), client.read_task_run(named_id)

    ours = compat.task_run_identity(plain, {"x": 3})
    for name, key in ((by_engine[0].name, by_engine[0].dynamic_key),
                      (ours["name"], ours["dynamic_key"])):
        assert uuid.UUID(key).version == 4 and name == f"plain-{key[:3]}"
    assert by_engine[1].name == "plain-of-4"
    assert compat.task_run_identity(named, {"x": 4})["name"] == "plain-of-4"
    # a template that cannot be rendered from what the driver holds keeps the default name
    fallback = compat.task_run_identity(named, {})
    assert fallback["name"] == f"named-{fallback['dynamic_key'][:3]}"
