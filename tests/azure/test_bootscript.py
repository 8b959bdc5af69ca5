"""The boot script, run by a real bash: quoting, env file, hooks, status marker, size limit."""

from __future__ import annotations

import base64
import getpass
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefect_azmanagers.azure.bootscript import (
    CUSTOM_DATA_LIMIT,
    READY_STATUS_PATH,
    boot_script,
    encode_custom_data,
)
from prefect_azmanagers.exceptions import ConfigurationError, CustomDataTooLarge

HOSTILE = {
    "SINGLE": "it's",
    "DOUBLE": 'say "hi"',
    "DOLLAR": "$HOME ${PATH} $(id) $((1+1))",
    "BACKTICK": "`touch /tmp/azm-pwned`",
    "NEWLINES": "line1\nline2\n\nline4\n",
    "HEREDOC": "AZM_ENV_EOFX\nEOF\n'AZM_ENV_EOF'",
    "BACKSLASH": "a\\nb\\\\c\\",
    "GLOB": "* ? [a-z] ~ !",
    "SEMI": "x; rm -rf / #",
    "EMPTY": "",
    "UNICODE": "héllo ✓",
}


def run_script(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """Run a boot script as bash would at boot, with the admin's home moved under tmp_path."""
    user = getpass.getuser()
    home = f"/home/{user}"
    path = tmp_path / "boot.sh"
    path.write_text(script.replace(home, str(tmp_path / "home")))
    return subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=30, cwd=tmp_path)


def status(tmp_path: Path) -> str:
    return (tmp_path / "home" / ".azmanagers" / "boot.status").read_text().strip()


def dump_hook(tmp_path: Path, names) -> str:
    # A trusted hook that writes each variable's value to a file, byte for byte.
    return "\n".join(f'printf %s "${name}" > {tmp_path}/out.{name}' for name in names)


def test_hostile_values_arrive_unchanged(tmp_path):
    script = boot_script(admin_username=getpass.getuser(), env=HOSTILE,
                         hooks=[dump_hook(tmp_path, HOSTILE)])
    result = run_script(tmp_path, script)
    assert result.returncode == 0, result.stderr
    for name, value in HOSTILE.items():
        assert (tmp_path / f"out.{name}").read_bytes().decode() == value, name
    assert status(tmp_path) == "ready"
    assert not Path("/tmp/azm-pwned").exists()


def test_env_file_sources_to_the_same_values(tmp_path):
    script = boot_script(admin_username=getpass.getuser(), env=HOSTILE)
    assert run_script(tmp_path, script).returncode == 0
    env_file = tmp_path / "home" / ".azmanagers" / "env.sh"
    reader = tmp_path / "read.sh"
    reader.write_text(f". {env_file}\n" + dump_hook(tmp_path, HOSTILE))
    subprocess.run(["bash", str(reader)], check=True, timeout=30)
    for name, value in HOSTILE.items():
        assert (tmp_path / f"out.{name}").read_bytes().decode() == value, name


@settings(max_examples=25, deadline=None)
@given(value=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")))
def test_any_value_arrives_unchanged(tmp_path_factory, value):
    tmp_path = tmp_path_factory.mktemp("any")
    script = boot_script(admin_username=getpass.getuser(), env={"V": value},
                         hooks=[dump_hook(tmp_path, ["V"])])
    assert run_script(tmp_path, script).returncode == 0
    assert (tmp_path / "out.V").read_bytes().decode() == value


def test_tempdisk_then_hooks_in_order(tmp_path):
    script = boot_script(admin_username=getpass.getuser(), tempdisk=f"echo tempdisk >> {tmp_path}/order",
                         hooks=[f"echo one >> {tmp_path}/order", f"echo two >> {tmp_path}/order"])
    assert run_script(tmp_path, script).returncode == 0
    assert (tmp_path / "order").read_text().split() == ["tempdisk", "one", "two"]
    assert status(tmp_path) == "ready"


def test_failing_hook_marks_failed_with_step_and_stops(tmp_path):
    script = boot_script(admin_username=getpass.getuser(),
                         hooks=["true", "exit 7", f"touch {tmp_path}/never"])
    result = run_script(tmp_path, script)
    assert result.returncode == 7
    marker = status(tmp_path)
    assert marker.startswith("failed: exit 7") and "(hook 2)" in marker
    assert not (tmp_path / "never").exists()


def test_failing_command_reports_its_line(tmp_path):
    script = boot_script(admin_username=getpass.getuser(), hooks=["true\nfalse\ntrue"])
    result = run_script(tmp_path, script)
    line = next(i for i, text in enumerate(script.splitlines(), 1) if text == "false")
    assert result.returncode == 1
    assert status(tmp_path) == f"failed: exit 1 at line {line} (hook 1)"


def test_failing_tempdisk_command_does_not_fail_the_boot(tmp_path):
    # AzManagers' default tempdisk `mkdir`s a directory an image may already have.
    script = boot_script(admin_username=getpass.getuser(),
                         tempdisk=f"mkdir {tmp_path}\ntouch {tmp_path}/after", hooks=["true"])
    result = run_script(tmp_path, script)
    assert result.returncode == 0
    assert (tmp_path / "after").exists() and status(tmp_path) == "ready"
    assert "File exists" in result.stdout + result.stderr


def test_status_path_matches_contract():
    script = boot_script(admin_username="azureuser")
    assert READY_STATUS_PATH.format(admin="azureuser") == "/home/azureuser/.azmanagers/boot.status"
    assert "azm_status_dir=/home/azureuser/.azmanagers" in script


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", "", "A;B"])
def test_invalid_env_names_are_refused(name):
    with pytest.raises(ConfigurationError, match="not a valid shell name"):
        boot_script(admin_username="azureuser", env={name: "x"})


def test_invalid_admin_name_is_refused():
    with pytest.raises(ConfigurationError, match="not a valid Linux user name"):
        boot_script(admin_username="root; rm -rf /")


def test_custom_data_roundtrip_and_limit():
    script = boot_script(admin_username="azureuser", env={"A": "b"})
    assert base64.b64decode(encode_custom_data(script)).decode() == script
    at_limit = "#" * CUSTOM_DATA_LIMIT
    assert len(base64.b64decode(encode_custom_data(at_limit))) == CUSTOM_DATA_LIMIT
    with pytest.raises(CustomDataTooLarge, match=rf"{CUSTOM_DATA_LIMIT + 1} bytes .* at most {CUSTOM_DATA_LIMIT}"):
        encode_custom_data(at_limit + "#")


def test_boot_script_holds_only_what_it_is_given():
    script = boot_script(admin_username="azureuser", env={"PREFECT_LOGGING_LEVEL": "INFO"})
    lowered = script.lower()
    for secret_word in ("cookie", "password", "api_key", "token", "secret"):
        assert secret_word not in lowered
