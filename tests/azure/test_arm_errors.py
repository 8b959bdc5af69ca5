"""ARM error bodies -> the project's exception types, with actionable messages."""

from __future__ import annotations

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ODataV4Format,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
)

from prefect_azmanagers.azure.errors import arm_errors, classify
from prefect_azmanagers.exceptions import (
    AllocationFailed,
    AuthenticationFailed,
    AzureError,
    QuotaExceeded,
    ResourceMissing,
    SkuNotAvailable,
    SpotRequestError,
)

QUOTA_MESSAGE = ("Operation could not be completed as it results in exceeding approved "
                 "standardDSv3Family Cores quota. Current Limit: 10, Current Usage: 8, "
                 "Additional Required: 16.")


def arm_error(cls, code, message, details=()):
    exc = cls(message=message)
    exc.error = ODataV4Format({"code": code, "message": message,
                               "details": [{"code": c, "message": m} for c, m in details]})
    return exc


@pytest.mark.parametrize("exc, expected, words", [
    (arm_error(ResourceExistsError, "OperationNotAllowed", QUOTA_MESSAGE), QuotaExceeded,
     ["Current Limit: 10", "Current Usage: 8", "Additional Required: 16", "quota increase"]),
    (arm_error(HttpResponseError, "AllocationFailed", "Allocation failed."), AllocationFailed,
     ["Allocation failed", "another VM size"]),
    (arm_error(HttpResponseError, "OperationFailed", "failed", [("ZonalAllocationFailed", "no room")]),
     AllocationFailed, ["no room"]),
    (arm_error(ResourceExistsError, "SkuNotAvailable", "The requested size is not available."),
     SkuNotAvailable, ["not available", "another"]),
    (arm_error(HttpResponseError, "MaxPriceValueInvalid", "Max price too low."), SpotRequestError,
     ["max_price"]),
    (arm_error(HttpResponseError, "AzureSpotIsNotSupportedForThisVMSize", "no spot"), SpotRequestError,
     ["supports spot"]),
    (arm_error(ResourceNotFoundError, "ResourceNotFound", "The Resource was not found."),
     ResourceMissing, ["not found"]),
    (arm_error(HttpResponseError, "AuthorizationFailed", "no access"), AuthenticationFailed,
     ["role assignment"]),
    (ClientAuthenticationError(message="DefaultAzureCredential failed"), AuthenticationFailed,
     ["az login"]),
    (ServiceRequestError("Cannot connect to host"), AzureError, ["arm_endpoint"]),
    (arm_error(ResourceExistsError, "OperationNotAllowed", "Cannot modify while deleting."), AzureError,
     ["Cannot modify"]),
])
def test_classification(exc, expected, words):
    err = classify(exc, "create scale set azm")
    assert type(err) is expected
    text = str(err)
    assert "create scale set azm" in text
    for word in words:
        assert word in text


def test_throttling_that_outlasts_the_retries_says_so():
    exc = arm_error(HttpResponseError, "OperationNotAllowed", "too many requests", [("TooManyRequests", "x")])
    exc.status_code = 429
    err = classify(exc, "list VMs")
    assert type(err) is AzureError and err.status == 429 and "throttling" in str(err)


def test_code_is_kept():
    err = classify(arm_error(HttpResponseError, "AllocationFailed", "x"), "grow")
    assert err.code == "AllocationFailed"


def test_arm_errors_chains_the_sdk_error():
    original = arm_error(ResourceNotFoundError, "ResourceNotFound", "gone")
    with pytest.raises(ResourceMissing) as info:
        with arm_errors("read VM x"):
            raise original
    assert info.value.__cause__ is original


def test_arm_errors_leaves_other_exceptions_alone():
    with pytest.raises(KeyError):
        with arm_errors("anything"):
            raise KeyError("x")
