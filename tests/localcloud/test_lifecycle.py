"""Lifecycle of the local cloud process: state survives a restart, `stop` leaves nothing running or
listening, and a crashed run's leftovers are removed by the next `stop`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from arm_harness import Cloud, StaticCredential
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient

from prefect_azmanagers.localcloud import LocalCloudAdmin, LocalCloudError, start, stop
from prefect_azmanagers.localcloud.sandbox import SandboxHost


def _open(info: dict) -> Cloud:
    kwargs = dict(base_url=info["arm_endpoint"], connection_verify=info["ca_cert"], polling_interval=0)
    return Cloud(info, LocalCloudAdmin.from_info(info),
                 ComputeManagementClient(StaticCredential(info["static_token"]), info["subscription_id"], **kwargs),
                 NetworkManagementClient(StaticCredential(info["static_token"]), info["subscription_id"], **kwargs))


def _leftovers(state_dir: Path, port: int, pids: list[int] = ()) -> dict[str, list]:
    cloud_id = SandboxHost(state_dir).cloud_id
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
    return {
        "netns": [line for line in netns.splitlines() if cloud_id in line],
        "links": [line for line in links.splitlines() if f"azl{cloud_id}" in line],
        "listening": [line for line in listening.splitlines() if f"127.0.0.1:{port} " in line],
        "processes": [_cmdline(pid) for pid in pids if _running(pid)],
    }


def _running(pid: int) -> bool:
    """Alive and not a zombie (an unreaped zombie runs nothing; reaping is its parent's job)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"{pid}: (gone)"


NOTHING = {"netns": [], "links": [], "listening": [], "processes": []}


def _instance_pids(cloud: Cloud) -> list[int]:
    """Every process of every instance (sshd, boot script, ...), as the sandbox host reports them."""
    return [pid for inst in cloud.admin.status()["instances"] for pid in (inst["sandbox"] or {}).get("pids", [])]


@pytest.fixture
def state_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lc-life")
    yield path
    stop(path)
    shutil.rmtree(path, ignore_errors=True)


def test_state_survives_restart_and_stop_leaves_nothing(state_dir: Path):
    info = start(state_dir)
    port = int(info["arm_endpoint"].rsplit(":", 1)[1])
    cloud = _open(info)
    cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, "keep", cloud.scale_set_body(1)).result()
    assert cloud.admin.counters()["live_instances"] == 1
    pids = _instance_pids(cloud)
    assert _leftovers(state_dir, port, pids)["processes"], "the instance's sshd runs while the cloud runs"
    with pytest.raises(LocalCloudError, match="already runs"):
        start(state_dir)

    assert stop(state_dir) is True
    assert _leftovers(state_dir, port, pids) == NOTHING
    assert not (state_dir / "localcloud.json").exists()

    again = _open(start(state_dir))
    rg = again.rg
    assert again.compute.virtual_machine_scale_sets.get(rg, "keep").sku.capacity == 1
    [vm] = again.compute.virtual_machine_scale_set_vms.list(rg, "keep", expand="instanceView")
    assert vm.instance_view.statuses[-1].code == "PowerState/deallocated"  # its sandbox did not survive
    again.compute.virtual_machine_scale_sets.begin_delete(rg, "keep").result()
    assert list(again.compute.virtual_machine_scale_sets.list(rg)) == []
    assert stop(state_dir) is True


def test_stop_cleans_up_after_a_crashed_run(state_dir: Path):
    info = start(state_dir, blob="on")
    cloud = _open(info)
    cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, "crash", cloud.scale_set_body(1)).result()
    pids = _instance_pids(cloud)
    azurite = int((state_dir / "azurite.pid").read_text())
    os.kill(info["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{info['pid']}").exists():
        time.sleep(0.1)
    port = int(info["arm_endpoint"].rsplit(":", 1)[1])
    blob_port = int(info["blob_url"].split(":")[2].split("/")[0])
    assert _leftovers(state_dir, port, pids)["netns"], "a crash leaves namespaces behind"
    assert _leftovers(state_dir, blob_port, [azurite])["processes"], "and Azurite running"
    assert stop(state_dir) is False  # nothing was running ...
    assert _leftovers(state_dir, port, pids) == NOTHING  # ... and all is gone
    assert _leftovers(state_dir, blob_port, [azurite]) == NOTHING


def test_blob_storage_starts_and_stops_with_the_cloud(state_dir: Path):
    """Azurite (issue 15): an account of this start's own, a container ready, the key never
    printed, and nothing of it left listening or running after stop."""
    from azure.storage.blob import BlobServiceClient

    from prefect_azmanagers.localcloud.blob import BlobEndpoint

    info = start(state_dir, blob="on")
    endpoint = BlobEndpoint(info["blob_url"], info["blob_account"], info["blob_key"], info["blob_container"])
    assert endpoint.key != "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
    with BlobServiceClient.from_connection_string(endpoint.connection_string) as service:
        service.get_container_client(endpoint.container).upload_blob("probe", b"ok")
    assert endpoint.key not in (state_dir / "localcloud.log").read_text()
    azurite = int((state_dir / "azurite.pid").read_text())
    assert stop(state_dir) is True
    assert _leftovers(state_dir, endpoint.port, [azurite]) == NOTHING


def test_a_missing_node_is_a_clear_error(monkeypatch):
    from prefect_azmanagers.localcloud.blob import AzuriteError, find_azurite

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AzuriteError, match="needs Node.js.*nodejs and npm.*--no-blob"):
        find_azurite()


def test_foreground_process_cleans_up_on_sigterm(state_dir: Path):
    proc = subprocess.Popen([sys.executable, "-m", "prefect_azmanagers.localcloud", "--state-dir", str(state_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (state_dir / "localcloud.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        info = json.loads((state_dir / "localcloud.json").read_text())
        cloud = _open(info)
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, "fg", cloud.scale_set_body(1)).result()
        pids = _instance_pids(cloud)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        port = int(info["arm_endpoint"].rsplit(":", 1)[1])
        assert _leftovers(state_dir, port, pids) == NOTHING
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
