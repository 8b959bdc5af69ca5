"""Pickling callables for instances, where only installed packages are importable.

cloudpickle pickles functions of importable modules by reference; an instance has the same
installed distributions as the driver (or the boot-built customenv) but not the driver's
script, working directory or PYTHONPATH. So every module that belongs to no installed
distribution and is not part of the standard library (the user's script, local helper modules,
test modules) is registered for pickling by value, as Prefect's bundles do. The decision is
made once per module and the registration is kept (process-wide, like cloudpickle's own).
"""

from __future__ import annotations

import importlib.metadata
import sys
import threading
from types import ModuleType
from typing import Any

import cloudpickle

from prefect_azmanagers.exceptions import PayloadError

_lock = threading.Lock()
_installed_top_level: frozenset[str] | None = None
_classified: set[str] = set()
_modules_seen = 0  # len(sys.modules) at the last scan: unchanged means nothing new to classify


def _installed() -> frozenset[str]:
    global _installed_top_level
    if _installed_top_level is None:
        _installed_top_level = frozenset(importlib.metadata.packages_distributions())
    return _installed_top_level


def is_local_module(module: ModuleType) -> bool:
    """True if `module` exists only on the driver: not stdlib, builtin or installed."""
    top = module.__name__.partition(".")[0]
    if top == "__main__":
        return False  # cloudpickle already pickles __main__ by value
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return False
    if getattr(module, "__file__", None) is None:
        return False  # namespace packages and frozen or dynamic modules: nothing to ship
    return top not in _installed()


def register_local_modules() -> None:
    """Register every not-yet-seen local top-level module for pickling by value."""
    global _modules_seen
    if len(sys.modules) == _modules_seen:
        return
    with _lock:
        _modules_seen = len(sys.modules)
        for name, module in list(sys.modules.items()):
            top = name.partition(".")[0]
            if top in _classified or module is None:
                continue
            root = sys.modules.get(top)
            if root is None:
                continue
            _classified.add(top)
            if is_local_module(root):
                cloudpickle.register_pickle_by_value(root)


def dumps(obj: Any, *, what: str = "the callable") -> bytes:
    """cloudpickle `obj` for an instance; PayloadError naming `what` when it cannot be."""
    register_local_modules()
    try:
        return cloudpickle.dumps(obj)
    except Exception as exc:
        raise PayloadError(
            f"{what} cannot be pickled to send it to a worker: {type(exc).__name__}: {exc}. "
            "Pass picklable values (plain data, importable or locally defined functions), "
            "or create the resource (client, lock, open file) inside the task."
        ) from exc


def loads(data: bytes) -> Any:
    return cloudpickle.loads(data)
