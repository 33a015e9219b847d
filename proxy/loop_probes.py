"""Loop probes: how the forwarder finds an upstream that forwards our
queries back to us (see "Forwarding loops" in proxy/forwarder.py's notes).

A probe is an HINFO query for `<random>.u<index>.<token>.dnschaos-loop.`
sent on an upstream's first query socket.  One that reaches our own
listeners is answered with a marker record and never forwarded; an answer
that carries the marker, or a probe of ours that comes back, marks the
upstream looped; a real answer to a later probe clears it.  A mixin of
Forwarder: it reads and sets the forwarder's upstreams and probe state."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from typing import Any

from proxy.core import wire
from proxy.stats import Stats
from proxy.upstreams import Upstream, answers

log = logging.getLogger("dnschaos.forwarder")

PROBE_INTERVAL = 10.0  # seconds between loop probes of every upstream
PROBE_MIN_GAP = 1.0  # seconds at least between probe rounds a suspicion starts
SUSPICIOUS = 64  # queries from upstreams' addresses in one sweep that start a probe round
PROBE_LABEL = b"dnschaos-loop"
PROBE_SUFFIX = bytes([len(PROBE_LABEL)]) + PROBE_LABEL + b"\x00"
HINFO = 13


class LoopProbes:
    # Set by Forwarder.__init__:
    upstreams: list[Upstream]
    stats: Stats
    clock: Callable[[], float]
    loop_token: bytes
    _probe_marker: bytes
    _next_probe: float
    _last_probe: float

    def _recompute_orders(self) -> None:
        raise NotImplementedError

    def start_loop_probes(self) -> None:
        """Probe every upstream now and every PROBE_INTERVAL from now on;
        called once the listeners are bound, so a probe that comes back finds them."""
        self.probe_loops()

    def probe_loops(self) -> None:
        now = self.clock()
        self._last_probe = now
        self._next_probe = now + PROBE_INTERVAL
        for index, upstream in enumerate(self.upstreams):
            if not upstream.sockets:
                continue
            # On a query socket (not counted as a request): an ICMP error
            # tells at once that the upstream is unreachable.
            sock = upstream.sockets[0]
            txid = os.urandom(2)
            while txid in sock.pending:
                txid = os.urandom(2)
            question = b"".join(bytes([len(label)]) + label for label in (
                os.urandom(4).hex().encode(), b"u%d" % index, self.loop_token,
            )) + PROBE_SUFFIX + struct.pack("!HH", HINFO, 1)
            if len(upstream.probes) >= 8:
                upstream.probes.clear()  # old probes nobody answered
            upstream.probes[txid] = question
            sock.transport.sendto(  # type: ignore[union-attr]
                txid + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + question)

    def _own_probe(self, data: bytes, qend: int, addr: Any, reply_to: Any,
                   listener: str) -> bool:
        """Whether the query is one of our loop probes come back: then it is
        answered here, with the marker, and never forwarded."""
        name = data[12:qend - 4].lower()
        if not name.endswith(PROBE_SUFFIX):
            return False
        labels, pos = [], 0
        while pos < len(name) and 0 < name[pos] < 64:
            labels.append(name[pos + 1:pos + 1 + name[pos]])
            pos += 1 + name[pos]
        if len(labels) != 4 or labels[2] != self.loop_token:
            return False  # another proxy's probe: a query like any other
        index = labels[1][1:]
        if index.isdigit() and int(index) < len(self.upstreams):
            self.loop_detected(self.upstreams[int(index)],
                               f"its loop probe came back to {listener} from {addr[0]}")
        # QR AA (RD copied), NOERROR; the question; HINFO "dnschaos-loop" "<token>".
        marker = self._probe_marker
        reply_to.sendto(data[:2] + bytes([0x84 | data[2] & 1, 0]) + b"\x00\x01\x00\x01\x00\x00"
                        + b"\x00\x00" + data[12:qend] + b"\xc0\x0c"
                        + struct.pack("!HHIH", HINFO, 1, 0, len(marker)) + marker, addr)
        return True

    def probe_answered(self, upstream: Upstream, reply: bytes) -> None:
        question = upstream.probes.pop(reply[:2])
        if not answers(reply, question):
            self.stats.mismatched_replies += 1
            return
        if self._probe_marker in reply:
            self.loop_detected(upstream, "its answer to a loop probe came from this proxy")
        elif upstream.looped and reply[3] & 15 in (wire.NOERROR, wire.NXDOMAIN):
            upstream.looped = False  # a real answer: something else resolved it
            log.warning("upstream %s no longer loops back to this proxy", upstream.name)
            self._recompute_orders()

    def loop_detected(self, upstream: Upstream, how: str) -> None:
        if upstream.looped:
            return
        upstream.looped = True
        upstream.stats.loops += 1
        log.error("upstream %s forwards back to this proxy (%s): forwarding loop; "
                  "no query goes to it until a loop probe gets a real answer",
                  upstream.name, how)
        self._recompute_orders()
