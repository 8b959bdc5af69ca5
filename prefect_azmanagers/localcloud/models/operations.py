"""Long-running operations (what Azure-AsyncOperation reports) and the injected request faults."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Awaitable, Callable

from prefect_azmanagers.localcloud import exceptions as errors
from prefect_azmanagers.localcloud.models.base import BackendBase
from prefect_azmanagers.localcloud.models.resources import TERMINAL, Operation, utcnow_iso

logger = logging.getLogger("prefect_azmanagers.localcloud")

MAX_OPERATIONS = 2000  # kept for polling; the oldest finished half goes when reached


class Operations(BackendBase):
    """Runs each write's work as an ARM operation; counts requests; hands out injected faults."""

    def _operation(self, name: str, work: Callable[[Operation], Awaitable[None]]) -> Operation:
        op = Operation(id=str(uuid.uuid4()), name=name)
        self.operations[op.id] = op
        self._prune_operations()

        async def run() -> None:
            try:
                await work(op)
                if op.status == "InProgress":
                    op.status = "Succeeded"
            except errors.ArmError as exc:
                op.status, op.error = "Failed", exc.body()["error"]
            except asyncio.CancelledError:
                op.status = "Canceled"
                raise
            except Exception as exc:  # an emulator bug must still end the LRO, and be logged
                logger.exception("operation %s failed", name)
                op.status = "Failed"
                op.error = {"code": "InternalExecutionError", "message": f"{type(exc).__name__}: {exc}"}
            finally:
                op.end_time = utcnow_iso()

        self._spawn(run())
        return op

    def _done(self, name: str) -> Operation:
        """An operation with nothing left to do (an update of tags, a NIC create)."""
        async def nothing(op: Operation) -> None:
            return None

        return self._operation(name, nothing)

    def _prune_operations(self) -> None:
        if len(self.operations) < MAX_OPERATIONS:
            return
        for op_id in [k for k, op in self.operations.items() if op.status in TERMINAL][:MAX_OPERATIONS // 2]:
            del self.operations[op_id]

    # ----- faults and counters -----------------------------------------------------------
    def take_request_fault(self, operation: str) -> errors.ArmError | None:
        """Consume one injected throttle/failure that applies to this request, if any."""
        f = self.faults
        if f.throttle and f.throttle_operation in (None, operation):
            f.throttle -= 1
            return errors.throttled(f.throttle_retry_after, utcnow_iso())
        if f.fail and f.fail_operation in (None, operation):
            f.fail -= 1
            return errors.service_unavailable(f.fail_retry_after)
        return None

    def _take_allocation_failure(self) -> bool:
        if self.faults.allocation_failures:
            self.faults.allocation_failures -= 1
            return True
        return False

    def count(self, operation: str) -> None:
        self.counters[operation] = self.counters.get(operation, 0) + 1
