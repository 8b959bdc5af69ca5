"""A TCP forwarder from an address instances reach to one service on the driver's loopback.

It stands in for a Prefect server that Azure VMs reach over their VNet: detached VMs' workers
use http://<gateway>:<port>/api, which arrives at the driver's loopback Prefect server. Only
that one port is forwarded; the host's 127.0.0.1 stays unreachable from instances otherwise.
Blob Storage goes the same way from a socket on each instance's own 127.0.0.1 (`start_on`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class TCPForwarder:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (the target's port if free, else any); returns the address."""
        try:
            self._server = await asyncio.start_server(self._handle, host, port)
        except OSError:
            self._server = await asyncio.start_server(self._handle, host, 0)
        self.address = self._server.sockets[0].getsockname()[:2]
        return self.address

    async def start_on(self, sock: socket.socket) -> None:
        """Serve an already listening socket (one bound inside an instance's namespace)."""
        self._server = await asyncio.start_server(self._handle, sock=sock)
        self.address = sock.getsockname()[:2]

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            try:
                target_r, target_w = await asyncio.open_connection(*self.target)
            except OSError:
                return
            try:
                await asyncio.gather(_pipe(client_r, target_w), _pipe(target_r, client_w))
            finally:
                target_w.close()
        finally:
            client_w.close()
            self._tasks.discard(asyncio.current_task())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
