"""The UDP fast path: the C relay of proxy/_relay.c, when it is built and not
turned off (`accelerate: false`, --no-accel, DNSCHAOS_ACCEL=0).

With it, a UDP listener is a plain non-blocking socket read by the relay
(recvmmsg) from a loop reader, and the relay has its own connected sockets
to each upstream.  It relays on its own the common case: a well-formed
query, not HINFO (loop probes are Python's), from an address Python's ACL
let through (`allow`; an upstream's address is counted for the loop
suspicion, as Forwarder.handle counts it), that no live rule may
select (the engine's Screen, asked once per batch), to the first upstream
of the next order (`set_orders`, pushed on every change).  Everything else
comes back as (data, addr) and goes through Forwarder.handle unchanged,
answered on the listener socket.

Python keeps the rest: counters come over in `flush` (every sweep and
before every read); attempts that time out or whose socket gets an ICMP
error become ordinary pending entries (proxy/upstreams.py) and take
Python's `_expire` / `_next_attempt` path (the next upstream on Python's
sockets, SERVFAIL at the deadline)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any

from proxy.upstreams import Upstream

try:
    import proxy._relay as _relay
except ImportError:  # not built: the pure-Python path
    _relay = None  # type: ignore[assignment]

log = logging.getLogger("dnschaos.accel")

ENV = "DNSCHAOS_ACCEL"


def unavailable(forwarder: Any) -> str | None:
    """Why the fast path is off for this forwarder; None when it is on."""
    if _relay is None:
        return "the C extension proxy._relay is not built"
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV}={os.environ[ENV]}"
    if not forwarder.settings.accelerate:
        return "turned off (accelerate: false)"
    if not sys.platform.startswith("linux"):
        return "recvmmsg/sendmmsg need Linux"
    if forwarder.clock is not time.monotonic:
        return "the forwarder runs on another clock"  # the relay reads CLOCK_MONOTONIC
    if forwarder.settings.upstream_sockets < 2:
        return "upstream_sockets is 1: none to spare for the relay"
    return None


def relay_sockets(forwarder: Any) -> int:
    """How many of each upstream's `upstream_sockets` the relay gets (0: the
    fast path is off): three quarters; the rest carry the Python path's
    queries (the first from each client, rules' queries, retries, loop probes).
    Logs why when off."""
    why = unavailable(forwarder)
    if why is not None:
        log.info("UDP fast path off (%s): pure Python", why)
        return 0
    count = forwarder.settings.upstream_sockets
    return count - max(1, count // 4)


class ListenerReply:
    """reply_to for the queries the relay hands to Python: sends on the
    listener's socket; a full send buffer loses the datagram, as UDP may."""

    __slots__ = ("sock", "dropped")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dropped = 0

    def sendto(self, data: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError as exc:  # a full send buffer (EAGAIN) above all
            self.dropped += 1
            log.debug("UDP reply not sent: %s", exc)


class Accelerator:
    """The relay of one forwarder, its upstream sockets and its listeners."""

    def __init__(self, forwarder: Any, loop: Any, count: int) -> None:
        self.forwarder = forwarder
        self.loop = loop
        self.sockets: list[socket.socket] = []
        self.upstream_of: list[Upstream] = []
        self.listeners: list[socket.socket] = []
        self.replies: list[ListenerReply] = []
        """Each listener's reply_to, by the relay's listener index (kept after
        the listeners close: entries that time out later still name theirs)."""
        self.reading = False
        self._index = {id(u): i for i, u in enumerate(forwarder.upstreams)}
        try:
            for upstream in forwarder.upstreams:
                family = socket.AF_INET6 if ":" in upstream.addr[0] else socket.AF_INET
                for _ in range(count):
                    sock = socket.socket(family, socket.SOCK_DGRAM)
                    self.sockets.append(sock)
                    sock.setblocking(False)
                    sock.connect(upstream.addr)
                    self.upstream_of.append(upstream)
        except OSError:
            self.close()
            raise
        # The relay's sockets share max_pending with Python's.
        self.cap = max(1, forwarder.settings.max_pending
                       // max(1, len(forwarder.sockets) + len(self.sockets)))
        deps = forwarder.deps
        self.relay = _relay.Relay(
            [(sock.fileno(), self._index[id(u)])
             for sock, u in zip(self.sockets, self.upstream_of, strict=True)],
            len(forwarder.upstreams), self.cap, forwarder.engine, self._gate,
            deps.answer if deps is not None else None, self._refused, forwarder.handle)
        for number, sock in enumerate(self.sockets):
            loop.add_reader(sock.fileno(), self.relay.pump_replies, number)

    # --- listeners --------------------------------------------------------------

    def listen(self, sock: socket.socket, listener: str) -> None:
        """Serve a bound, non-blocking UDP socket: the relay reads it."""
        reply_to = ListenerReply(sock)
        number = self.relay.add_listener(sock.fileno(), reply_to, listener)
        self.listeners.append(sock)
        self.replies.append(reply_to)
        # The relay hands what it does not take to forwarder.handle itself.
        self.loop.add_reader(sock.fileno(), self.relay.pump_queries, number)
        self.reading = True

    def stop_listening(self) -> None:
        """Drain: read no more queries; the answers to pending ones still go out."""
        if self.reading:
            for sock in self.listeners:
                self.loop.remove_reader(sock.fileno())
            self.reading = False

    def close_listeners(self) -> None:
        self.stop_listening()
        if self.listeners:
            self.relay.forget_listeners()  # before the fd numbers can be reused
        for sock in self.listeners:
            sock.close()
        self.listeners.clear()

    # --- what the forwarder tells it ------------------------------------------------

    def allow(self, ip: str, upstream: bool) -> None:
        """The ACL let `ip` through: its next queries may take the fast path;
        `upstream`: an upstream's address, whose queries the relay counts for
        the forwarder's loop suspicion (`_from_upstreams`)."""
        try:
            raw = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
        except OSError:
            return  # a scoped address, say: Python's path serves it
        self.relay.allow(raw, ip, upstream)

    def clear_allowed(self) -> None:
        self.relay.clear_allowed()

    def set_orders(self, orders: list[tuple[Upstream, ...]]) -> None:
        index = self._index
        self.relay.set_orders([(index[id(order[0])], order) for order in orders if order])

    @property
    def pending(self) -> int:
        return int(self.relay.pending())

    def _gate(self) -> Any:
        """Asked once per batch while engine.active (the relay reads that
        itself): None, every query may go fast (no live run); False, none may
        (the screen is off); else the Screen, whose names and zones the relay
        looks the queries up in."""
        engine = self.forwarder.engine
        if not engine.active:
            return None
        screen = engine.screen(time.time())
        return screen if screen.usable else False

    # --- what it hands back -----------------------------------------------------------

    def _entry(self, item: tuple[Any, ...]) -> tuple[Upstream, list[Any]]:
        """A relay attempt as a pending entry of Python's (the proxy/upstreams.py fields)."""
        number, query, qend, addr, listener, order, sent, start = item
        reply_to = self.replies[listener]
        return self.upstream_of[number], [query[:2], addr, reply_to, False, query[12:qend],
                                          query, order, 1, sent, None, None, start]

    def expired(self, sent_before: float) -> list[tuple[Upstream, list[Any]]]:
        """The relay's attempts sent at or before `sent_before`, taken from it."""
        return [self._entry(item) for item in self.relay.expired(sent_before)]

    def _refused(self, number: int, errno: int) -> None:
        """An ICMP error on a relay socket: Python's unreachable handling."""
        waiting = [self._entry(item)[1] for item in self.relay.take_pending(number)]
        self.forwarder.upstream_unreachable(self.upstream_of[number],
                                            OSError(errno, os.strerror(errno)), waiting)

    def flush(self) -> None:
        """The relay's counters since the last flush, added to the forwarder's."""
        (queries, fast, from_upstreams, answers, unmatched, mismatched, dropped, rcodes,
         latency, qtypes, upstreams) = self.relay.flush()
        fwd = self.forwarder
        fwd._from_upstreams += from_upstreams
        stats = fwd.stats
        for reply_to in self.replies:  # the Python path's replies on the relay's listeners
            dropped += reply_to.dropped
            reply_to.dropped = 0
        stats.replies_unsent += dropped
        stats.queries_udp += queries
        stats.fast_path += fast
        stats.answers += answers
        stats.unmatched_replies += unmatched
        stats.mismatched_replies += mismatched
        for code, count in enumerate(rcodes):
            stats.rcodes[code] += count
        _add(stats.latency, latency)
        for qtype, count in qtypes.items():
            stats.qtypes[qtype] += count
        for upstream, (sent, replies, up_latency, answered) in zip(
                fwd.upstreams, upstreams, strict=True):
            upstream.relayed_sent += sent
            upstream.relayed_replies += replies
            _add(upstream.stats.latency, up_latency)
            if answered and upstream.fails:
                fwd.mark_alive(upstream)

    def close(self) -> None:
        self.close_listeners()
        relay = getattr(self, "relay", None)
        for sock in self.sockets:
            if relay is not None:
                self.loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets.clear()
        if relay is not None:
            relay.close()


def _add(histogram: Any, data: tuple[list[int], float]) -> None:
    counts, total = data
    for i, count in enumerate(counts):
        histogram.counts[i] += count
    histogram.total += total


def attach(forwarder: Any, loop: Any, count: int) -> Accelerator | None:
    """The fast path for `forwarder`, with `count` sockets per upstream
    (relay_sockets), or None; logs which path runs."""
    try:
        accelerator = Accelerator(forwarder, loop, count)
    except OSError as exc:
        log.warning("UDP fast path off (its upstream sockets failed: %s): pure Python", exc)
        return None
    log.info("UDP fast path: the C relay (batches of recvmmsg/sendmmsg), %d of %d sockets "
             "per upstream", count, forwarder.settings.upstream_sockets)
    return accelerator
