"""Every use of a private Prefect name in the project, in one place (checked against prefect 3.9.1).

Prefect has no public API for a few things a remote task runner needs: the uuid7 it gives
task runs, the deployment context variables that `serialize_context` carries, a way to
serialize the context without re-serializing the (unchanging, expensive) settings each time,
and the name and dynamic key its task engine gives a task run it creates.
Each name below says what it is used for; `tests/test_prefect_compat.py` fails when one of
them moves or changes shape in a new Prefect release.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from typing import Any
from uuid import uuid4

from prefect.context import (
    EngineContext,
    SettingsContext,
    TagsContext,
    TaskRunContext,
)

# prefect 3.9.1: prefect/_internal/uuid7.py; task runners give task runs time-ordered ids.
from prefect._internal.uuid7 import uuid7 as _uuid7

# prefect 3.9.1: prefect/context.py module-level ContextVars read by `serialize_context`.
from prefect.context import _deployment_id, _deployment_parameters

# prefect 3.9.1: prefect/_internal/engine.py; the task engine names a task run with a
# `task_run_name` from it.
from prefect._internal.engine import resolve_custom_task_run_name

PREFECT_VERSION_CHECKED = "3.9.1"


def new_task_run_id() -> uuid.UUID:
    """A task run id as Prefect's own task runners make them (uuid7: time-ordered)."""
    return _uuid7()


def task_run_identity(task: Any, parameters: dict[str, Any]) -> dict[str, str]:
    """`name` and `dynamic_key` for a task run the runner creates in the API itself.

    As prefect 3.9.1's task engine makes them for a run off the flow's process
    (`_create_task_run_locally` with `dynamic_key_for_task_run(stable=False)`, then
    `_set_custom_task_run_name`): a uuid4 key, the name `<task>-<key[:3]>` unless the task
    has a `task_run_name`, rendered with the parameters (kept when rendering fails there).
    """
    dynamic_key = str(uuid4())
    name = f"{task.name}-{dynamic_key[:3]}"
    if task.task_run_name:
        try:
            name = resolve_custom_task_run_name(task, parameters)
        except Exception:  # noqa: BLE001 - a name template must not hide the state
            pass
    return {"name": name, "dynamic_key": dynamic_key}


_serialized_settings: tuple[SettingsContext, Mapping[str, Any]] | None = None


def serialize_settings() -> Mapping[str, Any]:
    """The settings part of `prefect.context.serialize_context()` (its costly ~80%).

    Kept for the current settings context: successive flow runs in one process share it, so
    each one does not pay the serialization again. The result is shared, hence a read-only
    `Mapping`: copy it to change it.
    """
    global _serialized_settings
    settings_context = SettingsContext.get()
    if settings_context is None:
        return {}
    cached = _serialized_settings
    if cached is None or cached[0] is not settings_context:
        cached = _serialized_settings = (settings_context, settings_context.serialize())
    return cached[1]


def flow_run_scoped_context(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of `prefect.context.serialize_context()` fixed for a whole flow run.

    Settings (serialized once by the caller, `serialize_settings`), the flow run context
    (Prefect re-serializes its result store's JSON schema on every call) and the deployment
    variables. With `task_scoped_context()` it makes prefect 3.9.1's `serialize_context()`.
    """
    flow_run_context = EngineContext.get()
    deployment_id = _deployment_id.get()
    serialized = flow_run_context.serialize() if flow_run_context else {}
    if "flow" in serialized:
        serialized["flow"] = flow_stand_in(serialized["flow"])
    return {
        "flow_run_context": serialized,
        "settings_context": settings,
        "deployment_id": str(deployment_id) if deployment_id else None,
        "deployment_parameters": _deployment_parameters.get(),
    }


def flow_stand_in(flow: Any) -> Any:
    """A copy of `flow` without its body and hooks, for the context a task run ships with.

    A worker needs the flow's name, settings and task runner, never its body (which runs on
    the driver): pickled by value, the body would drag along every global it references,
    picklable or not. Attribute names as in prefect 3.9.1's `Flow.__init__`.
    """
    stand_in = copy.copy(flow)
    stand_in.fn = stand_in.__wrapped__ = _flow_body_left_on_driver
    for hooks in ("on_completion_hooks", "on_failure_hooks", "on_cancellation_hooks",
                  "on_crashed_hooks", "on_running_hooks"):
        setattr(stand_in, hooks, [])
    return stand_in


def _flow_body_left_on_driver(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("A flow's body runs on the driver; workers only run its tasks.")


def task_scoped_context() -> dict[str, Any]:
    """The parts of `serialize_context()` that change between submits (parent task, tags)."""
    task_run_context = TaskRunContext.get()
    tags_context = TagsContext.get()
    return {
        "task_run_context": task_run_context.serialize() if task_run_context else {},
        "tags_context": tags_context.serialize() if tags_context else {},
        "asset_context": {},
    }


def current_engine_context() -> Any:
    """The active flow run's `EngineContext` (identity tells when the flow run changed)."""
    return EngineContext.get()


def current_settings_context() -> Any:
    """The active `SettingsContext` object (identity tells when settings were changed)."""
    return SettingsContext.get()


__all__ = [
    "PREFECT_VERSION_CHECKED",
    "current_engine_context",
    "current_settings_context",
    "flow_run_scoped_context",
    "new_task_run_id",
    "serialize_settings",
    "task_run_identity",
    "task_scoped_context",
]
