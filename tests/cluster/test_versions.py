"""Driver/worker version agreement: what is refused, what is accepted, and what the agent reports."""

from __future__ import annotations

import json
import subprocess
import sys

import cloudpickle
import pytest

from prefect_azmanagers.cluster import versions
from prefect_azmanagers.cluster.protocol import HEADER, Kind
from prefect_azmanagers.exceptions import ConfigurationError, VersionMismatch

DRIVER = {"python": "3.11.7", "cloudpickle": "3.1.3", "prefect": "3.9.1", "prefect-azmanagers": "0.1.0"}


def worker(**changes):
    return {**DRIVER, **changes}


@pytest.mark.parametrize("other", [
    worker(python="3.11.2"),                         # patch releases pickle the same code
    worker(cloudpickle="3.0.0"),                      # same major
    worker(prefect="3.9.7"),                          # same minor
    worker(**{"prefect-azmanagers": "0.2.0"}),        # not checked
])
def test_compatible_versions_are_accepted(other):
    versions.check(DRIVER, other)


@pytest.mark.parametrize("other, names, fix", [
    (worker(python="3.12.1"), ["python 3.12.1 on the worker, 3.11.7 on the driver"],
     "the manifest's `python` at a Python 3.11 interpreter"),
    (worker(cloudpickle="2.2.1"), ["cloudpickle 2.2.1 on the worker, 3.1.3 on the driver"],
     "customenv=True"),
    (worker(prefect="3.8.4"), ["prefect 3.8.4 on the worker, 3.9.1 on the driver"], "prefect 3.9.x"),
    (worker(prefect=None), ["prefect not installed on the worker"], "customenv=True"),
    (worker(python="3.10.4", prefect="2.20.0"), ["python 3.10.4", "prefect 2.20.0"], "image"),
])
def test_incompatible_versions_name_both_sides_and_the_fix(other, names, fix):
    with pytest.raises(VersionMismatch) as info:
        versions.check(DRIVER, other, where="worker 3 on instance azm-x_1", python="/opt/py/bin/python3")
    text = str(info.value)
    assert isinstance(info.value, ConfigurationError)
    assert text.startswith("worker 3 on instance azm-x_1 cannot run the driver's tasks")
    for name in names:
        assert name in text
    assert fix in text
    assert "Driver: python 3.11.7, cloudpickle 3.1.3" in text
    assert "Worker (/opt/py/bin/python3): python " in text


def test_an_agent_reporting_no_versions_is_refused():
    with pytest.raises(VersionMismatch, match="reported no versions.*prefect-azmanagers"):
        versions.check(DRIVER, None)


def test_local_reports_this_interpreter():
    mine = versions.local()
    assert mine["python"] == ".".join(map(str, sys.version_info[:3]))
    assert mine["cloudpickle"] == cloudpickle.__version__
    assert mine["prefect"] is not None and mine["prefect-azmanagers"] is not None
    versions.check(mine, mine)


def test_agent_hello_carries_versions_the_driver_accepts():
    agent = subprocess.Popen([sys.executable, "-m", "prefect_azmanagers.cluster.agent"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        length, kind, _ = HEADER.unpack(agent.stdout.read(HEADER.size))
        hello = json.loads(agent.stdout.read(length))
    finally:
        agent.stdin.close()
        agent.wait(30)
    assert kind == Kind.HELLO
    assert hello["versions"] == versions.local()
    versions.check(versions.local(), hello["versions"])
