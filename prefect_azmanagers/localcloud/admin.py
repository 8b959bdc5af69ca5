"""The local cloud's admin API (fault injection, settings, counters) and its client.

The API lives under `ADMIN_PREFIX` on the same HTTPS server as the ARM endpoint and answers
loopback clients only. `LocalCloudAdmin` is what tests and the CLI use:

```python
admin = LocalCloudAdmin.from_state_dir("~/.azmanagers/localcloud")
admin.throttle(3)                     # the next 3 ARM requests get 429 + Retry-After
admin.fail_next_lro()                 # the next create fails with AllocationFailed
admin.set_quota("standardDSv3Family", 4)
admin.kill("myscaleset_0")            # abrupt death of an instance (ARM keeps it, stopped)
admin.counters()["requests"]["VirtualMachineScaleSets_CreateOrUpdate"]
```
"""

from __future__ import annotations

import ipaddress
import json
import ssl
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from prefect_azmanagers.localcloud.identity import Identity
from prefect_azmanagers.localcloud.models import Backend

ADMIN_PREFIX = "/localcloud-admin"

_SETTINGS = {"boot_delay": float, "eviction_notice": float, "page_size": int, "lro_retry_after": int}


class AdminError(RuntimeError):
    """The admin API refused a request (the message says why)."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _count(doc: dict[str, Any], key: str = "count", default: int = 1) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"'{key}' must be a non-negative integer, got {value!r}")
    return value


def admin_routes(backend: Backend, describe_host: Any, identity: Identity) -> list[Route]:
    """Starlette routes of the admin API; `describe_host()` returns the sandbox host's summary.
    Requests must carry the local cloud's static token (`Authorization: Bearer ...`)."""

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        doc = json.loads(raw) if raw else {}
        if not isinstance(doc, dict):
            raise ValueError("the body must be a JSON object")
        return doc

    def guarded(handler: Any) -> Any:
        async def endpoint(request: Request) -> JSONResponse:
            host = request.client.host if request.client else ""
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                return _error(403, "the admin API answers loopback clients only")
            if not identity.is_static_token(request.headers.get("authorization")):
                return _error(401, "the admin API needs the local cloud's token (static_token in its "
                                   "localcloud.json): send it as 'Authorization: Bearer <token>'")
            try:
                return JSONResponse(await handler(request))
            except KeyError as exc:
                return _error(404, str(exc.args[0]) if exc.args else str(exc))
            except (ValueError, TypeError) as exc:
                return _error(400, str(exc))
        return endpoint

    async def status(request: Request) -> dict[str, Any]:
        instances = []
        for inst in sorted(backend.instances.values(), key=lambda i: (i.scale_set_id or "", i.time_created)):
            nic = backend.nics.get(inst.nic_ids[0].lower()) if inst.nic_ids else None
            instances.append({
                "name": inst.name, "vm_id": inst.vm_id, "computer_name": inst.computer_name,
                "resource_group": inst.resource_group,
                "scale_set": inst.scale_set_id.rsplit("/", 1)[-1] if inst.scale_set_id else None,
                "private_ip": nic.private_ip if nic else None, "priority": inst.priority,
                "provisioning_state": inst.provisioning_state, "power_state": inst.power_state,
                "sandbox": _describe_sandbox(backend, inst.vm_id),
            })
        scale_sets = [{"name": ss.name, "resource_group": ss.resource_group, "capacity": ss.sku["capacity"],
                       "sku": ss.sku["name"], "orchestration_mode": ss.orchestration_mode,
                       "provisioning_state": ss.provisioning_state} for ss in backend.scale_sets.values()]
        return {"host": describe_host(), "scale_sets": scale_sets, "instances": instances,
                "nics": len(backend.nics), "faults": vars(backend.faults), "settings": _settings(backend)}

    async def counters(request: Request) -> dict[str, Any]:
        if request.method == "DELETE":
            backend.counters.clear()
        seconds = backend.instance_seconds()
        return {"requests": dict(backend.counters), "live_instances": backend.live_instances(),
                "instance_seconds": {"total": sum(seconds.values()), "by_instance": seconds}}

    async def instance_action(request: Request) -> dict[str, Any]:
        inst = backend.find_instance(request.path_params["ref"])
        action = request.path_params["action"]
        if action == "kill":
            await backend.kill(inst)
        elif action == "drop-ssh":
            await backend.drop_ssh(inst)
        else:
            raise KeyError(f"unknown instance action {action!r}; known: kill, drop-ssh")
        return {"name": inst.name, "vm_id": inst.vm_id, "action": action}

    async def fault(request: Request) -> dict[str, Any]:
        doc, kind, f = await body(request), request.path_params["kind"], backend.faults
        if kind == "throttle":
            f.throttle, f.throttle_retry_after = _count(doc), _count(doc, "retry_after", 1)
            f.throttle_operation = doc.get("operation")
        elif kind == "fail":
            f.fail, f.fail_operation = _count(doc), doc.get("operation")
            f.fail_retry_after = None if doc.get("retry_after") is None else _count(doc, "retry_after")
        elif kind == "allocation-failure":
            f.allocation_failures = _count(doc)
        elif kind == "boot-failure":
            f.boot_failures = _count(doc)
        elif kind == "clear":
            backend.faults = type(f)()
        else:
            raise KeyError(f"unknown fault {kind!r}; known: throttle, fail, allocation-failure, boot-failure, clear")
        return vars(backend.faults)

    async def quotas(request: Request) -> dict[str, Any]:
        for name, limit in (await body(request)).items():
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"quota {name!r} must be a non-negative integer, got {limit!r}")
            backend.config.quotas[name] = limit
        return {"quotas": backend.config.quotas, "usage": backend.usage()}

    async def settings(request: Request) -> dict[str, Any]:
        for name, value in (await body(request)).items():
            kind = _SETTINGS.get(name)
            if kind is None:
                raise ValueError(f"unknown setting {name!r}; known: {sorted(_SETTINGS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"setting {name!r} must be a non-negative number, got {value!r}")
            setattr(backend.config, name, kind(value))
        return _settings(backend)

    return [
        Route(f"{ADMIN_PREFIX}/status", guarded(status), methods=["GET"]),
        Route(f"{ADMIN_PREFIX}/counters", guarded(counters), methods=["GET", "DELETE"]),
        Route(f"{ADMIN_PREFIX}/instances/{{ref}}/{{action}}", guarded(instance_action), methods=["POST"]),
        Route(f"{ADMIN_PREFIX}/faults/{{kind}}", guarded(fault), methods=["POST"]),
        Route(f"{ADMIN_PREFIX}/quotas", guarded(quotas), methods=["PUT"]),
        Route(f"{ADMIN_PREFIX}/settings", guarded(settings), methods=["PUT"]),
    ]


def _describe_sandbox(backend: Backend, key: str) -> dict[str, Any] | None:
    """The sandbox's own view (pids, netns, state), or None when it has none (e.g. deallocated)."""
    try:
        return backend.sandboxes.describe(key)
    except Exception:  # the sandbox host refuses unknown keys with its own error type
        return None


def _settings(backend: Backend) -> dict[str, Any]:
    return {name: getattr(backend.config, name) for name in _SETTINGS}


class LocalCloudAdmin:
    """Client of the admin API (sync; call it from a thread in async code)."""

    def __init__(self, admin_endpoint: str, ca_cert: str | Path, token: str, *, timeout: float = 60):
        self.endpoint = admin_endpoint.rstrip("/")
        self._http = httpx.Client(verify=ssl.create_default_context(cafile=str(ca_cert)), timeout=timeout,
                                  headers={"Authorization": f"Bearer {token}"})

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> "LocalCloudAdmin":
        """From the localcloud.json document (e.g. the `localcloud` test fixture's value)."""
        return cls(info["admin_endpoint"], info["ca_cert"], info["static_token"])

    @classmethod
    def from_state_dir(cls, state_dir: str | Path) -> "LocalCloudAdmin":
        path = Path(state_dir).expanduser() / "localcloud.json"
        if not path.exists():
            raise AdminError(f"no running local cloud in {path.parent} (no localcloud.json); "
                             "start one with `prefect-azmanagers localcloud start`")
        return cls.from_info(json.loads(path.read_text()))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "LocalCloudAdmin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, doc: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._http.request(method, f"{self.endpoint}{path}", json=doc)
        except httpx.HTTPError as exc:
            raise AdminError(f"the local cloud's admin API at {self.endpoint} is unreachable ({exc}); is it "
                             "running? After a crash, `prefect-azmanagers localcloud stop` cleans up") from exc
        if response.status_code >= 400:
            raise AdminError(response.json().get("error", response.text))
        return response.json()

    def status(self) -> dict[str, Any]:
        """Mode, scale sets, instances (with private IPs and states), faults and settings."""
        return self._call("GET", "/status")

    def counters(self) -> dict[str, Any]:
        """{"requests": {operationId: n}, "live_instances": n, "instance_seconds": {"total": s,
        "by_instance": {vm name: s}}} (VM time since the start, deleted VMs included)."""
        return self._call("GET", "/counters")

    def reset_counters(self) -> None:
        self._call("DELETE", "/counters")

    def kill(self, instance: str) -> dict[str, Any]:
        """Kill an instance abruptly (by VM name, vmId or computer name); ARM keeps it, stopped."""
        return self._call("POST", f"/instances/{instance}/kill")

    def drop_ssh(self, instance: str) -> dict[str, Any]:
        """Cut the instance's live SSH connections; the instance keeps running."""
        return self._call("POST", f"/instances/{instance}/drop-ssh")

    def throttle(self, count: int, *, retry_after: int = 1, operation: str | None = None) -> None:
        """The next `count` ARM requests (of `operation`, an operationId, if given) get 429."""
        self._call("POST", "/faults/throttle", {"count": count, "retry_after": retry_after, "operation": operation})

    def fail_next(self, count: int, *, retry_after: int | None = None, operation: str | None = None) -> None:
        """The next `count` ARM requests (of `operation` if given) get 503 ServiceUnavailable."""
        self._call("POST", "/faults/fail", {"count": count, "retry_after": retry_after, "operation": operation})

    def fail_next_lro(self, count: int = 1) -> None:
        """The next `count` creations (scale set grow or VM create) fail with AllocationFailed."""
        self._call("POST", "/faults/allocation-failure", {"count": count})

    def boot_fail(self, count: int = 1) -> None:
        """The next `count` instance boots fail (the instance and its operation end Failed)."""
        self._call("POST", "/faults/boot-failure", {"count": count})

    def clear_faults(self) -> None:
        self._call("POST", "/faults/clear")

    def set_quota(self, name: str, limit: int) -> dict[str, Any]:
        """Set one quota ("cores", "lowPriorityCores", a family such as "standardDSv3Family")."""
        return self._call("PUT", "/quotas", {name: limit})

    def settings(self, **values: float) -> dict[str, Any]:
        """Change boot_delay, eviction_notice, page_size or lro_retry_after at run time."""
        return self._call("PUT", "/settings", values)
