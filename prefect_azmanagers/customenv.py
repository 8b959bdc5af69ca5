"""customenv: rebuild the driver's Python environment on every instance at boot.

```python
runner = AzureScaleSetTaskRunner("localcloud-small", 4, customenv=True)
```

`capture_environment()` records what the driver runs: the project's lock file when it has one
(`pylock.toml`, or a fully pinned `requirements.lock` / `requirements.txt`), otherwise the
installed distributions and their versions. Packages installed from local paths (editable
installs included, PEP 610 `direct_url.json`) are built into wheels and shipped inside the spec;
one that cannot be built is an error naming it, never silently dropped.

`customenv_hook(spec, ...)` turns the spec into a bash fragment for the boot script: it unpacks
the compressed spec, creates a virtual environment at `~/.azmanagers/env` layered over the
instance's Python (whose site-packages, holding `prefect_azmanagers`, stay visible behind the
venv's own), pip-installs exactly the captured pins there, and fails the boot with pip's output
tail when that does not work. Agents then run with `env_python(admin_username)`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from prefect_azmanagers.azure.bootscript import CUSTOM_DATA_LIMIT
from prefect_azmanagers.exceptions import ConfigurationError, CustomDataTooLarge, LockFileError

logger = logging.getLogger("prefect_azmanagers.customenv")

# Never part of a spec: packaging tools churn independently of the project, and
# prefect_azmanagers is provided by the instance's Python (docs/architecture.md, "Inside an
# instance"), so the agent that runs the spec's code always matches the instance's image.
EXCLUDED = frozenset({"pip", "setuptools", "wheel", "distribute", "prefect-azmanagers"})

ENV_DIR = "/home/{admin}/.azmanagers/env"

_PIP_CONFIG_OPTIONS = ("index-url", "extra-index-url", "find-links", "no-index", "trusted-host")


class LocalPackageError(ConfigurationError):
    """A package installed from a local path (editable or not) cannot be shipped to instances."""

    def __init__(self, message: str, *, names: Sequence[str]):
        super().__init__(message)
        self.names = tuple(names)


@dataclass(frozen=True)
class LocalWheel:
    """A wheel built from (or copied for) a package the driver installed from a local path."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class EnvironmentSpec:
    """What an instance installs: pinned requirement lines, shipped wheels, pip options."""

    source: str
    requirements: tuple[str, ...]
    wheels: tuple[LocalWheel, ...] = ()
    pip_args: tuple[str, ...] = ()

    def payload(self) -> bytes:
        """The spec as a zlib-compressed tar: requirements.txt, pip-args.txt, wheels/*.whl."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            members = {
                "requirements.txt": "".join(f"{line}\n" for line in self.requirements).encode(),
                "pip-args.txt": "".join(f"{arg}\n" for arg in self.pip_args).encode(),
                **{f"wheels/{w.filename}": w.data for w in self.wheels},
            }
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        return zlib.compress(buffer.getvalue(), 9)


def capture_environment(
    project_dir: str | Path | None = None,
    *,
    paths: Sequence[str] | None = None,
    pip_args: Sequence[str] | None = None,
    use_lock_file: bool = True,
) -> EnvironmentSpec:
    """Capture the driver's environment.

    project_dir: where to look for a lock file (default: the current directory).
    paths: the sys.path entries whose installed distributions form the environment when there
        is no lock file (default: sys.path).
    pip_args: pip options for the instance (index / find-links); default: the index, find-links,
        no-index and trusted-host settings of the driver's pip configuration.
    use_lock_file: False captures the installed distributions even when there is a lock file.
    """
    options = tuple(pip_args) if pip_args is not None else _driver_pip_options()
    lock = _find_lock_file(Path(project_dir or Path.cwd())) if use_lock_file else None
    if lock is not None:
        lock_path, requirements, local = lock
        source = f"lock file {lock_path}"
    else:
        requirements, local = _installed_requirements(
            list(paths) if paths is not None else sys.path)
        source = f"installed distributions of {sys.executable}"
    spec = EnvironmentSpec(source, tuple(requirements), _build_wheels(local), options)
    logger.info("customenv: %s (%d pins, %d local wheels)", spec.source,
                len(spec.requirements), len(spec.wheels))
    return spec


def env_python(admin_username: str) -> str:
    """The interpreter of the environment customenv builds on an instance."""
    return ENV_DIR.format(admin=admin_username) + "/bin/python"


def boot_hooks(customenv: bool | EnvironmentSpec, *, admin_username: str,
               python: str) -> tuple[list[str], str]:
    """The boot hooks that build the customenv environment on an instance (none when
    `customenv` is false), and the interpreter that runs there afterwards. `True` captures the
    driver's environment now; an `EnvironmentSpec` is reused."""
    if not customenv:
        return [], python
    spec = customenv if isinstance(customenv, EnvironmentSpec) else capture_environment()
    return ([customenv_hook(spec, admin_username=admin_username, python=python)],
            env_python(admin_username))


