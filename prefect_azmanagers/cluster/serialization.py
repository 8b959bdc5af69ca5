"""Pickling callables for instances, where only installed packages are importable.

cloudpickle pickles functions of importable modules by reference; an instance has the same
installed distributions as the driver (or the boot-built customenv) but not the driver's
script, working directory or PYTHONPATH. So every module that belongs to no installed
distribution and is not part of the standard library (the user's script, local helper modules,
test modules) is registered for pickling by value, as Prefect's bundles do. The decision is
made once per module and the registration is kept (process-wide, like cloudpickle's own).

Frame payloads (`dumps_payload`, `pickle_payload`) are pickles whose large bytes, bytearrays
and pickle-5 buffers (numpy arrays and the like) stay out of the pickle stream: the protocol
writes them from the caller's objects and the agent reads them into the objects the callee
gets (`protocol.Payload`). Copying 100 MB costs ~0.1 s on a small VM, as much as sending it.
"""

from __future__ import annotations

import importlib.metadata
import io
import pickle
import sys
import threading
from types import ModuleType
from typing import Any, Callable, TypeVar

import cloudpickle

from prefect_azmanagers.cluster.protocol import BufferKind, Payload, load_payload
from prefect_azmanagers.exceptions import PayloadError

T = TypeVar("T")
OUT_OF_BAND_MIN = 1 << 16  # smaller buffers are copied into the pickle: one write is cheaper
_BUFFER_TYPES = frozenset({bytes, bytearray, pickle.PickleBuffer, memoryview})

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


class _PayloadPickler(cloudpickle.Pickler):
    """cloudpickle, with large buffers referred to by index (persistent ids), not copied in."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=5)
        self.buffers: list[Any] = []
        self.kinds: list[BufferKind] = []
        self._index: dict[int, int] = {}
        self._keep: list[Any] = []  # ids stay unique while the pickler lives

    def persistent_id(self, obj: Any) -> int | None:
        cls = type(obj)
        if cls not in _BUFFER_TYPES:  # called for every object pickled: keep this path short
            return None
        if cls is bytes or cls is bytearray:
            if len(obj) < OUT_OF_BAND_MIN:
                return None
            buffer, kind = obj, BufferKind.BYTES if cls is bytes else BufferKind.BYTEARRAY
        else:  # a PickleBuffer (numpy & co.), or a memoryview (a nested Payload's buffer)
            try:
                buffer = obj.raw() if cls is pickle.PickleBuffer else obj.cast("B")
            except (BufferError, TypeError):  # not contiguous: pickled in-band (or refused)
                return None
            if buffer.nbytes < OUT_OF_BAND_MIN:
                return None
            # as in-band pickle-5 buffers are: read-only ones come back as bytes
            kind = BufferKind.BYTES if buffer.readonly else BufferKind.BYTEARRAY
        index = self._index.get(id(obj))
        if index is None:
            index = self._index[id(obj)] = len(self.buffers)
            self._keep.append(obj)
            self.buffers.append(buffer)
            self.kinds.append(kind)
        return index


def pickle_payload(obj: Any) -> Payload:
    """cloudpickle `obj` as a frame payload, its large buffers out of band (not copied)."""
    file = io.BytesIO()
    pickler = _PayloadPickler(file)
    pickler.dump(obj)
    return Payload(file.getvalue(), tuple(pickler.buffers), tuple(pickler.kinds))


def _pickling(dump: Callable[[Any], T], obj: Any, what: str) -> T:
    register_local_modules()
    try:
        return dump(obj)
    except Exception as exc:
        raise PayloadError(
            f"{what} cannot be pickled to send it to a worker: {type(exc).__name__}: {exc}. "
            "Pass picklable values (plain data, importable or locally defined functions), "
            "or create the resource (client, lock, open file) inside the task."
        ) from exc


def dumps(obj: Any, *, what: str = "the callable") -> bytes:
    """cloudpickle `obj` for an instance, as one self-contained blob; PayloadError naming
    `what` when it cannot be."""
    return _pickling(cloudpickle.dumps, obj, what)


def dumps_payload(obj: Any, *, what: str = "the callable") -> Payload:
    """`dumps` as a frame payload: large buffers travel beside the pickle, uncopied."""
    return _pickling(pickle_payload, obj, what)


def loads(data: bytes | Payload) -> Any:
    """Unpickle a `dumps` blob, a payload, or a received pickle body in either layout."""
    return load_payload(data)
