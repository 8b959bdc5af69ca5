"""The cluster's membership lines (joins, lost and replaced workers) in the flow run's log."""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any


class MembershipLogRelay(logging.Handler):
    """Puts the cluster's membership lines (joins, lost and replaced workers) in the flow
    run's log, and so in the UI; lines logged before the flow run is known are kept until then.
    """

    _LOGGER = "prefect_azmanagers.cluster"
    _MAX_PENDING = 1000

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._lock_pending = threading.Lock()
        self._pending: list[logging.LogRecord] = []
        self._target: tuple[Any, contextvars.Context] | None = None
        self._raised_level = False

    @classmethod
    def install(cls) -> MembershipLogRelay:
        relay = cls()
        logger = logging.getLogger(cls._LOGGER)
        if not logger.isEnabledFor(logging.INFO):
            # Raised for the relay only: the lines must not also reach the root's handlers,
            # which were not asking for them (they would print twice on the console).
            logger.setLevel(logging.INFO)
            logger.propagate = False
            relay._raised_level = True
        logger.addHandler(relay)
        return relay

    def uninstall(self) -> None:
        logger = logging.getLogger(self._LOGGER)
        logger.removeHandler(self)
        if self._raised_level:
            logger.setLevel(logging.NOTSET)
            logger.propagate = True

    def attach(self, flow_logger: Any, context: contextvars.Context) -> None:
        with self._lock_pending:
            self._target = (flow_logger, context)
            pending, self._pending = self._pending, []
        for record in pending:
            self._forward(record)

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_pending:
            if self._target is None:
                if len(self._pending) < self._MAX_PENDING:
                    self._pending.append(record)
                return
        self._forward(record)

    def _forward(self, record: logging.LogRecord) -> None:
        assert self._target is not None
        flow_logger, context = self._target
        context.copy().run(flow_logger.log, record.levelno, "%s", record.getMessage())
