"""customenv: capture (installed pins, lock files, local packages) and the boot hook, run by
real bash with real pip in a private mount namespace whose /home is a tmpfs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zlib
from importlib import metadata
from pathlib import Path

import pytest

from prefect_azmanagers.azure.bootscript import boot_script
from prefect_azmanagers.customenv import (
    CUSTOM_DATA_LIMIT,
    EnvironmentSpec,
    LocalPackageError,
    LocalWheel,
    LockFileError,
    boot_hooks,
    capture_environment,
    customenv_hook,
    env_python,
)
from prefect_azmanagers.exceptions import ConfigurationError, CustomDataTooLarge

from .wheels import build_wheel

ADMIN = "nobody"  # an existing account, so the hook's chown works; /home is a private tmpfs


def _install_target(tmp_path: Path, wheel: Path) -> Path:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True)
    return target


def _fake_dist(site: Path, name: str, version: str, direct_url: dict | None) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))


def test_installed_pins_ship_local_wheels_and_exclude_tooling(tmp_path):
    wheel = build_wheel(tmp_path, "azm-tiny", "0.3.1", {"azm_tiny/__init__.py": "ANSWER = 42\n"})
    site = _install_target(tmp_path, wheel)
    spec = capture_environment(tmp_path, paths=[*sys.path, str(site)], pip_args=[])
    assert f"cloudpickle=={metadata.version('cloudpickle')}" in spec.requirements
    assert f"prefect=={metadata.version('prefect')}" in spec.requirements
    names = {r.split("==")[0].lower() for r in spec.requirements}
    assert not names & {"pip", "setuptools", "prefect-azmanagers", "azm-tiny"}
    assert [w.filename for w in spec.wheels] == [wheel.name]
    assert spec.wheels[0].data == wheel.read_bytes()
    assert spec.source.startswith("installed distributions")


def test_direct_urls_become_pins_or_errors(tmp_path):
    site = tmp_path / "site"
    _fake_dist(site, "from-git", "1.0", {"url": "https://example.org/r.git",
                                         "vcs_info": {"vcs": "git", "commit_id": "abc123"}})
    _fake_dist(site, "from-url", "2.0", {"url": "https://example.org/x-2.0.tar.gz",
                                         "archive_info": {}})
    spec = capture_environment(tmp_path, paths=[str(site)], pip_args=[])
    assert spec.requirements == ("from-git @ git+https://example.org/r.git@abc123",
                                 "from-url @ https://example.org/x-2.0.tar.gz")

    _fake_dist(site, "gone-editable", "0.1", {"url": (tmp_path / "nowhere").as_uri(),
                                              "dir_info": {"editable": True}})
    with pytest.raises(LocalPackageError) as err:
        capture_environment(tmp_path, paths=[str(site)], pip_args=[])
    assert err.value.names == ("gone-editable",)
    assert "no longer exists" in str(err.value)


def test_credentials_in_install_urls_are_refused_without_echoing_them(tmp_path):
    site = tmp_path / "site"
    _fake_dist(site, "private", "1.0", {"url": "https://user:s3cr3t@pkgs.example.org/p-1.0.whl",
                                        "archive_info": {}})
    with pytest.raises(ConfigurationError) as err:
        capture_environment(tmp_path, paths=[str(site)], pip_args=[])
    assert "pkgs.example.org" in str(err.value) and "s3cr3t" not in str(err.value)


def test_driver_pip_configuration_becomes_pip_args(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_FIND_LINKS", "/srv/wheels")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    spec = capture_environment(tmp_path, paths=[str(tmp_path)])
    assert "--no-index" in spec.pip_args
    i = spec.pip_args.index("--find-links")
    assert spec.pip_args[i + 1] == "/srv/wheels"

    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "https://u:tok3n@idx.example.org/simple")
    with pytest.raises(ConfigurationError) as err:
        capture_environment(tmp_path, paths=[str(tmp_path)])
    assert "idx.example.org" in str(err.value) and "tok3n" not in str(err.value)


def test_pylock_toml_is_preferred_and_translated(tmp_path):
    wheel = build_wheel(tmp_path, "azm-local", "1.0", {"azm_local.py": "X = 1\n"})
    (tmp_path / "requirements.txt").write_text("ignored==1.0\n")
    (tmp_path / "pylock.toml").write_text(f"""