def customenv_hook(spec: EnvironmentSpec, *, admin_username: str, python: str) -> str:
    """A bash fragment for boot_script(hooks=[...]) that builds the spec's environment.

    Raises CustomDataTooLarge (with the sizes and the largest shipped wheels) when the fragment
    alone exceeds Azure's customData limit.
    """
    encoded = base64.encodebytes(spec.payload()).decode("ascii")
    env_dir = ENV_DIR.format(admin=admin_username)
    q = shlex.quote
    fragment = _HOOK_TEMPLATE.format(
        env=q(env_dir),
        python=q(python),
        admin=q(admin_username),
        log=q(f"/home/{admin_username}/.azmanagers/customenv.log"),
        summary=q(f"{len(spec.requirements)} pins, {len(spec.wheels)} shipped wheels"
                  f" from {spec.source}"),
        unpack=q(_UNPACK_PY),
        layer=q(_LAYER_PY),
        payload=encoded,
    )
    if len(fragment.encode()) > CUSTOM_DATA_LIMIT:
        largest = sorted(spec.wheels, key=lambda w: len(w.data), reverse=True)[:3]
        detail = ", ".join(f"{w.filename} ({len(w.data)} bytes)" for w in largest) or "none"
        raise CustomDataTooLarge(
            f"customenv: the environment spec needs {len(fragment.encode())} bytes of customData "
            f"but Azure allows {CUSTOM_DATA_LIMIT}: {len(spec.requirements)} pinned requirements, "
            f"largest shipped wheels: {detail}. Install large local packages from an index "
            f"(pip_args) or into the image instead of shipping them."
        )
    return fragment


# Runs on the instance with its Python: unpack the spec into a directory.
_UNPACK_PY = """\
import base64, io, sys, tarfile, zlib
data = zlib.decompress(base64.b64decode(sys.stdin.read()))
kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
tarfile.open(fileobj=io.BytesIO(data)).extractall(sys.argv[1], **kw)
"""

# Runs on the instance with its Python: a .pth line layering its site directories (processed
# with their own .pth files, so editable installs keep working) behind the venv's own.
_LAYER_PY = """\
import sys
dirs = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
print("import site; " + "; ".join("site.addsitedir(%r)" % d for d in dirs))
"""

_HOOK_TEMPLATE = """\
# customenv (prefect_azmanagers.customenv): the driver's packages in a venv over the base Python.
# The build runs in its own bash so its errexit holds; a failure names pip's tail in boot.status.
azm_step=customenv
azm_ce_dir=$(mktemp -d)
cat > "$azm_ce_dir/build.sh" <<'AZM_CUSTOMENV_SCRIPT'
set -euo pipefail
work=$1; env={env}; log={log}
mkdir -p "$(dirname "$log")"
echo customenv: installing {summary}
{python} -c {unpack} "$work" <<'AZM_CUSTOMENV_PAYLOAD'
{payload}AZM_CUSTOMENV_PAYLOAD
rm -rf "$env"
{python} -m venv --without-pip "$env"
purelib=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
{python} -c {layer} > "$purelib/_azmanagers_base.pth"
"$env/bin/python" -m pip --version >/dev/null 2>&1 || "$env/bin/python" -m ensurepip -q
mapfile -t pip_args < "$work/pip-args.txt"
wheels=("$work"/wheels/*.whl)
[[ -e ${{wheels[0]}} ]] || wheels=()
echo "customenv: pip install into $env"
if ! "$env/bin/python" -m pip install --disable-pip-version-check --no-input --progress-bar off \\
    "${{pip_args[@]}}" -r "$work/requirements.txt" "${{wheels[@]}}" >"$log" 2>&1; then
  cat "$log"
  echo "pip install failed: $(tail -n 15 "$log" | tr '\\n' ' ' | cut -c1-1500)" > "$work/reason"
  exit 1
fi
cat "$log"
chown -R {admin}: "$env" "$log"
echo "customenv: ready: $env/bin/python"
AZM_CUSTOMENV_SCRIPT
azm_ce_rc=0
bash "$azm_ce_dir/build.sh" "$azm_ce_dir" || azm_ce_rc=$?
if [ "$azm_ce_rc" -ne 0 ]; then
  azm_step="customenv: $(cat "$azm_ce_dir/reason" 2>/dev/null || echo "failed, see the log above")"
  rm -rf "$azm_ce_dir"
  exit "$azm_ce_rc"
fi
rm -rf "$azm_ce_dir"
"""


