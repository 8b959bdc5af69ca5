"""What a cluster used: instances, instance-hours by priority, evictions, re-queued calls,
peak and mean workers. Read from the members' records; the report is a table for a Prefect
artifact and one log line, and each cluster keeps its latest report in
`~/.azmanagers/usage/<cluster id>.json` (0600) for `prefect-azmanagers usage`."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from prefect_azmanagers.cluster.members import Member

USAGE_DIR = Path("~/.azmanagers/usage")


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


def save(cluster_id: str, group: str, usage: UsageReport, directory: Path = USAGE_DIR) -> Path:
    """Write a cluster's latest report (atomically, 0600: it names the scale set)."""
    directory = directory.expanduser()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{cluster_id}.json"
    temporary = path.with_suffix(".tmp")
    record = {"cluster_id": cluster_id, "group": group, "updated": datetime.now(
        timezone.utc).isoformat(timespec="seconds"), "usage": dataclasses.asdict(usage)}
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
    os.replace(temporary, path)
    return path


def saved(directory: Path = USAGE_DIR) -> list[dict[str, Any]]:
    """The reports saved by clusters on this machine, newest first (`usage` a UsageReport)."""
    records = []
    for path in directory.expanduser().glob("*.json"):
        try:
            record = json.loads(path.read_text())
            record["usage"] = UsageReport(**record["usage"])
        except (OSError, ValueError, TypeError, KeyError):
            continue  # a record being replaced, or not one of ours
        records.append(record)
    return sorted(records, key=lambda r: r["updated"], reverse=True)
