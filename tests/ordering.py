"""A pytest plugin (`-p tests.ordering`, as scripts/test runs the suite): end-to-end files go
first, those with the most tests first, then the rest.

Under `--dist loadfile` a file is one unit of work, handed out in collection order (with
`--no-loadscope-reorder`; xdist's own reorder puts files with the most tests first, which are
quick unit files here). A long end-to-end file handed out last makes the whole run wait for it
alone; handed out first, the quick files fill the other workers around it.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def weight(path: str) -> tuple[bool, int]:
        tests = files[path]
        end_to_end = any(item.get_closest_marker("e2e") for item in tests)
        return not end_to_end, -len(tests)

    items[:] = [item for path in sorted(files, key=weight) for item in files[path]]
