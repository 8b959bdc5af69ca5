"""Remote errors rebuilt on the driver: their own type, or RemoteError when they cannot be."""

from __future__ import annotations

import cloudpickle

from prefect_azmanagers.cluster.errors import RemoteError, exception_from_error
from prefect_azmanagers.exceptions import PayloadError


def test_remote_errors_rebuild_the_original_type_or_a_remote_error():
    body = {"type": "builtins.ValueError", "message": "bad", "traceback": "Traceback...\nValueError: bad",
            "exception": cloudpickle.dumps(ValueError("bad")).hex()}
    exc = exception_from_error(body, "worker 3")
    assert isinstance(exc, ValueError) and exc.remote_traceback.endswith("ValueError: bad")
    assert any("worker 3" in note for note in exc.__notes__)
    body["exception"] = None
    exc = exception_from_error(body, "worker 3")
    assert isinstance(exc, RemoteError) and "ValueError: bad" in str(exc)
    body["type"] = "prefect_azmanagers.exceptions.PayloadError"
    assert isinstance(exception_from_error(body, "worker 3"), PayloadError)


