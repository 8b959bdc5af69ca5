"""Azure Instance Metadata Service (IMDS) for the sandboxes, at the real http://169.254.169.254
(isolated mode).

One server in the local cloud's own event loop serves every instance: for each instance a
listening socket is created *inside* the instance's network namespace (a thread enters the
namespace with setns(2), binds 169.254.169.254:80 there and returns), so each instance reaches
only its own metadata at the real address and no process per instance is needed. The host's
network is untouched (the address exists only on each instance's loopback).
In loopback mode (no namespaces) the socket listens on the instance's own 127.x.y.z address at
an unprivileged port instead; instances learn the URL from AZMANAGERS_IMDS_URL.

Served, with Azure's JSON shapes and rules (`Metadata: true` and `api-version` required, 400
otherwise): GET /metadata/instance[/<path>][?format=text], GET /metadata/scheduledevents,
POST /metadata/scheduledevents {"StartRequests": [{"EventId": ...}]} (acknowledgement), and the
managed-identity token endpoint GET /metadata/identity/oauth2/token?resource=... (a token from
`token_for(key, resource)`; 400 "Identity not found" for a VM without a SystemAssigned identity).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000
_MAX_HEAD = 16 * 1024
_MAX_BODY = 64 * 1024
_NEWEST_VERSIONS = ["2023-07-01", "2021-12-13", "2020-07-01"]
APPROVAL_LATENCY = 1.0  # seconds from answering a StartRequests to telling the host


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    acknowledged: tuple[str, ...] = ()  # EventIds approved by this request


@dataclass
class InstanceMetadata:
    """What one instance's IMDS serves; the SandboxHost mutates it, requests read it."""

    compute: dict
    network: dict
    events: list[dict] = field(default_factory=list)
    incarnation: int = 1

    def post_event(self, event: dict) -> None:
        self.events = [e for e in self.events if e.get("EventId") != event.get("EventId")]
        self.events.append(dict(event))
        self.incarnation += 1

    def clear_events(self) -> None:
        self.events = []
        self.incarnation += 1

    def scheduled_events(self) -> dict:
        return {"DocumentIncarnation": self.incarnation, "Events": [dict(e) for e in self.events]}


def network_document(ip: str, subnet_address: str, prefixlen: int, mac: str) -> dict:
    """The "network" part of /metadata/instance, as Azure shapes it."""
    return {"interface": [{
        "ipv4": {"ipAddress": [{"privateIpAddress": ip, "publicIpAddress": ""}],
                 "subnet": [{"address": subnet_address, "prefix": str(prefixlen)}]},
        "ipv6": {"ipAddress": []},
        "macAddress": mac.replace(":", "").upper(),
    }]}


