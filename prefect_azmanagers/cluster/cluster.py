"""AzureCluster: elastic remote execution of cloudpickled callables on scale-set instances.

```python
from prefect_azmanagers import AzureCluster

with AzureCluster("localcloud-small", 4, manifest="localcloud") as cluster:   # addprocs
    futures = [cluster.submit(lambda i=i: i * i) for i in range(100)]
    print(sum(f.result() for f in futures))
```

The front of the engine: its options (`ClusterOptions`), its own asyncio loop on a thread, and
the public methods. The parts behind it, each with one job: `membership` (which instances are
ours, claims, replacement budget, scaling arithmetic), `dispatch` (queue, slots, outcomes),
`lifecycle` (SSH joins, agents, reconnect, drain, losses, teardown). `start()` grows the scale
set by n in one request and returns; work is handed to any free slot as soon as one joins
(elastic). `close()` stops the agents and deletes the instances this cluster added in one call,
and the scale set if this cluster created it and it is empty; it also runs at interpreter exit
and on SIGTERM.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Coroutine, TypeVar

import asyncssh

from prefect_azmanagers.cluster import mpi, serialization
from prefect_azmanagers.cluster.adapt import Adapt, AdaptivePolicy
from prefect_azmanagers.cluster.dispatch import Dispatcher
from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys
from prefect_azmanagers.cluster.api_probe import watch_api
from prefect_azmanagers.cluster.backpressure import Backpressure
from prefect_azmanagers.cluster.lifecycle import Access, Lifecycle
from prefect_azmanagers.cluster.members import InstanceInfo, Member, WorkerInfo, WorkerState
from prefect_azmanagers.cluster.membership import Membership
from prefect_azmanagers.cluster.options import ClusterOptions, check_instance_count
from prefect_azmanagers.cluster.progress import JoinProgress
from prefect_azmanagers.cluster.protocol import Payload
from prefect_azmanagers.cluster.transport import InstanceConnection
from prefect_azmanagers.cluster.usage import UsageReport, WorkerGauge
from prefect_azmanagers.cluster.usage import report as usage_report
from prefect_azmanagers.cluster.usage import save as save_usage
from prefect_azmanagers.customenv import boot_hooks
from prefect_azmanagers.exceptions import AzManagersError, ConfigurationError

if TYPE_CHECKING:
    from prefect_azmanagers.azure.clients import ArmClients
    from prefect_azmanagers.azure.scaleset import ScaleSet
    from prefect_azmanagers.blocks import AzureManifest, ScaleSetTemplate

T = TypeVar("T")
USAGE_SAVE_SECONDS = 60.0  # a running cluster's report is saved this often (and at close)
logger = logging.getLogger("prefect_azmanagers.cluster")
worker_logger = logging.getLogger("prefect_azmanagers.worker")

__all__ = ["Adapt", "AzureCluster", "ClusterOptions", "InstanceInfo", "UsageReport", "WorkerInfo",
           "WorkerState", "log_worker_output"]


def _forget_deleted(host_keys: PinnedHostKeys, members: list[Member]) -> None:
    """Deleted instances: their pinned keys go, and nothing connects to them again."""
    host_keys.forget({m.vm_id for m in members})
    for member in members:
        InstanceConnection.mark_gone(member.vm_id)


def log_worker_output(worker: WorkerInfo, stream: str, line: str) -> None:
    """The default output handler: `From worker N: line` on logger prefect_azmanagers.worker.

    Both streams log at INFO: libraries (Prefect included) log to stderr in normal operation.
    """
    worker_logger.info("From worker %d: %s", worker.id, line)


class AzureCluster:
    """Workers on the instances of a scale set, running cloudpickled callables over SSH.

    Args:
        template: a ScaleSetTemplate block or the name of one.
        n: instances to add (each runs `ppi` worker slots).
        manifest: an AzureManifest block or the name of one.
        **options: the `ClusterOptions` (ppi, group, spot and priority mix, customenv, MPI,
            env, image overrides, join_timeout, waitfor, concurrency, replacements, ...),
            checked here: a bad value is a ConfigurationError before anything is provisioned.
    """

    def __init__(self, template: str | ScaleSetTemplate, n: int | None = None, *,
                 manifest: str | AzureManifest = "default", **options: Any):
        self.template = template
        self.manifest = manifest
        self.options = ClusterOptions.from_keywords(options)
        self.n = check_instance_count(n, self.options.adapt)
        self.output_handler: Callable[[WorkerInfo, str, str], None] = log_worker_output
        self.cluster_id = uuid.uuid4().hex[:12]

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._spawn = spawner(self._tasks)
        self._dispatcher = Dispatcher(
            max_task_retries_on_lost_worker=self.options.max_task_retries_on_lost_worker,
            hopeless=self._hopeless,
            spawn=self._spawn,
            gate=Backpressure(self.options.prefect_api or "", max_in_flight=self.options.max_in_flight,
                              give_up_after=self.options.api_give_up_after,
                              max_unrecorded=self.options.max_unrecorded))
        self._membership: Membership | None = None
        self._lifecycle: Lifecycle | None = None
        self._join_setup: bytes | Payload | None = None
        self._scaleset: ScaleSet | None = None
        self._clients: ArmClients | None = None

    def _hopeless(self) -> str | None:
        """Why queued work can never run (None before the cluster started)."""
        return None if self._lifecycle is None else self._lifecycle.hopeless_reason()

    @property
    def group(self) -> str:
        """The scale set's name: `group=`, or one of this cluster's own."""
        return self.options.group or f"azm-{self.cluster_id}"

    @property
    def ppi(self) -> int:
        return self.options.ppi

    @property
    def forward_ports(self) -> tuple[int, ...]:
        return tuple(self.options.forward_ports)

    # -- public API (any thread) -------------------------------------------------------------

    def on_join(self, setup: Callable[[], Any]) -> None:
        """Run `setup()` on every worker slot as it joins (and after each agent restart),
        before it takes work: e.g. a warm-up, so the first call pays nothing extra.

        On a started cluster it replaces the setup and runs at once, ahead of their next
        call, on the slots already up (not waited for); the setup in place again is a no-op.
        """
        if self._closed:
            raise AzManagersError("this cluster was closed; create a new AzureCluster")
        payload = serialization.dumps_payload(setup, what="the join setup")
        if payload == self._join_setup:
            return
        self._join_setup = payload
        if self._lifecycle is not None:
            self._call(self._lifecycle.replace_join_setup(payload))

    def start(self) -> AzureCluster:
        """Begin provisioning (returns at once; with `waitfor`, blocks until all workers joined).

        Raises JoinTimeout (after deleting what it created) if `waitfor` and the workers did
        not join within `join_timeout`.
        """
        if self._started:
            return self
        if self._closed:
            raise AzManagersError("this cluster was closed; create a new AzureCluster")
        self._started = True
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="azm-cluster",
                                        daemon=True)
        self._thread.start()
        _open_clusters.add(self)
        _install_exit_handlers()
        try:
            self._call(self._start(time.monotonic()))
            if self.options.waitfor:
                self.wait_for_workers(self.n * self.ppi, self.options.join_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_for_workers(self, count: int | None = None, timeout: float | None = None) -> None:
        """Block until `count` workers (default n * ppi) joined; JoinTimeout after `timeout` s."""
        self._require_started()
        count = self.n * self.ppi if count is None else count
        timeout = self.options.join_timeout if timeout is None else timeout
        self._call(self._lifecycle.wait_for_workers(count, timeout))

    def submit(self, fn: Callable[[], T], *, label: str = "",
               payload: bytes | None = None) -> concurrent.futures.Future[T]:
        """Run `fn()` (or the cloudpickled callable `payload`) on a free worker slot.

        Returns at once. The future holds the return value or the exception raised on the
        worker (its remote traceback attached), WorkerLost when its workers kept being lost,
        or PayloadError when `fn` cannot be pickled (raised here, at once).
        """
        self._require_started()
        if self._lifecycle is None or self._lifecycle.closing:
            raise AzManagersError("this cluster is closing; no new work is accepted")
        label = label or getattr(fn, "__qualname__", None) or type(fn).__qualname__
        if payload is None:
            payload = serialization.dumps_payload(fn, what=f"callable {label!r}")
        item = self._dispatcher.new_item(payload, label)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatcher.enqueue, item)
        return item.future

    @property
    def in_flight(self) -> int:
        """Calls sent to workers and not answered yet."""
        return self._dispatcher.in_flight

    def pace_by_unrecorded(self, backlog: Callable[[], int]) -> Callable[[], None]:
        """Hold dispatch while the calls in flight plus every `backlog()` (calls that came back
        and are not recorded yet by the API they report to; read at each dispatch, on the
        cluster's loop: keep it cheap) reach `max_unrecorded`. Each task runner on the cluster
        adds its own; returns what removes it."""
        return self._dispatcher.gate.pace_by_unrecorded(backlog)

    def cancel(self, future: concurrent.futures.Future) -> None:
        """Cancel a submitted call; if it is running, its agent process is killed (and the
        slot restarted), so the remote work stops."""
        item = self._dispatcher.items.get(future)
        if item is None or self._lifecycle is None or self._closed:
            future.cancel()
            return
        self._call(self._lifecycle.slots.cancel([item]))

    def cancel_all(self) -> None:
        """Cancel every queued and running call (running ones stop: their agents are killed)."""
        if self._lifecycle is None or self._closed:
            return
        self._call(self._lifecycle.slots.cancel(list(self._dispatcher.items.values())))

    def scale(self, n: int) -> None:
        """Grow to or shrink to `n` instances (a shrink deletes instances in one request); an
        adaptive cluster stops adapting (as Dask's `scale` after `adapt`)."""
        self._require_started()
        if n < 0:
            raise ConfigurationError(f"scale(n) needs n >= 0, got {n}")
        self.n = n
        self._lifecycle.policy = None
        self._call(self._lifecycle.scale(n))

    def adapt(self, adapt: Adapt | None = None, **bounds: Any) -> None:
        """Make capacity follow the work: `adapt(Adapt(...))` or `adapt(minimum=, maximum=,
        idle_timeout=, ...)`; `scale(n)` returns to a fixed size."""
        self._require_started()
        policy = AdaptivePolicy(adapt if adapt is not None else Adapt(**bounds))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(
            lambda: self._spawn(self._lifecycle.adapt(policy)))

    @property
    def instances(self) -> list[InstanceInfo]:
        """The instances this cluster added (also those removed), with their states."""
        if self._membership is None:
            return []
        return [m.info() for m in list(self._membership.members.values())]

    def simulate_eviction(self, instance: str) -> None:
        """Ask ARM to evict one of this cluster's spot instances (`simulateEviction`), to see
        a flow survive evictions before they happen for real."""
        self._require_started()
        member = next((m for m in self._membership.members.values() if m.name == instance), None)
        if member is None:
            raise ConfigurationError(
                f"{instance!r} is not an instance of this cluster; its instances: "
                f"{', '.join(m.name for m in self._membership.members.values()) or 'none'}")
        self._call(self._scaleset.simulate_eviction(member.instance_id))

    def _save_usage(self) -> None:
        """Keep the latest report where `prefect-azmanagers usage` finds it."""
        if self._lifecycle is None:
            return
        try:
            save_usage(self.cluster_id, self.group, self.usage())
        except OSError as exc:
            logger.warning("could not save the usage report of cluster %s: %s", self.cluster_id, exc)

    async def _save_usage_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await asyncio.to_thread(self._save_usage)

    def usage(self) -> UsageReport:
        """Instances used, instance-hours by priority, evictions, re-queued calls, workers."""
        if self._lifecycle is None:
            return usage_report([], requeued=0, gauge=WorkerGauge())
        return usage_report(list(self._membership.members.values()),
                            requeued=self._dispatcher.requeued, gauge=self._lifecycle.gauge)

    @property
    def workers(self) -> list[WorkerInfo]:
        """The worker slots that joined and are not removed."""
        if self._membership is None:
            return []
        return [w.info() for m in list(self._membership.members.values())
                for w in list(m.workers) if w.state is not WorkerState.STOPPED]

    def close(self, *, urgent: bool = False) -> None:
        """Stop the agents, delete the instances this cluster added (one request) and the scale
        set if this cluster created it and it is empty. Idempotent. `urgent` (SIGTERM: the
        process has seconds left) sends the deletion first and does not wait for agents."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _open_clusters.discard(self)
        if self._loop is None:
            return
        if threading.current_thread() is self._thread:  # e.g. from an output handler
            self._loop.create_task(self._close(urgent)).add_done_callback(
                lambda _: self._loop.call_soon(self._loop.stop))
            return
        try:
            if self._loop.is_running():
                self._wait_closed(asyncio.run_coroutine_threadsafe(self._close(urgent), self._loop))
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

    def __enter__(self) -> AzureCluster:
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

    # -- start and close (on the loop) ---------------------------------------------------------

    async def _start(self, started_at: float) -> None:
        from prefect_azmanagers.azure.bootscript import boot_script, encode_custom_data
        from prefect_azmanagers.azure.clients import ArmClients
        from prefect_azmanagers.azure.fallback import SpotWithFallback
        from prefect_azmanagers.azure.provisioning import ProvisioningOptions
        from prefect_azmanagers.azure.ownership import ownership_tags
        from prefect_azmanagers.azure.scaleset import ScaleSet
        from prefect_azmanagers.blocks import aload_manifest, aload_scaleset_template

        options = self.options
        manifest: AzureManifest = await aload_manifest(self.manifest)
        template: ScaleSetTemplate = await aload_scaleset_template(self.template)
        os_profile = template.value["properties"]["virtualMachineProfile"]["osProfile"]
        admin = manifest.ssh_user or os_profile["adminUsername"]
        hooks, python = boot_hooks(options.customenv, admin_username=admin, python=manifest.python)
        access = Access(
            manifest=manifest, admin=admin,
            client_key=asyncssh.import_private_key(manifest.read_private_key()),
            host_keys=PinnedHostKeys(manifest.known_hosts_path()),
            python=python,
            launcher=mpi.launcher(options.mpi_ranks_per_worker, options.mpi_flags)
            if options.mpi_ranks_per_worker else [])
        script = boot_script(admin_username=admin, tempdisk=template.tempdisk, env=options.env,
                             hooks=hooks)
        self._clients = ArmClients(manifest, subscription_id=template.subscription_id or None)
        def scaleset(name: str, provisioning: ProvisioningOptions) -> ScaleSet:
            return ScaleSet(
                self._clients, manifest, template, name, custom_data=encode_custom_data(script),
                tags=ownership_tags(self.cluster_id), provisioning=provisioning,
                lease_holder=self.cluster_id,
                boot_log=lambda instance: access.boot_log(instance.private_ip, instance.vm_id,
                                                          lines=30))

        self._scaleset = scaleset(self.group, options.provisioning)
        if options.spot_fallback:
            regular = dataclasses.replace(options.provisioning, spot=False, max_price=-1,
                                          spot_base_regular_priority_count=0,
                                          spot_regular_percentage_above_base=0)
            self._scaleset = SpotWithFallback(
                self._scaleset, scaleset(f"{self.group}-regular"[:64], regular))
        self._membership = Membership(
            self._scaleset, name=self.group, join_timeout=options.join_timeout,
            replacements=options.replacements_for(self.n),
            replace_lost=options.replace_lost_workers,
            on_deleted=partial(_forget_deleted, access.host_keys))
        self._lifecycle = Lifecycle(
            options, access, self._membership, self._dispatcher,
            progress=JoinProgress(self.n * self.ppi, show=options.progress),
            output=lambda info, stream, line: self.output_handler(info, stream, line),
            spawn=self._spawn, started_at=started_at,
            fall_back=self._scaleset.fall_back if options.spot_fallback else None,
            join_setup=self._join_setup)
        await self._membership.know_existing()
        if self.n:
            await self._membership.grow(self.n)
        self._spawn(self._lifecycle.watch())
        if options.prefect_api:
            self._spawn(watch_api(options.prefect_api, self._dispatcher))
        self._spawn(self._save_usage_every(USAGE_SAVE_SECONDS))
        if options.adapt is not None:
            self._spawn(self._lifecycle.adapt(AdaptivePolicy(options.adapt)))

    async def _close(self, urgent: bool) -> None:
        errors = []
        if self._lifecycle is not None:
            try:
                await self._lifecycle.teardown(self._tasks, urgent=urgent)
            except Exception as exc:
                errors.append(exc)
        if self._scaleset is not None:
            try:
                await self._scaleset.close()
            except Exception as exc:
                errors.append(exc)
        if self._clients is not None:
            await self._clients.close()
        self._save_usage()
        if errors:
            logger.error("closing cluster %s left resources behind: %s; run "
                         "`prefect-azmanagers cleanup` to find them by tag", self.cluster_id, errors)
            raise errors[0]


def spawner(tasks: set[asyncio.Task]) -> Callable[..., asyncio.Task]:
    """`spawn(coro, owner=None)`: run `coro` as a task kept in `tasks` (and `owner`), its
    failure logged."""
    def spawn(coro: Coroutine[Any, Any, Any], owner: set[asyncio.Task] | None = None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        for group in (tasks, owner) if owner is not None else (tasks,):
            group.add(task)
            task.add_done_callback(group.discard)
        task.add_done_callback(_log_task_failure)
        return task
    return spawn


def _log_task_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("cluster background task failed", exc_info=task.exception())


# -- interpreter exit and SIGTERM: close every open cluster --------------------------------

_open_clusters: "weakref.WeakSet[AzureCluster]" = weakref.WeakSet()
_handlers_installed = False


def _close_all(*, urgent: bool = False) -> None:
    for cluster in list(_open_clusters):
        try:
            cluster.close(urgent=urgent)
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
        _close_all(urgent=True)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)
