"""The `localcloud` CLI as the shared fixture runs it: blocks saved in the real Prefect server point
at a working local cloud; admin verbs and status through the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

from arm_harness import StaticCredential
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient

from prefect_azmanagers.blocks import load_manifest, load_nic_template, load_scaleset_template, load_vm_template
from prefect_azmanagers.localcloud import LocalCloudAdmin
from prefect_azmanagers.localcloud.config import LocalCloudConfig

CLI = [sys.executable, "-m", "prefect_azmanagers.cli", "localcloud"]


def _cli(*args: str):
    """Run `prefect-azmanagers localcloud ARGS` in-process (typer's runner: the real commands)."""
    from typer.testing import CliRunner

    from prefect_azmanagers.cli import app

    result = CliRunner().invoke(app, ["localcloud", *args])
    result.returncode = result.exit_code  # same reading as subprocess results below
    return result


def test_blocks_saved_by_start_drive_the_local_cloud(localcloud):
    manifest = load_manifest("localcloud")
    # the start's own token, as a secret (the local cloud refuses any other)
    assert manifest.credential == "static" and manifest.static_token.get_secret_value() == localcloud["static_token"]
    assert manifest.arm_endpoint == localcloud["arm_endpoint"] and manifest.ca_bundle == localcloud["ca_cert"]
    assert manifest.credential == "static" and manifest.python == sys.executable
    assert manifest.prefect_api_url_for_vms == localcloud["prefect_api_url_for_vms"] is not None
    assert oct(os.stat(manifest.ssh_private_key_file).st_mode & 0o777) == "0o600"
    template = load_scaleset_template("localcloud-small")
    assert load_vm_template("localcloud-vm").value["properties"]["hardwareProfile"]["vmSize"]
    assert load_nic_template("localcloud-nic").value["properties"]["ipConfigurations"]

    # the template's body, completed as the control plane completes it, is accepted as is
    body = dict(template.value)
    body["sku"] = dict(body["sku"], capacity=1)
    os_profile = body["properties"]["virtualMachineProfile"]["osProfile"]
    os_profile["linuxConfiguration"]["ssh"]["publicKeys"] = [
        {"path": f"/home/{manifest.ssh_user}/.ssh/authorized_keys", "keyData": manifest.read_public_key().strip()}]
    kwargs = dict(base_url=manifest.arm_endpoint, connection_verify=manifest.ca_bundle, polling_interval=0)
    compute = ComputeManagementClient(StaticCredential(manifest.static_token.get_secret_value()), manifest.subscription_id, **kwargs)
    network = NetworkManagementClient(StaticCredential(manifest.static_token.get_secret_value()), manifest.subscription_id, **kwargs)
    rg = manifest.resource_group
    compute.virtual_machine_scale_sets.begin_create_or_update(rg, "clismall", body).result()
    try:
        [nic] = network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(rg, "clismall")
        ip = nic.ip_configurations[0].private_ip_address
        status = _cli("status", "--state-dir", localcloud["state_dir"])
        assert status.returncode == 0, status.output
        assert "isolated" in status.stdout and "clismall_0" in status.stdout and ip in status.stdout
        as_json = _cli("status", "--json", "--state-dir", localcloud["state_dir"])
        assert as_json.returncode == 0 and localcloud["arm_endpoint"] in as_json.stdout
        assert localcloud["static_token"] not in as_json.stdout and localcloud["client_secret"] not in as_json.stdout

        kill = _cli("kill", "clismall_0", "--state-dir", localcloud["state_dir"])
        assert kill.returncode == 0, kill.output
        view = compute.virtual_machine_scale_set_vms.get_instance_view(rg, "clismall", "0")
        assert view.statuses[-1].code == "PowerState/stopped"
        unknown = _cli("kill", "no-such-vm", "--state-dir", localcloud["state_dir"])
        assert unknown.returncode == 1 and "no instance named 'no-such-vm'" in unknown.output
    finally:
        compute.virtual_machine_scale_sets.begin_delete(rg, "clismall").result()


def test_fault_verbs_reach_the_admin_api(localcloud):
    state = ["--state-dir", localcloud["state_dir"]]
    admin = LocalCloudAdmin.from_info(localcloud)
    try:
        assert _cli("throttle", "2", "--retry-after", "1", *state).returncode == 0
        assert _cli("fail-next", "1", "--allocation-failed", *state).returncode == 0
        assert _cli("boot-fail", "3", *state).returncode == 0
        assert _cli("quota", "standardBSFamily", "7", *state).returncode == 0
        assert _cli("boot-delay", "0.5", *state).returncode == 0
        doc = admin.status()
        assert doc["faults"]["throttle"] == 2 and doc["faults"]["allocation_failures"] == 1
        assert doc["faults"]["boot_failures"] == 3 and doc["settings"]["boot_delay"] == 0.5
        assert admin.set_quota("standardBSFamily", 7)["quotas"]["standardBSFamily"] == 7
        counters = _cli("counters", *state)
        assert counters.returncode == 0 and "live instances" in counters.stdout
    finally:
        admin.clear_faults()
        admin.settings(boot_delay=0)
        admin.set_quota("standardBSFamily", LocalCloudConfig().quotas["standardBSFamily"])
        admin.close()


def test_start_without_a_prefect_api_says_the_blocks_were_not_saved(tmp_path):
    state = ["--state-dir", str(tmp_path / "lc")]
    env = dict(os.environ, PREFECT_API_URL="http://127.0.0.1:9/api")  # nothing listens there
    try:
        started = subprocess.run(CLI + ["start", "--background", *state], capture_output=True, text=True,
                                 timeout=180, env=env)
        assert started.returncode == 0, started.stderr
        assert "NOT saved" in started.stdout and "arm_endpoint" in started.stdout
        assert (tmp_path / "lc" / "localcloud.json").exists()
    finally:
        stopped = subprocess.run(CLI + ["stop", *state], capture_output=True, text=True, timeout=180, env=env)
    assert stopped.returncode == 0 and "Stopped the local cloud" in stopped.stdout
    assert not (tmp_path / "lc" / "localcloud.json").exists()


def test_foreground_start_runs_until_ctrl_c_and_cleans_up(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state_dir = tmp_path / "fg"
    env = dict(os.environ, PREFECT_API_URL="http://127.0.0.1:9/api")
    proc = subprocess.Popen(CLI + ["start", "--state-dir", str(state_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        info = json.loads((state_dir / "localcloud.json").read_text())
        assert info["arm_endpoint"] == f"https://127.0.0.1:{port}", "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0 and "Stopped." in rest
        assert not (state_dir / "localcloud.json").exists()
        with socket.socket() as s:  # nothing listens on the port any more
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(CLI + ["stop", "--state-dir", str(state_dir)], capture_output=True, timeout=120, env=env)
