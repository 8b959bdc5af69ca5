"""Authentication of detached payloads and results: an HMAC-SHA256 key per detached VM.

Anyone who can write to the Prefect API can create flow runs of a VM's deployment (with any
parameters) and artifacts on any flow run. Both carry pickles, and unpickling runs code, so
neither end unpickles what the other end did not sign:

- `addproc` makes a random 256-bit key for the VM and ships it over SFTP (pinned host key) to
  `~/.azmanagers/detached.key` on the VM (0600). The driver keeps its copy in
  `~/.azmanagers/detached-keys/<vm name>.<vm id>.json` (0600, directory 0700), where any process
  of the same user on that machine (DetachedJob, the persist=False reaper) finds it.
  Not a Prefect Secret block: a block is readable by whoever can write to the API, the very
  party the key must keep out. The key stays after rmproc, so results remain readable.
- A payload is signed over (key id, a fresh nonce, the pickle bytes); the VM checks the MAC
  before it unpickles, and refuses a nonce it has seen (a replayed flow run).
- A result artifact is signed by the VM over (key id, flow-run id, its data); the driver
  refuses a run with no result artifact, more than one, one whose key is not the key of the
  run's VM, or a MAC that does not match, before it unpickles anything.

Imports only the standard library: the VM side runs in the job's flow process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect_azmanagers.exceptions import UntrustedPayload

VM_KEY_FILE = ".azmanagers/detached.key"  # relative to the admin user's home on the VM
DRIVER_KEY_DIR = Path("~/.azmanagers/detached-keys")
SEEN_NONCES_DIR = Path("~/.azmanagers/payloads-seen")  # on the VM
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}\Z")


@dataclass(frozen=True)
class JobKey:
    """The HMAC key shared by the driver and one detached VM; `key_id` is the VM's vmId."""

    vm: str
    key_id: str
    secret: bytes

    @classmethod
    def new(cls, vm: str, key_id: str) -> JobKey:
        return cls(vm, key_id, secrets.token_bytes(32))

    def to_json(self) -> bytes:
        return json.dumps({"vm": self.vm, "key_id": self.key_id,
                           "secret": base64.b64encode(self.secret).decode()}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JobKey:
        record = json.loads(data)
        return cls(record["vm"], record["key_id"], base64.b64decode(record["secret"]))

    def _mac(self, kind: str, *fields: str, body: bytes) -> str:
        head = "\n".join([f"azmanagers-{kind}", self.key_id, *fields, ""]).encode()
        return hmac.new(self.secret, head + body, hashlib.sha256).hexdigest()

    def sign_payload(self, payload: bytes) -> dict[str, str]:
        """The flow-run parameters that authenticate `payload`: key id, nonce, MAC."""
        nonce = secrets.token_hex(16)
        return {"key_id": self.key_id, "nonce": nonce,
                "mac": self._mac("payload", nonce, body=payload)}

    def check_payload(self, payload: bytes, *, key_id: str | None, nonce: str | None,
                      mac: str | None) -> None:
        """UntrustedPayload unless `mac` is this key's MAC of `payload` (nothing unpickled)."""
        if not all(isinstance(field, str) and field for field in (key_id, nonce, mac)):
            raise UntrustedPayload(
                "the job's payload is not signed (no key_id/nonce/mac parameters): only "
                "detachat sends jobs to a detached VM; this flow run was made by something else")
        if key_id != self.key_id or not hmac.compare_digest(
                mac, self._mac("payload", nonce, body=payload)):
            raise UntrustedPayload(
                f"the job's payload signature does not match the key of detached VM {self.vm}: "
                "it was not sent by the driver that made this VM (forged or altered); refused "
                "without unpickling")

    def sign_result(self, flow_run_id: str, data: dict[str, Any]) -> dict[str, Any]:
        """`data` (ok, pickle, traceback, blob) with the VM, key id and MAC over it and the run id."""
        return {**data, "vm": self.vm, "key_id": self.key_id,
                "mac": self._mac("result", self.vm, flow_run_id, body=_canonical(data))}

    def check_result(self, flow_run_id: str, signed: dict[str, Any]) -> dict[str, Any]:
        """The result data if `signed` carries this key's MAC for `flow_run_id`."""
        data = {k: signed.get(k) for k in ("ok", "pickle", "traceback", "blob")}
        mac = signed.get("mac")
        expected = self._mac("result", self.vm, flow_run_id, body=_canonical(data))
        if (signed.get("vm"), signed.get("key_id")) != (self.vm, self.key_id) or \
                not isinstance(mac, str) or not hmac.compare_digest(mac, expected):
            raise UntrustedPayload(
                f"the result artifact of detached job {flow_run_id} is not signed by detached VM "
                f"{self.vm} (forged, altered or copied from another run through the Prefect API); "
                "refused without unpickling")
        return data


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _checked_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise UntrustedPayload(f"{what} {value!r} is not a VM name or vmId; refused")
    return value


def driver_key_path(vm: str, key_id: str) -> Path:
    return DRIVER_KEY_DIR.expanduser() / (
        f"{_checked_name('VM name', vm)}.{_checked_name('key id', key_id)}.json")


def save_driver_key(key: JobKey) -> Path:
    """Keep the driver's copy of `key` in a 0600 file (created exclusively)."""
    path = driver_key_path(key.vm, key.key_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.to_json())
    return path


def forget_driver_key(vm: str, key_id: str) -> None:
    driver_key_path(vm, key_id).unlink(missing_ok=True)


def load_driver_key(vm: str, key_id: str) -> JobKey:
    """The driver's key of detached VM `vm` (vmId `key_id`); UntrustedPayload if unknown here."""
    path = driver_key_path(vm, key_id)
    try:
        return JobKey.from_json(path.read_bytes())
    except FileNotFoundError:
        raise UntrustedPayload(
            f"no key of detached VM {vm} (vmId {key_id}) on this machine ({path}): jobs are "
            "signed, and results checked, with the key addproc made for that VM; use the "
            "machine (and user) that ran addproc, or copy that file from there "
            "(mode 0600)") from None


def load_vm_key() -> JobKey:
    """The VM's key (shipped by addproc); UntrustedPayload if it is missing."""
    path = Path("~").expanduser() / VM_KEY_FILE
    try:
        return JobKey.from_json(path.read_bytes())
    except FileNotFoundError:
        raise UntrustedPayload(
            f"this VM has no job key ({path}): addproc ships it; a VM made otherwise, or by an "
            "older prefect-azmanagers, cannot run signed jobs (re-create it with addproc)") from None


def claim_nonce(nonce: str) -> None:
    """Record `nonce` as used on this VM; UntrustedPayload if it was used before (a replay)."""
    directory = SEEN_NONCES_DIR.expanduser()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not re.fullmatch(r"[0-9a-f]{32}", nonce):
        raise UntrustedPayload(f"nonce {nonce!r} is not 32 hex digits; refused")
    try:
        os.close(os.open(directory / nonce, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise UntrustedPayload(
            f"this signed payload (nonce {nonce}) already ran on this VM: a flow run replayed "
            "through the Prefect API; refused") from None