class NetnsBinder:
    """Creates listening sockets inside network namespaces from one dedicated thread (setns
    changes only the calling thread's namespace; a dedicated thread keeps every other thread
    of the process in the host's)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="azlc-netns")
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")

    def _bind(self, netns_file: Path, address: str, port: int) -> socket.socket:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(netns_file, os.O_RDONLY)
        try:
            self._setns(target)
            try:
                return socket.create_server((address, port))
            finally:
                self._setns(own)
        finally:
            os.close(own)
            os.close(target)

    async def bind(self, netns_file: Path, address: str, port: int) -> socket.socket:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._bind, netns_file, address, port)

    def close(self) -> None:
        self._executor.shutdown(wait=False)


class IMDSServer:
    """Serves one instance's metadata on a socket bound inside its namespace."""

    def __init__(self, key: str, metadata: InstanceMetadata,
                 on_event_ack: Callable[[str, str], None] | None,
                 token_for: Callable[[str, str], dict | None] | None = None):
        self.key, self.metadata, self.on_event_ack = key, metadata, on_event_ack
        self.token_for = token_for
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._pending: set[asyncio.TimerHandle] = set()

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._handle, sock=sock)

    async def close(self) -> None:
        """Close the listening socket and every open connection (a socket would keep the
        namespace alive after `ip netns del`)."""
        if self._server is not None:
            self._server.close()
        for handle in self._pending:  # an instance that is gone approves nothing
            handle.cancel()
        for writer in list(self._connections):
            writer.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        response = None
        try:
            response = await self._respond(reader)
            head = (f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}\r\n"
                    f"Content-Type: {response.content_type}\r\n"
                    f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + response.body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()
        if response is not None and response.acknowledged:
            # The platform hears of an approval after the instance has its answer, and a moment
            # later, as on Azure: the approval may end the instance, and the instance must be
            # able to finish the request (e.g. an SSH session running curl) first.
            loop = asyncio.get_running_loop()
            self._pending = {h for h in self._pending if h.when() > loop.time()}  # not yet run
            self._pending.add(loop.call_later(APPROVAL_LATENCY, self._notify, response.acknowledged))

    def _notify(self, event_ids: tuple[str, ...]) -> None:
        for event_id in event_ids:
            if self.on_event_ack is not None:
                try:
                    self.on_event_ack(self.key, event_id)
                except Exception:  # the host's bug must not break the metadata service
                    logger.exception("on_event_ack(%s, %s) failed", self.key, event_id)

    async def _respond(self, reader: asyncio.StreamReader) -> Response:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEAD:
            return _error(400, "Bad request. Request headers too large")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = request_line.split(" ")
        except ValueError:
            return _error(400, "Bad request")
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length > _MAX_BODY:
            return _error(400, "Bad request. Body too large")
        body = await reader.readexactly(length) if length else b""
        return self.route(method, target, headers, body)

    def route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        """Answer one request (headers keyed in lowercase)."""
        url = urlsplit(target)
        path = url.path.rstrip("/").lower()
        query = {k.lower(): v[-1] for k, v in parse_qs(url.query).items()}
        if path == "/metadata/identity/oauth2/token":
            return self._identity_token(method, headers, query)
        if headers.get("metadata", "").lower() != "true":
            return _error(400, "Bad request. Required metadata header not specified")
        if "x-forwarded-for" in headers:
            return _error(400, "Bad request. Request contains X-Forwarded-For header")
        if path == "/metadata/scheduledevents":
            if "api-version" not in query:
                return _missing_api_version()
            if method == "GET":
                return _json(200, self.metadata.scheduled_events())
            if method == "POST":
                return self._acknowledge(body)
            return _error(405, "Method not allowed")
        if path == "/metadata/instance" or path.startswith("/metadata/instance/"):
            if "api-version" not in query:
                return _missing_api_version()
            if method != "GET":
                return _error(405, "Method not allowed")
            return self._instance(url.path.rstrip("/").split("/")[3:], query.get("format"))
        return _error(404, "Not found")

    def _identity_token(self, method: str, headers: dict[str, str], query: dict[str, str]) -> Response:
        """IMDS's managed-identity endpoint (its errors are OAuth-shaped, unlike the rest)."""
        def refuse(description: str, status: int = 400) -> Response:
            return _json(status, {"error": "invalid_request", "error_description": description})

        if headers.get("metadata", "").lower() != "true":
            return refuse("Required metadata header not specified")
        if method != "GET":
            return _error(405, "Method not allowed")
        if "api-version" not in query:
            return refuse("Required query variable 'api-version' is missing")
        if not query.get("resource"):
            return refuse("Required query variable 'resource' is missing")
        if {"client_id", "object_id", "msi_res_id", "mi_res_id"} & set(query):
            return refuse("Identity not found")  # user-assigned identities are not modelled
        token = self.token_for(self.key, query["resource"]) if self.token_for is not None else None
        if token is None:
            return refuse("Identity not found")
        return _json(200, token)

    def _instance(self, parts: list[str], fmt: str | None) -> Response:
        node: object = {"compute": self.metadata.compute, "network": self.metadata.network}
        for part in parts:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return _error(404, "Not found")
        if fmt == "text":
            if isinstance(node, (dict, list)):
                return _error(400, "Bad request. format=text is only allowed for leaf nodes")
            return Response(200, "text/plain; charset=utf-8", str(node).encode())
        return _json(200, node)

    def _acknowledge(self, body: bytes) -> Response:
        try:
            requests = json.loads(body or b"null")["StartRequests"]
            event_ids = [r["EventId"] for r in requests]
        except (ValueError, TypeError, KeyError):
            return _error(400, 'Bad request. Expected {"StartRequests": [{"EventId": "..."}]}')
        known = {e.get("EventId") for e in self.metadata.events}
        unknown = [i for i in event_ids if i not in known]
        if unknown:
            return _error(400, f"Bad request. Unknown EventId(s): {', '.join(map(str, unknown))}")
        return Response(200, "application/json; charset=utf-8", b"", tuple(event_ids))


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def _json(status: int, doc: object) -> Response:
    return Response(status, "application/json; charset=utf-8", json.dumps(doc).encode())


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


def _missing_api_version() -> Response:
    return _json(400, {
        "error": "Bad request. api-version was not specified in the request. "
                 "For more information refer to aka.ms/azureimds",
        "newest-versions": _NEWEST_VERSIONS,
    })
