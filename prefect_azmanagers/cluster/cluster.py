"""AzureCluster: elastic remote execution of cloudpickled callables on scale-set instances.

```python
from prefect_azmanagers import AzureCluster

with AzureCluster("localcloud-small", 4, manifest="localcloud") as cluster:   # addprocs
    futures = [cluster.submit(lambda i=i: i * i) for i in range(100)]
    print(sum(f.result() for f in futures))
```

The cluster runs its own asyncio loop on a thread. `start()` grows the scale set by n in one
request and returns; a watcher lists the instances (VMs + NICs, with backoff), claims the new
ones, and joins each: SSH connection (host key pinned per vmId), wait for the boot script's
`ready`, forward the driver's ports, start `ppi` agent processes. Work is queued and handed to
any free slot as soon as one joins (elastic). A lost worker (agent died, SSH dropped, instance
deleted, spot eviction) has its in-flight items re-queued up to a bound; lost capacity can be
replaced. `close()` stops the agents and deletes the instances this cluster added in one call,
and the scale set if this cluster created it and it is empty; it also runs at interpreter exit
and on SIGTERM.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import email.utils
import enum
import itertools
import logging
import os
import signal
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import asyncssh

from prefect_azmanagers.cluster import mpi, serialization
from prefect_azmanagers.cluster.errors import exception_from_error
from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys
from prefect_azmanagers.cluster.mpi import DEFAULT_MPI_FLAGS
from prefect_azmanagers.cluster.progress import JoinProgress
from prefect_azmanagers.cluster.protocol import Frame, Kind, Payload
from prefect_azmanagers.cluster.transport import AgentProcess, InstanceConnection, agent_command
from prefect_azmanagers.customenv import (
    EnvironmentSpec,
    capture_environment,
    customenv_hook,
    env_python,
)
from prefect_azmanagers.exceptions import (
    AzManagersError,
    AzureError,
    BootFailed,
    ConfigurationError,
    HostKeyMismatch,
    JoinTimeout,
    WorkerLost,
)

if TYPE_CHECKING:
    from prefect_azmanagers.azure.clients import ArmClients
    from prefect_azmanagers.azure.scaleset import Instance, ScaleSet
    from prefect_azmanagers.blocks import AzureManifest, ScaleSetTemplate

T = TypeVar("T")
logger = logging.getLogger("prefect_azmanagers.cluster")
worker_logger = logging.getLogger("prefect_azmanagers.worker")

DEFAULT_IMDS_URL = "http://169.254.169.254"
LARGE_PAYLOAD = 1 << 20  # results above this size are unpickled off the event loop
AGENT_HELLO_TIMEOUT = 120.0
DRAIN_MARGIN = 5.0  # seconds before a Preempt's NotBefore by which in-flight work is re-queued
MAX_AGENT_RESTARTS = 5  # consecutive restarts of one slot without a completed call


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # its instance got a Preempt: no new work
    LOST = "lost"
    STOPPED = "stopped"


@dataclass(frozen=True)
class WorkerInfo:
    """A snapshot of one worker slot (what `AzureCluster.workers` returns)."""

    id: int
    instance: str
    ip: str
    slot: int
    state: str
    preempted: bool
    tasks_run: int
    pid: int | None  # the agent process on the instance (changes when the slot restarts)


def log_worker_output(worker: WorkerInfo, stream: str, line: str) -> None:
    """The default output handler: `From worker N: line` on logger prefect_azmanagers.worker.

    Both streams log at INFO: libraries (Prefect included) log to stderr in normal operation.
    """
    worker_logger.info("From worker %d: %s", worker.id, line)


@dataclass(eq=False)
class _WorkItem:
    id: int
    payload: bytes | Payload
    future: concurrent.futures.Future
    label: str
    lost_attempts: int = 0
    worker: "_Worker | None" = None


class _WorkQueue:
    """FIFO of work items; re-queued items go to the front. Lives on the cluster's loop."""

    def __init__(self) -> None:
        self._items: deque[_WorkItem] = deque()
        self._waiters: deque[asyncio.Future] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: _WorkItem, *, front: bool = False) -> None:
        (self._items.appendleft if front else self._items.append)(item)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def get(self) -> _WorkItem:
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

    def drain(self) -> list[_WorkItem]:
        items, self._items = list(self._items), deque()
        return items


@dataclass(eq=False)
class _Member:
    """An instance this cluster added, from claim to removal."""

    name: str
    instance_id: str
    vm_id: str
    requested_at: float
    address: str | None = None
    provisioning_state: str = "Creating"
    power_state: str | None = None
    state: str = "joining"  # joining | joined | draining | removing | gone
    conn: InstanceConnection | None = None
    workers: list["_Worker"] = field(default_factory=list)
    preempted: bool = False
    failure: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task] = field(default_factory=set)


@dataclass(eq=False)
class _Worker:
    id: int
    member: _Member
    slot: int
    concurrency: int
    state: WorkerState = WorkerState.STARTING
    agent: AgentProcess | None = None
    generation: int = 0
    pid: int | None = None
    pgid: int | None = None
    inflight: dict[int, _WorkItem] = field(default_factory=dict)
    tasks_run: int = 0
    restarts: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    hello: asyncio.Future | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    free: asyncio.Semaphore | None = None
    feeder: asyncio.Task | None = None
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    command: str = ""

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.id, self.member.name, self.member.address or "", self.slot,
                          self.state.value, self.member.preempted, self.tasks_run, self.pid)


