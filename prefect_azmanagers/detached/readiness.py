"""Is a new detached VM's worker coming up? `wait_until_serving` finds out early.

A worker that cannot reach the Prefect API keeps retrying (with a growing back-off), and one
whose interpreter lacks Prefect is restarted every 5 s by the VM's loop: neither ever comes
online, and waiting for a heartbeat alone would wait out the whole worker timeout. So, until the
pool's worker is online, addproc also watches the VM over its pinned SSH connection:

- the boot status (`~/.azmanagers/boot.status`): "failed: ..." means the worker never started;
- the worker's log (`~/.azmanagers/worker.log`): MAX_WORKER_EXITS restarts mean it keeps exiting;
- a probe run on the VM (stdlib Python, the worker's URL and API key): `GET <api>/health` must
  answer 200; failing for PROBE_PATIENCE seconds (a few probes) means the VM cannot use the API.

Each ends in an error naming the cause and the setting that fixes it. `Readiness` holds the
decisions (no I/O, unit-tested); `wait_until_serving` does the reading.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncssh

from prefect_azmanagers.azure.bootscript import READY_STATUS_PATH, boot_log_tail
from prefect_azmanagers.exceptions import AzManagersError, BootFailed, PrefectAPIUnreachable

WORKER_LOG = ".azmanagers/worker.log"  # relative to the admin user's home
WORKER_EXIT_LINE = "worker exited with"  # what the VM's restart loop writes after each exit
API_ENV_FILE = ".azmanagers/prefect.env"  # the worker's API key, when the driver has one
MAX_WORKER_EXITS = 3
PROBE_PATIENCE = 15.0  # seconds of failing probes (at least PROBE_ATTEMPTS) before giving up
PROBE_ATTEMPTS = 3
POLL_SECONDS = 1.0
_LOG_LINES = 15

# Run on the VM by the interpreter the worker uses (stdlib only): prints {"status", "error"}.
_PROBE = """\
import json, os, sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1].rstrip("/") + "/health")
if os.environ.get("PREFECT_API_KEY"):
    request.add_header("Authorization", "Bearer " + os.environ["PREFECT_API_KEY"])
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        print(json.dumps({"status": response.status, "error": ""}))
except urllib.error.HTTPError as exc:
    print(json.dumps({"status": exc.code, "error": str(exc)}))
except Exception as exc:
    reason = getattr(exc, "reason", exc)
    print(json.dumps({"status": None, "error": f"{type(reason).__name__}: {reason}"}))
"""


@dataclass(frozen=True)
class Probe:
    """What `GET <api>/health` from the VM gave: an HTTP status, or None and the error."""

    status: int | None
    error: str

    @property
    def ok(self) -> bool:
        return self.status == 200


def probe_command(python: str, api_url: str) -> str:
    """The shell command probing `api_url` from the VM, with the worker's API key if any."""
    env_file = shlex.quote(API_ENV_FILE)
    return (f"cd; if [ -f {env_file} ]; then set -a; . {env_file}; set +a; fi; "
            f"exec {shlex.join([python, '-c', _PROBE, api_url])}")


