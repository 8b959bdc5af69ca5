"""Detached-run figures on the local cloud (not collected by default; run it by hand):

    .venv/bin/pytest tests/detached/measure_detached.py -s -q

It uses the session fixtures (a Prefect server, the local cloud) and prints one line: addproc
(VM created -> worker online), submit -> done for a trivial job (3 runs), a 2 MB payload job,
submit -> running, kill -> cancelled, rmproc. Everything it makes is removed.
"""

from __future__ import annotations

import os
import statistics
import time

from prefect_azmanagers.detached import addproc, detachat, rmproc


def noop() -> int:
    return 1


def test_measure_detached(localcloud):
    started = time.monotonic()
    vm = addproc("localcloud-vm", "localcloud-nic", manifest="localcloud", basename="azmfig")
    add = time.monotonic() - started
    try:
        latencies = []
        for _ in range(3):
            started = time.monotonic()
            assert detachat(vm, noop).wait(300, poll=0.2) == "done"
            latencies.append(time.monotonic() - started)
        data = os.urandom(2 * 1024 * 1024)
        started = time.monotonic()
        assert detachat(vm, len, data).result(300) == len(data)
        big = time.monotonic() - started
        started = time.monotonic()
        sleeper = detachat(vm, time.sleep, 600)
        while sleeper.status() != "running":
            time.sleep(0.2)
        to_running = time.monotonic() - started
        started = time.monotonic()
        assert sleeper.kill() == "cancelled"
        kill = time.monotonic() - started
    finally:
        started = time.monotonic()
        rmproc(vm)
        remove = time.monotonic() - started
    print(f"\naddproc {add:.1f} s | trivial job submit->done {[round(x, 1) for x in latencies]} "
          f"(median {statistics.median(latencies):.1f} s) | 2 MB payload job {big:.1f} s | "
          f"submit->running {to_running:.1f} s | kill {kill:.1f} s | rmproc {remove:.1f} s")
