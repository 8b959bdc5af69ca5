"""Pickling for instances: local modules travel by value; an unpicklable callable is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import asyncssh
import pytest

from prefect_azmanagers.cluster import serialization
from prefect_azmanagers.exceptions import PayloadError


def test_local_modules_travel_by_value(tmp_path, monkeypatch):
    (tmp_path / "my_local_helpers.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_local_helpers

    payload = serialization.dumps(lambda: my_local_helpers.triple(14))
    # a fresh interpreter that cannot import the module still runs the callable
    code = "import sys, cloudpickle; print(cloudpickle.loads(sys.stdin.buffer.read())())"
    result = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True,
                            cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.stdout.strip() == b"42", result.stderr.decode()
    # installed and standard-library modules stay by reference
    assert not serialization.is_local_module(json)
    assert not serialization.is_local_module(asyncssh)
    assert serialization.is_local_module(my_local_helpers)


def test_unpicklable_callable_is_a_payload_error_naming_it():
    lock = threading.Lock()
    with pytest.raises(PayloadError, match="callable 'uses_lock'.*lock"):
        serialization.dumps(lambda: lock, what="callable 'uses_lock'")


