#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently:
#   - Debian packages (when root): OpenSSH (the local cloud's instances run real sshd),
#     iproute2 (network namespaces), Chromium (UI checks), Open MPI (mpi_ranks_per_worker),
#     PostgreSQL + Redis (a Prefect server for large runs: scripts/services.sh starts them).
#   - a virtual environment in .venv with the package (editable) and its test/mpi extras.
# Re-running is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(openssh-server openssh-client iproute2 procps psmisc util-linux passwd
                 chromium openmpi-bin libopenmpi-dev curl postgresql redis-server)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
fi
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages (install them as root): ${missing[*]}" >&2
  fi
fi

# Node.js for Azurite (the local cloud's Blob Storage): Debian's nodejs + npm unless a node
# and npm are already on PATH (e.g. NodeSource's nodejs, which ships npm itself).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]]; then
    echo "setup: installing Debian packages: nodejs npm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  else
    echo "setup: Node.js is missing (install Debian's nodejs and npm as root): the local cloud runs without Blob Storage" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.azm-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "setup: installing the package and its test extras into .venv (log: .venv/install.log)"
  if ! { .venv/bin/python -m pip install --upgrade pip &&
         .venv/bin/python -m pip install -e ".[test,mpi,blob]"; } > .venv/install.log 2>&1; then
    tail -40 .venv/install.log >&2
    echo "setup: pip install failed (full log: .venv/install.log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi

# Azurite, Microsoft's Blob Storage emulator, from npm into the venv (the local cloud finds it
# there: prefect_azmanagers/localcloud/blob.py).
azurite=.venv/azurite/node_modules/.bin/azurite-blob
if [[ ! -x $azurite ]] && command -v npm >/dev/null 2>&1; then
  echo "setup: installing Azurite from npm into .venv/azurite (log: .venv/azurite-install.log)"
  if ! npm install --prefix .venv/azurite --no-audit --no-fund "azurite@3" > .venv/azurite-install.log 2>&1; then
    tail -20 .venv/azurite-install.log >&2
    echo "setup: npm install azurite failed (full log: .venv/azurite-install.log)" >&2
    exit 1
  fi
fi
