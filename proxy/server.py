"""Starts and stops everything that listens: the UDP and TCP frontends, the
upstream sockets and the admin HTTP listener."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from typing import Any
from aiohttp import web

from proxy.admin import make_app
from proxy.config import Settings, format_hostport, split_hostport
from proxy.forwarder import Forwarder
from proxy.frontends import TcpConnection, UdpFrontend
from proxy.metrics import make_registry

log = logging.getLogger("dnschaos.server")


class Server:
    def __init__(self, settings: Settings, engine: Any = None) -> None:
        if engine is None:
            from proxy.core.engine import Engine

            engine = Engine()
        self.settings = settings
        self.engine = engine
        self.forwarder = Forwarder(settings, self.engine)
        self.registry = make_registry(self.forwarder)
        self.tcp_connections: set[TcpConnection] = set()
        self.listen_addresses: list[str] = []  # with the real ports, once bound
        self.admin_address: str | None = None
        self._udp: list[asyncio.DatagramTransport] = []
        self._udp_frontends: list[UdpFrontend] = []
        self._tcp: list[asyncio.AbstractServer] = []
        self._admin: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        self._phase_watch: asyncio.TimerHandle | None = None
        self._phase_seen: tuple | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.forwarder.start()
        for text in self.settings.listen:
            host, port = split_hostport(text, 5353)
            # TCP first, so that port 0 picks a free port that UDP then shares.
            # The listener's text is known only once bound: the factory reads it from a cell.
            cell: list[str] = []
            tcp = await loop.create_server(
                lambda cell=cell: TcpConnection(self.forwarder, cell[0], self.tcp_connections),
                host, port, reuse_address=True, family=_family(host),
            )
            port = tcp.sockets[0].getsockname()[1]
            listener = format_hostport(host, port)
            cell.append(listener)
            udp, frontend = await loop.create_datagram_endpoint(
                lambda listener=listener: UdpFrontend(self.forwarder, listener),
                local_addr=(host, port), family=_family(host),
            )
            self._udp.append(udp)
            self._udp_frontends.append(frontend)
            self._tcp.append(tcp)
            self.listen_addresses.append(listener)
        if self.settings.admin:
            host, port = split_hostport(self.settings.admin, 5380)
            self._admin = web.AppRunner(make_app(self), access_log=None)
            await self._admin.setup()
            site = web.TCPSite(self._admin, host, port)
            await site.start()
            bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
            self.admin_address = format_hostport(host, bound[1])
        self._watch_phases()
        log.info(
            "dnschaos listening on %s (UDP and TCP), forwarding to %s (%s), admin on %s",
            ", ".join(self.listen_addresses), ", ".join(self.settings.upstreams),
            self.settings.policy, self.admin_address or "nothing (off)",
        )

    def _watch_phases(self) -> None:
        """Log each phase change of the running scenario: one line per event."""
        phase = self.engine.current_phase(time.time())
        seen = (self.engine.scenario, phase[0], phase[1]) if phase else None
        if seen != self._phase_seen:
            if seen is not None:
                log.info("scenario %s: phase %d %r begins (%.1f s)", seen[0], seen[1] + 1,
                         seen[2], phase[2])  # type: ignore[index]
            elif self._phase_seen is not None:
                log.info("scenario %s ended: every fault reverted", self._phase_seen[0])
            self._phase_seen = seen
        self._phase_watch = asyncio.get_running_loop().call_later(0.1, self._watch_phases)

    async def stop(self) -> None:
        if self._phase_watch is not None:
            self._phase_watch.cancel()
        for udp in self._udp:
            udp.close()
        for tcp in self._tcp:
            tcp.close()
        for connection in list(self.tcp_connections):
            connection.close()
        if self._admin:
            await self._admin.cleanup()
        await self.forwarder.stop()
        self._stopped.set()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("stopping: draining queries in flight")
        await self.drain()
        await self.stop()
        log.info("stopped")

    async def drain(self, limit: float | None = None) -> None:
        """Stop listening for new queries and wait (up to the query deadline)
        for the ones in flight to be answered."""
        for frontend in self._udp_frontends:
            frontend.handle = _ignore  # keep the socket: answers in flight still go out
        for tcp in self._tcp:
            tcp.close()
        loop = asyncio.get_running_loop()
        end = loop.time() + (limit if limit is not None else self.settings.deadline + 0.2)
        while self.forwarder.inflight > 0 and loop.time() < end:
            await asyncio.sleep(0.02)


def _ignore(*args: object) -> None:
    pass


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET

