"""Turning a task's remote failure back into an exception on the driver.

The agent sends the exception pickled when it can be, plus its type name, message and the
remote traceback text. The driver re-raises the original type when it unpickles (with the
remote traceback attached as `remote_traceback` and as a note shown by `traceback`), and a
`RemoteError` carrying the same information otherwise.
"""

from __future__ import annotations

from typing import Any

import cloudpickle

from prefect_azmanagers import exceptions


class RemoteError(Exception):
    """A task raised on a worker and its exception could not be rebuilt on the driver."""

    def __init__(self, type_name: str, message: str, remote_traceback: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.args[0]}\n\nRemote traceback:\n{self.remote_traceback}"


def exception_from_error(body: dict[str, Any], where: str) -> BaseException:
    """The exception described by an ERROR frame's body; `where` names the worker."""
    tb_text = body.get("traceback", "")
    type_name = body.get("type", "Exception")
    message = body.get("message", "")
    if type_name == "prefect_azmanagers.exceptions.PayloadError":
        return exceptions.PayloadError(f"{message} (on {where})")
    exc: BaseException | None = None
    if body.get("exception"):
        try:
            exc = cloudpickle.loads(bytes.fromhex(body["exception"]))
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteError(type_name, message, tb_text)
    exc.remote_traceback = tb_text  # type: ignore[attr-defined]
    exc.add_note(f"Remote traceback ({where}):\n{tb_text.rstrip()}")
    return exc
