"""IMDS request handling (no namespace needed): Azure's rules and document shapes."""

from __future__ import annotations

import asyncio
import json

import pytest

from prefect_azmanagers.localcloud.imds import IMDSServer, InstanceMetadata, network_document

H = {"metadata": "true"}


@pytest.fixture
def imds():
    acks = []
    meta = InstanceMetadata(compute={"name": "ss_1", "vmId": "v", "tags": ""},
                            network=network_document("10.0.0.5", "10.0.0.0", 22, "0a:1b:2c:3d:4e:5f"))
    server = IMDSServer("v", meta, lambda key, event_id: acks.append((key, event_id)))
    server.acks = acks
    return server


def call(server, method, target, headers=H, body=b""):
    r = server.route(method, target, headers, body)
    return r.status, (json.loads(r.body) if r.body and "json" in r.content_type else r.body.decode())


def test_instance_document_and_leaves(imds):
    status, doc = call(imds, "GET", "/metadata/instance?api-version=2021-02-01")
    assert status == 200 and doc["compute"]["name"] == "ss_1"
    assert doc["network"]["interface"][0]["macAddress"] == "0A1B2C3D4E5F"
    assert call(imds, "GET", "/metadata/instance/compute/vmId?api-version=1&format=text") == (200, "v")
    ip = "/metadata/instance/network/interface/0/ipv4/ipAddress/0/privateIpAddress?api-version=1&format=text"
    assert call(imds, "GET", ip) == (200, "10.0.0.5")
    assert call(imds, "GET", "/metadata/instance/compute?api-version=1&format=text")[0] == 400
    assert call(imds, "GET", "/metadata/instance/compute/nope?api-version=1")[0] == 404


@pytest.mark.parametrize("headers, target, status, fragment", [
    ({}, "/metadata/instance?api-version=1", 400, "Required metadata header"),
    ({"metadata": "false"}, "/metadata/instance?api-version=1", 400, "Required metadata header"),
    ({**H, "x-forwarded-for": "1.2.3.4"}, "/metadata/instance?api-version=1", 400, "X-Forwarded-For"),
    (H, "/metadata/scheduledevents", 400, "api-version was not specified"),
])
def test_requests_azure_refuses(imds, headers, target, status, fragment):
    got, doc = call(imds, "GET", target, headers)
    assert got == status and fragment in doc["error"]


def test_scheduled_events_incarnation_and_acknowledgement(imds):
    url = "/metadata/scheduledevents?api-version=2020-07-01"
    first = call(imds, "GET", url)[1]
    event = {"EventId": "E1", "EventType": "Preempt", "EventStatus": "Scheduled"}
    imds.metadata.post_event(event)
    imds.metadata.post_event({**event, "EventStatus": "Started"})  # same id: replaced
    second = call(imds, "GET", url)[1]
    assert second["Events"] == [{**event, "EventStatus": "Started"}]
    assert second["DocumentIncarnation"] > first["DocumentIncarnation"]
    approval = imds.route("POST", url, H, b'{"StartRequests": [{"EventId": "E1"}]}')
    assert (approval.status, approval.acknowledged) == (200, ("E1",))
    assert call(imds, "POST", url, body=b'{"StartRequests": [{"EventId": "E2"}]}')[0] == 400
    assert call(imds, "POST", url, body=b"not json")[0] == 400
    assert call(imds, "DELETE", url)[0] == 405
    assert imds.route("GET", url, H, b"").acknowledged == ()
    assert imds.acks == []  # the host hears of approvals only once the answer is sent


def test_approval_reaches_the_host_after_the_answer(imds):
    """Over a real socket: on_event_ack runs once the instance has its 200."""
    imds.metadata.post_event({"EventId": "E1", "EventType": "Preempt"})
    asyncio.run(_approve_over_a_socket(imds))


async def _approve_over_a_socket(imds):
    server = await asyncio.start_server(imds._handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"StartRequests": [{"EventId": "E1"}]}'
        writer.write(b"POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\n"
                     b"Metadata: true\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 200 ")
        writer.close()
        for _ in range(500):
            if imds.acks:
                break
            await asyncio.sleep(0.01)
        assert imds.acks == [("v", "E1")]
    finally:
        server.close()


def test_managed_identity_endpoint_rules():
    """/metadata/identity/oauth2/token answers as Azure's IMDS: OAuth-shaped 400s, the token
    document with string numbers, "Identity not found" without an identity."""
    asked = []

    def token_for(key, resource):
        asked.append((key, resource))
        return None if resource == "none" else {"access_token": "t", "expires_in": "3600", "resource": resource,
                                                "token_type": "Bearer"}

    server = IMDSServer("v", InstanceMetadata(compute={}, network={}), None, token_for)
    path = "/metadata/identity/oauth2/token"
    assert call(server, "GET", f"{path}?api-version=2018-02-01&resource=r", headers={}) == (
        400, {"error": "invalid_request", "error_description": "Required metadata header not specified"})
    assert call(server, "GET", f"{path}?resource=r")[1]["error_description"] == \
        "Required query variable 'api-version' is missing"
    assert call(server, "GET", f"{path}?api-version=2018-02-01")[1]["error_description"] == \
        "Required query variable 'resource' is missing"
    assert call(server, "GET", f"{path}?api-version=2018-02-01&resource=none") == (
        400, {"error": "invalid_request", "error_description": "Identity not found"})
    assert call(server, "GET", f"{path}?api-version=2018-02-01&resource=r&client_id=x")[1]["error_description"] == \
        "Identity not found"
    status, doc = call(server, "GET", f"{path}?api-version=2018-02-01&resource=https://management.azure.com/")
    assert status == 200 and doc["resource"] == "https://management.azure.com/" and doc["token_type"] == "Bearer"
    assert asked == [("v", "none"), ("v", "https://management.azure.com/")]
