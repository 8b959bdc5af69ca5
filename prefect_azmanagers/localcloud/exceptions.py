"""ARM errors as the local cloud answers them: status, ARM error code, message, headers.

Every refusal of the endpoint is an `ArmError`; responses.py serializes it into ARM's error body
`{"error": {"code", "message", "target", "details"}}`. The constructors below reproduce the
codes and message shapes Azure uses, so client code that branches on `e.error.code` (or parses
quota numbers out of the message) behaves here as it does on Azure.
"""

from __future__ import annotations

import time
from typing import Any


class ArmError(Exception):
    """An ARM error response: HTTP status, ARM code, message, optional target/details/headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        target: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.target = target
        self.details = details or []
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The error document: ARM's body for an error response and an async operation's `error`."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.target is not None:
            error["target"] = self.target
        if self.details:
            error["details"] = self.details
        return {"error": error}


def invalid_parameter(message: str, target: str) -> ArmError:
    """400 InvalidParameter naming the offending field (ARM's strict body validation)."""
    return ArmError(400, "InvalidParameter", message, target=target)


def missing_parameter(path: str) -> ArmError:
    """400 for a required field that is absent; `path` is the dotted path in the body."""
    return invalid_parameter(f"Required parameter '{path}' is missing (null).", path)


def unknown_member(path: str, type_name: str) -> ArmError:
    """400 for a body member ARM does not know (typically a snake_case key from a plain dict)."""
    member = path.rsplit(".", 1)[-1]
    return invalid_parameter(
        f"Could not find member '{member}' on object of type '{type_name}'. Path '{path}'. "
        "ARM bodies are camelCase: send SDK model objects or camelCase dictionaries.",
        path,
    )


def resource_not_found(resource_type: str, name: str, resource_group: str) -> ArmError:
    """404 ResourceNotFound with ARM's message."""
    return ArmError(
        404,
        "ResourceNotFound",
        f"The Resource '{resource_type}/{name}' under resource group '{resource_group}' was not found. "
        "For more details please go to https://aka.ms/ARMResourceNotFoundFix",
    )


def not_found(message: str) -> ArmError:
    """404 NotFound (CRP's code for children such as a scale set's VM)."""
    return ArmError(404, "NotFound", message)


def quota_exceeded(
    quota_label: str, location: str, limit: int, usage: int, required: int
) -> ArmError:
    """409 OperationNotAllowed with the numbers in CRP's quota message shape."""
    return ArmError(
        409,
        "OperationNotAllowed",
        f"Operation could not be completed as it results in exceeding approved {quota_label} quota. "
        f"Additional details - Deployment Model: Resource Manager, Location: {location}, "
        f"Current Limit: {limit}, Current Usage: {usage}, Additional Required: {required}, "
        f"(Minimum) New Limit Required: {usage + required}. Submit a request for Quota increase "
        "at https://aka.ms/ProdportalCRP/#blade/Microsoft_Azure_Capacity/UsageAndQuota.ReactView "
        "by specifying parameters listed in the 'Details' section for deployment to succeed. "
        "Please read more about quota limits at "
        "https://docs.microsoft.com/en-us/azure/azure-supportability/per-vm-quota-requests",
    )


def sku_not_available(sku: str, location: str) -> ArmError:
    """409 SkuNotAvailable for a size that is unknown or restricted in the location."""
    return ArmError(
        409,
        "SkuNotAvailable",
        f"The requested VM size for resource 'Following SKUs have failed for Capacity Restrictions: "
        f"{sku}' is currently not available in location '{location}'. Please try another size or "
        "deploy to a different location or different zone. See https://aka.ms/azureskunotavailable "
        "for details.",
    )


def allocation_failed() -> ArmError:
    """AllocationFailed, as the `error` of a Failed long-running operation."""
    return ArmError(
        200,
        "AllocationFailed",
        "Allocation failed. We do not have sufficient capacity for the requested VM size in this "
        "region. Read more about improving likelihood of allocation success at "
        "http://aka.ms/allocation-guidance",
    )


def os_provisioning_failed(vm_name: str, reason: str) -> ArmError:
    """The Failed-operation error of an instance whose boot (SSH never came up) failed."""
    return ArmError(
        200,
        "OSProvisioningTimedOut",
        f"OS Provisioning for VM '{vm_name}' did not finish in the allotted time. The VM may still "
        f"finish provisioning successfully. Please check provisioning state later. ({reason})",
    )


def throttled(retry_after: int, now_iso: str) -> ArmError:
    """429 as CRP throttles: Retry-After, remaining-resource header, TooManyRequests detail."""
    return ArmError(
        429,
        "OperationNotAllowed",
        "The server rejected the request because too many requests have been received for this "
        "subscription.",
        details=[{
            "code": "TooManyRequests",
            "target": "HighCostGet30Min",
            "message": (
                '{"operationGroup":"HighCostGet30Min","startTime":"' + now_iso + '",'
                '"endTime":"' + now_iso + '","allowedRequestCount":0,"measuredRequestCount":1}'
            ),
        }],
        headers={
            "Retry-After": str(retry_after),
            "x-ms-ratelimit-remaining-resource":
                "Microsoft.Compute/HighCostGet3Min;0,Microsoft.Compute/HighCostGet30Min;0",
        },
    )


def service_unavailable(retry_after: int | None) -> ArmError:
    """503 ServiceUnavailable (an injected transient failure)."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return ArmError(
        503,
        "ServiceUnavailable",
        "The service is temporarily unavailable (injected by the local cloud's admin API). "
        "Retry the request.",
        headers=headers,
    )


# ----- authentication (ARM's front door answers these before any routing) -------------------
def _challenge(authority: str, description: str) -> dict[str, str]:
    """The headers of ARM's 401: a Bearer challenge naming the tenant's authority (Azure's is
    https://login.windows.net/<tenant>; the local cloud's is its own token endpoint's)."""
    return {
        "WWW-Authenticate": f'Bearer authorization_uri="{authority}", '
                            f'error="invalid_token", error_description="{description}"',
        "x-ms-failure-cause": "gateway",
    }


def authentication_missing(authority: str) -> ArmError:
    """401 AuthenticationFailed: no (Bearer) Authorization header."""
    return ArmError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.",
                    headers=_challenge(authority, "The authentication failed because of missing 'Authorization' "
                                                  "header."))


def invalid_token(authority: str, message: str = "The access token is invalid.") -> ArmError:
    """401 InvalidAuthenticationToken: a token this cloud did not issue (or a malformed one)."""
    return ArmError(401, "InvalidAuthenticationToken", message, headers=_challenge(authority, message))


def expired_token(authority: str, expiry: float, now: float) -> ArmError:
    """401 ExpiredAuthenticationToken, with ARM's message (UTC times as it prints them)."""
    def fmt(t: float) -> str:
        return time.strftime("%m/%d/%Y %I:%M:%S %p", time.gmtime(t)).lstrip("0").replace("/0", "/")

    message = f"The access token expiry UTC time '{fmt(expiry)}' is earlier than current UTC time '{fmt(now)}'."
    return ArmError(401, "ExpiredAuthenticationToken", message,
                    headers=_challenge(authority, "The access token has expired."))


def wrong_audience(authority: str, audience: str, allowed: tuple[str, ...]) -> ArmError:
    """401 InvalidAuthenticationTokenAudience naming the allowed audiences."""
    listed = ",".join(f"'{a}'" for a in allowed)
    message = (f"The access token has been obtained for wrong audience or resource '{audience}'. It should "
               f"exactly match with one of the allowed audiences {listed}.")
    return ArmError(401, "InvalidAuthenticationTokenAudience", message,
                    headers=_challenge(authority, "The access token has been obtained for wrong audience."))
