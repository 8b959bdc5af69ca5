"""The local cloud process: HTTPS ARM endpoint + admin API + sandboxes, and its lifecycle.

`run()` serves in the foreground until SIGINT/SIGTERM and then removes every instance; `start()`
runs it in the background (a detached `python -m prefect_azmanagers.localcloud.server`) and
returns once it answers; `stop()` ends it and also cleans what a crashed run left behind.
The state directory holds config.json, state.db (ARM resources, kept across restarts), the CA,
the manifest's SSH key pair, the log, the pid file and localcloud.json (what clients need).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from prefect_azmanagers.localcloud import urls
from prefect_azmanagers.localcloud._proc import alive, wait_gone
from prefect_azmanagers.localcloud.admin import ADMIN_PREFIX, admin_routes
from prefect_azmanagers.localcloud.blob import Azurite, AzuriteError
from prefect_azmanagers.localcloud.config import load_config
from prefect_azmanagers.localcloud.entra import entra_routes
from prefect_azmanagers.localcloud.exceptions import ArmError
from prefect_azmanagers.localcloud.identity import Identity
from prefect_azmanagers.localcloud.keys import ensure_ssh_keypair, ensure_tls
from prefect_azmanagers.localcloud.models import Backend
from prefect_azmanagers.localcloud.responses import ArmRequest, ArmResponses
from prefect_azmanagers.localcloud.store import STORE_FILE, Store

logger = logging.getLogger("prefect_azmanagers.localcloud")

DEFAULT_STATE_DIR = Path("~/.azmanagers/localcloud")
INFO_FILE = "localcloud.json"
PID_FILE = "localcloud.pid"
LOG_FILE = "localcloud.log"
SECRET_FIELDS = ("static_token", "client_secret", "blob_key")  # of localcloud.json: never printed or logged
# Idle keep-alive connections stay open for minutes, as Azure's front ends keep them. At
# uvicorn's 5 s default, equal to httpx's own expiry, a client reusing a connection at that
# moment got "Server disconnected without sending a response" (the admin client, under load).
KEEP_ALIVE_SECONDS = 120


class LocalCloudError(RuntimeError):
    """The local cloud could not be started or stopped (the message says why and what to do)."""


# ----- the ARM application ------------------------------------------------------------------
def build_app(backend: Backend, describe_host: Any, identity: Identity) -> Starlette:
    """The Starlette app: admin routes under ADMIN_PREFIX, every other path is ARM. Both need
    the identity's credential."""
    responses = ArmResponses(backend)
    config = backend.config

    async def arm(request: Request) -> Response:
        path, method = request.url.path, request.method

        provider: dict[str, str] = {}  # the headers of the provider, once the request reached one

        def arm_error(exc: ArmError) -> Response:
            return _json(request, exc.status, exc.body(), provider | exc.headers)

        refused = identity.authenticate(request.headers.get("authorization"))
        if refused is not None:
            return arm_error(refused)
        query = {k.lower() if k.lower() == "api-version" else k: v for k, v in request.query_params.items()}
        refused = urls.front_door(method, path, query.get("api-version"), config.location)
        if refused is not None:
            return arm_error(refused)
        route, params = urls.match(method, path)
        provider.update(_provider_headers(path, route.operation))
        backend.count(route.operation)
        fault = backend.take_request_fault(route.operation)
        if fault is not None:
            return arm_error(fault)
        try:
            if params["subscription"].lower() != config.subscription_id.lower():
                raise ArmError(404, "SubscriptionNotFound",
                               f"The subscription '{params['subscription']}' could not be found.")
            rg = params.get("resource_group")
            if rg is not None and rg.lower() != config.resource_group.lower():
                raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
            body = None
            raw = await request.body()
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise ArmError(400, "InvalidRequestContent",
                                   f"The request content was invalid and could not be deserialized: {exc}.") from None
            req = ArmRequest(method=method, params=params, query=query, body=body,
                             base_url=f"{request.url.scheme}://{request.url.netloc}", path=path,
                             headers={k.lower(): v for k, v in request.headers.items()})
            result = getattr(responses, route.handler)(req)
        except ArmError as exc:
            return arm_error(exc)
        except Exception as exc:  # an emulator bug: answer as ARM would, and keep the traceback
            logger.exception("%s %s failed", method, path)
            return arm_error(ArmError(500, "InternalServerError",
                                      f"The local cloud failed on this request ({type(exc).__name__}: {exc}); "
                                      "see localcloud.log in its state directory."))
        return _json(request, result.status, result.body, provider | result.headers)

    routes = admin_routes(backend, describe_host, identity) + entra_routes(identity) + [
        Route("/{path:path}", arm, methods=["GET", "PUT", "PATCH", "DELETE", "POST"]),
    ]
    return Starlette(routes=routes)


