"""Figures of the local cloud (not a test; run it alone on a quiet machine):

    .venv/bin/python tests/localcloud/figures.py [--instances 16] [--seconds 10] [--network loopback]

- time from the create request to every instance SSH-reachable with the stock OpenSSH client
  (boot delay 0), split into the ARM LRO (Succeeded = every sshd accepts) and the SSH check;
- the endpoint's requests per second on a list call (VirtualMachineScaleSetVMs_List, one client,
  sequential, keep-alive), through the real SDK and as raw HTTPS requests;
- resident memory per idle instance (every process in the instance's namespaces) and the local
  cloud process's growth per instance.
`--network` picks the local cloud's mode (default: isolated as root, loopback otherwise);
`--as-throwaway-user` (root only) runs the whole measurement as a new non-root account
(loopback_harness.NonRootUser), so the loopback mode is measured as a user without root runs it.
Prints a table and the JSON document.
"""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient

sys.path.insert(0, str(Path(__file__).parent))
from arm_harness import Cloud, StaticCredential, bearer  # noqa: E402

from prefect_azmanagers.localcloud import LocalCloudAdmin, start, stop  # noqa: E402


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(instances: int, seconds: float, network: str | None = None) -> dict:
    state_dir = Path(tempfile.mkdtemp(prefix="azm-figures-"))
    info = start(state_dir, network=network)
    kwargs = dict(base_url=info["arm_endpoint"], connection_verify=info["ca_cert"], polling_interval=0)
    cloud = Cloud(info, LocalCloudAdmin.from_info(info),
                  ComputeManagementClient(StaticCredential(info["static_token"]), info["subscription_id"], **kwargs),
                  NetworkManagementClient(StaticCredential(info["static_token"]), info["subscription_id"], **kwargs))
    try:
        cloud.admin.set_quota("standardBSFamily", 2 * instances)
        server_rss_before = _rss_kib(info["pid"])
        t0 = time.monotonic()
        cloud.compute.virtual_machine_scale_sets.begin_create_or_update(
            cloud.rg, "figures", cloud.scale_set_body(instances)).result()
        t_lro = time.monotonic() - t0
        ips = [n.ip_configurations[0].private_ip_address for n in
               cloud.network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(cloud.rg, "figures")]
        with ThreadPoolExecutor(instances) as pool:
            results = list(pool.map(lambda ip: cloud.ssh(ip, "true").returncode, ips))
        t_ssh = time.monotonic() - t0
        assert results == [0] * instances, results

        time.sleep(2)  # idle
        pids = [pid for inst in cloud.admin.status()["instances"] for pid in (inst["sandbox"] or {}).get("pids", [])]
        instance_rss = sum(_rss_kib(pid) for pid in pids)
        server_growth = _rss_kib(info["pid"]) - server_rss_before

        n, t1 = 0, time.monotonic()
        while time.monotonic() - t1 < seconds:
            list(cloud.compute.virtual_machine_scale_set_vms.list(cloud.rg, "figures"))
            n += 1
        rps = n / (time.monotonic() - t1)
        url = (f"{info['arm_endpoint']}/subscriptions/{info['subscription_id']}/resourceGroups/{cloud.rg}/providers/"
               "Microsoft.Compute/virtualMachineScaleSets/figures/virtualMachines?api-version=2026-04-01")
        with httpx.Client(verify=ssl.create_default_context(cafile=info["ca_cert"]),
                          headers=bearer(info)) as raw:
            n, t1 = 0, time.monotonic()
            while time.monotonic() - t1 < seconds:
                raw.get(url).raise_for_status()
                n += 1
            raw_rps = n / (time.monotonic() - t1)
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, "figures").result()
        return {
            "mode": info["mode"],
            "instances": instances,
            "create_to_lro_succeeded_s": round(t_lro, 2),
            "create_to_all_ssh_reachable_s": round(t_ssh, 2),
            "list_requests_per_s_sdk": round(rps, 1),
            "list_requests_per_s_raw_http": round(raw_rps, 1),
            "rss_per_idle_instance_mib": round(instance_rss / instances / 1024, 1),
            "processes_per_instance": round(len(pids) / instances, 1),
            "localcloud_rss_growth_per_instance_mib": round(server_growth / instances / 1024, 2),
        }
    finally:
        cloud.compute.close()
        cloud.network.close()
        cloud.admin.close()
        stop(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--network", choices=["isolated", "loopback"], default=None)
    parser.add_argument("--as-throwaway-user", action="store_true")
    args = parser.parse_args()
    if args.as_throwaway_user:
        from loopback_harness import NonRootUser

        user = NonRootUser.create()
        try:
            argv = [sys.executable, __file__, "--instances", str(args.instances), "--seconds", str(args.seconds)]
            result = user.run(argv, timeout=1800, env_extra={"TMPDIR": str(user.base)})
            print(result.stdout, result.stderr, end="")
        finally:
            user.remove()
        return
    figures = measure(args.instances, args.seconds, args.network)
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
