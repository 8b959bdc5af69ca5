"""Unit tests of the detached-run pieces that need no server: the Prefect API URL a VM gets,
the worker boot hook's quoting, payload pickling and loading."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_azmanagers.blocks import AzureManifest
from prefect_azmanagers.detached.job import DetachedJob, pickle_job
from prefect_azmanagers.detached.runtime import _load_payload
from prefect_azmanagers.detached.vm import api_url_for_vms, worker_hook
from prefect_azmanagers.exceptions import PayloadError, PrefectAPIUnreachable


def manifest(**fields) -> AzureManifest:
    return AzureManifest(subscription_id="sub", resource_group="rg", ssh_user="azureuser",
                         **fields)


@pytest.mark.parametrize("driver_api, fields, expected", [
    # the manifest's URL wins
    ("http://127.0.0.1:4200/api", {"prefect_api_url_for_vms": "http://10.0.0.4:4200/api"}, "http://10.0.0.4:4200/api"),
    # a loopback API is fine when the VMs share the driver's loopback (a loopback ARM endpoint)
    ("http://127.0.0.1:4200/api", {"arm_endpoint": "https://127.0.0.1:8443"}, "http://127.0.0.1:4200/api"),
    # an API the VMs can reach is used as it is
    ("https://api.prefect.cloud/api/x", {}, "https://api.prefect.cloud/api/x"),
])
def test_api_url_for_vms(driver_api, fields, expected):
    with temporary_settings(updates={PREFECT_API_URL: driver_api}):
        assert api_url_for_vms(manifest(**fields)) == expected


@pytest.mark.parametrize("driver_api, words", [
    ("http://localhost:4200/api", ["prefect_api_url_for_vms", "loopback"]),   # Azure VMs cannot reach it
    (None, ["PREFECT_API_URL is unset"]),
])
def test_api_url_the_vms_cannot_use_is_refused_with_the_fix(driver_api, words):
    with temporary_settings(updates={PREFECT_API_URL: driver_api}):
        with pytest.raises(PrefectAPIUnreachable) as info:
            api_url_for_vms(manifest())
    assert all(word in str(info.value) for word in words), str(info.value)


def _recorder(path: Path, record: Path, then: str = "") -> None:
    # Written whole, then renamed: a reader waiting for the file never sees half of it.
    path.write_text(f"#!/bin/bash\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done > {record}.tmp\n"
                    f"mv {record}.tmp {record}\n{then}\n")
    path.chmod(0o755)


def _recorded(record: Path) -> list[str]:
    return [word.decode() for word in record.read_bytes().split(b"\0")[:-1]]


def test_worker_hook_passes_hostile_values_unchanged(tmp_path):
    """Run the hook, then its worker loop, with shims for runuser and python: the worker's
    argv and environment arrive exactly as given, and nothing in them is executed."""
    shims = tmp_path / "bin"
    shims.mkdir()
    _recorder(shims / "runuser", tmp_path / "runuser.argv")
    _recorder(shims / "install", tmp_path / "install.argv")
    python = tmp_path / "py thon"
    _recorder(python, tmp_path / "python.argv", then="kill -TERM $PPID")  # end the loop
    pwned = tmp_path / "pwned"
    url = f"http://h/api?a='b'&c=\"$(touch {pwned})\"`touch {pwned}`"
    pool = "pool-$HOME-'x'"
    hook = worker_hook(admin="azureuser", python=str(python), pool=pool, api_url=url)
    hook = hook.replace("/home/azureuser/.azmanagers", str(tmp_path))  # the log file
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", HOME=str(tmp_path))
    subprocess.run(["bash", "-c", hook], check=True, env=env, timeout=30)
    deadline = time.monotonic() + 10
    while not (tmp_path / "runuser.argv").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    words = _recorded(tmp_path / "runuser.argv")
    assert words[:4] == ["-u", "azureuser", "--", "env"]
    assert f"PREFECT_API_URL={url}" in words and words[-4:-1] == ["setsid", "bash", "-c"]
    subprocess.run(["bash", "-c", words[-1]], env=env, timeout=30)
    assert _recorded(tmp_path / "python.argv") == [
        "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", pool]
    assert not pwned.exists()


def test_unpicklable_job_is_a_payload_error():
    lock = threading.Lock()
    with pytest.raises(PayloadError, match="cannot pickle"):
        pickle_job(lambda: lock, (lock,), {})


def test_function_of_a_local_module_travels_by_value(tmp_path, monkeypatch):
    (tmp_path / "my_local_module.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_local_module

    payload = pickle_job(my_local_module.triple, (5,), {})
    script = ("import sys, cloudpickle\njob = cloudpickle.loads(sys.stdin.buffer.read())\n"
              "print(job['fn'](*job['args']))")
    out = subprocess.run([sys.executable, "-c", script], input=payload, capture_output=True,
                         cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                         timeout=60)
    assert out.stdout.strip() == b"15", out.stderr


def test_payload_file_must_be_a_bare_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ValueError, match="bare file name"):
        _load_payload(None, "../../.ssh/id_rsa")
    with pytest.raises(ValueError, match="exactly one"):
        _load_payload(None, None)
    payload_dir = tmp_path / ".azmanagers" / "payloads"
    payload_dir.mkdir(parents=True)
    (payload_dir / "p.pkl").write_bytes(cloudpickle.dumps(1))
    assert cloudpickle.loads(_load_payload(None, "p.pkl")) == 1
    assert not (payload_dir / "p.pkl").exists()


def test_read_rejects_an_unknown_stream():
    with pytest.raises(ValueError, match="stdout"):
        DetachedJob("00000000-0000-0000-0000-000000000000").read("stdin")
