"""Ownership tags, the liveness rule that protects a running creator, and cleanup's durations."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
import typer

from prefect_azmanagers.azure.ownership import (
    CLUSTER_TAG,
    CREATED_TAG,
    CREATOR_TAG,
    KIND_TAG,
    PID_TAG,
    _creator_alive,
    creator,
    ownership_tags,
)
from prefect_azmanagers.cli.azure import parse_duration


def test_tags_name_creator_cluster_time_kind_pid():
    tags = ownership_tags("c-42", kind="detached")
    assert tags[CREATOR_TAG] == creator() and "@" in tags[CREATOR_TAG]
    assert tags[CLUSTER_TAG] == "c-42" and tags[KIND_TAG] == "detached"
    assert tags[PID_TAG] == str(os.getpid())
    created = datetime.fromisoformat(tags[CREATED_TAG])
    assert abs(datetime.now(timezone.utc) - created) < timedelta(minutes=1)
    # Azure tag names may not contain < > % & \ ? /
    assert not any(c in name for name in tags for c in "<>%&\\?/")


def test_live_creator_on_this_host_protects_its_resources():
    assert _creator_alive(ownership_tags("c"), creator())
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not _creator_alive({**ownership_tags("c"), PID_TAG: str(proc.pid)}, creator())
    assert not _creator_alive({**ownership_tags("c"), CREATOR_TAG: "someone@elsewhere"}, creator())
    assert not _creator_alive({CREATOR_TAG: creator()}, creator())


@pytest.mark.parametrize("text, seconds", [("0", 0), ("90s", 90), ("30m", 1800), ("2h", 7200),
                                           ("1d", 86400), ("1.5h", 5400), (" 10M ", 600)])
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "h", "-1h", "2 weeks", "1h30m"])
def test_bad_durations(text):
    with pytest.raises(typer.BadParameter, match="not a duration"):
        parse_duration(text)


class _Listed:
    def __init__(self, raw: dict):
        self.raw = raw

    def as_dict(self) -> dict:
        return self.raw


class _Lister:
    def __init__(self, *raws: dict):
        self.raws = raws

    async def list(self, resource_group: str):
        for raw in self.raws:
            yield _Listed(raw)


def test_cleanup_never_takes_a_flow_runs_vm_and_detached_ones_only_when_asked():
    """An azure-vm worker's VM belongs to its pool's worker (which adopts it after a restart),
    whatever process tag it carries; a dead creator's plain VM is an orphan."""
    import asyncio
    from types import SimpleNamespace

    from prefect_azmanagers.azure.ownership import find_orphans

    def vm(name: str, kind: str) -> dict:
        tags = {**ownership_tags(f"c-{name}", kind=kind), PID_TAG: "999999999"}  # creator gone
        return {"name": name, "tags": tags, "properties": {}}

    clients = SimpleNamespace(
        compute=SimpleNamespace(virtual_machine_scale_sets=_Lister(),
                                virtual_machines=_Lister(vm("run-vm", "azure-vm"), vm("job-vm", "detached"),
                                                         vm("plain", "cluster"))),
        network=SimpleNamespace(network_interfaces=_Lister()))
    names = lambda **kw: sorted(o.name for o in asyncio.run(find_orphans(clients, "rg", **kw)))  # noqa: E731
    assert names() == ["plain"]
    assert names(include_detached=True) == ["job-vm", "plain"]
