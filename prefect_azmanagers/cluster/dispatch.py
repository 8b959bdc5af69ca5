"""Dispatch: the work queue, feeding worker slots, turning result frames into outcomes, and the
re-queue policy for calls whose worker was lost. Futures are settled in one place (`settle`).
A `Backpressure` gate paces what is sent: at most its cap of calls in flight, none while the
API the calls report to is held (see api_probe.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Coroutine

import asyncssh

from prefect_azmanagers.cluster import serialization
from prefect_azmanagers.cluster.backpressure import Backpressure
from prefect_azmanagers.cluster.errors import exception_from_error
from prefect_azmanagers.cluster.members import Worker, WorkerState
from prefect_azmanagers.cluster.protocol import Frame, Kind, Payload
from prefect_azmanagers.exceptions import AzManagersError, PayloadError, WorkerLost

logger = logging.getLogger("prefect_azmanagers.cluster")

LARGE_PAYLOAD = 1 << 20  # results above this size are unpickled off the event loop


@dataclass(eq=False)
class WorkItem:
    """One submitted call, from `submit` to its future's outcome."""

    id: int
    payload: bytes | Payload
    future: concurrent.futures.Future
    label: str
    lost_attempts: int = 0
    worker: Worker | None = None
    # For one slot only (its setup): takes none of the slot's free threads (the agent runs
    # calls in order, so it goes ahead of the next one), and is cancelled, not re-queued, if lost.
    pinned: bool = False


class WorkQueue:
    """FIFO of work items; re-queued items go to the front. Lives on the cluster's loop."""

    def __init__(self) -> None:
        self._items: deque[WorkItem] = deque()
        self._waiters: deque[asyncio.Future] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: WorkItem, *, front: bool = False) -> None:
        (self._items.appendleft if front else self._items.append)(item)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def get(self) -> WorkItem:
        while True:
            while self._items:
                item = self._items.popleft()
                if not item.future.done():  # cancelled while queued
                    return item
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and self._items:
                    self.put(self._items.popleft(), front=True)  # pass the wake-up on
                raise

    def drain(self) -> list[WorkItem]:
        items, self._items = list(self._items), deque()
        return items


