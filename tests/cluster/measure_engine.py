"""Engine figures on the local cloud (not a test: run it by hand, it prints a table).

    .venv/bin/python tests/cluster/measure_engine.py [--instances 8 --ppi 4 --calls 2000]

It starts a local cloud in a temporary state directory (no Prefect server needed: the
manifest and template are built in memory like `localcloud start` saves them), then measures:

- raw asyncssh round trip (64-byte echo through `cat` on one instance, one connection) vs the
  engine's round trip for a trivial callable on one worker (submit -> result, sequential);
- pipelined engine throughput on one worker and on all workers;
- driver memory per worker (RSS and tracemalloc growth while the workers join, divided by
  their number);
- `--instances` x `--ppi` workers running `--calls` trivial callables.

Everything it starts is stopped at the end (cluster closed, local cloud stopped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import psutil

from prefect_azmanagers.cli.localcloud import LOCALCLOUD_TEMPDISK
from prefect_azmanagers.blocks import AzureManifest
from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.templates import build_sstemplate


def blocks_for(info: dict) -> tuple[AzureManifest, object]:
    sub, rg, location = info["subscription_id"], info["resource_group"], info["location"]
    manifest = AzureManifest(
        subscription_id=sub, resource_group=rg, location=location, ssh_user=info["ssh_user"],
        ssh_private_key_file=info["ssh_private_key_file"],
        ssh_public_key_file=info["ssh_public_key_file"], arm_endpoint=info["arm_endpoint"],
        ca_bundle=info["ca_cert"], credential="static", static_token=info["static_token"],
        known_hosts_file=info["known_hosts_file"], python=info["python"])
    template = build_sstemplate(
        "localcloud-small", vnet="localcloud-vnet", subnet="default", sku_name="Standard_D2s_v3",
        subscription_id=sub, admin_username=info["ssh_user"], location=location,
        resource_group=rg, image_gallery="localcloud-gallery", image_name="ubuntu",
        tempdisk=LOCALCLOUD_TEMPDISK)
    return manifest, template


def raw_round_trip(cluster: AzureCluster, count: int) -> float:
    """Seconds per 64-byte echo over one of the cluster's own SSH connections."""
    member = next(iter(cluster._membership.members.values()))

    async def measure() -> float:
        process = await member.conn.ssh.create_process("cat", encoding=None)
        message = b"x" * 64
        for _ in range(5):  # warm-up
            process.stdin.write(message)
            await process.stdout.readexactly(64)
        started = time.perf_counter()
        for _ in range(count):
            process.stdin.write(message)
            await process.stdout.readexactly(64)
        elapsed = time.perf_counter() - started
        process.stdin.write_eof()
        process.close()
        return elapsed / count

    return cluster._call(measure())


def raw_bandwidth(cluster: AzureCluster, size: int) -> float:
    """MB/s writing `size` bytes into `cat > /dev/null` over one of the cluster's connections."""
    member = next(iter(cluster._membership.members.values()))

    async def measure() -> float:
        data = b"x" * size
        started = time.perf_counter()
        await member.conn.ssh.run("cat > /dev/null", input=data, encoding=None, check=True)
        return size / (time.perf_counter() - started) / 1e6

    return cluster._call(measure())


def engine_bandwidth(cluster: AzureCluster, size: int) -> float:
    """MB/s shipping a `size`-byte argument to a callable (pickling included)."""
    data = b"x" * size
    started = time.perf_counter()
    assert cluster.submit(lambda: len(data)).result(timeout=600) == size
    return size / (time.perf_counter() - started) / 1e6


def engine_round_trip(cluster: AzureCluster, count: int) -> list[float]:
    for _ in range(5):
        cluster.submit(int).result()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        cluster.submit(int).result()
        times.append(time.perf_counter() - started)
    return times


def throughput(cluster: AzureCluster, calls: int) -> float:
    started = time.perf_counter()
    futures = [cluster.submit(int) for _ in range(calls)]
    for future in futures:
        future.result(timeout=600)
    return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--ppi", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--round-trips", type=int, default=500)
    args = parser.parse_args()

    state_dir = Path(tempfile.mkdtemp(prefix="azm-measure-"))
    cli = [sys.executable, "-m", "prefect_azmanagers.cli", "localcloud"]
    subprocess.run(cli + ["start", "--background", "--state-dir", str(state_dir)], check=True,
                   capture_output=True, env={**__import__("os").environ,
                                             "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    figures: dict[str, object] = {}
    try:
        manifest, template = blocks_for(json.loads((state_dir / "localcloud.json").read_text()))
        driver = psutil.Process()
        tracemalloc.start()
        cluster = AzureCluster(template, args.instances, manifest=manifest, ppi=args.ppi,
                               group="measure", progress=False, join_timeout=900)
        with cluster:
            # baseline once the machinery (loop, SDK clients, first listing) exists
            rss_before, traced_before = driver.memory_info().rss, tracemalloc.get_traced_memory()[0]
            started = time.perf_counter()
            workers = args.instances * args.ppi
            cluster.wait_for_workers(workers, timeout=900)
            figures["join_seconds"] = round(time.perf_counter() - started, 1)
            figures["workers"] = workers
            rss_after, traced_after = driver.memory_info().rss, tracemalloc.get_traced_memory()[0]
            figures["driver_rss_kib_per_worker"] = round((rss_after - rss_before) / 1024 / workers, 1)
            figures["driver_python_heap_kib_per_worker"] = round((traced_after - traced_before) / 1024 / workers, 1)
            tracemalloc.stop()

            # Interleaved rounds, so that load from other processes hits both alike. With all
            # workers idle, each sequential call is one dispatch + one reply.
            raws, times = [], []
            for _ in range(5):
                raws.append(raw_round_trip(cluster, args.round_trips // 5))
                times += engine_round_trip(cluster, args.round_trips // 5)
            raw = statistics.median(raws)
            figures["raw_asyncssh_round_trip_us"] = round(raw * 1e6)
            figures["engine_round_trip_us_p50"] = round(statistics.median(times) * 1e6)
            figures["engine_round_trip_us_p95"] = round(sorted(times)[int(len(times) * 0.95)] * 1e6)
            figures["engine_vs_raw_round_trip"] = round(statistics.median(times) / raw, 2)

            for size_mb in (10, 100):
                size = size_mb << 20
                raw_mb_s = statistics.median(raw_bandwidth(cluster, size) for _ in range(3))
                engine_mb_s = statistics.median(engine_bandwidth(cluster, size) for _ in range(3))
                figures[f"bulk_{size_mb}MB_raw_asyncssh_MB_s"] = round(raw_mb_s)
                figures[f"bulk_{size_mb}MB_engine_MB_s"] = round(engine_mb_s)
                figures[f"bulk_{size_mb}MB_engine_vs_raw"] = round(engine_mb_s / raw_mb_s, 2)

            throughput(cluster, 200)  # warm-up
            figures[f"calls_per_second_{workers}_workers"] = round(throughput(cluster, args.calls))
            figures["calls"] = args.calls
            figures["tasks_run_per_worker_min_max"] = (
                min(w.tasks_run for w in cluster.workers), max(w.tasks_run for w in cluster.workers))
    finally:
        subprocess.run(cli + ["stop", "--state-dir", str(state_dir)], capture_output=True)
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
