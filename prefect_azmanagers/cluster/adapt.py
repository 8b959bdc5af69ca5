"""Adaptive capacity: a policy over membership that decides "grow by k" or "remove these idle
instances" from what is queued and running. Pure: the lifecycle carries decisions out.

```python
from prefect_azmanagers import Adapt, AzureScaleSetTaskRunner

@flow(task_runner=AzureScaleSetTaskRunner("cbox08", adapt=Adapt(minimum=0, maximum=50,
                                                                  idle_timeout=300)))
```

Rules (counting instances, each running `ppi` slots of `concurrency` calls; the queue counts
calls):
- Wanted = ceil((queued + running) / calls per instance), within [minimum, maximum].
- Scale up by wanted - (live + requested) in one grow per decision, never above `maximum`, nor
  above `max_instances_per_minute` requested within the last 60 s, nor once `max_instance_hours`
  were used.
- Scale down only instances idle (nothing in flight) for `idle_timeout`, never below `minimum`
  nor below what is wanted, in one removal. Which first: regular priority before spot (regular
  costs several times more per hour, and regular capacity added by a fallback is the first to
  go when the work shrinks), then the longest idle. An instance picked is marked removed before
  anything else runs, so it takes no new call; one with a call in flight is never picked, so no
  call is lost or re-run because of a scale-down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from prefect_azmanagers.exceptions import ConfigurationError


@dataclass(frozen=True)
class Adapt:
    """Adaptive capacity bounds (Dask's `adapt(minimum=, maximum=)` conventions).

    Attributes:
        minimum: instances kept however idle.
        maximum: instances never exceeded (requested and live, replacements included).
        idle_timeout: seconds an instance must have been idle before it is removed.
        max_instances_per_minute: instances requested within any 60 s, at most.
        max_instance_hours: instance-hours this cluster may use; past it no capacity is added.
        interval: seconds between decisions.
    """

    minimum: int = 0
    maximum: int = 10
    idle_timeout: float = 300.0
    max_instances_per_minute: int = 100
    max_instance_hours: float | None = None
    interval: float = 1.0

    def __post_init__(self) -> None:
        for name in ("minimum", "maximum", "max_instances_per_minute"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"Adapt({name}=...) must be an integer >= 0, got {value!r}")
        if self.maximum < max(self.minimum, 1):
            raise ConfigurationError(
                f"Adapt(maximum={self.maximum}) must be >= 1 and >= minimum ({self.minimum})")
        if self.max_instances_per_minute < 1:
            raise ConfigurationError("Adapt(max_instances_per_minute=...) must be >= 1")
        for name in ("idle_timeout", "interval"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"Adapt({name}=...) must be a positive number of seconds")
        if self.max_instance_hours is not None and not self.max_instance_hours > 0:
            raise ConfigurationError("Adapt(max_instance_hours=...) must be positive (or None)")


@dataclass(frozen=True)
class InstanceView:
    """What the policy needs of one live instance."""

    key: str
    joined: bool
    inflight: int
    idle_for: float  # seconds since its last call ended (or it joined); 0 while busy
    spot: bool


@dataclass(frozen=True)
class Snapshot:
    queued: int
    running: int
    instances: Sequence[InstanceView]
    requested: int                 # instances requested and not listed yet
    removing: int                  # instances whose deletion is under way (they still count
                                   # toward maximum until gone)
    requested_last_minute: int     # instances requested within the last 60 s
    instance_hours: float          # used so far
    per_instance: int              # calls one instance runs at once (ppi * concurrency)


@dataclass(frozen=True)
class Decision:
    grow: int = 0
    remove: tuple[str, ...] = ()
    wanted: int = 0
    reason: str = ""
    budget_spent: bool = False


@dataclass
class AdaptivePolicy:
    adapt: Adapt
    told_budget: bool = field(default=False)

    def decide(self, now: Snapshot) -> Decision:
        adapt = self.adapt
        work = now.queued + now.running
        wanted = min(max(math.ceil(work / max(now.per_instance, 1)), adapt.minimum), adapt.maximum)
        current = len(now.instances) + now.requested
        if wanted > current:
            if current + now.removing >= adapt.maximum:
                return Decision(wanted=wanted)  # wait for the deletions: maximum is hard
            if adapt.max_instance_hours is not None and now.instance_hours >= adapt.max_instance_hours:
                return Decision(wanted=wanted, budget_spent=True,
                                reason=f"max_instance_hours={adapt.max_instance_hours:g} used")
            room = max(adapt.max_instances_per_minute - now.requested_last_minute, 0)
            grow = min(wanted - current, adapt.maximum - current - now.removing, room)
            return Decision(grow=grow, wanted=wanted,
                            reason=f"{now.queued} tasks queued, {now.running} running")
        idle = [i for i in now.instances if i.joined and not i.inflight
                and i.idle_for >= adapt.idle_timeout]
        excess = current - max(wanted, adapt.minimum)
        if excess <= 0 or not idle:
            return Decision(wanted=wanted)
        idle.sort(key=lambda i: (i.spot, -i.idle_for))  # regular first, then the longest idle
        chosen = tuple(i.key for i in idle[:excess])
        return Decision(remove=chosen, wanted=wanted,
                        reason=f"{len(chosen)} idle for {adapt.idle_timeout:g} s or more")