# Compute's throttling policy per operation, as x-ms-ratelimit-remaining-resource names them
# (policy, 3-minute budget, 30-minute budget), and whether the answer carries x-ms-request-charge.
# Recorded: tests/localcloud/recorded_facts.py COMPUTE_RESOURCE_BUDGETS; the rest follow them.
_COMPUTE_POLICIES: dict[str, tuple[str, int, int, bool]] = {
    "VirtualMachineScaleSets_CreateOrUpdate": ("CreateVMScaleSet", 60, 300, True),
    "VirtualMachineScaleSets_Update": ("CreateVMScaleSet", 60, 300, True),
    "VirtualMachineScaleSets_Get": ("GetVMScaleSet", 400, 2600, False),
    "VirtualMachineScaleSets_List": ("GetVMScaleSet", 400, 2600, False),
    "VirtualMachineScaleSets_ListAll": ("GetVMScaleSet", 400, 2600, False),
    "VirtualMachineScaleSets_GetInstanceView": ("GetVMScaleSet", 400, 2600, False),
    "VirtualMachineScaleSets_Delete": ("DeleteVMScaleSet", 80, 400, True),
    "VirtualMachineScaleSets_DeleteInstances": ("VMScaleSetActions", 240, 1200, True),
    "VirtualMachineScaleSetVMs_Get": ("GetVMScaleSetVM", 1000, 5000, True),
    "VirtualMachineScaleSetVMs_List": ("GetVMScaleSetVM", 1000, 5000, True),
    "VirtualMachineScaleSetVMs_GetInstanceView": ("GetVMScaleSetVM", 1000, 5000, True),
    "VirtualMachineScaleSetVMs_Delete": ("DeleteVMScaleSetVM", 240, 1200, True),
    "VirtualMachineScaleSetVMs_SimulateEviction": ("VMScaleSetVMActions", 200, 1000, True),
    "VirtualMachines_CreateOrUpdate": ("PutVM", 240, 1200, True),
    "VirtualMachines_Delete": ("DeleteVM", 240, 1200, True),
    "VirtualMachines_SimulateEviction": ("PutVM", 240, 1200, True),
    "AsyncOperation_Get": ("GetOperation", 15000, 30000, False),
    "OperationResult_Get": ("GetOperation", 15000, 30000, False),
}


def _provider_headers(path: str, operation: str) -> dict[str, str]:
    """Headers the resource provider adds: Compute its throttling budget (and request charge),
    Network its own request id."""
    kind = urls.resource_type(path)
    namespace = kind[0].lower() if kind else ""
    if namespace == "microsoft.network":
        return {"x-ms-arm-service-request-id": str(uuid.uuid4())}
    if namespace != "microsoft.compute":
        return {}
    policy, short, long, charged = _COMPUTE_POLICIES.get(operation, ("LowCostGet", 4000, 32000, False))
    headers = {"x-ms-ratelimit-remaining-resource":
               f"Microsoft.Compute/{policy}3Min;{short - 1},Microsoft.Compute/{policy}30Min;{long - 1}"}
    if charged:
        headers["x-ms-request-charge"] = "1"
    return headers


