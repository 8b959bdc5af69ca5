"""Task throughput, latency, argument bandwidth and driver memory of AzureScaleSetTaskRunner,
side by side with Prefect's ThreadPoolTaskRunner (the in-process bound), ProcessPoolTaskRunner
and prefect-dask's DaskTaskRunner (remote peers, same worker count), and raw asyncssh round
trips over one connection (the transport bound). One process tree, one run:

    python -m bench.throughput [--tasks 500] [--workers 4] [--no-scale]
    python -m bench.throughput --only bandwidth [--workers 1] [--repeat 3]

It starts a Prefect server and the local cloud itself and stops them. Every runner runs the
same flow: N trivial tasks submitted at once, each returning how long after its submit it
started. "shared 1st": the first flow run on a shared AzureCluster, "warm": the next one (no
warm-up by hand: the runner readies the slots as it enters); "fresh": a new
runner per flow run as a user runs it, nothing warmed by hand (timed from the flow's body, once
its workers joined; its first result is reported: bench.cold_start has the detail).
Bulk argument bandwidth (10-100 MB blobs) is sampled `--repeat` times, in turns, through the
runner, through AzureCluster.submit alone (the engine, no Prefect) and over raw asyncssh.
Results: a table on stdout and JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from bench.services import bench_environment, local_cloud, prefect_server  # noqa: E402  (no prefect)

_OWN_HOME = bench_environment()  # before prefect is imported

import asyncssh  # noqa: E402
import psutil  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner  # noqa: E402

from bench.cold_start import timed_flow  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MB = 1 << 20
ECHO_SERVER = r"""
import sys
inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = inp.read(8)
    if len(head) < 8:
        break
    size, reply = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
    data = inp.read(size)
    out.write(len(data).to_bytes(4, "big") + data[:reply])
    out.flush()
"""


@task
def trivial(submitted_at: float) -> float:
    return time.time() - submitted_at


@task
def size_of(blob: bytes) -> int:
    return len(blob)


def run_trivial(task_runner, n: int) -> dict:
    """Runs the trivial flow; tasks/s from first submit to last result, latency percentiles."""
    @flow(task_runner=task_runner, name="bench-trivial")
    def trivial_flow(count: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        futures = [trivial.submit(time.time()) for _ in range(count)]
        latencies = [f.result() for f in futures]
        return time.perf_counter() - t0, latencies

    seconds, latencies = trivial_flow(n)
    latencies.sort()
    return {"tasks": n, "seconds": round(seconds, 3), "tasks_per_s": round(n / seconds, 1),
            "start_latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "start_latency_p95_ms": round(1000 * latencies[int(len(latencies) * 0.95)], 1)}


def run_bandwidth(task_runner, sizes_mb: list[int]) -> dict:
    """MB/s of one task per size, each taking a blob of that size, in one flow run. A small
    task runs first, untimed: a flow run's first task also pays the run's one-time setup
    (settings and context serialized on the driver, rebuilt on the worker: ~0.2-0.4 s here),
    which the trivial-task latencies measure, not the transfer."""
    @flow(task_runner=task_runner, name="bench-bandwidth")
    def bandwidth_flow() -> dict:
        size_of.submit(b"").result()
        out = {}
        for size in sizes_mb:
            blob = os.urandom(size * MB)
            t0 = time.perf_counter()
            assert size_of.submit(blob).result() == len(blob)
            out[f"{size}MB"] = round(size / (time.perf_counter() - t0), 1)
        return out

    return bandwidth_flow()


async def raw_asyncssh(address: str, port: int, user: str, client_key, host_key, python: str,
                       round_trips: int, sizes_mb: list[int]) -> dict:
    """Round trips (none if `round_trips` is 0) and bulk transfers over one SSH connection to
    an echo process, with asyncssh's default settings."""
    async with asyncssh.connect(address, port=port, username=user, client_keys=[client_key],
                                known_hosts=([host_key], [], [])) as conn:
        proc = await conn.create_process(f"{python} -u -c {_quote(ECHO_SERVER)}", encoding=None)

        async def call(payload: bytes, reply: int) -> None:
            proc.stdin.write(len(payload).to_bytes(4, "big") + reply.to_bytes(4, "big") + payload)
            size = int.from_bytes(await proc.stdout.readexactly(4), "big")
            await proc.stdout.readexactly(min(size, reply))

        small = b"x" * 200
        for _ in range(50):
            await call(small, 200)
        t0 = time.perf_counter()
        for _ in range(round_trips):
            await call(small, 200)
        rate = round_trips / (time.perf_counter() - t0) if round_trips else None
        bandwidth = {}
        for size in sizes_mb:
            blob = os.urandom(size * MB)
            t0 = time.perf_counter()
            await call(blob, 0)
            bandwidth[f"{size}MB"] = round(size / (time.perf_counter() - t0), 1)
        proc.stdin.write_eof()
        proc.close()
        return {"round_trips_per_s": rate and round(rate, 1), "bandwidth_MB_s": bandwidth}


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def raw_endpoint(cluster, state_dir: Path) -> dict:
    """How raw asyncssh reaches the instance of the cluster's first worker (its pinned key)."""
    from prefect_azmanagers.blocks import load_manifest, load_scaleset_template
    from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    manifest = load_manifest("localcloud")
    template = load_scaleset_template("localcloud-small")
    user = manifest.ssh_user or \
        template.value["properties"]["virtualMachineProfile"]["osProfile"]["adminUsername"]
    worker = cluster.workers[0]
    with LocalCloudAdmin.from_state_dir(state_dir) as admin:
        vm_id = next(i["vm_id"] for i in admin.status()["instances"] if i["name"] == worker.instance)
    return {"address": worker.ip, "port": manifest.ssh_port, "user": user,
            "client_key": asyncssh.import_private_key(manifest.read_private_key()),
            "host_key": PinnedHostKeys(manifest.known_hosts_path()).get(vm_id),
            "python": manifest.python}


