"""What a cluster used: instances, instance-hours by priority, evictions, re-queued calls,
peak and mean workers. Read from the members' records; the report is a table for a Prefect
artifact and one log line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

from prefect_azmanagers.cluster.members import Member


@dataclass
class WorkerGauge:
    """Time-weighted mean and peak of the joined workers."""

    started: float = field(default_factory=time.monotonic)
    _last: float = field(default_factory=time.monotonic)
    _value: int = 0
    _area: float = 0.0
    peak: int = 0

    def set(self, workers: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._area += self._value * (now - self._last)
        self._last, self._value = now, workers
        self.peak = max(self.peak, workers)

    def mean(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        area = self._area + self._value * (now - self._last)
        return area / (now - self.started) if now > self.started else float(self._value)


@dataclass(frozen=True)
class UsageReport:
    instances: int
    instance_hours: dict[str, float]   # by priority: "Regular", "Spot"
    evictions: int
    requeued: int
    peak_workers: int
    mean_workers: float
    seconds: float

    def line(self) -> str:
        hours = ", ".join(f"{p.lower()} {h:.3f}" for p, h in sorted(self.instance_hours.items()))
        return (f"used {self.instances} instance(s), instance-hours {hours or '0'}, "
                f"{self.evictions} eviction(s), {self.requeued} re-queued call(s), workers "
                f"peak {self.peak_workers} / mean {self.mean_workers:.1f} over {self.seconds:.0f} s")

    def markdown(self, title: str = "Cluster usage") -> str:
        rows = [("instances used", str(self.instances))]
        rows += [(f"instance-hours, {p.lower()}", f"{h:.4f}")
                 for p, h in sorted(self.instance_hours.items())]
        rows += [("evictions", str(self.evictions)), ("re-queued calls", str(self.requeued)),
                 ("peak workers", str(self.peak_workers)),
                 ("mean workers", f"{self.mean_workers:.2f}"), ("seconds", f"{self.seconds:.0f}")]
        return "\n".join([f"### {title}", "", "| | |", "|---|---|",
                          *(f"| {k} | {v} |" for k, v in rows)])


def instance_hours(members: Iterable[Member], now: float | None = None) -> dict[str, float]:
    """Hours from each member's request to its removal (or now), by priority."""
    now = time.monotonic() if now is None else now
    hours: dict[str, float] = {}
    for member in members:
        end = member.ended_at if member.ended_at is not None else now
        key = member.priority or "Regular"
        hours[key] = hours.get(key, 0.0) + max(end - member.requested_at, 0.0) / 3600
    return hours


def report(members: Iterable[Member], *, requeued: int, gauge: WorkerGauge,
           now: float | None = None) -> UsageReport:
    now = time.monotonic() if now is None else now
    members = list(members)
    return UsageReport(
        instances=len(members), instance_hours=instance_hours(members, now),
        evictions=sum(m.evicted for m in members), requeued=requeued, peak_workers=gauge.peak,
        mean_workers=gauge.mean(now), seconds=now - gauge.started)