class AzureCluster:
    """Workers on the instances of a scale set, running cloudpickled callables over SSH.

    Args:
        template: a ScaleSetTemplate block or the name of one.
        n: instances to add (each runs `ppi` worker slots).
        manifest: an AzureManifest block or the name of one.
        ppi: agent processes (worker slots) per instance.
        group: the scale set's name (created if missing, then deleted when empty at close).
        spot, max_price, spot_base_regular_priority_count, spot_regular_percentage_above_base:
            spot instances and priority mix, as AzManagers' `addprocs`.
        customenv: build the driver's Python environment on the instances at boot: True
            captures it at start; an `EnvironmentSpec` (`capture_environment()`) is reused.
        mpi_ranks_per_worker, mpi_flags: each slot runs `mpirun -n K <flags>` agents.
        env: environment variables of the worker processes (values are quoted, not secrets).
        os_disk_size, image_name, image_version: template overrides.
        join_timeout: seconds an instance may take from request to joined; `waitfor` deadline.
        max_task_retries_on_lost_worker: times an item is re-queued after losing its worker.
        replace_lost_workers: grow the scale set again for instances lost or failed.
        max_replacements: bound on such replacements (default 2 * n).
        waitfor: `start()` blocks until n * ppi workers joined (JoinTimeout otherwise).
        forward_ports: driver loopback TCP ports made reachable on every instance's loopback.
        progress: show a rich progress bar of the joins.
        concurrency: callables one slot runs at once (threads in the agent).
        heartbeat_timeout: seconds without any frame from a busy agent before it counts as lost.
        imds_url: where spot agents poll scheduled events.
    """

    def __init__(self, template: str | ScaleSetTemplate, n: int, *,
                 manifest: str | AzureManifest = "default", ppi: int = 1, group: str = "azm",
                 spot: bool = False, max_price: float = -1,
                 spot_base_regular_priority_count: int = 0,
                 spot_regular_percentage_above_base: int = 0,
                 customenv: bool | EnvironmentSpec = False,
                 mpi_ranks_per_worker: int = 0, mpi_flags: str = DEFAULT_MPI_FLAGS,
                 env: dict[str, str] | None = None, os_disk_size: int | None = None,
                 image_name: str | None = None, image_version: str | None = None,
                 join_timeout: float = 720.0, max_task_retries_on_lost_worker: int = 3,
                 replace_lost_workers: bool = True, max_replacements: int | None = None,
                 waitfor: bool = False, forward_ports: Sequence[int] = (), progress: bool = True,
                 concurrency: int = 1, heartbeat_timeout: float = 300.0,
                 imds_url: str = DEFAULT_IMDS_URL):
        if n < 0:
            raise ConfigurationError(f"n must be >= 0 (instances to add), got {n}")
        if ppi < 1 or concurrency < 1:
            raise ConfigurationError(f"ppi and concurrency must be >= 1, got {ppi} and {concurrency}")
        if join_timeout <= 0:
            raise ConfigurationError(f"join_timeout must be positive, got {join_timeout}")
        for port in forward_ports:
            if not 0 < int(port) < 65536:
                raise ConfigurationError(f"forward_ports: {port} is not a TCP port")
        self.template = template
        self.n = n
        self.manifest = manifest
        self.ppi = ppi
        self.group = group
        self.spot = spot
        self.max_price = max_price
        self.spot_base_regular_priority_count = spot_base_regular_priority_count
        self.spot_regular_percentage_above_base = spot_regular_percentage_above_base
        self.customenv = customenv
        self.mpi_ranks_per_worker = mpi_ranks_per_worker
        self.mpi_flags = mpi_flags
        self.env = dict(env or {})
        self.os_disk_size = os_disk_size
        self.image_name = image_name
        self.image_version = image_version
        self.join_timeout = join_timeout
        self.max_task_retries_on_lost_worker = max_task_retries_on_lost_worker
        self.replace_lost_workers = replace_lost_workers
        self.max_replacements = 2 * n if max_replacements is None else max_replacements
        self.waitfor = waitfor
        self.forward_ports = tuple(int(p) for p in forward_ports)
        self.progress = progress
        self.concurrency = concurrency
        self.heartbeat_timeout = heartbeat_timeout
        self.imds_url = imds_url
        self.output_handler: Callable[[WorkerInfo, str, str], None] = log_worker_output
        self.cluster_id = uuid.uuid4().hex[:12]

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._item_ids = itertools.count(1)
        self._worker_ids = itertools.count(1)
        self._items: dict[concurrent.futures.Future, _WorkItem] = {}
        self._members: dict[str, _Member] = {}
        self._foreign: set[str] = set()  # instances of the scale set that are not ours
        self._unclaimed: deque[float] = deque()  # request times of instances not yet seen
        self._growing = 0  # _grow calls whose request is not sent yet
        self._last_join_failure: str | None = None
        self._discard_on_arrival = 0
        self._replacements_left = self.max_replacements
        self._provisioning_error: AzManagersError | None = None
        self._closing = False
        self._scaleset: ScaleSet | None = None
        self._clients: ArmClients | None = None
        self._progress: JoinProgress | None = None
        self._tasks: set[asyncio.Task] = set()
        self._removals: set[asyncio.Task] = set()
        self._t0 = time.monotonic()

    # -- public API (any thread) -------------------------------------------------------------

    def start(self) -> "AzureCluster":
        """Begin provisioning (returns at once; with `waitfor`, blocks until all workers joined).

        Raises JoinTimeout (after deleting what it created) if `waitfor` and the workers did
        not join within `join_timeout`.
        """
        if self._started:
            return self
        if self._closed:
            raise AzManagersError("this cluster was closed; create a new AzureCluster")
        self._started = True
        self._t0 = time.monotonic()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="azm-cluster",
                                        daemon=True)
        self._thread.start()
        _open_clusters.add(self)
        _install_exit_handlers()
        try:
            self._call(self._start())
            if self.waitfor:
                self.wait_for_workers(self.n * self.ppi, self.join_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_for_workers(self, count: int | None = None, timeout: float | None = None) -> None:
        """Block until `count` workers (default n * ppi) joined; JoinTimeout after `timeout` s."""
        self._require_started()
        count = self.n * self.ppi if count is None else count
        self._call(self._wait_for_workers(count, self.join_timeout if timeout is None else timeout))

    def submit(self, fn: Callable[[], T], *, label: str = "",
               payload: bytes | None = None) -> concurrent.futures.Future[T]:
        """Run `fn()` (or the cloudpickled callable `payload`) on a free worker slot.

        Returns at once. The future holds the return value or the exception raised on the
        worker (its remote traceback attached), WorkerLost when its workers kept being lost,
        or PayloadError when `fn` cannot be pickled (raised here, at once).
        """
        self._require_started()
        if self._closing:
            raise AzManagersError("this cluster is closing; no new work is accepted")
        label = label or getattr(fn, "__qualname__", None) or type(fn).__qualname__
        if payload is None:
            payload = serialization.dumps_payload(fn, what=f"callable {label!r}")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        item = _WorkItem(next(self._item_ids), payload, future, label)
        self._items[future] = item
        future.add_done_callback(self._forget_item)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._enqueue, item)
        return future

    def cancel(self, future: concurrent.futures.Future) -> None:
        """Cancel a submitted call; if it is running, its agent process is killed (and the
        slot restarted), so the remote work stops."""
        item = self._items.get(future)
        if item is None or self._loop is None or self._closed:
            future.cancel()
            return
        self._call(self._cancel([item]))

    def cancel_all(self) -> None:
        """Cancel every queued and running call (running ones stop: their agents are killed)."""
        if self._loop is None or self._closed:
            return
        self._call(self._cancel(list(self._items.values())))

    def scale(self, n: int) -> None:
        """Grow to or shrink to `n` instances (a shrink deletes instances in one request)."""
        self._require_started()
        if n < 0:
            raise ConfigurationError(f"scale(n) needs n >= 0, got {n}")
        self._call(self._scale(n))

    @property
    def workers(self) -> list[WorkerInfo]:
        """The worker slots that joined and are not removed."""
        return [w.info() for m in list(self._members.values()) for w in list(m.workers)
                if w.state not in (WorkerState.STOPPED,)]

    def close(self) -> None:
        """Stop the agents, delete the instances this cluster added (one request) and the scale
        set if this cluster created it and it is empty. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _open_clusters.discard(self)
        if self._loop is None:
            return
        if threading.current_thread() is self._thread:  # e.g. from an output handler
            self._loop.create_task(self._close()).add_done_callback(
                lambda _: self._loop.call_soon(self._loop.stop))
            return
        try:
            if self._loop.is_running():
                self._wait_closed(asyncio.run_coroutine_threadsafe(self._close(), self._loop))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(30)
            self._loop.close()

    def _wait_closed(self, closing: concurrent.futures.Future) -> None:
        """Wait for the teardown; a first Ctrl-C does not abandon it (instances would leak)."""
        interrupted = False
        while True:
            try:
                closing.result()
                return
            except KeyboardInterrupt:
                if interrupted:
                    logger.error("cleanup abandoned: run `prefect-azmanagers cleanup` to delete "
                                 "what cluster %s left behind", self.cluster_id)
                    raise
                interrupted = True
                logger.warning("still deleting the instances of cluster %s; press Ctrl-C again "
                               "to abandon the cleanup", self.cluster_id)

    def __enter__(self) -> "AzureCluster":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"AzureCluster({self.group!r}, n={self.n}, ppi={self.ppi}, "
                f"workers={len(self.workers)}, id={self.cluster_id})")

    # -- plumbing --------------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._started or self._closed:
            raise AzManagersError("the cluster is not running: call start() (or use `with`) first")

    def _call(self, coro: Any) -> Any:
        """Run a coroutine on the cluster's loop and wait; an interrupt cancels it."""
        assert self._loop is not None
        if threading.current_thread() is self._thread:
            coro.close()
            raise AzManagersError("AzureCluster methods cannot be called from its own event loop")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _spawn(self, coro: Any, owner: set[asyncio.Task] | None = None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        for tasks in (self._tasks, owner) if owner is not None else (self._tasks,):
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        task.add_done_callback(_log_task_failure)
        return task

    def _forget_item(self, future: concurrent.futures.Future) -> None:
        self._items.pop(future, None)

    # -- provisioning ----------------------------------------------------------------------

    async def _start(self) -> None:
        from prefect_azmanagers.azure.bootscript import boot_script, encode_custom_data
        from prefect_azmanagers.azure.clients import ArmClients
        from prefect_azmanagers.azure.ownership import ownership_tags
        from prefect_azmanagers.azure.scaleset import ScaleSet
        from prefect_azmanagers.blocks import aload_manifest, aload_scaleset_template

        self._manifest: AzureManifest = await aload_manifest(self.manifest)
        self._template: ScaleSetTemplate = await aload_scaleset_template(self.template)
        os_profile = self._template.value["properties"]["virtualMachineProfile"]["osProfile"]
        self._admin = self._manifest.ssh_user or os_profile["adminUsername"]
        self._client_key = asyncssh.import_private_key(self._manifest.read_private_key())
        self._host_keys = PinnedHostKeys(self._manifest.known_hosts_path())
        self._python = self._agent_python()
        self._launcher = self._agent_launcher()
        script = boot_script(admin_username=self._admin, tempdisk=self._template.tempdisk,
                             env=self.env, hooks=self._boot_hooks())
        self._clients = ArmClients(
            self._manifest, subscription_id=self._template.subscription_id or None)
        self._scaleset = ScaleSet(
            self._clients, self._manifest, self._template, self.group,
            custom_data=encode_custom_data(script), tags=ownership_tags(self.cluster_id),
            spot=self.spot, max_price=self.max_price,
            spot_base_regular_priority_count=self.spot_base_regular_priority_count,
            spot_regular_percentage_above_base=self.spot_regular_percentage_above_base,
            os_disk_size=self.os_disk_size, image_name=self.image_name,
            image_version=self.image_version)
        self._queue = _WorkQueue()
        self._membership_changed = asyncio.Event()
        self._wake_watcher = asyncio.Event()
        self._progress = JoinProgress(self.n * self.ppi, show=self.progress)
        self._foreign = {i.name for i in await self._scaleset.instances()}
        if self.n:
            await self._grow(self.n)
        self._spawn(self._watch_instances())

    # Seams for customenv and MPI (their owners extend these three methods).
    def _boot_hooks(self) -> list[str]:
        if not self.customenv:
            return []
        spec = self.customenv if isinstance(self.customenv, EnvironmentSpec) else capture_environment()
        return [customenv_hook(spec, admin_username=self._admin, python=self._manifest.python)]

    def _agent_python(self) -> str:
        return env_python(self._admin) if self.customenv else self._manifest.python

    def _agent_launcher(self) -> list[str]:
        if not self.mpi_ranks_per_worker:
            return []
        if self.concurrency != 1:
            raise ConfigurationError("mpi_ranks_per_worker needs concurrency=1: every call runs "
                                     "on all ranks of a worker, one call at a time")
        return mpi.launcher(self.mpi_ranks_per_worker, self.mpi_flags)

    async def _grow(self, count: int) -> None:
        now = time.monotonic()
        self._unclaimed.extend([now] * count)
        self._growing += 1  # claimed, not yet among the scale set's pending grows
        try:
            await self._scaleset.grow(count)
        except BaseException:
            for _ in range(count):
                self._unclaimed.pop()
            raise
        finally:
            self._growing -= 1
        self._wake_watcher.set()

    async def _watch_instances(self) -> None:
        """List the scale set's instances; claim new ones, notice failed and vanished ones."""
        delay = 1.0
        while not self._closing:
            # A listing that starts when no grow is pending shows every instance requested
            # before it: claims older than it will never be met (their grow failed).
            settled = self._no_grow_pending()
            listed_at = time.monotonic()
            failure: AzureError | None = None
            try:
                instances = await self._scaleset.instances()
            except AzureError as exc:
                # Either a grow failed (raised once: the next listing works) or listing itself
                # fails.
                failure = exc
                try:
                    instances = await self._scaleset.instances()
                except Exception as again:
                    logger.warning("listing the instances of %s failed: %s", self.group, again)
                    instances = None
            except Exception as exc:  # network trouble listing: keep trying with backoff
                logger.warning("listing the instances of %s failed: %s", self.group, exc)
                instances = None
            if instances is not None:
                self._reconcile(instances)
                if settled:
                    self._drop_claims_before(listed_at, "will not come: their grow ended without them")
            if failure is not None:
                self._provisioning_failed(failure)
            self._check_heartbeats()
            busy = self._unclaimed or any(m.state == "joining" for m in self._members.values())
            delay = 1.0 if busy else min(delay * 2, 10.0)
            self._wake_watcher.clear()
            try:
                await asyncio.wait_for(self._wake_watcher.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def _reconcile(self, instances: list[Instance]) -> None:
        self._drop_claims_before(time.monotonic() - self.join_timeout,
                                 "never appeared within join_timeout")
        seen = set()
        for inst in instances:
            seen.add(inst.name)
            member = self._members.get(inst.name)
            if member is None:
                if inst.name in self._foreign:
                    continue
                if not self._unclaimed:
                    self._foreign.add(inst.name)
                    continue
                member = _Member(inst.name, inst.instance_id, inst.vm_id, self._unclaimed.popleft())
                self._members[inst.name] = member
                if self._discard_on_arrival:
                    self._discard_on_arrival -= 1
                    self._spawn(self._remove([member], "scaled down"))
                    continue
                self._spawn(self._join(member), member.tasks)
            member.power_state = inst.power_state
            if (inst.private_ip, inst.provisioning_state) != (member.address, member.provisioning_state):
                member.address = inst.private_ip
                member.provisioning_state = inst.provisioning_state
                member.changed.set()
        for member in list(self._members.values()):
            if member.name not in seen and member.state not in ("gone", "removing"):
                self._spawn(self._lose_instance(member, "the instance was deleted or evicted"))

    def _no_grow_pending(self) -> bool:
        """Every grow requested so far has finished: a listing started now shows all it made."""
        return not self._growing and not self._scaleset.pending_grows

    def _drop_claims_before(self, moment: float, why: str) -> None:
        """Claims made before `moment` will not be met: forget them, then fail the queue if no
        worker is left or coming."""
        dropped = 0
        while self._unclaimed and self._unclaimed[0] < moment:
            self._unclaimed.popleft()
            dropped += 1
        if dropped:
            logger.warning("%d requested instance(s) of %s %s", dropped, self.group, why)
            self._fail_queue_if_hopeless()
            self._membership_changed.set()

    def _provisioning_failed(self, exc: AzManagersError) -> None:
        """A grow failed (e.g. AllocationFailed): the watcher drops the claims it will not
        meet once no grow is pending (claims of other grows stay, or their instances would
        be taken for someone else's and outlive the cluster)."""
        logger.error("provisioning scale set %s failed: %s", self.group, exc)
        self._provisioning_error = exc
        self._wake_watcher.set()
        self._fail_queue_if_hopeless()
        self._membership_changed.set()

    def _fail_queue_if_hopeless(self) -> None:
        if self._unclaimed or any(m.state in ("joining", "joined") for m in self._members.values()):
            return
        why = self._provisioning_error or AzManagersError(
            self._last_join_failure or "no instance could join")
        for item in self._queue.drain():
            _settle(item.future, exception=WorkerLost(
                f"{item.label}: no worker is left to run it and none is coming: {why}"))

    # -- joining -----------------------------------------------------------------------------

    async def _join(self, member: _Member) -> None:
        remaining = member.requested_at + self.join_timeout - time.monotonic()
        try:
            await asyncio.wait_for(self._bring_up(member), max(remaining, 1.0))
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            reason = (f"did not join within {self.join_timeout:.0f} s (provisioning state "
                      f"{member.provisioning_state}, address {member.address or 'none yet'})")
            await self._join_failed(member, reason)
        except (HostKeyMismatch, ConfigurationError) as exc:  # another instance fares no better
            await self._join_failed(member, str(exc), replace=False)
        except (BootFailed, asyncssh.Error, OSError) as exc:
            await self._join_failed(member, str(exc))

    async def _bring_up(self, member: _Member) -> None:
        from prefect_azmanagers.azure.bootscript import READY_STATUS_PATH

        while member.provisioning_state != "Succeeded" or not member.address:
            if member.provisioning_state.lower() == "failed":
                raise BootFailed(f"instance {member.name}: provisioning failed")
            member.changed.clear()
            await member.changed.wait()
        member.conn = await self._connect(member, retry=True)
        status_path = READY_STATUS_PATH.format(admin=self._admin)
        while True:
            result = await member.conn.run(f"cat {status_path} 2>/dev/null", timeout=60)
            status = str(result.stdout or "").strip()
            if status == "ready":
                break
            if status.startswith("failed"):
                raise BootFailed(f"instance {member.name}: boot script {status}")
            await asyncio.sleep(1.0)
        if self.forward_ports:
            await member.conn.forward_ports(self.forward_ports)
        member.workers = [_Worker(next(self._worker_ids), member, slot, self.concurrency)
                          for slot in range(1, self.ppi + 1)]
        await asyncio.gather(*(self._start_agent(w) for w in member.workers))
        member.state = "joined"
        self._announce_joined(member)

    def _announce_joined(self, member: _Member) -> None:
        # An instance's workers join together; their lines count up one by one ("3/4", "4/4")
        joined = self._joined_count()
        count = joined - sum(w.state in (WorkerState.IDLE, WorkerState.BUSY) for w in member.workers)
        for worker in member.workers:
            count = min(count + 1, joined)
            self._progress.worker_joined(worker.id, member.name, member.address or "",
                                         worker.slot, time.monotonic() - self._t0, count)
        self._membership_changed.set()

    async def _connect(self, member: _Member, *, retry: bool) -> InstanceConnection:
        """SSH to the instance; with `retry`, keep trying while sshd is not up yet."""
        while True:
            try:
                return await InstanceConnection.open(
                    member.address, port=self._manifest.ssh_port, username=self._admin,
                    client_key=self._client_key, vm_id=member.vm_id, host_keys=self._host_keys,
                    on_lost=partial(self._connection_lost, member))
            except HostKeyMismatch:
                raise
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
                if not retry:
                    raise
                logger.debug("instance %s not reachable yet: %s", member.name, exc)
                await asyncio.sleep(1.0)

    async def _start_agent(self, worker: _Worker) -> None:
        """Start the slot's agent; a start overtaken by another one (a reconnect racing a
        restart) closes the agent it made and leaves the slot to the newer start."""
        member = worker.member
        assert member.conn is not None
        if worker.feeder is not None and worker.feeder is not asyncio.current_task():
            worker.feeder.cancel()  # at most one feeder per slot, bound to the current agent
        if worker.hello is not None and not worker.hello.done():
            worker.hello.set_result(None)  # wakes an older start: it sees it was overtaken
        worker.generation += 1
        generation = worker.generation
        worker.state = WorkerState.STARTING
        hello = worker.hello = asyncio.get_running_loop().create_future()
        worker.exited = asyncio.Event()
        command = agent_command(
            self._python, worker_id=worker.id, concurrency=worker.concurrency, env=self.env,
            imds_url=self.imds_url if self.spot and worker.slot == 1 else None,
            launcher=self._launcher)
        worker.command = command
        worker.stderr_tail.clear()
        agent = await member.conn.start_agent(
            command, on_frame=partial(self._on_frame, worker, generation),
            on_stderr=partial(self._on_stderr, worker),
            on_exit=partial(self._on_agent_exit, worker, generation))
        if generation == worker.generation:
            worker.agent = agent
            started = await asyncio.wait_for(asyncio.shield(hello), AGENT_HELLO_TIMEOUT)
        if generation != worker.generation:
            agent.close()  # its exit callback carries a stale generation: ignored
            return
        worker.pid, worker.pgid = started.get("pid"), started.get("pgid")
        worker.last_seen = time.monotonic()
        worker.free = asyncio.Semaphore(worker.concurrency)
        worker.state = WorkerState.IDLE
        worker.feeder = self._spawn(self._feed(worker), member.tasks)

    async def _join_failed(self, member: _Member, reason: str, *, replace: bool = True) -> None:
        tail = await self._boot_tail(member)
        member.failure = f"{reason}\n{tail}"
        self._last_join_failure = f"instance {member.name} did not join: {reason}"
        logger.warning("instance %s did not join: %s\n%s", member.name, reason, tail)
        await self._remove([member], reason)
        if replace:
            await self._replace(1, f"instance {member.name} did not join")
        self._fail_queue_if_hopeless()
        self._membership_changed.set()

    async def _boot_tail(self, member: _Member) -> str:
        from prefect_azmanagers.azure.bootscript import boot_log_tail

        try:
            if member.conn is not None:
                return await asyncio.wait_for(
                    boot_log_tail(member.conn.ssh, admin_username=self._admin), 30)
            if member.address:
                pinned = self._host_keys.get(member.vm_id)
                return await asyncio.wait_for(boot_log_tail(
                    member.address, admin_username=self._admin, manifest=self._manifest,
                    host_key=pinned.export_public_key().decode() if pinned else None), 30)
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            return f"(boot log unavailable: {exc})"
        return f"(no boot log: the instance never got an address; state {member.provisioning_state})"

    async def _wait_for_workers(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._joined_count() < count:
            remaining = deadline - time.monotonic()
            hopeless = not self._unclaimed and not any(
                m.state == "joining" for m in self._members.values())
            if remaining <= 0 or hopeless:
                raise JoinTimeout(await self._join_report(count, timeout))
            self._membership_changed.clear()
            try:
                await asyncio.wait_for(self._membership_changed.wait(), min(remaining, 5.0))
            except asyncio.TimeoutError:
                pass

    def _joined_count(self) -> int:
        return sum(1 for m in self._members.values() if m.state == "joined"
                   for w in m.workers if w.state in (WorkerState.IDLE, WorkerState.BUSY))

    async def _join_report(self, count: int, timeout: float) -> str:
        lines = [f"{self._joined_count()} of {count} workers joined within {timeout:.0f} s "
                 f"(scale set {self.group})."]
        for member in self._members.values():
            if member.state == "joining":
                lines.append(f"- instance {member.name} ({member.address or 'no address'}) has "
                             f"not joined; state {member.provisioning_state}.\n"
                             + await self._boot_tail(member))
            elif member.failure:
                lines.append(f"- instance {member.name}: {member.failure}")
        if self._unclaimed:
            lines.append(f"- {len(self._unclaimed)} requested instances never appeared in the scale set.")
        if self._provisioning_error:
            lines.append(f"- provisioning failed: {self._provisioning_error}")
        lines.append("Raise join_timeout if instances boot slowly, or fix the boot failure shown.")
        return "\n".join(lines)

    # -- dispatch ----------------------------------------------------------------------------

    def _enqueue(self, item: _WorkItem) -> None:
        if item.future.done():
            return
        self._queue.put(item)
        self._fail_queue_if_hopeless()

    def _usable(self, worker: _Worker) -> bool:
        return (not self._closing and worker.state in (WorkerState.IDLE, WorkerState.BUSY)
                and worker.member.state in ("joining", "joined"))

    async def _feed(self, worker: _Worker) -> None:
        """Hand queued items to this slot whenever it has a free thread."""
        assert worker.free is not None and worker.agent is not None
        agent = worker.agent
        while self._usable(worker):
            await worker.free.acquire()
            item = await self._queue.get()
            if not self._usable(worker) or worker.agent is not agent:
                self._queue.put(item, front=True)
                worker.free.release()
                return
            item.worker = worker
            worker.inflight[item.id] = item
            worker.state = WorkerState.BUSY
            try:
                await agent.send(Kind.RUN, item.id, item.payload)
            except (asyncssh.Error, OSError):
                return  # the channel closed: the exit callback re-queues the item

    def _on_frame(self, worker: _Worker, generation: int, frame: Frame) -> None:
        if generation != worker.generation:
            return
        worker.last_seen = time.monotonic()
        kind = frame.kind
        if kind in (Kind.RESULT, Kind.ERROR):
            item = worker.inflight.pop(frame.task_id, None)
            if item is None:
                logger.warning("worker %d answered call %d, which it was not running: ignored",
                               worker.id, frame.task_id)
                return  # the slot's free threads count only calls it runs
            if worker.free is not None:
                worker.free.release()
            if not worker.inflight and worker.state == WorkerState.BUSY:
                worker.state = WorkerState.IDLE
            worker.tasks_run += 1
            worker.restarts = 0
            if item.future.done():
                return
            if kind == Kind.ERROR:
                _settle(item.future, exception=exception_from_error(
                    frame.json(), f"worker {worker.id}, instance {worker.member.name}"))
            elif len(frame.body) > LARGE_PAYLOAD:
                self._spawn(self._settle_large(item, frame.body))
            else:
                _settle_result(item.future, frame.body)
        elif kind == Kind.OUTPUT:
            message = frame.json()
            self._emit_output(worker, message["stream"], message["line"])
        elif kind == Kind.HELLO and worker.hello is not None and not worker.hello.done():
            worker.hello.set_result(frame.json())
        elif kind == Kind.PREEMPT:
            self._spawn(self._drain(worker.member, frame.json()))

    async def _settle_large(self, item: _WorkItem, body: bytes) -> None:
        try:
            value = await asyncio.to_thread(serialization.loads, body)
        except Exception as exc:
            _settle(item.future, exception=_unpickle_error(exc))
        else:
            _settle(item.future, result=value)

    def _on_stderr(self, worker: _Worker, line: str) -> None:
        worker.stderr_tail.append(line)
        self._emit_output(worker, "stderr", line)

    def _emit_output(self, worker: _Worker, stream: str, line: str) -> None:
        try:
            self.output_handler(worker.info(), stream, line)
        except Exception:
            logger.exception("the output handler failed")

    # -- failures ------------------------------------------------------------------------------

    def _on_agent_exit(self, worker: _Worker, generation: int, reason: str) -> None:
        if generation != worker.generation:
            return
        worker.exited.set()
        if worker.state in (WorkerState.LOST, WorkerState.STOPPED) or self._closing:
            worker.state = WorkerState.STOPPED if self._closing else worker.state
            return
        if worker.hello is not None and not worker.hello.done():
            tail = "\n".join(worker.stderr_tail) or "(nothing on stderr)"
            worker.hello.set_exception(BootFailed(
                f"the agent on instance {worker.member.name} exited before it started: {reason}. "
                f"Command: {worker.command}\nIts stderr:\n{tail}"))
            return
        self._worker_lost(worker, reason)
        self._schedule_restart(worker)

    def _worker_lost(self, worker: _Worker, reason: str, *, count_attempt: bool = True) -> None:
        """Mark a slot lost and re-queue (or fail, past the bound) what it was running."""
        worker.state = WorkerState.LOST
        worker.generation += 1  # late frames of the dead agent are ignored
        if worker.feeder is not None and worker.feeder is not asyncio.current_task():
            worker.feeder.cancel()
        items, worker.inflight = list(worker.inflight.values()), {}
        where = f"worker {worker.id} (instance {worker.member.name}, {worker.member.address})"
        if items:
            logger.warning("%s lost while running %d call(s): %s", where, len(items), reason)
        for item in reversed(items):
            if item.future.done():
                continue
            item.lost_attempts += count_attempt
            item.worker = None
            if item.lost_attempts > self.max_task_retries_on_lost_worker:
                _settle(item.future, exception=WorkerLost(
                    f"{item.label}: {where} was lost while running it ({reason}). It had been "
                    f"re-queued {item.lost_attempts - 1} time(s) already, the bound set by "
                    f"max_task_retries_on_lost_worker={self.max_task_retries_on_lost_worker}. "
                    "Raise that bound, or check what kills the workers."))
            else:
                self._queue.put(item, front=True)
        self._fail_queue_if_hopeless()

    def _schedule_restart(self, worker: _Worker) -> None:
        if worker.member.state == "joined":
            self._spawn(self._restart_slot(worker, worker.generation), worker.member.tasks)

    async def _restart_slot(self, worker: _Worker, lost_generation: int) -> None:
        """Start a new agent in a slot whose agent died, on the same connection if it lives,
        unless something else (a reconnect) has restarted the slot since it was lost."""
        worker.restarts += 1
        if worker.restarts > MAX_AGENT_RESTARTS:
            logger.error("worker %d: agent died %d times in a row; the slot is given up",
                         worker.id, worker.restarts - 1)
            self._progress.update(self._joined_count())
            return
        await asyncio.sleep(0.2)  # a dropped connection is noticed before reusing it
        if (worker.generation != lost_generation or worker.member.state != "joined"
                or worker.member.conn is None):
            return
        try:
            await self._start_agent(worker)
        except (asyncssh.Error, OSError, asyncio.TimeoutError, BootFailed) as exc:
            logger.warning("worker %d: agent restart failed (%s)", worker.id, exc)

    def _connection_lost(self, member: _Member, exc: Exception | None) -> None:
        if self._closing or member.state not in ("joined", "joining"):
            return
        if member.state == "joining":
            return  # the join task sees its own failure
        assert self._loop is not None
        self._loop.call_soon(lambda: self._spawn(self._reconnect(member, exc)))

    async def _reconnect(self, member: _Member, exc: Exception | None) -> None:
        """The SSH connection dropped: lose its slots, then reconnect and restart them, or
        treat the instance as gone."""
        reason = f"the SSH connection dropped ({exc or 'closed by the instance'})"
        member.state = "joining"
        for worker in member.workers:
            if worker.state not in (WorkerState.LOST, WorkerState.STOPPED):
                self._worker_lost(worker, reason)
        self._progress.update(self._joined_count())
        member.conn = None
        for attempt in range(5):
            if self._closing or member.state != "joining":
                return
            if member.power_state in ("stopped", "deallocated", "deallocating", "stopping"):
                await self._lose_instance(member, f"{reason}; the instance is {member.power_state}")
                return
            try:
                member.conn = await self._connect(member, retry=False)
                break
            except HostKeyMismatch as mismatch:
                await self._lose_instance(member, str(mismatch))
                return
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as error:
                logger.info("instance %s: reconnect attempt %d failed: %s", member.name, attempt + 1, error)
                await asyncio.sleep(2.0 * (attempt + 1))
        else:
            await self._lose_instance(member, f"{reason}, and reconnecting failed")
            return
        if self.forward_ports:
            try:
                await member.conn.forward_ports(self.forward_ports)
            except ConfigurationError as exc:
                await self._lose_instance(member, str(exc))
                return
        for worker in member.workers:
            worker.restarts = 0
        starts = await asyncio.gather(*(self._start_agent(w) for w in member.workers),
                                      return_exceptions=True)
        for worker, outcome in zip(member.workers, starts):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                logger.warning("worker %d: agent start after the reconnect failed (%s)", worker.id, outcome)
        member.state = "joined"
        self._announce_joined(member)

    async def _lose_instance(self, member: _Member, reason: str) -> None:
        """An instance is gone (deleted, evicted, unreachable): re-queue, delete, replace."""
        if member.state in ("gone", "removing"):
            return
        for worker in member.workers:
            if worker.state not in (WorkerState.LOST, WorkerState.STOPPED):
                self._worker_lost(worker, reason)
        logger.warning("instance %s lost: %s", member.name, reason)
        await self._remove([member], reason)
        await self._replace(1, f"instance {member.name} was lost")
        self._fail_queue_if_hopeless()

    async def _drain(self, member: _Member, event: dict) -> None:
        """A Preempt for this instance: stop feeding it, let in-flight calls finish until
        shortly before NotBefore, then re-queue the rest and give the instance up."""
        if member.preempted:
            return
        member.preempted = True
        if member.state == "joined":
            member.state = "draining"
        for worker in member.workers:
            if worker.state in (WorkerState.IDLE, WorkerState.BUSY):
                worker.state = WorkerState.DRAINING
        deadline = _seconds_until(event.get("not_before", "")) - DRAIN_MARGIN
        logger.warning("instance %s will be evicted (event %s, NotBefore %s): draining",
                       member.name, event.get("event_id"), event.get("not_before") or "now")
        until = time.monotonic() + max(deadline, 0.0)
        while time.monotonic() < until and any(w.inflight for w in member.workers):
            await asyncio.sleep(0.2)
        for worker in member.workers:
            if worker.state != WorkerState.STOPPED:
                self._worker_lost(worker, f"its spot instance {member.name} is being evicted")
        await self._remove([member], "evicted")
        await self._replace(1, f"spot instance {member.name} was evicted")
        self._fail_queue_if_hopeless()

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for member in list(self._members.values()):
            for worker in member.workers:
                if worker.inflight and now - worker.last_seen > self.heartbeat_timeout:
                    worker.last_seen = now
                    reason = f"no message from its agent for {self.heartbeat_timeout:.0f} s"
                    self._spawn(self._kill_agent(worker))
                    self._worker_lost(worker, reason)
                    self._schedule_restart(worker)

    async def _replace(self, count: int, why: str) -> None:
        if not self.replace_lost_workers or self._closing:
            return
        if self._replacements_left < count:
            logger.warning("%s; not replaced (max_replacements=%d reached)", why, self.max_replacements)
            return
        self._replacements_left -= count
        logger.info("%s; requesting %d replacement instance(s)", why, count)
        try:
            await self._grow(count)
        except AzManagersError as exc:
            self._provisioning_failed(exc)

    # -- removal, cancel, scale ------------------------------------------------------------

    async def _remove(self, members: list[_Member], reason: str) -> None:
        """Stop these instances' agents and delete the instances in one request."""
        members = [m for m in members if m.state not in ("gone", "removing")]
        if not members:
            return
        for member in members:
            member.state = "removing"
            for task in list(member.tasks):
                if task is not asyncio.current_task():
                    task.cancel()
            for worker in member.workers:
                if worker.inflight:
                    self._worker_lost(worker, reason)
                worker.state = WorkerState.STOPPED
            if member.conn is not None:
                member.conn.close()
        # The deletion is its own task: cancelling the caller (e.g. close() cancelling a join)
        # does not abandon a request half made; close() waits for these before its own sweep.
        deletion = asyncio.get_running_loop().create_task(self._delete_members(members))
        self._removals.add(deletion)
        deletion.add_done_callback(self._removals.discard)
        try:
            await asyncio.shield(deletion)
        finally:
            self._progress.update(self._joined_count())
            self._membership_changed.set()

    async def _delete_members(self, members: list[_Member]) -> None:
        await self._scaleset.delete_instances([m.instance_id for m in members])
        # Only after success: a failed removal stays "removing", and close() retries it.
        for member in members:
            member.state = "gone"
        self._host_keys.forget({m.vm_id for m in members})

    async def _kill_agent(self, worker: _Worker) -> None:
        conn = worker.member.conn
        if conn is None or worker.pgid is None:
            return
        try:
            await conn.run(f"kill -KILL -- -{int(worker.pgid)}", timeout=15)
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
            logger.warning("worker %d: could not kill its agent: %s", worker.id, exc)

    async def _cancel(self, items: list[_WorkItem]) -> None:
        running = {item.worker for item in items if item.worker is not None}
        for item in items:
            item.future.cancel()
        for worker in running:
            if worker is None or worker.state not in (WorkerState.BUSY, WorkerState.DRAINING):
                continue
            worker.generation += 1  # its exit is ours: not a lost worker
            await self._kill_agent(worker)
            # other calls the slot ran are re-queued; a cancel is not their loss
            self._worker_lost(worker, "cancelled", count_attempt=False)
            self._schedule_restart(worker)

    async def _scale(self, n: int) -> None:
        live = [m for m in self._members.values() if m.state in ("joining", "joined", "draining")]
        current = len(live) + len(self._unclaimed) - self._discard_on_arrival
        self.n = n
        self._progress.set_total(n * self.ppi)
        if n > current:
            await self._grow(n - current)
            return
        excess = current - n
        if not excess:
            return
        order = {"joining": 0, "joined": 1, "draining": 2}
        live.sort(key=lambda m: (order[m.state], sum(len(w.inflight) for w in m.workers)))
        chosen = live[:excess]
        self._discard_on_arrival += excess - len(chosen)
        await self._remove(chosen, "scaled down")

    # -- teardown ------------------------------------------------------------------------------

    async def _close(self) -> None:
        self._closing = True
        if self._progress is not None:
            self._progress.stop()
        for item in list(self._items.values()):
            item.future.cancel()
        workers = [w for m in self._members.values() if m.state in ("joined", "draining")
                   for w in m.workers if w.agent is not None and not w.exited.is_set()]
        for worker in workers:
            try:
                await asyncio.wait_for(worker.agent.send(Kind.SHUTDOWN), 5)
            except (asyncssh.Error, OSError, asyncio.TimeoutError):
                pass
        if workers:
            await asyncio.wait([asyncio.ensure_future(w.exited.wait()) for w in workers], timeout=10)
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(*[t for t in self._tasks if t is not asyncio.current_task()],
                             return_exceptions=True)
        await asyncio.gather(*self._removals, return_exceptions=True)
        errors = []
        if self._scaleset is not None:
            try:
                await self._delete_everything_added()
            except Exception as exc:
                errors.append(exc)
            try:
                await self._scaleset.close()
            except Exception as exc:
                errors.append(exc)
        if self._clients is not None:
            await self._clients.close()
        if errors:
            logger.error("closing cluster %s left resources behind: %s; run "
                         "`prefect-azmanagers cleanup` to find them by tag", self.cluster_id, errors)
            raise errors[0]

    async def _claim_requested(self) -> None:
        """Claim the instances requested but not listed yet, so that close deletes them too.

        ARM lists an instance as soon as its grow is accepted, so this returns after a listing
        or two, not after the boot (Ctrl-C while instances boot is quick)."""
        failures = 0
        while self._unclaimed:
            settled = self._no_grow_pending()
            try:
                instances = await self._scaleset.instances()
            except AzureError as exc:  # a grow's failure (raised once), or listing fails
                failures += 1
                if failures > 3:
                    raise
                logger.info("listing %s during close: %s", self.group, exc)
                continue
            self._reconcile(instances)
            if settled or not self._unclaimed:
                return
            await asyncio.sleep(1.0)

    async def _delete_everything_added(self) -> None:
        """Delete every instance this cluster added, then the scale set if it is empty. The
        instances already known are deleted even when claiming the requested ones fails (that
        failure is raised after: instances still unlisted may be left)."""
        claim_failure: AzureError | None = None
        try:
            await self._claim_requested()
        except AzureError as exc:
            claim_failure = exc
        members = [m for m in self._members.values() if m.state != "gone"]
        for member in members:
            if member.conn is not None:
                member.conn.close()
            member.state = "removing"
        if members:
            await self._scaleset.delete_instances([m.instance_id for m in members])
            self._host_keys.forget({m.vm_id for m in members})
            for member in members:
                member.state = "gone"
        await self._scaleset.delete_if_empty()
        if claim_failure is not None:
            raise claim_failure


def _settle(future: concurrent.futures.Future, *, result: Any = None,
            exception: BaseException | None = None) -> None:
    """Set a future's outcome unless it was cancelled meanwhile (from another thread)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _settle_result(future: concurrent.futures.Future, body: bytes) -> None:
    try:
        value = serialization.loads(body)
    except Exception as exc:
        _settle(future, exception=_unpickle_error(exc))
    else:
        _settle(future, result=value)


def _unpickle_error(exc: Exception) -> AzManagersError:
    from prefect_azmanagers.exceptions import PayloadError

    return PayloadError(f"the result came back but cannot be unpickled on the driver: "
                        f"{type(exc).__name__}: {exc}")


def _seconds_until(http_date: str) -> float:
    """Seconds from now to an IMDS NotBefore ("Mon, 19 Sep 2016 18:29:47 GMT"); 0 if empty."""
    if not http_date:
        return 0.0
    try:
        return email.utils.parsedate_to_datetime(http_date).timestamp() - time.time()
    except (TypeError, ValueError):
        return 0.0


def _log_task_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("cluster background task failed", exc_info=task.exception())


# -- interpreter exit and SIGTERM: close every open cluster --------------------------------

_open_clusters: "weakref.WeakSet[AzureCluster]" = weakref.WeakSet()
_handlers_installed = False


def _close_all() -> None:
    for cluster in list(_open_clusters):
        try:
            cluster.close()
        except Exception:
            logger.exception("closing %r at exit failed", cluster)


def _install_exit_handlers() -> None:
    """atexit always; SIGTERM (chained to the previous handler) when on the main thread."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_close_all)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        _close_all()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)