class Dispatcher:
    """Queue and outcomes of the calls submitted to one cluster.

    `hopeless()` says why no worker is left or coming (None while one is): queued calls then
    fail instead of waiting forever. `spawn` runs a coroutine as one of the cluster's tasks.
    """

    def __init__(self, *, max_task_retries_on_lost_worker: int,
                 hopeless: Callable[[], str | None],
                 spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task],
                 gate: Backpressure):
        self.max_task_retries_on_lost_worker = max_task_retries_on_lost_worker
        self.hopeless = hopeless
        self.spawn = spawn
        self.gate = gate
        self.queue = WorkQueue()
        self.items: dict[concurrent.futures.Future, WorkItem] = {}
        self.requeued = 0  # calls put back after losing their worker
        self.in_flight = 0  # calls sent to agents and not answered (pinned setups excluded)
        self._ids = itertools.count(1)

    def new_item(self, payload: bytes | Payload, label: str, *, pinned: bool = False) -> WorkItem:
        """Register a call (any thread); `enqueue` it on the loop (or `send_to` one slot)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        item = WorkItem(next(self._ids), payload, future, label, pinned=pinned)
        self.items[future] = item
        future.add_done_callback(lambda done: self.items.pop(done, None))
        return item

    def enqueue(self, item: WorkItem) -> None:
        if item.future.done():
            return
        self.queue.put(item)
        self.fail_if_hopeless()

    def fail_if_hopeless(self) -> None:
        """Fail the queued calls when no worker is left to run them and none is coming."""
        why = self.hopeless()
        if why is None:
            return
        for item in self.queue.drain():
            settle(item.future, exception=WorkerLost(
                f"{item.label}: no worker is left to run it and none is coming: {why}"))

    async def feed(self, worker: Worker, usable: Callable[[Worker], bool]) -> None:
        """Hand queued items to this slot whenever it has a free thread, while it is usable."""
        assert worker.free is not None and worker.agent is not None
        agent = worker.agent
        while usable(worker):
            await worker.free.acquire()
            while not self.gate.may_dispatch(self.in_flight):
                await asyncio.sleep(min(max(self.gate.wait_time(), 0.05), 1.0))
            item = await self.queue.get()
            if not usable(worker) or worker.agent is not agent:
                self.queue.put(item, front=True)
                worker.free.release()
                return
            item.worker = worker
            self.in_flight += 1
            worker.inflight[item.id] = item
            worker.state = WorkerState.BUSY
            worker.member.last_active = time.monotonic()
            try:
                await agent.send(Kind.RUN, item.id, item.payload)
            except (asyncssh.Error, OSError):
                return  # the channel closed: the exit callback re-queues the item

    async def send_to(self, worker: Worker, item: WorkItem) -> None:
        """Run a pinned item on this slot: its agent queues it before the calls sent after it."""
        assert worker.agent is not None
        item.worker = worker
        worker.inflight[item.id] = item
        worker.state = WorkerState.BUSY
        await worker.agent.send(Kind.RUN, item.id, item.payload)

    def on_outcome(self, worker: Worker, frame: Frame) -> None:
        """A RESULT or ERROR frame from this slot's agent."""
        item = worker.inflight.pop(frame.task_id, None)
        if item is None:
            logger.warning("worker %d answered call %d, which it was not running: ignored",
                           worker.id, frame.task_id)
            return  # the slot's free threads count only calls it runs
        self.in_flight -= not item.pinned
        if worker.free is not None and not item.pinned:
            worker.free.release()
        if not worker.inflight and worker.state == WorkerState.BUSY:
            worker.state = WorkerState.IDLE
        worker.member.last_active = time.monotonic()
        if not item.pinned:  # a setup is not a task, nor proof that the slot's agent works
            worker.tasks_run += 1
            worker.restarts = 0
        if item.future.done():
            return
        if frame.kind == Kind.ERROR:
            settle(item.future, exception=exception_from_error(
                frame.json(), f"worker {worker.id}, instance {worker.member.name}"))
        elif len(frame.body) > LARGE_PAYLOAD:
            self.spawn(_settle_large(item.future, frame.body))
        else:
            settle(item.future, **_unpickled(frame.body))

    def requeue(self, worker: Worker, reason: str, *, count_attempt: bool = True,
                then_check: bool = True) -> None:
        """The slot was lost: re-queue its calls at the front, or fail those past the bound;
        then fail the queue if hopeless (`then_check=False`: the caller checks once it has
        requested a replacement)."""
        items, worker.inflight = list(worker.inflight.values()), {}
        self.in_flight -= sum(not item.pinned for item in items)
        if items:
            logger.warning("%s lost while running %d call(s): %s", worker.where, len(items), reason)
        for item in reversed(items):
            if item.future.done():
                continue
            if item.pinned:
                item.future.cancel()
                continue
            item.lost_attempts += count_attempt
            item.worker = None
            if item.lost_attempts > self.max_task_retries_on_lost_worker:
                settle(item.future, exception=WorkerLost(
                    f"{item.label}: {worker.where} was lost while running it ({reason}). It had "
                    f"been re-queued {item.lost_attempts - 1} time(s) already, the bound set by "
                    f"max_task_retries_on_lost_worker={self.max_task_retries_on_lost_worker}. "
                    "Raise that bound, or check what kills the workers."))
            else:
                self.requeued += 1
                self.queue.put(item, front=True)
        if then_check:
            self.fail_if_hopeless()

    def cancel(self, items: list[WorkItem]) -> set[Worker]:
        """Cancel these calls; returns the slots that were running some of them."""
        running = {item.worker for item in items if item.worker is not None}
        for item in items:
            item.future.cancel()
        return running

    def cancel_everything(self) -> None:
        for item in list(self.items.values()):
            item.future.cancel()

    def fail_everything(self, exc: BaseException) -> None:
        """Fail every call, queued or in flight (whose late answers are then ignored)."""
        self.queue.drain()
        for item in list(self.items.values()):
            settle(item.future, exception=exc)


def settle(future: concurrent.futures.Future, *, result: Any = None,
           exception: BaseException | None = None) -> None:
    """Set a future's outcome unless it was cancelled meanwhile (from another thread)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _unpickled(body: bytes) -> dict[str, Any]:
    """`settle` keywords for a result body: its value, or why it cannot be unpickled."""
    try:
        return {"result": serialization.loads(body)}
    except Exception as exc:
        return {"exception": _unpickle_error(exc)}


async def _settle_large(future: concurrent.futures.Future, body: bytes) -> None:
    settle(future, **await asyncio.to_thread(_unpickled, body))


def _unpickle_error(exc: Exception) -> AzManagersError:
    return PayloadError(f"the result came back but cannot be unpickled on the driver: "
                        f"{type(exc).__name__}: {exc}")