_BUDGETS = {"GET": ("x-ms-ratelimit-remaining-subscription-reads", "11999"),
            "DELETE": ("x-ms-ratelimit-remaining-subscription-deletes", "14999")}


def _json(request: Request, status: int, body: Any, headers: dict[str, str]) -> Response:
    """An ARM response with the headers ARM sends on every one (request, correlation and routing
    ids, no caching, the subscription's read/write/delete budget), then the handler's."""
    request_id = str(uuid.uuid4())
    correlation_id = request.headers.get("x-ms-correlation-request-id") or str(uuid.uuid4())
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    budget = _BUDGETS.get(request.method, ("x-ms-ratelimit-remaining-subscription-writes", "1199"))
    headers = {
        "x-ms-request-id": request_id,
        "x-ms-correlation-request-id": correlation_id,
        "x-ms-routing-request-id": f"LOCALCLOUD:{stamp}:{correlation_id}",
        "Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "-1",
        "x-content-type-options": "nosniff", "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
        budget[0]: budget[1],
        **headers,
    }
    if body is None or status == 204:
        return Response(status_code=status, headers=headers)
    return JSONResponse(body, status_code=status, headers=headers)


# ----- foreground process -------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: run() installs handlers that also clean up."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


def _loopback_socket(port: int) -> socket.socket:
    # proto IPPROTO_TCP (not 0) so asyncio sets TCP_NODELAY on accepted connections; without it
    # every response waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise LocalCloudError(f"cannot listen on 127.0.0.1:{port}: {exc}; choose another --port (0 = any free)") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _serve(state_dir: Path, port: int, prefect_api_url: str | None, network: str | None,
                 blob: str = "auto") -> None:
    from prefect_azmanagers.localcloud.sandbox import SandboxHost

    config = load_config(state_dir)
    tls = ensure_tls(state_dir)
    ssh = ensure_ssh_keypair(state_dir)
    store = Store(state_dir / STORE_FILE)
    identity = Identity.create()
    backend_ref: list[Backend] = []
    host = SandboxHost(state_dir, network=network or config.network, address_block=config.address_block,
                       loopback_block=config.loopback_block, loopback_ssh_port=config.loopback_ssh_port,
                       loopback_imds_port=config.loopback_imds_port, prefect_api_url=prefect_api_url,
                       on_event_ack=lambda key, event_id: backend_ref[0].event_acknowledged(key, event_id),
                       token_for=lambda key, resource: _managed_identity_token(backend_ref[0], identity, key,
                                                                               resource))
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    server: _Server | None = None
    serving: asyncio.Task | None = None
    backend: Backend | None = None
    azurite = Azurite(state_dir)
    try:
        await host.start()
        blob_info = await _start_blob(azurite, blob)
        if azurite.endpoint is not None:
            host.loopback_services.append(azurite.endpoint.port)
        backend = Backend(config, store, host, tenant_id=identity.tenant_id)
        backend.bind_loop(loop)
        backend_ref.append(backend)

        def describe_host() -> dict[str, Any]:
            return {"mode": host.mode, "prefect_api_url_for_vms": host.prefect_api_url_for_vms,
                    "state_dir": str(state_dir), "ssh_port": host.ssh_port}

        sock = _loopback_socket(port)
        bound = sock.getsockname()[1]
        endpoint = f"https://127.0.0.1:{bound}"
        identity.issuer_base = endpoint
        uv_config = uvicorn.Config(build_app(backend, describe_host, identity), lifespan="off", log_level="warning",
                                   ssl_certfile=str(tls.server_cert), ssl_keyfile=str(tls.server_key),
                                   access_log=False, timeout_graceful_shutdown=2,
                                   timeout_keep_alive=KEEP_ALIVE_SECONDS)
        server = _Server(uv_config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serving.done():
                serving.result()
                raise LocalCloudError("the HTTPS server stopped while starting")
            await asyncio.sleep(0.05)
        info = {
            "arm_endpoint": endpoint,
            "ca_cert": str(tls.ca_cert),
            "subscription_id": config.subscription_id,
            "resource_group": config.resource_group,
            "location": config.location,
            "admin_endpoint": endpoint + ADMIN_PREFIX,
            "mode": host.mode,
            "python": sys.executable,
            "pid": os.getpid(),
            "prefect_api_url_for_vms": host.prefect_api_url_for_vms,
            **identity.info(),
            "ssh_user": "azureuser",
            "ssh_port": host.ssh_port,
            "ssh_private_key_file": str(ssh.private_key),
            "ssh_public_key_file": str(ssh.public_key),
            "known_hosts_file": str(state_dir / "known_hosts"),
            "state_dir": str(state_dir),
            **blob_info,
        }
        _write_atomic(state_dir / INFO_FILE, json.dumps(info, indent=2) + "\n")
        print(json.dumps({k: v for k, v in info.items() if k not in SECRET_FIELDS}, indent=2), flush=True)
        stopper = asyncio.create_task(stop_requested.wait())
        await asyncio.wait({stopper, serving}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if server is not None:
            server.should_exit = True
        if serving is not None:
            with contextlib.suppress(BaseException):
                await serving
        if backend is not None:
            await backend.shutdown()
        await host.stop()
        await azurite.stop()
        store.close()
        (state_dir / INFO_FILE).unlink(missing_ok=True)


async def _start_blob(azurite: Azurite, blob: str) -> dict[str, Any]:
    """Start Azurite unless `blob` is "off"; localcloud.json's blob fields (or, with "auto",
    why it did not start: the cloud serves VMs without it)."""
    if blob == "off":
        return {}
    try:
        endpoint = await azurite.start()
    except (AzuriteError, ImportError) as exc:
        if blob == "on":
            raise LocalCloudError(f"Blob Storage: {exc}") from None
        logger.warning("Blob Storage (Azurite) not started: %s", exc)
        return {"blob_not_started": str(exc)}
    return {"blob_url": endpoint.url, "blob_account": endpoint.account, "blob_key": endpoint.key,
            "blob_container": endpoint.container}


def _managed_identity_token(backend: Backend, identity: Identity, vm_id: str, resource: str) -> dict | None:
    """IMDS's answer for the instance's SystemAssigned identity, or None when it has none."""
    inst = backend.instance_by_vm_id(vm_id)
    if inst is None or not inst.identity:
        return None
    return identity.managed_identity_token(resource, principal_id=inst.identity["principalId"],
                                           client_id=inst.identity["clientId"], resource_id=inst.id)


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` (0600: localcloud.json holds the credentials) via a rename."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


def _claim_pid_file(state_dir: Path) -> Path:
    pid_file = state_dir / PID_FILE
    other = running_pid(state_dir)
    if other is not None and other != os.getpid():
        raise LocalCloudError(f"a local cloud (pid {other}) already runs with state dir {state_dir}; "
                              f"stop it first: prefect-azmanagers localcloud stop --state-dir {state_dir}")
    pid_file.write_text(f"{os.getpid()}\n")
    return pid_file


def run(state_dir: Path, *, port: int = 0, prefect_api_url: str | None = None,
        network: str | None = None, blob: str = "auto") -> None:
    """Serve in the foreground until SIGINT/SIGTERM, then remove every instance and process.
    `network`: "isolated" | "loopback" (default: config.json's, else isolated as root).
    `blob`: Blob Storage (Azurite) "on" (an error if it cannot start), "off", or "auto"."""
    state_dir = prepare_state_dir(state_dir)
    pid_file = _claim_pid_file(state_dir)
    try:
        asyncio.run(_serve(state_dir, port, prefect_api_url, network, blob))
    finally:
        with contextlib.suppress(FileNotFoundError):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()


def prepare_state_dir(state_dir: Path | str) -> Path:
    path = Path(state_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def running_pid(state_dir: Path) -> int | None:
    """The pid of the local cloud running with this state dir, or None.

    A pid file left by a crash may name a process that reused the pid: only a process running
    the local cloud counts (so `stop` never signals a stranger)."""
    try:
        pid = int((state_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return pid
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"prefect_azmanagers.localcloud" in cmdline and alive(pid) else None


# ----- background start / stop ----------------------------------------------------------------
def start(state_dir: Path | str = DEFAULT_STATE_DIR, *, port: int = 0, prefect_api_url: str | None = None,
          network: str | None = None, blob: str = "auto", timeout: float = 120) -> dict[str, Any]:
    """Start the local cloud as a background process; return its localcloud.json document.
    `network`, `blob`: as for `run`."""
    state_dir = prepare_state_dir(state_dir)
    running = running_pid(state_dir)
    if running is not None:
        raise LocalCloudError(f"a local cloud (pid {running}) already runs with state dir {state_dir}; "
                              f"stop it first: prefect-azmanagers localcloud stop --state-dir {state_dir}")
    if prefect_api_url is not None:
        _check_loopback_url(prefect_api_url)
    info_file = state_dir / INFO_FILE
    info_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "prefect_azmanagers.localcloud", "--state-dir", str(state_dir),
            "--port", str(port)]
    if prefect_api_url:
        argv += ["--prefect-api-url", prefect_api_url]
    if network:
        argv += ["--network", network]
    argv += ["--blob", blob]
    log_path = state_dir / LOG_FILE
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=state_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalCloudError(f"the local cloud exited while starting (status {proc.returncode}); "
                                  f"log {log_path}:\n{_tail(log_path)}")
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(info_file.read_text())
            if info.get("pid") == proc.pid:
                return info
        time.sleep(0.1)
    proc.terminate()
    raise LocalCloudError(f"the local cloud did not start within {timeout:.0f}s; log {log_path}:\n{_tail(log_path)}")


def stop(state_dir: Path | str = DEFAULT_STATE_DIR, *, timeout: float = 60) -> bool:
    """Stop the local cloud of this state dir and remove what a crashed run left behind.

    Returns True if a running local cloud was stopped. Namespaces, links, processes and accounts
    of an earlier crashed run are removed either way.
    """
    state_dir = prepare_state_dir(state_dir)
    pid = running_pid(state_dir)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and running_pid(state_dir) == pid and alive(pid):
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
            if not wait_gone(pid, timeout):
                raise LocalCloudError(f"the local cloud (pid {pid}) still runs {timeout:.0f} s "
                                      "after SIGKILL; its leftovers were not removed")
    asyncio.run(_remove_leftovers(state_dir))
    Azurite(state_dir).remove_leftover()
    (state_dir / PID_FILE).unlink(missing_ok=True)
    (state_dir / INFO_FILE).unlink(missing_ok=True)
    return pid is not None


async def _remove_leftovers(state_dir: Path) -> None:
    from prefect_azmanagers.localcloud.sandbox import SandboxHost

    await SandboxHost(state_dir).remove_leftovers()


def _check_loopback_url(url: str) -> None:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname
    try:
        ok = host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise LocalCloudError(f"--prefect-api-url must be a loopback URL such as http://127.0.0.1:4200/api "
                              f"(got {url!r}): the local cloud forwards it into the instances' network")


def _tail(path: Path, n: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the local cloud in the foreground.")
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--prefect-api-url", default=None)
    parser.add_argument("--network", choices=["isolated", "loopback"], default=None)
    parser.add_argument("--blob", choices=["auto", "on", "off"], default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from prefect_azmanagers.localcloud.sandbox import SandboxError

    try:
        run(Path(args.state_dir), port=args.port, prefect_api_url=args.prefect_api_url, network=args.network,
            blob=args.blob)
    except (LocalCloudError, SandboxError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


