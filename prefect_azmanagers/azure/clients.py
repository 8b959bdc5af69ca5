"""The async Compute and Network clients for a manifest: credential, retries, polling, logging.

One place decides how this package talks to Azure Resource Manager (or the local cloud, which
is ARM-compatible: only the endpoint, the CA bundle and the credential differ):

- credential from `manifest.credential`: "default" (azure-identity's DefaultAzureCredential),
  "client_secret" (a service principal), "managed_identity" (the VM's identity, from IMDS),
  "static" (a fixed bearer token, the local cloud's); the local cloud serves all four offline;
- retries on 408/429/5xx for every method, POST and PATCH included (our writes are idempotent:
  absolute capacities, explicit instance ids), honouring `Retry-After`;
- a user agent `prefect-azmanagers/<version>`;
- every HTTP attempt logged at DEBUG on the `prefect_azmanagers.azure` logger (method, path,
  status, milliseconds); `prefect-azmanagers --verbose` shows them.

```python
async with ArmClients(manifest) as arm:
    vmss = await arm.compute.virtual_machine_scale_sets.get(rg, "azm")
```
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlsplit

from azure.core.credentials import AccessToken
from azure.core.pipeline.policies import AsyncRetryPolicy, SansIOHTTPPolicy
from azure.mgmt.compute.aio import ComputeManagementClient
from azure.mgmt.network.aio import NetworkManagementClient

from prefect_azmanagers import __version__
from prefect_azmanagers.azure.errors import arm_errors
from prefect_azmanagers.exceptions import ConfigurationError, ResourceMissing

logger = logging.getLogger("prefect_azmanagers.azure")

USER_AGENT = f"prefect-azmanagers/{__version__}"
# Fallback delay between LRO polls when ARM sends no Retry-After (the SDK's default is 30 s).
POLLING_INTERVAL = 2.0
RETRY_TOTAL = 10   # attempts after the first, for throttling and 5xx alike (azure-core: 3 for status codes)


class StaticTokenCredential:
    """An async credential that always returns the same bearer token (the local cloud's)."""

    def __init__(self, token: str):
        self._token = token

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + 3600)

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> StaticTokenCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class IdempotentRetryPolicy(AsyncRetryPolicy):
    """azure-core's retry policy, extended to POST and PATCH (it retries those only on 500/503/504).

    Every write this package sends is idempotent (PUT/PATCH of absolute values, POST delete with
    explicit instance ids), so a 429 or 502 on them is safe to retry like a GET.
    """

    def configure_retries(self, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().configure_retries(options)
        settings["methods"] = frozenset(settings["methods"]) | {"POST", "PATCH"}
        return settings


class RequestLogPolicy(SansIOHTTPPolicy):
    """Logs each HTTP attempt (after retries are split out) at DEBUG: method, path, status, ms."""

    def on_request(self, request: Any) -> None:
        request.context["azm_started"] = time.monotonic()

    def on_response(self, request: Any, response: Any) -> None:
        self._log(request, response.http_response.status_code)

    def on_exception(self, request: Any) -> None:
        self._log(request, "error")

    @staticmethod
    def _log(request: Any, status: int | str) -> None:
        if not logger.isEnabledFor(logging.DEBUG):
            return
        started = request.context.get("azm_started", time.monotonic())
        http = request.http_request
        logger.debug("ARM %s %s -> %s (%.0f ms)", http.method, urlsplit(http.url).path, status,
                     (time.monotonic() - started) * 1000)


async def collect(pages: Any) -> list[dict]:
    """Every item of a paged SDK list (all pages), as REST (camelCase) dicts."""
    return [item.as_dict() async for item in pages]


async def delete_and_wait(action: str, begin_delete: Awaitable[Any]) -> None:
    """Await an SDK `begin_delete*` call and its poller; a resource already gone is fine (ARM
    answers 204 or 404 for it). Other errors are raised as `arm_errors(action)` classifies them."""
    try:
        with arm_errors(action):
            poller = await begin_delete
            await poller.result()
    except ResourceMissing:
        pass


def make_credential(manifest: Any) -> Any:
    """The async credential the manifest names; ConfigurationError if its fields are missing.

    "client_secret" and "default" use the manifest's `authority_host` (an Entra authority other
    than login.microsoftonline.com: then no instance discovery, which would ask Microsoft's host)
    and its `ca_bundle`, so the local cloud's own token endpoint serves them offline.
    """
    kind = (manifest.credential or "default").lower()
    if kind == "static":
        token = manifest.static_token.get_secret_value() if manifest.static_token else ""
        if not token:
            raise ConfigurationError(
                "The manifest's credential is 'static' but it has no static_token. Set static_token "
                "(the local cloud saves it in its `localcloud` manifest) or use credential 'default'.")
        return StaticTokenCredential(token)
    if kind == "managed_identity":
        from azure.identity.aio import ManagedIdentityCredential

        # the VM's system-assigned identity, or the user-assigned one named by client_id (IMDS)
        return ManagedIdentityCredential(client_id=manifest.client_id) if manifest.client_id \
            else ManagedIdentityCredential()
    options: dict[str, Any] = {}
    if getattr(manifest, "authority_host", None):
        options.update(authority=manifest.authority_host, disable_instance_discovery=True)
    if manifest.ca_bundle:
        options["connection_verify"] = str(manifest.ca_bundle)
    if kind == "client_secret":
        missing = [f for f in ("tenant_id", "client_id", "client_secret") if not getattr(manifest, f, None)]
        if missing:
            raise ConfigurationError(
                f"The manifest's credential is 'client_secret' but {', '.join(missing)} is not set. "
                "Fill them in (prefect-azmanagers manifest write ...) or use credential 'default'.")
        from azure.identity.aio import ClientSecretCredential

        return ClientSecretCredential(manifest.tenant_id, manifest.client_id,
                                      manifest.client_secret.get_secret_value(), **options)
    if kind == "default":
        from azure.identity.aio import DefaultAzureCredential

        return DefaultAzureCredential(**options)
    raise ConfigurationError(
        f"Unknown manifest credential {manifest.credential!r}: use 'default', 'client_secret', "
        "'managed_identity' or 'static'.")


class ArmClients:
    """The Compute and Network management clients of one subscription, sharing one credential.

    An async context manager; `close()` releases the HTTP sessions and the credential. The
    subscription defaults to the manifest's. Caches (SKU vCPUs) live here, per subscription.
    """

    def __init__(self, manifest: Any, *, subscription_id: str | None = None):
        self.manifest = manifest
        self.subscription_id = subscription_id or manifest.subscription_id
        if not self.subscription_id:
            raise ConfigurationError(
                "No subscription id: set subscription_id in the manifest or the template.")
        self.credential = make_credential(manifest)
        options: dict[str, Any] = dict(
            base_url=manifest.arm_endpoint or "https://management.azure.com",
            polling_interval=POLLING_INTERVAL,
            user_agent=USER_AGENT,
        )
        if manifest.ca_bundle:
            options["connection_verify"] = str(manifest.ca_bundle)
        self.compute = ComputeManagementClient(self.credential, self.subscription_id,
                                               **self._policies(), **options)
        self.network = NetworkManagementClient(self.credential, self.subscription_id,
                                               **self._policies(), **options)
        self.sku_cache: dict[tuple[str, str], Any] = {}

    @staticmethod
    def _policies() -> dict[str, Any]:
        # Each client gets its own policy objects (pipelines must not share stateful policies).
        return dict(retry_policy=IdempotentRetryPolicy(retry_total=RETRY_TOTAL, retry_status=RETRY_TOTAL),
                    custom_hook_policy=RequestLogPolicy())

    async def close(self) -> None:
        """Close both clients and the credential (idempotent)."""
        await self.compute.close()
        await self.network.close()
        await self.credential.close()

    async def __aenter__(self) -> ArmClients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
