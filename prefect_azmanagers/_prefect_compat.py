"""Every use of a private Prefect name in the project, in one place (checked against prefect 3.9.1).

Prefect has no public API for a few things a remote task runner needs: the uuid7 it gives
task runs, the deployment context variables that `serialize_context` carries, and a way to
serialize the context without re-serializing the (unchanging, expensive) settings each time.
Each name below says what it is used for; `tests/test_prefect_compat.py` fails when one of
them moves or changes shape in a new Prefect release.
"""

from __future__ import annotations

import uuid
from typing import Any

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

PREFECT_VERSION_CHECKED = "3.9.1"


def new_task_run_id() -> uuid.UUID:
    """A task run id as Prefect's own task runners make them (uuid7: time-ordered)."""
    return _uuid7()


def serialize_settings() -> dict[str, Any]:
    """The settings part of `prefect.context.serialize_context()` (its costly ~80%)."""
    settings_context = SettingsContext.get()
    return settings_context.serialize() if settings_context else {}


def serialize_context_with_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """`prefect.context.serialize_context()` with a settings part serialized earlier.

    Same keys and values as prefect 3.9.1's `serialize_context()` (without asset kwargs);
    the settings do not change between the submits of one flow run, so the caller
    serializes them once (`serialize_settings`) and passes them here on every submit.
    """
    flow_run_context = EngineContext.get()
    task_run_context = TaskRunContext.get()
    tags_context = TagsContext.get()
    deployment_id = _deployment_id.get()
    return {
        "flow_run_context": flow_run_context.serialize() if flow_run_context else {},
        "task_run_context": task_run_context.serialize() if task_run_context else {},
        "tags_context": tags_context.serialize() if tags_context else {},
        "settings_context": settings,
        "asset_context": {},
        "deployment_id": str(deployment_id) if deployment_id else None,
        "deployment_parameters": _deployment_parameters.get(),
    }


def current_settings_context() -> Any:
    """The active `SettingsContext` object (identity tells when settings were changed)."""
    return SettingsContext.get()


__all__ = [
    "PREFECT_VERSION_CHECKED",
    "current_settings_context",
    "new_task_run_id",
    "serialize_context_with_settings",
    "serialize_settings",
]
