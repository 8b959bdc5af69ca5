"""Figures of the VM sandboxes (root): boot N instances in parallel, then their idle memory.

    .venv/bin/python tests/localcloud/measure_sandboxes.py 32

Prints the time from boot() calls to every sshd answering, the idle RSS and PSS per instance
(its processes: sshd; IMDS is served by the local cloud process), the local cloud process's
own growth, and the time stop() takes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from prefect_azmanagers.localcloud.sandbox import InstanceSpec, SandboxHost


def memory_kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


async def measure(n: int, workdir: Path) -> None:
    key = workdir / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    host = SandboxHost(workdir / "state")
    await host.start()
    try:
        own_before = memory_kib("self", "Rss")
        specs = [InstanceSpec(key=str(uuid.uuid4()), name=f"m_{i}", computer_name=f"m{i:06d}",
                              admin_username="azureuser", public_keys=[key.with_suffix(".pub").read_text()],
                              custom_data=None, metadata={"name": f"m_{i}"}) for i in range(n)]
        for spec in specs:
            host.allocate(spec.key)
        started = time.monotonic()
        await asyncio.gather(*(host.boot(s) for s in specs))
        booted = time.monotonic() - started
        await asyncio.sleep(2)
        pids = [host.describe(s.key)["pids"] for s in specs]
        rss = sum(memory_kib(p, "Rss") for ps in pids for p in ps) / n / 1024
        pss = sum(memory_kib(p, "Pss") for ps in pids for p in ps) / n / 1024
        own = (memory_kib("self", "Rss") - own_before) / 1024
        print(f"{n} instances: all sshd up {booted:.2f} s after boot(); idle per instance "
              f"RSS {rss:.1f} MiB, PSS {pss:.1f} MiB; local cloud process +{own:.1f} MiB")
    finally:
        started = time.monotonic()
        await host.stop()
        print(f"stop(): {time.monotonic() - started:.2f} s")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="azlc-measure-") as tmp:
        asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 16, Path(tmp)))
