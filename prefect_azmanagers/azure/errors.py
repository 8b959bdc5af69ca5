"""ARM error -> project exception, by ARM's error code, with a message that says what to do.

The SDK raises `HttpResponseError` (or a subclass chosen by HTTP status) for a refused request and
for a long-running operation that ended `Failed`; ARM's own code is in `e.error.code`, sometimes
only in `e.error.details[*].code`. `arm_errors(action)` wraps a block of SDK calls and re-raises
what it catches as the matching `AzureError` subclass, chained to the original.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from azure.core.exceptions import AzureError as SdkError
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

from prefect_azmanagers.exceptions import (
    AllocationFailed,
    AuthenticationFailed,
    AzureError,
    QuotaExceeded,
    ResourceMissing,
    SkuNotAvailable,
    SpotRequestError,
)

ALLOCATION_CODES = frozenset({
    "allocationfailed", "zonalallocationfailed", "overconstrainedallocationrequest",
    "overconstrainedzonalallocationrequest", "skunotavailableinzone",
})
SKU_CODES = frozenset({"skunotavailable", "invalidsku", "skunotsupported"})
SPOT_CODES = frozenset({
    "maxpricevalueinvalid", "azurespotisnotsupportedforthisvmsize", "spotvmnotsupported",
    "evictionpolicynotsupported", "maxpricenotsupported", "operationnotallowedforspotvms",
})
MISSING_CODES = frozenset({
    "resourcenotfound", "notfound", "parentresourcenotfound", "resourcegroupnotfound",
    "subscriptionnotfound",
})
AUTH_CODES = frozenset({
    "authenticationfailed", "invalidauthenticationtoken", "expiredauthenticationtoken",
    "authorizationfailed", "invalidauthenticationtokentenant", "linkedauthorizationfailed",
})
QUOTA_CODES = frozenset({"quotaexceeded", "operationnotallowed"})

def _codes_and_message(exc: HttpResponseError) -> tuple[list[str], str]:
    """Every ARM error code in the exception (top level first, then details) and its message."""
    codes: list[str] = []
    messages: list[str] = []
    error = getattr(exc, "error", None)
    if error is not None:
        if error.code:
            codes.append(error.code)
        if error.message:
            messages.append(error.message)
        for detail in error.details or []:
            if getattr(detail, "code", None):
                codes.append(detail.code)
            if getattr(detail, "message", None):
                messages.append(detail.message)
    message = " ".join(messages) or (exc.message or str(exc))
    return codes, message


def classify(exc: SdkError, action: str) -> AzureError:
    """The project exception for an SDK error raised while doing `action` ("create scale set x")."""
    status = getattr(getattr(exc, "response", None), "status_code", None) or getattr(exc, "status_code", None)
    if isinstance(exc, HttpResponseError):
        codes, message = _codes_and_message(exc)
    else:
        codes, message = [], str(exc)
    lowered = [c.lower() for c in codes]
    code = codes[0] if codes else None
    where = f"Azure refused to {action}: {message}"

    def first(group: frozenset[str]) -> str | None:
        return next((c for c, low in zip(codes, lowered) if low in group), None)

    if isinstance(exc, ClientAuthenticationError) or first(AUTH_CODES) or status in (401, 403):
        return AuthenticationFailed(
            f"{where}\nThe credential was refused or has no right to do this. Check the manifest's "
            "credential (`az login` for 'default', client_id/tenant_id/client_secret for "
            "'client_secret') and the role assignment on the subscription/resource group.",
            code=first(AUTH_CODES) or code, status=status)
    if c := first(ALLOCATION_CODES):
        return AllocationFailed(
            f"{where}\nAzure has no capacity for this VM size right now. Retry later, ask for fewer "
            "instances, or choose another VM size or region in the template.", code=c, status=status)
    if c := first(SPOT_CODES):
        return SpotRequestError(
            f"{where}\nThe spot request was refused: raise max_price (-1 = pay up to the regular "
            "price) or choose a VM size that supports spot.", code=c, status=status)
    if c := first(SKU_CODES):
        return SkuNotAvailable(
            f"{where}\nThis VM size is not offered here to this subscription. Pick another size "
            "(`az vm list-skus --location <region>`) or region in the template.", code=c, status=status)
    if status == 429:
        return AzureError(
            f"{where}\nAzure Resource Manager is throttling this subscription and the retries "
            "(honouring Retry-After) ran out. Wait a few minutes, and look for other clients "
            "polling the same subscription.", code=code, status=status)
    quota = first(QUOTA_CODES)
    if quota and ("quota" in message.lower() or quota.lower() == "quotaexceeded"):
        return QuotaExceeded(
            f"{where}\nRequest a quota increase for the VM family / region (Azure portal: "
            "Subscriptions > Usage + quotas), or ask for fewer instances.", code=quota, status=status)
    if first(MISSING_CODES) or status == 404:
        return ResourceMissing(f"{where}\nThe resource does not exist (already deleted?).",
                               code=first(MISSING_CODES) or code, status=status)
    if isinstance(exc, ServiceRequestError):
        return AzureError(f"Could not reach Azure Resource Manager to {action}: {message}\nCheck the "
                          "manifest's arm_endpoint (and ca_bundle for the local cloud) and the network.",
                          status=status)
    return AzureError(where, code=code, status=status)


@contextmanager
def arm_errors(action: str) -> Iterator[None]:
    """Re-raise SDK errors raised in the block as classified project exceptions."""
    try:
        yield
    except SdkError as exc:
        raise classify(exc, action) from exc