lock-version = "1.0"
created-by = "test"
[[packages]]
name = "attrs"
version = "25.1.0"
[[packages]]
name = "colorama"
version = "0.4.6"
marker = "sys_platform == 'win32'"
[[packages]]
name = "pip"
version = "25.0"
[[packages]]
name = "from-git"
vcs = {{ type = "git", url = "https://example.org/r.git", commit-id = "abc" }}
[[packages]]
name = "azm-local"
version = "1.0"
wheels = [{{ path = "{wheel.name}" }}]
""")
    spec = capture_environment(tmp_path, pip_args=[])
    assert spec.source == f"lock file {tmp_path / 'pylock.toml'}"
    assert spec.requirements == ("attrs==25.1.0", "colorama==0.4.6 ; sys_platform == 'win32'",
                                 "from-git @ git+https://example.org/r.git@abc")
    assert [w.filename for w in spec.wheels] == [wheel.name]

    (tmp_path / "pylock.toml").write_text("[[packages]]\nname = 'noversion'\n")
    with pytest.raises(LockFileError, match="noversion"):
        capture_environment(tmp_path, pip_args=[])


def test_requirements_lock_only_when_fully_pinned(tmp_path):
    (tmp_path / "requirements.txt").write_text(
        "# pinned by pip-compile\nattrs==25.1.0 \\\n    --hash=sha256:abc\nidna==3.10 ; python_version >= '3'\n")
    spec = capture_environment(tmp_path, pip_args=[], paths=[])
    assert spec.requirements == ("attrs==25.1.0 --hash=sha256:abc",
                                 "idna==3.10 ; python_version >= '3'")

    (tmp_path / "requirements.txt").write_text("attrs==25.1.0\nrequests>=2\n")
    spec = capture_environment(tmp_path, pip_args=[], paths=[])
    assert spec.source.startswith("installed distributions")

    (tmp_path / "requirements.txt").write_text("--index-url https://x/simple\nattrs==25.1.0\n")
    with pytest.raises(LockFileError, match="--index-url"):
        capture_environment(tmp_path, pip_args=[], paths=[])


def test_payload_round_trips(tmp_path):
    spec = EnvironmentSpec("test", ("a==1", "b==2"), (LocalWheel("c-1-py3-none-any.whl", b"zip"),),
                           ("--find-links", "/dir with space"))
    tar = tarfile.open(fileobj=io.BytesIO(zlib.decompress(spec.payload())))
    assert tar.extractfile("requirements.txt").read() == b"a==1\nb==2\n"
    assert tar.extractfile("pip-args.txt").read() == b"--find-links\n/dir with space\n"
    assert tar.extractfile("wheels/c-1-py3-none-any.whl").read() == b"zip"


def test_hook_too_large_names_the_sizes(tmp_path):
    big = LocalWheel("huge-1.0-py3-none-any.whl", os.urandom(CUSTOM_DATA_LIMIT))
    spec = EnvironmentSpec("test", ("attrs==25.1.0",), (big,))
    with pytest.raises(CustomDataTooLarge) as err:
        customenv_hook(spec, admin_username=ADMIN, python=sys.executable)
    message = str(err.value)
    assert "huge-1.0-py3-none-any.whl" in message and str(CUSTOM_DATA_LIMIT) in message


def _run_hook(hook: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the control plane's boot script with the hook (bash, root) with a private tmpfs
    /home; the resulting /home is copied out to tmp_path/home for inspection."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("the hook test needs root and unshare (as in CI)")
    script = tmp_path / "boot.sh"
    script.write_text(boot_script(admin_username=ADMIN, hooks=[hook]))
    out = tmp_path / "home"
    check = (f"{env_python(ADMIN)} -c 'import azm_tiny, prefect_azmanagers, sys; "
             "print(azm_tiny.ANSWER, sys.prefix)' > /home/check.txt 2>&1 || true")
    inner = (f"mount -t tmpfs none /home && mkdir -p /home/{ADMIN}/.azmanagers && "
             f"bash {script}; rc=$?; {check}; cp -a /home {out}; exit $rc")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", inner],
                          capture_output=True, text=True, timeout=300)
    return proc, out


def test_hook_builds_a_layered_venv_with_the_pins(tmp_path):
    wheel = build_wheel(tmp_path, "azm-tiny", "0.3.1", {"azm_tiny/__init__.py": "ANSWER = 42\n"})
    site = _install_target(tmp_path, wheel)
    spec = capture_environment(tmp_path, paths=[*sys.path, str(site)], pip_args=["--no-index"])
    proc, home = _run_hook(customenv_hook(spec, admin_username=ADMIN, python=sys.executable),
                           tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "customenv: ready" in proc.stdout
    assert (home / ADMIN / ".azmanagers/boot.status").read_text() == "ready\n"
    assert (home / "check.txt").read_text().split() == ["42", f"/home/{ADMIN}/.azmanagers/env"]
    assert "Successfully installed azm-tiny-0.3.1" in (home / ADMIN / ".azmanagers/customenv.log").read_text()


def test_hook_failure_writes_the_pip_tail_to_boot_status(tmp_path):
    hostile = f"lock file $(touch {tmp_path}/pwned) `touch {tmp_path}/pwned2` 'quoted'"
    spec = EnvironmentSpec(hostile, ("azm-no-such-package==9.9",), (), ("--no-index",))
    proc, home = _run_hook(customenv_hook(spec, admin_username=ADMIN, python=sys.executable),
                           tmp_path)
    assert hostile in proc.stdout  # the spec's text is data in the script, never code
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    assert proc.returncode != 0
    status = (home / ADMIN / ".azmanagers/boot.status").read_text()
    assert status.startswith("failed: exit 1 at line")
    assert "(customenv: pip install failed:" in status
    assert "azm-no-such-package" in status
    assert "No matching distribution" in proc.stdout  # pip's full output is in the boot log


def test_boot_hooks_are_the_one_place_cluster_detached_vms_and_the_worker_get_customenv():
    assert boot_hooks(False, admin_username="cvx", python="python3") == ([], "python3")
    spec = EnvironmentSpec("test", ("a==1",))
    hooks, python = boot_hooks(spec, admin_username="cvx", python="/usr/bin/python3")
    assert hooks == [customenv_hook(spec, admin_username="cvx", python="/usr/bin/python3")]
    assert python == env_python("cvx")
