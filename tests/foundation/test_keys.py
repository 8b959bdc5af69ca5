"""SSH keys: the manifest's readers (OpenSSH's permission rule) and `keygen`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import asyncssh
import pytest
from typer.testing import CliRunner

from prefect_azmanagers.blocks import AzureManifest
from prefect_azmanagers.cli import app
from prefect_azmanagers.cli.config import generate_key_pair
from prefect_azmanagers.exceptions import KeyFileError


def manifest(**fields) -> AzureManifest:
    return AzureManifest(subscription_id="SUB", resource_group="rg", ssh_user="cvx", **fields)


@pytest.fixture
def key_pair(tmp_path: Path) -> tuple[Path, Path]:
    return generate_key_pair(tmp_path / "keys" / "azmanagers_rsa")


def test_keygen_writes_a_usable_rsa_pair_with_private_0600(key_pair) -> None:
    private, public = key_pair
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = asyncssh.import_private_key(private.read_text())
    assert key.algorithm == b"ssh-rsa"
    assert key.pyca_key.key_size >= 3072
    assert public.read_text().split()[1] == key.export_public_key().decode().split()[1]


def test_keygen_refuses_to_overwrite(key_pair) -> None:
    private, public = key_pair
    before = private.read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_key_pair(private)
    public.unlink()  # the private key alone is enough to refuse
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_key_pair(private)
    assert private.read_bytes() == before


def test_keygen_cli_creates_then_refuses_with_a_clean_error(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "id"
    first = runner.invoke(app, ["keygen", "--file", str(target)])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, ["keygen", "--file", str(target)])
    assert second.exit_code == 1
    assert "refusing to overwrite" in second.output and "Traceback" not in second.output


def test_reads_keys_from_files_with_tilde_expanded(key_pair, monkeypatch) -> None:
    private, public = key_pair
    monkeypatch.setenv("HOME", str(private.parent.parent))
    m = manifest(ssh_private_key_file="~/keys/azmanagers_rsa", ssh_public_key_file="~/keys/azmanagers_rsa.pub")
    assert m.read_private_key() == private.read_text()
    assert m.read_public_key() == public.read_text().strip()


def test_key_material_takes_precedence_over_files(tmp_path: Path) -> None:
    m = manifest(
        ssh_private_key="-----BEGIN OPENSSH PRIVATE KEY-----\nx\n",
        ssh_public_key="ssh-rsa AAAA me\n",
        ssh_private_key_file=str(tmp_path / "missing"),
        ssh_public_key_file=str(tmp_path / "missing.pub"),
    )
    assert m.read_private_key().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert m.read_public_key() == "ssh-rsa AAAA me"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_private_key_readable_by_others_is_refused_with_the_fix(key_pair, mode: int) -> None:
    private, _ = key_pair
    os.chmod(private, mode)
    with pytest.raises(KeyFileError, match=rf"{mode:04o} .* too open.*chmod 600 {private}"):
        manifest(ssh_private_key_file=str(private)).read_private_key()


def test_missing_key_files_say_how_to_create_them(tmp_path: Path) -> None:
    m = manifest(ssh_private_key_file=str(tmp_path / "nope"), ssh_public_key_file=str(tmp_path / "nope.pub"))
    with pytest.raises(KeyFileError, match="does not exist.*prefect-azmanagers keygen"):
        m.read_private_key()
    with pytest.raises(KeyFileError, match="public key file .* does not exist"):
        m.read_public_key()


def test_unreadable_or_empty_key_file_is_a_key_file_error(tmp_path: Path) -> None:
    directory = tmp_path / "dir-as-key"
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o600)
    with pytest.raises(KeyFileError, match="Cannot read"):
        manifest(ssh_private_key_file=str(directory)).read_private_key()
    empty = tmp_path / "empty"
    empty.touch(mode=0o600)
    with pytest.raises(KeyFileError, match="is empty"):
        manifest(ssh_private_key_file=str(empty)).read_private_key()


def test_known_hosts_path_is_expanded(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert manifest().known_hosts_path() == tmp_path / ".azmanagers" / "known_hosts"
