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


def test_context_with_cached_settings_equals_serialize_context(prefect_server):
    """Outside and inside a flow and a task, with tags: the same dict Prefect builds."""
    assert compat.serialize_context_with_settings(compat.serialize_settings()) == serialize_context()

    @task
    def inner():
        with tags("t1"):
            return (compat.serialize_context_with_settings(compat.serialize_settings()),
                    serialize_context())

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=1))
    def outer():
        future: PrefectConcurrentFuture = inner.submit()
        return future.result()

    ours, prefects = outer()
    assert ours.keys() == prefects.keys()
    for key in prefects:
        if key == "flow_run_context":
            continue  # holds the Flow object: compared by identity-free fields below
        assert ours[key] == prefects[key], key
    assert ours["flow_run_context"].keys() == prefects["flow_run_context"].keys()
    assert ours["flow_run_context"]["flow_run"] == prefects["flow_run_context"]["flow_run"]
    assert ours["tags_context"]["current_tags"] == {"t1"}
    assert ours["task_run_context"]["task_run"]["name"].startswith("inner")


def test_settings_context_identity_changes_with_temporary_settings():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = compat.current_settings_context()
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        inside = compat.current_settings_context()
        assert inside is not before
        assert compat.serialize_settings()["settings"]["api"]["url"] == "http://127.0.0.1:9/api"
    assert compat.current_settings_context() is before