def _driver_pip_options() -> tuple[str, ...]:
    """Index and find-links options of the driver's pip configuration, as pip arguments."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
            timeout=60, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("customenv: cannot read the driver's pip configuration: %s", exc)
        return ()
    args: list[str] = []
    seen: set[tuple[str, str]] = set()
    for line in out.splitlines():
        key, _, raw = line.partition("=")
        option = key.rpartition(".")[2]
        if option not in _PIP_CONFIG_OPTIONS:
            continue
        value = raw.strip().strip("'\"")
        for item in value.split() if option != "no-index" else [value]:
            if (option, item) in seen:
                continue
            seen.add((option, item))
            if option == "no-index":
                if item.lower() in ("1", "true", "yes", "on"):
                    args.append("--no-index")
                continue
            _refuse_credentials(item, f"pip configuration {key}")
            args += [f"--{option}", item]
    return tuple(args)


def _refuse_credentials(url: str, where: str) -> None:
    if urllib.parse.urlsplit(url).password or "@" in urllib.parse.urlsplit(url).netloc:
        raise ConfigurationError(
            f"customenv: {where} holds credentials ({urllib.parse.urlsplit(url).hostname}); "
            "customData must hold no secret. Configure that index on the image (pip.conf or "
            "keyring) and pass pip_args without credentials."
        )


def _installed_requirements(paths: list[str]) -> tuple[list[str], list[tuple[str, Path]]]:
    """Pins of the distributions on `paths` (first one of a name wins, as imports do)."""
    pins: list[str] = []
    local: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for dist in metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if not name:
            continue
        key = _normalize(name)
        if key in seen:
            continue
        seen.add(key)
        if key in EXCLUDED:
            continue
        requirement, local_path = _requirement_of(name, dist.version, dist.read_text("direct_url.json"))
        if local_path is not None:
            local.append((name, local_path))
        else:
            pins.append(requirement)
    return sorted(pins, key=str.lower), local


def _requirement_of(name: str, version: str, direct_url: str | None) -> tuple[str, Path | None]:
    """A pip requirement for one installed distribution, or the local path to build it from."""
    if not direct_url:
        return f"{name}=={version}", None
    info = json.loads(direct_url)
    url = info["url"]
    if url.startswith("file:"):
        return "", Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    _refuse_credentials(url, f"the install URL of {name}")
    vcs = info.get("vcs_info")
    if vcs:
        return f"{name} @ {vcs['vcs']}+{url}@{vcs['commit_id']}", None
    return f"{name} @ {url}", None


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _find_lock_file(project_dir: Path) -> tuple[Path, list[str], list[tuple[str, Path]]] | None:
    """(lock path, pins, local packages) from the project's lock file, or None without one."""
    pylock = project_dir / "pylock.toml"
    if pylock.is_file():
        return (pylock, *_pylock_requirements(pylock))
    for name in ("requirements.lock", "requirements.txt"):
        path = project_dir / name
        if path.is_file():
            parsed = _pinned_requirements(path)
            if parsed is None:
                logger.info("customenv: %s is not fully pinned; capturing installed "
                            "distributions instead", path)
                return None
            return (path, *parsed)
    if (project_dir / "uv.lock").is_file():
        logger.info("customenv: uv.lock is uv's own format, which pip cannot install; capturing "
                    "installed distributions (or `uv export --format pylock.toml`)")
    return None


