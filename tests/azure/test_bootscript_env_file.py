"""The boot script's env file holds the `env=` values, which may be secrets: only its owner reads it."""

from __future__ import annotations

import getpass
import os
import stat

from prefect_azmanagers.azure.bootscript import boot_script
from tests.azure.test_bootscript import HOSTILE, run_script


def test_env_file_is_0600_even_over_an_old_one(tmp_path):
    env_file = tmp_path / "home" / ".azmanagers" / "env.sh"
    env_file.parent.mkdir(parents=True)
    env_file.write_text("# left by an earlier boot, world-readable\n")
    os.chmod(env_file, 0o644)
    script = boot_script(admin_username=getpass.getuser(), env={**HOSTILE, "TOKEN": "s3cret"})
    assert run_script(tmp_path, script).returncode == 0
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "export TOKEN=s3cret" in env_file.read_text()


def test_a_new_env_file_is_0600(tmp_path):
    script = boot_script(admin_username=getpass.getuser(), env={"TOKEN": "s3cret"})
    assert run_script(tmp_path, script).returncode == 0
    assert stat.S_IMODE((tmp_path / "home" / ".azmanagers" / "env.sh").stat().st_mode) == 0o600
