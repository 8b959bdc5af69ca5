"""The backend's state, its persistence and its background tasks (every part builds on it)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Any, Awaitable

from prefect_azmanagers.localcloud.config import LocalCloudConfig
from prefect_azmanagers.localcloud.models.resources import (TERMINAL, Faults, Instance, InstanceSandboxes, Nic,
                                                            Operation, ScaleSet, compute_prefix)
from prefect_azmanagers.localcloud.store import Store


class BackendBase:
    """All resources of one local cloud: the tables, the store they persist in, the sandboxes."""

    def __init__(self, config: LocalCloudConfig, store: Store, sandboxes: InstanceSandboxes, *,
                 tenant_id: str = ""):
        self.config = config
        self.tenant_id = tenant_id  # of managed identities (the local cloud's Entra tenant)
        self.store = store
        self.sandboxes = sandboxes
        self.scale_sets: dict[str, ScaleSet] = {}
        self.instances: dict[str, Instance] = {}
        self.nics: dict[str, Nic] = {}
        self.operations: dict[str, Operation] = {}
        self.faults = Faults()
        self.counters: dict[str, int] = {}
        self._existing_since: dict[str, tuple[str, float]] = {}  # instance id -> (name, since)
        self._ended_seconds: dict[str, float] = {}  # VM name -> seconds it existed, once deleted
        self._tasks: set[asyncio.Task] = set()
        self._evictions: dict[str, tuple[str, asyncio.Event]] = {}  # vmId -> (EventId, acked)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load()

    # ----- persistence -------------------------------------------------------------------
    def _load(self) -> None:
        for rec in self.store.load("scale_set"):
            ss = ScaleSet(**rec)
            if ss.provisioning_state not in TERMINAL:
                ss.provisioning_state = "Failed"
            self.scale_sets[ss.id.lower()] = ss
        for rec in self.store.load("instance"):
            inst = Instance(**rec)
            # The sandbox did not survive the restart: the VM is kept, deallocated.
            if inst.provisioning_state not in TERMINAL:
                inst.provisioning_state = "Failed"
            inst.power_state = "deallocated"
            self.instances[inst.id.lower()] = inst
        for rec in self.store.load("nic"):
            nic = Nic(**rec)
            # Azure keeps a NIC's dynamic private IP while it exists (also when its VM is deallocated).
            nic.private_ip = self.sandboxes.allocate(nic.address_key)
            self.nics[nic.id.lower()] = nic

    def _table(self, obj: ScaleSet | Instance | Nic) -> dict:
        return {ScaleSet: self.scale_sets, Instance: self.instances, Nic: self.nics}[type(obj)]

    def _save(self, obj: ScaleSet | Instance | Nic) -> None:
        if self._table(obj).get(obj.id.lower()) is not obj:
            return  # deleted meanwhile (e.g. a boot failing because its instance was deleted)
        if isinstance(obj, Instance):
            self._existing_since.setdefault(obj.id.lower(), (obj.name, time.monotonic()))
        kind = {ScaleSet: "scale_set", Instance: "instance", Nic: "nic"}[type(obj)]
        self.store.put(kind, obj.id, asdict(obj))

    def _forget(self, obj: ScaleSet | Instance | Nic) -> None:
        self._table(obj).pop(obj.id.lower(), None)
        self.store.delete(obj.id)
        if (since := self._existing_since.pop(obj.id.lower(), None)) is not None:
            name, started = since
            self._ended_seconds[name] = self._ended_seconds.get(name, 0.0) + time.monotonic() - started

    def instance_seconds(self) -> dict[str, float]:
        """Seconds each VM has existed since this start (VM time, as billed), by VM name;
        deleted VMs keep theirs. Tests and benches measure VM time with it, not a clock."""
        now = time.monotonic()
        seconds = dict(self._ended_seconds)
        for name, started in self._existing_since.values():
            seconds[name] = seconds.get(name, 0.0) + now - started
        return seconds

    # ----- lifecycle ---------------------------------------------------------------------
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the loop so thread-side callbacks (event acks) can reach it."""
        self._loop = loop

    async def shutdown(self) -> None:
        """Cancel every operation and eviction in flight (the sandboxes are stopped by the caller)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _compute_id(self, rg: str, *parts: str) -> str:
        return "/".join([compute_prefix(self.config.subscription_id, rg), *parts])