def _pylock_requirements(path: Path) -> tuple[list[str], list[tuple[str, Path]]]:
    """Pins from a PEP 751 lock file: index packages by version, VCS by commit, paths built."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LockFileError(f"customenv: cannot read {path}: {exc}") from exc
    pins: list[str] = []
    local: list[tuple[str, Path]] = []
    for package in document.get("packages", []):
        name = package.get("name")
        if not name:
            raise LockFileError(f"customenv: {path}: a [[packages]] entry has no name")
        if _normalize(name) in EXCLUDED:
            continue
        marker = f" ; {package['marker']}" if package.get("marker") else ""
        source = _pylock_local_source(package)
        if source is not None:
            local.append((name, (path.parent / source).resolve()))
        elif "vcs" in package:
            vcs = package["vcs"]
            _refuse_credentials(vcs["url"], f"{path} ({name})")
            pins.append(f"{name} @ {vcs['type']}+{vcs['url']}@{vcs['commit-id']}{marker}")
        elif "archive" in package:
            _refuse_credentials(package["archive"]["url"], f"{path} ({name})")
            pins.append(f"{name} @ {package['archive']['url']}{marker}")
        elif package.get("version"):
            pins.append(f"{name}=={package['version']}{marker}")
        else:
            raise LockFileError(f"customenv: {path}: package {name} has neither a version nor "
                                "a source pip can install")
    return pins, local


def _pylock_local_source(package: dict) -> str | None:
    """The local path of a pylock package installed from a directory or a local file."""
    if "directory" in package:
        return package["directory"]["path"]
    for key in ("archive", "sdist"):
        if key in package and package[key].get("path") and not package[key].get("url"):
            return package[key]["path"]
    wheels = package.get("wheels") or []
    if wheels and all(w.get("path") and not w.get("url") for w in wheels):
        return wheels[0]["path"]
    return None


_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?\s*(===?[^,;\s]+|@\s*\S+)")


def _pinned_requirements(path: Path) -> tuple[list[str], list[tuple[str, Path]]] | None:
    """Lines of a requirements file if every requirement is pinned (== or @ URL), else None."""
    pins: list[str] = []
    local: list[tuple[str, Path]] = []
    text = path.read_text().replace("\\\n", " ")
    for number, raw in enumerate(text.splitlines(), 1):
        line = " ".join(raw.split(" #", 1)[0].split())
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-e ", "--editable ")):
            target = line.split(None, 1)[1].strip()
            local.append((target, (path.parent / target).resolve()))
        elif line.startswith("-"):
            raise LockFileError(
                f"customenv: {path} line {number}: option {line.split()[0]} is not supported in "
                "a lock file; pass index options as pip_args")
        elif _PIN.match(line):
            if "@" in line.split(";")[0]:
                _refuse_credentials(line.split("@", 1)[1].split()[0], f"{path} line {number}")
            pins.append(line)
        else:
            return None
    return pins, local


def _build_wheels(local: Iterable[tuple[str, Path]]) -> tuple[LocalWheel, ...]:
    """Wheels for local-path packages: copied when already a wheel, built by pip otherwise."""
    wheels: list[LocalWheel] = []
    failures: list[str] = []
    for name, path in local:
        if path.suffix == ".whl" and path.is_file():
            wheels.append(LocalWheel(path.name, path.read_bytes()))
            continue
        if not path.exists():
            failures.append(f"{name}: installed from {path}, which no longer exists")
            continue
        built, error = _pip_wheel(path)
        if built is None:
            failures.append(f"{name}: building a wheel from {path} failed: {error}")
        else:
            wheels.append(built)
    if failures:
        raise LocalPackageError(
            "customenv: packages installed from local paths cannot be shipped to the instances:\n  "
            + "\n  ".join(failures)
            + "\nInstall them from an index, make them buildable (pip wheel --no-build-isolation),"
            " or uninstall them from the driver's environment.",
            names=[f.split(":", 1)[0] for f in failures],
        )
    return tuple(wheels)


def _pip_wheel(path: Path) -> tuple[LocalWheel | None, str]:
    """Build a wheel with the driver's pip: first with its installed build backend (offline),
    then in an isolated build environment. Returns (wheel, "") or (None, pip's output tail)."""
    error = ""
    for isolation in (["--no-build-isolation"], []):
        with tempfile.TemporaryDirectory(prefix="azm-customenv-") as out:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                 "--disable-pip-version-check", "-q", "-w", out, str(path)],
                capture_output=True, text=True, timeout=600,
            )
            built = sorted(Path(out).glob("*.whl"))
            if result.returncode == 0 and built:
                return LocalWheel(built[0].name, built[0].read_bytes()), ""
            error = " | ".join((result.stderr or result.stdout).strip().splitlines()[-5:])
    return None, error
