"""Spot eviction: a Preempt scheduled event, then Delete or Deallocate at NotBefore (or once the
VM approved the event through IMDS)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

from prefect_azmanagers.localcloud import exceptions as errors
from prefect_azmanagers.localcloud.models.instances import Instances
from prefect_azmanagers.localcloud.models.resources import Instance


class Evictions(Instances):
    def simulate_eviction(self, inst: Instance) -> None:
        """Post a Preempt scheduled event; evict at NotBefore (or once the VM approved it)."""
        if not inst.is_spot:
            raise errors.ArmError(
                409, "OperationNotAllowed",
                f"Simulate eviction is only supported for Spot virtual machines; '{inst.name}' has priority "
                f"'{inst.priority}'.",
            )
        if inst.power_state != "running" or inst.vm_id in self._evictions:
            return
        event_id = str(uuid.uuid4()).upper()
        not_before = datetime.now(timezone.utc) + timedelta(seconds=self.config.eviction_notice)
        event = {
            "EventId": event_id,
            "EventType": "Preempt",
            "ResourceType": "VirtualMachine",
            "Resources": [inst.name],
            "EventStatus": "Scheduled",
            "NotBefore": format_datetime(not_before, usegmt=True),
            "Description": "The Spot virtual machine is being evicted.",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        }
        acked = asyncio.Event()
        self._evictions[inst.vm_id] = (event_id, acked)
        self.sandboxes.post_scheduled_event(inst.vm_id, event)
        self._spawn(self._evict(inst, acked, self.config.eviction_notice))

    def event_acknowledged(self, key: str, event_id: str) -> None:
        """SandboxHost's on_event_ack: the VM approved an event early (thread-safe)."""
        pending = self._evictions.get(key)
        if pending is None or pending[0].lower() != event_id.lower():
            return
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(pending[1].set)
        else:
            pending[1].set()

    async def _evict(self, inst: Instance, acked: asyncio.Event, notice: float) -> None:
        try:
            await asyncio.wait_for(acked.wait(), timeout=notice)
        except asyncio.TimeoutError:
            pass
        if self._evictions.pop(inst.vm_id, None) is None:
            return  # deleted meanwhile
        await self.sandboxes.kill(inst.vm_id)
        if inst.eviction_policy == "Deallocate":
            self.sandboxes.clear_scheduled_events(inst.vm_id)
            inst.power_state = "deallocated"
            self._save(inst)
            return
        await self._remove_instance(inst)
        self._lower_capacity(inst)
