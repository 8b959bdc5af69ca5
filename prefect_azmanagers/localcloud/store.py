"""SQLite persistence of the local cloud's resources, so ARM state survives a restart.

One row per resource (scale set, VM, NIC): its lower-cased ARM id, its kind and its record as
JSON. Writes are synchronous and small (one row per change), which keeps the model simple and
the file consistent if the process dies.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator

STORE_FILE = "state.db"


class Store:
    """Resource records keyed by ARM id (case-insensitive, as ARM ids are)."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS resources (id TEXT PRIMARY KEY, kind TEXT NOT NULL, record TEXT NOT NULL)"
        )

    def put(self, kind: str, resource_id: str, record: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO resources (id, kind, record) VALUES (?, ?, ?)",
            (resource_id.lower(), kind, json.dumps(record)),
        )

    def delete(self, resource_id: str) -> None:
        self._db.execute("DELETE FROM resources WHERE id = ?", (resource_id.lower(),))

    def load(self, kind: str) -> Iterator[dict[str, Any]]:
        for (record,) in self._db.execute(
            "SELECT record FROM resources WHERE kind = ? ORDER BY rowid", (kind,)
        ):
            yield json.loads(record)

    def close(self) -> None:
        self._db.close()
