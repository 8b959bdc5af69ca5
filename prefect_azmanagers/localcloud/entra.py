"""A Microsoft Entra-compatible token endpoint on the local cloud's HTTPS server.

What azure-identity's ClientSecretCredential (sync: through MSAL, aio: its own client) calls
when its authority host is the local cloud's endpoint:
GET  /{tenant}/v2.0/.well-known/openid-configuration   OpenID discovery (MSAL reads it first)
POST /{tenant}/oauth2/v2.0/token                       client-credentials grant -> JWT
GET  /{tenant}/discovery/v2.0/keys                      the signing key (jwks_uri)
Refusals use Entra's error body (error, error_description with its AADSTS code, error_codes,
timestamp, trace_id, correlation_id, error_uri) and status codes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from prefect_azmanagers.localcloud.identity import Identity

_NO_STORE = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}


def _error(status: int, error: str, code: int, description: str) -> JSONResponse:
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    return JSONResponse({
        "error": error,
        "error_description": f"AADSTS{code}: {description}\r\nTrace ID: {trace}\r\nCorrelation ID: {correlation}"
                             f"\r\nTimestamp: {stamp}",
        "error_codes": [code], "timestamp": stamp, "trace_id": trace, "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }, status_code=status, headers=_NO_STORE)


def _unknown_tenant(tenant: str) -> JSONResponse:
    return _error(400, "invalid_request", 90002,
                  f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
                  "signing into the correct cloud (the local cloud's tenant is in its localcloud.json).")


def service_principal_object_id(identity: Identity) -> str:
    """The object id of the local cloud's service principal (stable for its client id)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"localcloud-sp:{identity.client_id}"))


def entra_routes(identity: Identity) -> list[Route]:
    def base(request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}/{identity.tenant_id}"

    async def openid_configuration(request: Request) -> JSONResponse:
        if request.path_params["tenant"].lower() != identity.tenant_id:
            return _unknown_tenant(request.path_params["tenant"])
        root = base(request)
        return JSONResponse({
            "token_endpoint": f"{root}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{root}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": identity.issuer,
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid", "oid", "azp", "ver"],
            "tenant_region_scope": "NA",
            "cloud_instance_name": "localcloud",
        })

    async def keys(request: Request) -> JSONResponse:
        if request.path_params["tenant"].lower() != identity.tenant_id:
            return _unknown_tenant(request.path_params["tenant"])
        return JSONResponse(identity.jwks())

    async def token(request: Request) -> JSONResponse:
        tenant = request.path_params["tenant"]
        if tenant.lower() != identity.tenant_id:
            return _unknown_tenant(tenant)
        # application/x-www-form-urlencoded, parsed here (Starlette's form() needs python-multipart)
        form: dict[str, Any] = {k: v[-1] for k, v in parse_qs((await request.body()).decode("latin-1")).items()}
        if form.get("grant_type") != "client_credentials":
            return _error(400, "unsupported_grant_type", 70003,
                          f"The app requested an unsupported grant type '{form.get('grant_type')}'. The local "
                          "cloud's token endpoint answers the client_credentials grant only.")
        client_id, secret = str(form.get("client_id") or ""), form.get("client_secret")
        if secret is None:
            return _error(401, "invalid_client", 7000218,
                          "The request body must contain the following parameter: 'client_assertion' or "
                          "'client_secret'.")
        if client_id.lower() != identity.client_id:
            return _error(400, "unauthorized_client", 700016,
                          f"Application with identifier '{client_id}' was not found in the directory "
                          f"'{tenant}'. This can happen if the application has not been installed by the "
                          "administrator of the tenant or consented to by any user in the tenant.")
        if not identity.client_secret_matches(client_id.lower(), str(secret)):
            return _error(401, "invalid_client", 7000215,
                          "Invalid client secret provided. Ensure the secret being sent in the request is the "
                          f"client secret value, not the client secret ID, for a secret added to app "
                          f"'{client_id}'.")
        scopes = str(form.get("scope") or "").split()
        resources = [s[: -len("/.default")] for s in scopes if s.endswith("/.default")]
        if len(resources) != 1:
            return _error(400, "invalid_scope", 1002012,
                          f"The provided value for scope {' '.join(scopes)} is not valid. Client credential "
                          "flows must have a scope value with /.default suffixed to the resource identifier "
                          "(application ID URI).")
        issued = identity.issue(resources[0], app_id=identity.client_id,
                                object_id=service_principal_object_id(identity))
        return JSONResponse({"token_type": "Bearer", "expires_in": issued["expires_in"],
                             "ext_expires_in": issued["expires_in"], "access_token": issued["access_token"]},
                            headers=_NO_STORE)

    return [
        Route("/{tenant}/v2.0/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
        Route("/{tenant}/discovery/v2.0/keys", keys, methods=["GET"]),
        Route("/{tenant}/oauth2/v2.0/token", token, methods=["POST"]),
    ]
