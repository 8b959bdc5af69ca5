"""Join progress on the driver: a rich bar ("workers 3/5 joined") and one log line per join."""

from __future__ import annotations

import logging

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

logger = logging.getLogger("prefect_azmanagers.cluster")


class JoinProgress:
    """Shows how many of `total` workers joined; `show=False` keeps only the log lines."""

    def __init__(self, total: int, *, show: bool):
        self.total = total
        self.joined = 0
        self._bar: Progress | None = None
        if show:
            self._bar = Progress(TextColumn("workers"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("joined"), TimeElapsedColumn(), transient=True)
            self._task = self._bar.add_task("join", total=total)
            self._bar.start()

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def update(self, joined: int) -> None:
        """The number of workers currently joined changed."""
        self.joined = joined
        if self._bar is not None:
            self._bar.update(self._task, completed=min(joined, self.total))
            if joined >= self.total:
                self.stop()

    def worker_joined(self, worker_id: int, instance: str, address: str, slot: int,
                      seconds: float, joined: int) -> None:
        logger.info("worker %d joined (%d/%d): instance %s, %s, slot %d, %.1f s after start",
                    worker_id, joined, self.total, instance, address, slot, seconds)
        self.update(joined)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
