"""The versions the driver and its workers must agree on, checked when a worker joins.

A task travels as a cloudpickle of code objects, so both ends need the same Python minor
version (bytecode and pickled code objects change between minors), the same cloudpickle major
version (its pickle layout), and the same Prefect minor version (a task run's context, states
and engine are rebuilt on the worker). The agent reports `local()` in its HELLO; the driver
calls `check(local(), hello["versions"])` and refuses a worker that cannot work, with one error
naming both sides and the fix, instead of an obscure unpickling error on the first task.
Patch-level differences, and any prefect-azmanagers difference, are accepted.

Standard library only: the agent imports this module before anything else.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from importlib import metadata

from prefect_azmanagers.exceptions import VersionMismatch

DISTRIBUTIONS = ("cloudpickle", "prefect", "prefect-azmanagers")


def local() -> dict[str, str | None]:
    """This interpreter's versions: python (x.y.z) and each distribution (None if missing).

    Read once per process (the metadata scan takes tens of ms; it is called on event loops).
    """
    return dict(_read_local())


@functools.cache
def _read_local() -> tuple[tuple[str, str | None], ...]:
    versions: list[tuple[str, str | None]] = [("python", ".".join(map(str, sys.version_info[:3])))]
    for name in DISTRIBUTIONS:
        try:
            versions.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            versions.append((name, None))
    return tuple(versions)


def _prefix(version: str | None, parts: int) -> tuple[str, ...] | None:
    return tuple(version.split(".")[:parts]) if version else None


# (key, how many leading version parts must match, why, how to fix it)
_RULES = (
    ("python", 2, "a cloudpickled task needs the same Python minor version on both ends",
     "use an image whose Python is {wanted}, or point the manifest's `python` at a Python "
     "{wanted} interpreter on the instances (customenv cannot change it: its environment "
     "is layered over the instance's Python)"),
    ("cloudpickle", 1, "pickles of one cloudpickle major version do not load in another",
     "use customenv=True (the instances install the driver's pinned packages), or an image with "
     "cloudpickle {wanted}.x"),
    ("prefect", 2, "a task run's context and states are rebuilt on the worker by Prefect",
     "use customenv=True (the instances install the driver's pinned packages), or an image with "
     "prefect {wanted}.x"),
)


def _describe(versions: Mapping[str, str | None]) -> str:
    return ", ".join(f"{key} {versions.get(key) or 'not installed'}"
                     for key in ("python", *DISTRIBUTIONS))


def check(driver: Mapping[str, str | None], worker: Mapping[str, str | None] | None, *,
          where: str = "the worker", python: str = "python3") -> None:
    """Refuse a worker whose versions cannot run the driver's tasks.

    `driver` is `local()` on the driver, `worker` the `versions` of the agent's HELLO (None
    when the agent sent none), `where` names the worker and `python` its interpreter in the
    message. Raises VersionMismatch (a ConfigurationError) listing every incompatibility.
    """
    if not isinstance(worker, Mapping):
        raise VersionMismatch(
            f"{where} ({python}) reported no versions: its prefect-azmanagers is older than the "
            f"driver's ({driver.get('prefect-azmanagers')}), which checks them. Install the "
            "driver's prefect-azmanagers on the image, or point the manifest's `python` at an "
            "interpreter that has it.")
    problems = []
    for key, parts, why, fix in _RULES:
        ours, theirs = driver.get(key), worker.get(key)
        if _prefix(ours, parts) != _prefix(theirs, parts):
            minor = ".".join(_prefix(ours, parts) or ("?",))
            problems.append(f"- {key} {theirs or 'not installed'} on the worker, {ours or 'not installed'} "
                            f"on the driver: {why}. Fix: {fix.format(wanted=minor)}.")
    if problems:
        raise VersionMismatch(
            f"{where} cannot run the driver's tasks: its versions are incompatible.\n"
            + "\n".join(problems)
            + f"\nDriver: {_describe(driver)}.\nWorker ({python}): {_describe(worker)}.")
