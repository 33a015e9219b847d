"""Client-facing listeners: thin protocols that hand queries to the forwarder.

Both kinds give the forwarder a `reply_to` object with `sendto(bytes, addr)`:
for UDP it is the asyncio transport itself, for TCP the connection, which
adds the two-byte length prefix.  TCP connections carry any number of
queries, answered as soon as each answer is ready, in any order (RFC 7766);
a connection whose client does not read its answers is not read from
either, until they drain.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

from proxy.forwarder import Forwarder

log = logging.getLogger("dnschaos.frontends")


class UdpFrontend(asyncio.DatagramProtocol):
    def __init__(self, forwarder: Forwarder, listener: str) -> None:
        self.handle = forwarder.handle
        self.stats = forwarder.stats
        self.listener = listener
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        grow_receive_buffer(transport.get_extra_info("socket"))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.stats.queries_udp += 1
        self.handle(data, addr, self.transport, False, self.listener)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


def udp_listener_socket(host: str, port: int, family: int, reuse_port: bool) -> socket.socket:
    """A bound non-blocking UDP socket, as the loop's datagram endpoint
    binds one (for the fast path, which reads it itself)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    grow_receive_buffer(sock)
    return sock


UDP_RECEIVE_BUFFER = 4 << 20  # bytes: absorbs bursts while the loop is busy


def grow_receive_buffer(sock: Any) -> None:
    """A larger kernel receive buffer, so a burst (an upstream dying and every
    pending query retried at once) is queued rather than dropped.  Root may
    exceed net.core.rmem_max; others get what the kernel allows."""
    if sock is None:
        return
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_RECEIVE_BUFFER)
            return
        except OSError:
            continue


class TcpConnection(asyncio.Protocol):
    """One client TCP connection."""

    def __init__(self, forwarder: Forwarder, listener: str, connections: set) -> None:
        self.forwarder = forwarder
        self.listener = listener
        self.connections = connections
        self.idle_timeout = forwarder.settings.tcp_idle_timeout
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.outstanding = 0  # queries received and not yet answered or dropped
        self.last_active = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        stats = self.forwarder.stats
        if len(self.connections) >= self.forwarder.settings.tcp_max_connections:
            # At the cap, make room by closing the connection idle the longest,
            # so that a pile of silent connections cannot lock clients out.
            idle = [c for c in self.connections if c.outstanding <= 0]
            if not idle:
                stats.tcp_rejected += 1
                transport.close()
                return
            min(idle, key=lambda c: c.last_active).close()
            stats.tcp_evicted += 1
        stats.tcp_connections += 1
        self.connections.add(self)
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        self.timer = loop.call_later(self.idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        # Only whole messages count as activity: a client trickling a byte at a
        # time is still idle, and the idle timeout closes it.
        while len(buffer) >= 2:
            (length,) = struct.unpack_from("!H", buffer)
            if len(buffer) < 2 + length:
                break
            message = bytes(buffer[2:2 + length])
            del buffer[:2 + length]
            self.last_active = asyncio.get_running_loop().time()
            self.forwarder.stats.queries_tcp += 1
            self.outstanding += 1
            self.forwarder.handle(message, self.peer, self, True, self.listener)

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.outstanding -= 1
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(struct.pack("!H", len(data)) + data)
            self.last_active = asyncio.get_running_loop().time()

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its queries
        # until they drain, so it cannot make the proxy buffer answers
        # without bound.  The idle timeout still closes it.
        if self.transport is not None:
            self.forwarder.stats.tcp_paused += 1
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def no_reply(self) -> None:
        """A query on this connection ends without an answer (dropped)."""
        self.outstanding -= 1
        self.last_active = asyncio.get_running_loop().time()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.connections.discard(self)  # at once: connection_lost comes a loop turn later

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle_until = self.last_active + self.idle_timeout
        if self.outstanding > 0:
            # Not idle while a query waits for its answer (RFC 7766 6.2.3); the
            # forwarder's deadline bounds that wait.
            self.timer = loop.call_later(self.idle_timeout, self._check_idle)
        elif loop.time() >= idle_until:
            self.forwarder.stats.tcp_idle_closed += 1
            self.close()
        else:
            self.timer = loop.call_later(idle_until - loop.time(), self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.connections.discard(self)
        self.transport = None