def engine_bandwidth(cluster, sizes_mb: list[int]) -> dict:
    """MB/s of AzureCluster.submit alone (no Prefect): a call taking a blob of each size."""
    out = {}
    for size in sizes_mb:
        blob = os.urandom(size * MB)
        t0 = time.perf_counter()
        assert cluster.submit(functools.partial(len, blob), label="len").result() == len(blob)
        out[f"{size}MB"] = round(size / (time.perf_counter() - t0), 1)
    return out


def measure_bandwidth(cluster, endpoint: dict, sizes_mb: list[int], repeat: int) -> dict:
    """Bulk-argument bandwidth of the runner, of the engine under it (AzureCluster.submit, no
    Prefect) and of raw asyncssh, sampled in turns (so machine load weighs on all alike);
    medians, every sample, and raw asyncssh's round trips/s."""
    from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

    samples: dict[str, dict[str, list[float]]] = {"azure": {}, "engine": {}, "raw_asyncssh": {}}
    round_trips = None
    for turn in range(repeat):
        azure = run_bandwidth(AzureScaleSetTaskRunner(cluster=cluster), sizes_mb)
        engine = engine_bandwidth(cluster, sizes_mb)
        raw = asyncio.run(raw_asyncssh(**endpoint, round_trips=2000 if turn == 0 else 0,
                                       sizes_mb=sizes_mb))
        round_trips = round_trips or raw["round_trips_per_s"]
        for name, rates in (("azure", azure), ("engine", engine),
                            ("raw_asyncssh", raw["bandwidth_MB_s"])):
            for size, rate in rates.items():
                samples[name].setdefault(size, []).append(rate)
        print(f"  bandwidth turn {turn + 1}/{repeat}: runner {azure}  engine {engine}  "
              f"raw asyncssh {raw['bandwidth_MB_s']}", flush=True)

    def medians(name: str) -> dict:
        return {k: statistics.median(v) for k, v in samples[name].items()}

    return {"azure_bandwidth_MB_s": medians("azure"), "engine_bandwidth_MB_s": medians("engine"),
            "raw_asyncssh": {"round_trips_per_s": round_trips,
                             "bandwidth_MB_s": medians("raw_asyncssh")},
            "bandwidth_samples_MB_s": samples}


def start_cluster(api_port: int, instances: int, ppi: int, group: str):
    from prefect_azmanagers.cluster.cluster import AzureCluster

    cluster = AzureCluster("localcloud-small", instances, manifest="localcloud", ppi=ppi,
                           group=group, forward_ports=[api_port], progress=False,
                           waitfor=True, join_timeout=600)
    return cluster.start()


def driver_rss() -> int:
    return psutil.Process().memory_info().rss


def measure_runner(name: str, make_runner: Callable, n: int, warmup: int) -> dict:
    if warmup:
        run_trivial(make_runner(), warmup)
    result = run_trivial(make_runner(), n)
    print(f"  {name:<28} {result['tasks_per_s']:>8} tasks/s  "
          f"p50 {result['start_latency_p50_ms']} ms  p95 {result['start_latency_p95_ms']} ms",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--sizes-mb", default="10,50,100")
    parser.add_argument("--no-scale", action="store_true",
                        help="skip the 8 instances x ppi 4 = 32 workers, 2,000 tasks run")
    parser.add_argument("--only", choices=("all", "bandwidth"), default="all",
                        help="bandwidth: only the bulk-argument bandwidth against raw asyncssh")
    parser.add_argument("--repeat", type=int, default=3,
                        help="bandwidth samples per size (runner and raw asyncssh in turns); "
                             "medians are reported")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    root = Path(tempfile.mkdtemp(prefix="azm-bench-"))
    report: dict = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "memory_GiB": round(psutil.virtual_memory().total / 2**30, 1)},
                    "tasks": args.tasks, "workers": args.workers}
    try:
        with prefect_server(root, os.environ["PREFECT_API_URL"]) as api_url, \
                local_cloud(root, api_url):
            from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

            api_port = int(api_url.rsplit(":", 1)[1].split("/")[0])
            n, w = args.tasks, args.workers
            runners = report["runners"] = {}
            print(f"{n} trivial tasks, {w} workers, {os.cpu_count()} CPUs", flush=True)

            if args.only == "all":
                fresh = runners["AzureScaleSetTaskRunner fresh"] = timed_flow(
                    AzureScaleSetTaskRunner("localcloud-small", w, manifest="localcloud",
                                            waitfor=True, group="bench-fresh"), n)
                print(f"  {'AzureScaleSetTaskRunner fresh':<28} {fresh['tasks_per_s']:>8} tasks/s"
                      f"  first result {fresh['first_result_s']} s", flush=True)
            base = driver_rss()
            cluster = start_cluster(api_port, w, 1, "bench-tp")
            try:
                report["driver_rss_per_worker_MB"] = round((driver_rss() - base) / w / MB, 2)
                if args.only == "all":
                    # The first flow run on a shared cluster is timed too: nothing warms it by
                    # hand, the runner readies the joined slots as it enters.
                    first = runners["AzureScaleSetTaskRunner shared 1st"] = run_trivial(
                        AzureScaleSetTaskRunner(cluster=cluster), n)
                    print(f"  {'AzureScaleSetTaskRunner shared 1st':<28} {first['tasks_per_s']:>8}"
                          f" tasks/s  p50 {first['start_latency_p50_ms']} ms", flush=True)
                    runners["AzureScaleSetTaskRunner warm"] = measure_runner(
                        "AzureScaleSetTaskRunner warm", lambda: AzureScaleSetTaskRunner(cluster=cluster),
                        n, 0)
                run_bandwidth(AzureScaleSetTaskRunner(cluster=cluster), [1])  # warm-up
                report.update(measure_bandwidth(cluster, raw_endpoint(cluster, root / "localcloud"),
                                                sizes, args.repeat))
            finally:
                cluster.close()
            if args.only == "all":
                measure_peers(report, n, w, api_port, scale=not args.no_scale)

    finally:
        shutil.rmtree(root, ignore_errors=True)
        if _OWN_HOME:
            shutil.rmtree(_OWN_HOME, ignore_errors=True)
    summarize(report)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"throughput-{report['when'].replace(':', '')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {out}")
    return report


