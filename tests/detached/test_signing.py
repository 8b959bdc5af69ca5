"""Unit tests of `detached.signing`: payload and result MACs, key files, replayed nonces."""

from __future__ import annotations

import stat

import pytest

from prefect_azmanagers.detached import signing
from prefect_azmanagers.detached.signing import JobKey
from prefect_azmanagers.exceptions import UntrustedPayload

RUN = "6c1a3d1e-0000-4000-8000-000000000001"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_a_signed_payload_checks_and_any_change_is_refused():
    key = JobKey.new("azm-a", "vm-id-1")
    signed = key.sign_payload(b"pickle bytes")
    key.check_payload(b"pickle bytes", **signed)
    for payload, fields in [
        (b"pickle bytez", signed),                                   # altered payload
        (b"pickle bytes", {**signed, "nonce": "0" * 32}),            # another nonce
        (b"pickle bytes", {**signed, "key_id": "vm-id-2"}),          # another VM's key id
    ]:
        with pytest.raises(UntrustedPayload, match="does not match"):
            key.check_payload(payload, **fields)
    with pytest.raises(UntrustedPayload, match="does not match"):   # another VM's key
        JobKey.new("azm-a", "vm-id-1").check_payload(b"pickle bytes", **signed)
    with pytest.raises(UntrustedPayload, match="not signed"):
        key.check_payload(b"pickle bytes", key_id=None, nonce=None, mac=None)
    with pytest.raises(UntrustedPayload, match="not signed"):   # JSON parameters of other types
        key.check_payload(b"pickle bytes", **{**signed, "mac": 0})


def test_a_signed_result_is_bound_to_its_run():
    key = JobKey.new("azm-a", "vm-id-1")
    data = {"ok": True, "pickle": "gAN9cQAu", "traceback": None, "blob": None}
    signed = key.sign_result(RUN, data)
    assert key.check_result(RUN, signed) == data
    other_run = RUN.replace("1", "2")
    for run, artifact in [(other_run, signed),                          # copied to another run
                          (RUN, {**signed, "ok": False}),              # altered
                          (RUN, {**signed, "pickle": "gAN9cQEu"}),
                          (RUN, {**signed, "blob": {"block": "b", "path": "p", "sha256": "0"}}),
                          (RUN, {**signed, "vm": "azm-b"}),            # another VM's name
                          (RUN, {**data, "vm": "azm-a", "key_id": "vm-id-1", "mac": "0" * 64})]:
        with pytest.raises(UntrustedPayload, match="not signed by detached VM azm-a"):
            key.check_result(run, artifact)


def test_driver_keys_are_private_files_found_by_vm_name_and_id(home):
    key = JobKey.new("azm-a", "vm-id-1")
    path = signing.save_driver_key(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert signing.load_driver_key("azm-a", "vm-id-1") == key
    with pytest.raises(UntrustedPayload, match="no key of detached VM azm-b"):
        signing.load_driver_key("azm-b", "vm-id-1")       # the key of another VM is not used
    for name, key_id in [("../azm-a", "vm-id-1"), ("azm-a", "../../.ssh/id_rsa")]:
        with pytest.raises(UntrustedPayload, match="is not a VM name or vmId"):
            signing.load_driver_key(name, key_id)
    signing.forget_driver_key("azm-a", "vm-id-1")
    assert not path.exists()


def test_the_vm_key_is_read_from_the_home_and_missing_is_clear(home):
    with pytest.raises(UntrustedPayload, match="this VM has no job key"):
        signing.load_vm_key()
    key = JobKey.new("azm-a", "vm-id-1")
    (home / ".azmanagers").mkdir()
    (home / signing.VM_KEY_FILE).write_bytes(key.to_json())
    assert signing.load_vm_key() == key


def test_a_nonce_runs_once(home):
    nonce = JobKey.new("azm-a", "x").sign_payload(b"")["nonce"]
    signing.claim_nonce(nonce)
    with pytest.raises(UntrustedPayload, match="already ran on this VM"):
        signing.claim_nonce(nonce)
    with pytest.raises(UntrustedPayload, match="32 hex digits"):
        signing.claim_nonce("../x")
