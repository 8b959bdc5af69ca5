"""The API the calls report to, watched from the driver: its answers pace dispatch.

Every `interval` seconds the driver GETs `<api>/health` and reports the answer (status, time,
Retry-After) to the dispatcher's `Backpressure` gate: a 429 or 503, no answer, or a slow answer
halves the calls in flight and holds dispatch; good answers raise the cap again. When the API
has answered only failures for longer than the gate's `give_up_after`, every queued and running
call fails with PrefectAPIUnreachable, so a flow fails in bounded time instead of hanging while
its VMs bill.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from prefect_azmanagers.cluster.dispatch import Dispatcher
from prefect_azmanagers.exceptions import PrefectAPIUnreachable

logger = logging.getLogger("prefect_azmanagers.cluster")

PROBE_TIMEOUT = 10.0


async def watch_api(api_url: str, dispatcher: Dispatcher, *, interval: float = 2.0) -> None:
    """Probe the API until cancelled, or until the gate gives up on it."""
    gate = dispatcher.gate
    health = api_url.rstrip("/") + "/health"
    held = False
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT) as client:
        while True:
            started = time.monotonic()
            status, retry_after = None, None
            try:
                answer = await client.get(health)
                status, retry_after = answer.status_code, _seconds(answer.headers.get("retry-after"))
            except httpx.HTTPError as exc:
                logger.debug("the Prefect API did not answer its health probe: %s", exc)
            took = time.monotonic() - started
            gate.observe(status, took, retry_after, what=f"GET {health}")
            if gate.limit < gate.max_in_flight and not held:
                why = ("no answer" if status is None else f"HTTP {status}"
                       if status >= 400 else f"answered in {took:.1f} s")
                logger.warning("the Prefect API at %s is overloaded or failing (%s): dispatch "
                               "slows to %d calls in flight", api_url, why, gate.limit)
            held = gate.limit < gate.max_in_flight
            try:
                gate.check()
            except PrefectAPIUnreachable as exc:
                logger.error("%s", exc)
                dispatcher.fail_everything(exc)
                return
            await asyncio.sleep(interval)


def _seconds(retry_after: str | None) -> float | None:
    try:
        return max(float(retry_after), 0.0) if retry_after else None
    except ValueError:
        return None  # an HTTP date: the gate's own pause applies