def measure_peers(report: dict, n: int, w: int, api_port: int, *, scale: bool) -> None:
    """Prefect's own runners on the same flow, then (`scale`) 32 workers running 2,000 tasks."""
    from prefect_dask import DaskTaskRunner

    from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

    runners = report["runners"]
    runners["ThreadPoolTaskRunner"] = measure_runner(
        "ThreadPoolTaskRunner", lambda: ThreadPoolTaskRunner(), n, 4 * w)
    runners[f"ProcessPoolTaskRunner({w})"] = measure_runner(
        f"ProcessPoolTaskRunner({w})", lambda: ProcessPoolTaskRunner(max_workers=w),
        max(n // 10, 4 * w), 4 * w)
    runners[f"DaskTaskRunner({w})"] = measure_runner(
        f"DaskTaskRunner({w})", lambda: DaskTaskRunner(
            cluster_kwargs={"n_workers": w, "threads_per_worker": 1, "processes": True,
                            "dashboard_address": None}),
        max(n // 10, 4 * w), 4 * w)

    if scale:
        base = driver_rss()
        t0 = time.perf_counter()
        big = start_cluster(api_port, 8, 4, "bench-scale")
        try:
            joined = time.perf_counter() - t0
            rss = (driver_rss() - base) / len(big.workers) / MB
            result = measure_runner("AzureScaleSetTaskRunner 8x4", lambda: AzureScaleSetTaskRunner(
                cluster=big), 2000, 64)
            report["scale_32_workers"] = dict(result, workers=len(big.workers),
                                              join_seconds=round(joined, 1),
                                              driver_rss_per_worker_MB=round(rss, 2))
        finally:
            big.close()


def summarize(report: dict) -> None:
    runners = report["runners"]
    raw = report["raw_asyncssh"]
    ratios = report["ratios"] = {"bandwidth_vs_raw_asyncssh": {
        k: round(v / raw["bandwidth_MB_s"][k], 2) for k, v in report["azure_bandwidth_MB_s"].items()}}
    if runners:
        w = report["workers"]
        ours = runners["AzureScaleSetTaskRunner warm"]["tasks_per_s"]
        fresh = runners["AzureScaleSetTaskRunner fresh"]
        ratios.update(
            azure_vs_dask=round(ours / runners[f"DaskTaskRunner({w})"]["tasks_per_s"], 2),
            azure_vs_threadpool=round(ours / runners["ThreadPoolTaskRunner"]["tasks_per_s"], 2),
            fresh_vs_threadpool=round(
                fresh["tasks_per_s"] / runners["ThreadPoolTaskRunner"]["tasks_per_s"], 2),
            azure_vs_processpool=round(
                ours / runners[f"ProcessPoolTaskRunner({w})"]["tasks_per_s"], 2))
        print(f"\n{'runner':<30}{'tasks/s':>10}{'p50 ms':>10}{'p95 ms':>10}")
        for name, r in runners.items():
            print(f"{name:<30}{r['tasks_per_s']:>10}{r['start_latency_p50_ms']:>10}"
                  f"{r['start_latency_p95_ms']:>10}")
        print(f"\nAzure (warm) vs Dask: {ratios['azure_vs_dask']}x (goal >= 10x); "
              f"vs ThreadPool: {ratios['azure_vs_threadpool']}x (goal >= 0.7x)")
        print(f"Azure (fresh) vs ThreadPool: {ratios['fresh_vs_threadpool']}x (goal >= 1.0x); "
              f"first result {fresh['first_result_s']} s (goal < 0.3 s)")
    print(f"{'raw asyncssh round trips':<30}{raw['round_trips_per_s']:>10}")
    print(f"{'argument':<12}{'runner MB/s':>14}{'raw MB/s':>12}{'ratio':>8}{'engine MB/s':>14}"
          f"   (goal: ratio >= 0.5; medians of "
          f"{len(next(iter(report['bandwidth_samples_MB_s']['azure'].values())))})")
    for size, rate in report["azure_bandwidth_MB_s"].items():
        print(f"{size:<12}{rate:>14}{raw['bandwidth_MB_s'][size]:>12}"
              f"{ratios['bandwidth_vs_raw_asyncssh'][size]:>8}"
              f"{report['engine_bandwidth_MB_s'][size]:>14}")
    print(f"driver memory per worker: {report['driver_rss_per_worker_MB']} MB RSS")
    if "scale_32_workers" in report:
        s = report["scale_32_workers"]
        print(f"32 workers (8 x ppi 4): {s['tasks']} tasks in {s['seconds']} s "
              f"({s['tasks_per_s']} tasks/s), joined in {s['join_seconds']} s, "
              f"{s['driver_rss_per_worker_MB']} MB driver RSS per worker")

if __name__ == "__main__":
    main(sys.argv[1:])