def parse_probe(output: str) -> Probe | None:
    """The probe's result, or None when the probe itself could not run (no such python...)."""
    try:
        result = json.loads(output.strip().splitlines()[-1])
        return Probe(result["status"], result["error"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def worker_log_tail(log: str) -> str:
    """The worker log's last lines without traceback frames (indented lines)."""
    lines = [line for line in log.splitlines() if line.strip() and not line.startswith(" ")]
    return "\n".join(lines[-_LOG_LINES:])


class Readiness:
    """The decisions of `wait_until_serving`: from observations to an error, or None (wait)."""

    def __init__(self, *, vm: str, api_url: str, url_source: str, python: str,
                 local_cloud: bool, timeout: float, now: float):
        self.vm, self.api_url, self.url_source = vm, api_url, url_source
        self.python, self.local_cloud = python, local_cloud
        self.deadline = now + timeout
        self.timeout = timeout
        self.api_reached = False
        self._failing_since: float | None = None
        self._failures: list[Probe] = []

    @property
    def needs_probe(self) -> bool:
        return not self.api_reached

    def record_probe(self, probe: Probe | None, now: float) -> None:
        if probe is None:   # inconclusive: the worker's own exits will tell
            return
        if probe.ok:
            self.api_reached = True
            return
        if self._failing_since is None:
            self._failing_since = now
        self._failures.append(probe)

    def verdict(self, *, boot_status: str | None, worker_exits: int, now: float
                ) -> Callable[[str, str], AzManagersError] | None:
        """None while the worker may still come up; else a maker of the error, which takes
        the worker log's tail and the boot log's tail."""
        if boot_status is not None and boot_status != "ready":
            return lambda worker_log, boot_log: BootFailed(
                f"The boot script of detached VM {self.vm} failed ({boot_status}), so its Prefect "
                f"worker never started. Its boot log:\n{boot_log}")
        if self._failures and len(self._failures) >= PROBE_ATTEMPTS \
                and now - self._failing_since >= PROBE_PATIENCE:
            return lambda worker_log, boot_log: self._unreachable(now, worker_log)
        if worker_exits >= MAX_WORKER_EXITS:
            return lambda worker_log, boot_log: BootFailed(
                f"The Prefect worker of detached VM {self.vm} keeps exiting ({worker_exits} exits; "
                f"the VM restarts it every 5 s). The end of its log (~/{WORKER_LOG} on the VM):\n"
                f"{worker_log}\nThe worker runs `{self.python} -m prefect worker start`: that "
                f"interpreter, the manifest's `python` ({self.python}), must have prefect and "
                "prefect-azmanagers installed on the VM. Fix the image or the manifest's python "
                "(`prefect-azmanagers manifest write ... --python PATH`), or pass customenv=True "
                "to build the driver's environment on the VM.")
        if now >= self.deadline:
            return lambda worker_log, boot_log: BootFailed(
                f"the Prefect worker of detached VM {self.vm} did not come online within "
                f"{self.timeout:.0f} s. The end of its log (~/{WORKER_LOG} on the VM):\n"
                f"{worker_log}\nIts boot log:\n{boot_log}")
        return None

    def _unreachable(self, now: float, worker_log: str) -> PrefectAPIUnreachable:
        last = self._failures[-1]
        if last.status is None:
            what = f"cannot reach the Prefect API at {self.api_url}: {last.error}"
            fix = "set prefect_api_url_for_vms to the API's URL as the VMs reach it"
        elif last.status in (401, 403):
            what = (f"is refused by the Prefect API at {self.api_url} (HTTP {last.status}): the "
                    "VM uses the driver's PREFECT_API_KEY, shipped to ~/.azmanagers/prefect.env")
            fix = "check the driver's PREFECT_API_KEY (`prefect config view`), or set " \
                  "prefect_api_url_for_vms to the workspace's API URL"
        elif last.status >= 500:
            what = (f"gets HTTP {last.status} from {self.api_url}/health: the server answers but "
                    "fails (its own log says why)")
            fix = "repair the server behind that URL, or set prefect_api_url_for_vms to another"
        else:
            what = (f"gets HTTP {last.status} from {self.api_url}/health: that URL is not a "
                    "Prefect API (it ends in /api, e.g. http://host:4200/api)")
            fix = "set prefect_api_url_for_vms to the API's URL as the VMs reach it"
        message = (
            f"The Prefect worker of detached VM {self.vm} {what} (a probe run on the VM failed "
            f"{len(self._failures)} times over {now - self._failing_since:.0f} s). The URL is "
            f"{self.url_source}: {fix} (`prefect-azmanagers manifest write ... "
            "--prefect-api-url-for-vms URL`).")
        if self.local_cloud:
            message += (
                " On the local cloud, VMs reach the driver's Prefect API only through the "
                "forwarder that `prefect-azmanagers localcloud start --prefect-api-url "
                "<your PREFECT_API_URL>` makes; it saves that URL as prefect_api_url_for_vms in "
                "the localcloud manifest.")
        if worker_log:
            message += f"\nThe end of the worker's log (~/{WORKER_LOG} on the VM):\n{worker_log}"
        return PrefectAPIUnreachable(message)


def observe_command(admin: str) -> str:
    """Prints the boot status (maybe nothing), then, always as the last line, the worker's exits."""
    status = shlex.quote(READY_STATUS_PATH.format(admin=admin))
    return (f"cat {status} 2>/dev/null; echo; cat {shlex.quote(WORKER_LOG)} 2>/dev/null | "
            f"grep -c {shlex.quote(WORKER_EXIT_LINE)}")


def parse_observation(output: str) -> tuple[str | None, int]:
    """(boot status or None while booting, worker exits) from `observe_command`'s output."""
    *status_lines, exits = output.rstrip("\n").split("\n")
    boot_status = "\n".join(status_lines).strip() or None
    return boot_status, int(exits) if exits.strip().isdigit() else 0


async def wait_until_serving(ssh: asyncssh.SSHClientConnection, readiness: Readiness, *,
                             admin: str, probe_python: str,
                             worker_online: Callable[[], Awaitable[bool]]) -> None:
    """Return once the VM's worker is online; raise the error `readiness` decides on first.

    `ssh` is the VM's pinned connection; `worker_online` asks the Prefect API; the probe runs
    with `probe_python`, the image's interpreter (a customenv venv exists only late in boot).
    """
    try:
        while not await worker_online():
            observed = await ssh.run(observe_command(admin), check=False)
            boot_status, exits = parse_observation(observed.stdout or "")
            if readiness.needs_probe:
                result = await ssh.run(probe_command(probe_python, readiness.api_url),
                                       check=False)
                readiness.record_probe(parse_probe(result.stdout or ""), time.monotonic())
            error = readiness.verdict(boot_status=boot_status, worker_exits=exits,
                                      now=time.monotonic())
            if error is not None:
                log = await ssh.run(f"tail -n 200 {shlex.quote(WORKER_LOG)} 2>/dev/null",
                                    check=False)
                raise error(worker_log_tail(log.stdout or ""),
                            await boot_log_tail(ssh, admin_username=admin))
            await asyncio.sleep(POLL_SECONDS)
    except (OSError, asyncssh.Error) as exc:
        raise BootFailed(
            f"lost the SSH connection to detached VM {readiness.vm} while waiting for its "
            f"Prefect worker ({type(exc).__name__}: {exc}); was it deleted or evicted?") from exc
