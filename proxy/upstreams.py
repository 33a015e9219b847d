"""The upstream side of forwarding: an upstream resolver with its health
and counters, its connected UDP sockets (each with its table of pending
queries, see proxy/forwarder.py), and the TCP exchange used after a
truncated answer.  A socket hands what it receives to its `Carrier` (the
Forwarder)."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable
from typing import Any, Protocol

from proxy.core import wire
from proxy.core.deps import DepMap
from proxy.errors import DnschaosError
from proxy.stats import Stats, UpstreamStats

# Fields of a pending query (a list: cheaper to build per query than an object).
CLIENT_ID, ADDR, REPLY_TO, TCP, QUESTION, QUERY, ORDER, TRIES, SENT, RESPOND, VIEW, START = (
    range(12)
)

_QR_BIT = wire.QR
_TC_BIT = wire.TC
_ONE = b"\x00\x01"


class Carrier(Protocol):
    """What an upstream socket calls on the forwarder that owns it."""

    stats: Stats
    clock: Callable[[], float]
    deps: DepMap | None

    def mark_alive(self, upstream: Upstream) -> None: ...

    def probe_answered(self, upstream: Upstream, reply: bytes) -> None: ...

    def retry_tcp_or_apply_fault(self, entry: list[Any], data: bytes,
                                 upstream: Upstream) -> None: ...

    def unreachable(self, sock: UpstreamSocket, exc: Exception) -> None: ...


class Upstream:
    """One upstream resolver: its sockets, its health and its counters."""

    def __init__(self, host: str, port: int, name: str) -> None:
        self.addr = (host, port)
        self.name = name
        self.sockets: list[UpstreamSocket] = []
        self.fails = 0
        self.down_until = 0.0  # loop time; 0 when up
        self.looped = False  # a loop probe came back to us: never forwarded to
        self.probes: dict[bytes, bytes] = {}  # loop probes sent: ID -> question
        self.stats = UpstreamStats()
        self.relayed_sent = 0  # by the fast path's own sockets (proxy/accel.py)
        self.relayed_replies = 0

    @property
    def up(self) -> bool:
        return self.down_until == 0.0

    def sent(self) -> int:
        return sum(sock.sent for sock in self.sockets) + self.relayed_sent

    def replies(self) -> int:
        return sum(sock.replies for sock in self.sockets) + self.relayed_replies


class UpstreamSocket(asyncio.DatagramProtocol):
    """One connected UDP socket towards an upstream, with its pending IDs."""

    def __init__(self, forwarder: Carrier, upstream: Upstream) -> None:
        self.forwarder = forwarder
        self.upstream = upstream
        self.stats = forwarder.stats
        self.clock = forwarder.clock
        self.deps = forwarder.deps
        self.pending: dict[bytes, list] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.sent = 0
        self.replies = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        txid = data[:2]
        pending = self.pending
        entry = pending.get(txid)
        if entry is None:
            if txid in self.upstream.probes:
                self.forwarder.probe_answered(self.upstream, data)
            else:
                self.forwarder.stats.unmatched_replies += 1
            return
        question = entry[QUESTION]
        if not (
            len(data) >= 12 and data[2] & _QR_BIT and data[4:6] == _ONE
            and (data.startswith(question, 12) or same_question(data, question))
        ):
            self.forwarder.stats.mismatched_replies += 1
            return
        del pending[txid]
        self.replies += 1
        upstream = self.upstream
        now = self.clock()
        upstream.stats.latency.observe(now - entry[SENT])
        if upstream.fails:
            self.forwarder.mark_alive(upstream)
        if (entry[TCP] and data[2] & _TC_BIT) or entry[RESPOND] is not None:
            self.forwarder.retry_tcp_or_apply_fault(entry, data, upstream)
            return
        deps = self.deps
        if deps is not None:
            deps.answer(entry[ADDR][0], entry[QUESTION], data)
        stats = self.stats
        stats.answers += 1
        stats.rcodes[data[3] & 15] += 1
        stats.latency.observe(now - entry[START])
        entry[REPLY_TO].sendto(entry[CLIENT_ID] + data[2:], entry[ADDR])

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) on a connected socket: the kernel
        # does not say which send caused it.
        self.forwarder.unreachable(self, exc)


def answers(reply: bytes, question: bytes) -> bool:
    """Whether `reply` is a response to `question` (ID aside).  The UDP reply
    path (datagram_received) spells this out inline: it runs per query."""
    return len(reply) >= 12 and bool(reply[2] & _QR_BIT) and (
        reply.startswith(question, 12) or same_question(reply, question))


def same_question(data: bytes, question: bytes) -> bool:
    """Same name ignoring ASCII case (some servers change it), same type and class."""
    end = 12 + len(question)
    got = data[12:end]
    return (
        len(got) == len(question) and got[-4:] == question[-4:]
        and got[:-4].lower() == question[:-4].lower()
    )


async def tcp_exchange(addr: tuple[str, int], query: bytes, question: bytes) -> bytes:
    """Send `query` over a new TCP connection under a fresh ID; return the
    reply after checking its ID and question."""
    txid = os.urandom(2)
    reader, writer = await asyncio.open_connection(addr[0], addr[1])
    try:
        writer.write(struct.pack("!H", len(query)) + txid + query[2:])
        await writer.drain()
        while True:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            reply = await reader.readexactly(length)
            if reply[:2] == txid and answers(reply, question):
                return reply
    except asyncio.IncompleteReadError:
        raise DnschaosError("upstream closed the TCP connection before answering") from None
    finally:
        writer.close()
