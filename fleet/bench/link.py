"""A slow network link on this machine: a TCP proxy that delays every byte by a fixed time.

Boards and server on one machine talk over loopback in well under a millisecond; a board on a
farm's Wi-Fi or a cellular modem waits tens to hundreds of milliseconds per round trip. The
benchmark puts boards behind this proxy to measure what that costs and what pipelined drafting
wins back. Bytes keep their order; each direction is delayed by half the round-trip time, so
MQTT keep-alives, PUBACKs and TLS all see the same link.
"""

import asyncio
import socket
import threading
from concurrent.futures import Future
from typing import Self

from fleet.logging import get_logger

READ_SIZE = 65536


class DelayedLink:
    """`with DelayedLink(host, port, rtt_ms) as link:` clients connect to 127.0.0.1:`link.port`
    and reach host:port through a link with that round-trip time."""

    def __init__(self, upstream_host: str, upstream_port: int, rtt_ms: float) -> None:
        if rtt_ms < 0:
            raise ValueError(f"a round-trip time cannot be negative, got {rtt_ms}")
        self.upstream = (upstream_host, upstream_port)
        self.one_way_s = rtt_ms / 2000
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delayed-link", daemon=True)
        self._server: asyncio.Server | None = None
        self._log = get_logger(component="delayed-link")

    def __enter__(self) -> Self:
        self._thread.start()
        started: Future[asyncio.Server] = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        )
        self._server = started.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        self._log.info("link_started", port=self.port, upstream=f"{self.upstream[0]}:{self.upstream[1]}", one_way_ms=1000 * self.one_way_s)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _shutdown(self) -> None:
        """Stop accepting, then cut every connection still carried."""
        if self._server is not None:
            self._server.close()
        carried = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in carried:
            task.cancel()
        await asyncio.gather(*carried, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            self._log.warning("link_upstream_refused", reason=str(exc))
            client_writer.close()
            return
        for writer in (client_writer, upstream_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(
                self._carry(client_reader, upstream_writer),
                self._carry(upstream_reader, client_writer),
            )
        except asyncio.CancelledError:
            pass  # the link is shutting down; asyncio's server logs a cancelled handler as an error
        finally:
            client_writer.close()
            upstream_writer.close()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward what `reader` gets to `writer`, each chunk `one_way_s` after it arrived."""
        loop = asyncio.get_running_loop()
        in_flight: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await in_flight.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        delivery = asyncio.create_task(deliver())
        try:
            while data := await reader.read(READ_SIZE):
                in_flight.put_nowait((loop.time() + self.one_way_s, data))
            in_flight.put_nowait(None)
            await delivery
        except ConnectionError:
            pass
        finally:
            delivery.cancel()
            writer.close()
