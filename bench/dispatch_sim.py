"""The dispatcher at many workers, simulated: its cost per task and its memory per worker at
1, 100 and 1,000 workers, with no SSH, cloud or Prefect in the way.

    python -m bench.dispatch_sim [--tasks 20000] [--workers 1 100 1000]

The real `Dispatcher` (queue, feeders, the backpressure gate, outcomes, `settle`) drives
in-process agents that answer each RUN with a RESULT on the next turn of the loop, as an agent
answering at once would; the submits and the results go through the same calls
`AzureCluster.submit` and the transport make (`new_item` + `enqueue`, `on_outcome` with a
pickled result). Reported: microseconds per task (wall and CPU, submit to result), and
tracemalloc bytes per worker (the slots' records, semaphores and feeder tasks).
Goal (issue 12): under 100 us per task, flat in the number of workers.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import tracemalloc
from datetime import datetime, timezone

from bench.services import write_results
from prefect_azmanagers.cluster import serialization
from prefect_azmanagers.cluster.backpressure import Backpressure
from prefect_azmanagers.cluster.dispatch import Dispatcher
from prefect_azmanagers.cluster.members import Member, MemberState, Worker, WorkerState
from prefect_azmanagers.cluster.protocol import Frame, Kind

RESULT = serialization.dumps(None)
PAYLOAD = serialization.dumps_payload(lambda: None)


class EchoAgent:
    """An agent in this process: each RUN is answered with a RESULT on the loop's next turn."""

    def __init__(self, dispatcher: Dispatcher, worker: Worker):
        self.dispatcher, self.worker = dispatcher, worker
        self.loop = asyncio.get_running_loop()

    async def send(self, kind: Kind, task_id: int, payload) -> None:
        self.loop.call_soon(self.dispatcher.on_outcome, self.worker,
                            Frame(Kind.RESULT, task_id, RESULT))


def slots(dispatcher: Dispatcher, count: int, per_member: int = 4) -> list[Worker]:
    workers = []
    for first in range(0, count, per_member):
        member = Member(f"sim_{first}", str(first), f"vm-{first}", time.monotonic(),
                        address="10.0.0.1", state=MemberState.JOINED)
        for slot in range(min(per_member, count - first)):
            worker = Worker(first + slot + 1, member, slot + 1, concurrency=1,
                            state=WorkerState.IDLE)
            worker.free = asyncio.Semaphore(1)
            worker.agent = EchoAgent(dispatcher, worker)
            member.workers.append(worker)
            workers.append(worker)
    return workers


async def simulate(workers: int, tasks: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    dispatcher = Dispatcher(max_task_retries_on_lost_worker=3, hopeless=lambda: None,
                            spawn=loop.create_task, gate=Backpressure("sim", max_in_flight=256))
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    pool = slots(dispatcher, workers)
    feeders = [loop.create_task(dispatcher.feed(w, lambda w: True)) for w in pool]
    await asyncio.sleep(0)
    per_worker = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(
        before, "filename")) / workers
    tracemalloc.stop()
    all_done, remaining = asyncio.Event(), [tasks]

    def one_done(_) -> None:  # settled on this loop's thread (on_outcome)
        remaining[0] -= 1
        if not remaining[0]:
            all_done.set()

    started, cpu = time.perf_counter(), time.process_time()
    futures = []
    for _ in range(tasks):
        item = dispatcher.new_item(PAYLOAD, "sim")
        item.future.add_done_callback(one_done)
        dispatcher.enqueue(item)
        futures.append(item.future)
    await all_done.wait()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert all(f.result() is None for f in futures)
    for feeder in feeders:
        feeder.cancel()
    await asyncio.gather(*feeders, return_exceptions=True)
    return {"workers": workers, "tasks": tasks, "us_per_task_wall": wall / tasks * 1e6,
            "us_per_task_cpu": cpu / tasks * 1e6, "bytes_per_worker": per_worker}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 100, 1000])
    args = parser.parse_args()
    rows = [asyncio.run(simulate(n, args.tasks)) for n in args.workers]
    print(f"{'workers':>8} {'us/task wall':>13} {'us/task cpu':>12} {'bytes/worker':>13}")
    for row in rows:
        print(f"{row['workers']:8d} {row['us_per_task_wall']:13.1f} {row['us_per_task_cpu']:12.1f} "
              f"{row['bytes_per_worker']:13.0f}")
    write_results("dispatch_sim", {"args": vars(args), "rows": rows},
                  datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%S%z"))


if __name__ == "__main__":
    main()
