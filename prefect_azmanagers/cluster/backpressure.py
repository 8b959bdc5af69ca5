"""Backpressure towards one Prefect API: how many task runs may be in flight, given how the API
answers. Pure policy, no I/O: the dispatcher asks `may_dispatch(in_flight)` before it sends a
task run, reports each API answer it sees with `observe(...)` (its own probes of the API, and
the errors workers send back), and calls `check()` to fail the flow when the API is gone.

- The cap starts at `max_in_flight` (default 256 task runs per API; 16 instances x ppi 4 keep
  64 busy) and never goes below `min_in_flight`.
- A 429 or 503, a failed request or an answer slower than `slow_after` halves the cap and holds
  dispatch for the answer's Retry-After (or `pause`); `recover_after` answers in a row that are
  neither raise it by one again (additive increase, multiplicative decrease: the way TCP shares
  a link, so many clients converge on what the server absorbs instead of piling on).
- When nothing but failures has come back for `give_up_after` seconds, `check()` raises
  PrefectAPIUnreachable naming the last answer: the flow fails in bounded time, never hangs.
- An API can answer quickly yet fall behind: Prefect's default server (SQLite, in-memory
  messaging) queues the events task runs send and drops them past its queue size, with no 429.
  So whoever can see how far behind the API is gives the gate a backlog (`pace_by_unrecorded`:
  each task runner on the cluster counts its task runs that came back and are not recorded
  yet), read at each dispatch: it holds while the backlogs plus the task runs in flight reach
  `max_unrecorded`. Flows sharing a cluster add a backlog each; one that ends removes its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prefect_azmanagers.exceptions import PrefectAPIUnreachable

OVERLOADED = frozenset({429, 503})


@dataclass
class Backpressure:
    api_url: str
    max_in_flight: int = 256
    min_in_flight: int = 1
    slow_after: float = 5.0
    pause: float = 1.0
    recover_after: int = 8
    give_up_after: float = 300.0
    max_unrecorded: int | None = None
    clock: Callable[[], float] = time.monotonic
    limit: int = field(init=False)
    _backlogs: tuple[Callable[[], int], ...] = field(init=False, default=())
    _held_until: float = field(init=False, default=float("-inf"))
    _good_streak: int = field(init=False, default=0)
    _failing_since: float | None = field(init=False, default=None)
    _last_failure: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if not 1 <= self.min_in_flight <= self.max_in_flight:
            raise ValueError(f"need 1 <= min_in_flight <= max_in_flight, got {self.min_in_flight} "
                             f"and {self.max_in_flight}")
        if self.give_up_after <= 0 or self.slow_after <= 0:
            raise ValueError("give_up_after and slow_after must be positive seconds")
        self.limit = self.max_in_flight

    def may_dispatch(self, in_flight: int) -> bool:
        """True when one more task run may be sent now."""
        return (self.clock() >= self._held_until and in_flight < self.limit
                and not self._recording_behind(in_flight))

    def _recording_behind(self, in_flight: int) -> bool:
        """The task runs sent and not recorded yet (in flight, plus the backlogs) reach
        `max_unrecorded`; never without a backlog to read."""
        if self.max_unrecorded is None or not self._backlogs:
            return False
        return in_flight + sum(backlog() for backlog in self._backlogs) >= self.max_unrecorded

    def pace_by_unrecorded(self, backlog: Callable[[], int]) -> Callable[[], None]:
        """Also read, at each dispatch, `backlog()`: task runs that came back and are not
        recorded by the API yet. Returns what removes it. (Any thread: the tuple is swapped
        whole, so a dispatch reads one or the other.)"""
        self._backlogs = (*self._backlogs, backlog)

        def remove() -> None:
            self._backlogs = tuple(b for b in self._backlogs if b is not backlog)

        return remove

    def wait_time(self) -> float:
        """Seconds until dispatch may resume after a hold (0 when not held)."""
        return max(0.0, self._held_until - self.clock())

    def observe(self, status: int | None, seconds: float, retry_after: float | None = None,
                what: str = "") -> None:
        """One API answer: its HTTP status (None: no answer at all), how long it took, its
        Retry-After header in seconds, and what it was (for the give-up error)."""
        now = self.clock()
        failed = status is None or status in OVERLOADED or status >= 500
        if failed or seconds > self.slow_after:
            self.limit = max(self.min_in_flight, self.limit // 2)
            self._good_streak = 0
            self._held_until = max(self._held_until, now + (retry_after if retry_after is not None
                                                            else self.pause))
        else:
            self._good_streak += 1
            if self._good_streak >= self.recover_after:
                self._good_streak = 0
                self.limit = min(self.max_in_flight, self.limit + 1)
        if failed:
            self._last_failure = (f"{what or 'a request'}: "
                                  f"{'no answer' if status is None else f'HTTP {status}'}")
            if self._failing_since is None:
                self._failing_since = now
        else:
            self._failing_since = None

    def check(self) -> None:
        """Raise PrefectAPIUnreachable when the API answered nothing but failures for longer
        than `give_up_after` seconds."""
        if self._failing_since is not None and self.clock() - self._failing_since > self.give_up_after:
            raise PrefectAPIUnreachable(
                f"The Prefect API at {self.api_url} has answered only failures for "
                f"{self.clock() - self._failing_since:.0f} s (last: {self._last_failure}), more "
                f"than the {self.give_up_after:.0f} s allowed, so the flow stops instead of "
                "waiting forever. Check the server (`prefect server start` log, its /health), "
                "or run large flows on PostgreSQL + Redis (README, \"Large runs\").")
