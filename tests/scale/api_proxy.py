"""A reverse proxy in front of a real Prefect server, on loopback, that can answer 503 for a
while: the overloaded or vanished API of the outage tests. HTTP requests and the events
websocket are forwarded as they are; in `failing` mode every new request (websocket upgrades
included) gets 503 with a Retry-After; `fail(close_websockets=True)` also closes the open
events websockets, as a server that went away would."""

from __future__ import annotations

import asyncio
import threading

import aiohttp
from aiohttp import web

from tests.conftest import free_port

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host",
               "content-length"}


class FailingApiProxy:
    def __init__(self, upstream_api_url: str, retry_after: int = 4):
        self.upstream = upstream_api_url.rstrip("/")
        self.retry_after = retry_after
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.failing = False
        self.refused = 0  # requests answered 503
        self._sockets: set[web.WebSocketResponse] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FailingApiProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def fail(self, failing: bool = True, *, close_websockets: bool = False) -> None:
        """Answer 503 from now on, or forward again."""
        self.failing = failing
        if failing and close_websockets:
            for ws in list(self._sockets):
                asyncio.run_coroutine_threadsafe(ws.close(), self._loop)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        await self._runner.cleanup()
        await self._session.close()

    def _target(self, request: web.Request) -> str:
        path = request.rel_url.path_qs
        assert path.startswith("/api")
        return self.upstream + path[len("/api"):]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.failing:
            self.refused += 1
            return web.Response(status=503, text="overloaded",
                                headers={"Retry-After": str(self.retry_after)})
        if request.headers.get("upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._session.request(request.method, self._target(request), headers=headers,
                                         data=await request.read(), allow_redirects=False) as up:
            body = await up.read()
            return web.Response(status=up.status, body=body, headers={
                k: v for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP})

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        protocols = tuple(p.strip() for p in request.headers.get(
            "sec-websocket-protocol", "").split(",") if p.strip())
        downstream = web.WebSocketResponse(protocols=protocols)
        await downstream.prepare(request)
        self._sockets.add(downstream)
        target = self._target(request).replace("http://", "ws://", 1)
        try:
            async with self._session.ws_connect(target, protocols=protocols) as upstream:
                async def pump(source, sink) -> None:
                    async for message in source:
                        if message.type == aiohttp.WSMsgType.TEXT:
                            await sink.send_str(message.data)
                        elif message.type == aiohttp.WSMsgType.BINARY:
                            await sink.send_bytes(message.data)
                        else:
                            break
                    await sink.close()

                await asyncio.gather(pump(downstream, upstream), pump(upstream, downstream),
                                     return_exceptions=True)
        finally:
            self._sockets.discard(downstream)
        return downstream
