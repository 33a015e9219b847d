"""The forwarder's failover and upstream health, in memory: a fake clock,
fake upstream transports that record what was sent, and a fake client.
Which upstream each attempt goes to, mark-down after max_fails, another
chance after down_time, SERVFAIL at the deadline, an unreachable upstream
skipped at once, a looped one skipped.  (The same over real sockets:
tests/e2e/test_upstream_failure.py, test_loop.py.)"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import dns.message
import dns.rcode
import pytest

from proxy.config import Settings
from proxy.core.engine import Engine
from proxy.forwarder import Forwarder
from proxy.upstreams import Upstream, UpstreamSocket

A, B = "127.0.0.1:5301", "127.0.0.2:5302"
CLIENT = ("127.0.0.9", 40000)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Transport:
    """An upstream socket's transport: what was sent, in order, also to a
    log every transport of the forwarder shares."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(data)
        if data[2] & 0x80 == 0 and b"dnschaos-loop" not in data:  # a query, not a probe
            self.log.append(self.name)

    def close(self) -> None:
        pass


class Client:
    """The frontend a reply goes back through."""

    def __init__(self) -> None:
        self.got: list[dns.message.Message] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        assert addr == CLIENT
        self.got.append(dns.message.from_wire(data))


class Loop:
    def call_later(self, delay: float, callback: Any, *args: Any) -> Any:
        return SimpleNamespace(cancel=lambda: None)  # the tests call _sweep themselves


def forwarder(clock: Clock, *upstreams: str, **settings: Any) -> Forwarder:
    """A forwarder with one fake socket per upstream, as start() would make them."""
    fwd = Forwarder(Settings(upstreams=list(upstreams or (A, B)), allow=["0.0.0.0/0"],
                             **settings), Engine(), rng=random.Random(1), clock=clock)
    fwd.loop = Loop()
    fwd.attempt_log = []  # type: ignore[attr-defined]
    for upstream in fwd.upstreams:
        sock = UpstreamSocket(fwd, upstream)
        sock.connection_made(Transport(upstream.name, fwd.attempt_log))  # type: ignore[attr-defined,arg-type]
        upstream.sockets.append(sock)
        fwd.sockets.append(sock)
    fwd.pending_cap = 1000
    fwd._recompute_orders()
    return fwd


def up(fwd: Forwarder, name: str) -> Upstream:
    return next(u for u in fwd.upstreams if u.name == name)


def sent(fwd: Forwarder) -> list[str]:
    """Every attempt so far, by upstream name, in order of sending."""
    return list(fwd.attempt_log)  # type: ignore[attr-defined]


def ask(fwd: Forwarder, client: Client, name: str = "www.example.test") -> int:
    """A client query; its ID."""
    query = dns.message.make_query(name, "A")
    fwd.handle(query.to_wire(), CLIENT, client, False, "l")
    return query.id


def advance(fwd: Forwarder, clock: Clock, seconds: float) -> None:
    clock.now += seconds
    fwd._sweep()


def answer(fwd: Forwarder, name: str, rcode: int = dns.rcode.NOERROR) -> None:
    """The upstream `name` answers its last pending attempt."""
    sock = up(fwd, name).sockets[0]
    data = sock.transport.sent[-1]  # type: ignore[union-attr]
    reply = dns.message.make_response(dns.message.from_wire(data))
    reply.set_rcode(rcode)
    sock.datagram_received(reply.to_wire(), None)


def test_each_attempt_goes_to_the_next_upstream_then_servfail_at_the_deadline() -> None:
    clock, client = Clock(), Client()
    fwd = forwarder(clock, deadline="3s", timeout="1s")
    assert fwd.attempts == 3
    qid = ask(fwd, client)
    assert sent(fwd) == [A]
    advance(fwd, clock, 0.99)
    assert sent(fwd) == [A] and client.got == []  # not yet expired
    advance(fwd, clock, 0.02)
    assert sent(fwd) == [A, B]
    advance(fwd, clock, 1.0)
    assert sent(fwd) == [A, B, A] and client.got == []
    advance(fwd, clock, 1.0)  # the deadline: the last attempt expired
    assert [(m.id, m.rcode()) for m in client.got] == [(qid, dns.rcode.SERVFAIL)]
    assert fwd.stats.servfail_deadline == 1 and len(sent(fwd)) == 3
    assert up(fwd, A).stats.timeouts == 2 and up(fwd, B).stats.timeouts == 1


def test_an_answer_goes_back_under_the_clients_id_and_ends_the_query() -> None:
    clock, client = Clock(), Client()
    fwd = forwarder(clock)
    qid = ask(fwd, client)
    clock.now += 0.25
    answer(fwd, A, dns.rcode.NXDOMAIN)
    assert [(m.id, m.rcode()) for m in client.got] == [(qid, dns.rcode.NXDOMAIN)]
    assert fwd.inflight == 0 and fwd.stats.answers == 1
    assert fwd.stats.latency.total == pytest.approx(0.25)  # read from the injected clock
    advance(fwd, clock, 5.0)
    assert sent(fwd) == [A] and len(client.got) == 1  # nothing retried, nothing more sent


def test_marked_down_after_max_fails_then_another_chance_after_down_time() -> None:
    clock, client = Clock(), Client()
    fwd = forwarder(clock, deadline="2s", timeout="1s", max_fails=2, down_time="5s")
    a = up(fwd, A)
    ask(fwd, client)
    advance(fwd, clock, 1.0)  # one timeout on A: still up, tried first
    assert a.up and a.fails == 1
    answer(fwd, B)
    ask(fwd, client)
    assert sent(fwd)[-1] == A
    advance(fwd, clock, 1.0)  # the second timeout in a row: down
    assert not a.up and a.down_until == clock.now + 5.0
    answer(fwd, B)
    ask(fwd, client)
    assert sent(fwd)[-1] == B  # a down upstream is tried last
    answer(fwd, B)
    advance(fwd, clock, 4.9)
    assert not a.up
    advance(fwd, clock, 0.2)  # down_time over: another chance, one timeout from down
    assert a.up and a.fails == 1
    ask(fwd, client)
    assert sent(fwd)[-1] == A
    advance(fwd, clock, 1.0)
    assert not a.up  # one more timeout was enough
    answer(fwd, B)
    assert all(m.rcode() == dns.rcode.NOERROR for m in client.got) and len(client.got) == 4


def test_an_answer_from_a_down_upstream_brings_it_back() -> None:
    clock, client = Clock(), Client()
    fwd = forwarder(clock, A, deadline="1s", timeout="1s", max_fails=1)
    ask(fwd, client)
    advance(fwd, clock, 1.0)
    assert not up(fwd, A).up and client.got[-1].rcode() == dns.rcode.SERVFAIL
    ask(fwd, client)  # the only upstream: tried although down
    answer(fwd, A)
    assert up(fwd, A).up and up(fwd, A).fails == 0
    assert client.got[-1].rcode() == dns.rcode.NOERROR


def test_unreachable_upstream_is_marked_down_and_the_next_one_tried_at_once() -> None:
    clock, client = Clock(), Client()
    fwd = forwarder(clock, deadline="3s", timeout="1s")
    ask(fwd, client)
    ask(fwd, client, "mail.example.test")
    assert sent(fwd) == [A, A]
    up(fwd, A).sockets[0].error_received(ConnectionRefusedError(111, "Connection refused"))
    assert sent(fwd) == [A, A, B, B]  # no clock moved: both retried now
    assert not up(fwd, A).up and up(fwd, A).stats.errors == 1
    assert up(fwd, A).down_until == clock.now + fwd.settings.down_time
    answer(fwd, B)
    ask(fwd, client)
    assert sent(fwd)[-1] == B  # down: tried last


def test_every_upstream_unreachable_ends_in_servfail_after_the_attempts() -> None:
    clock, client = Clock(), Client()
    fwd = forwarder(clock, deadline="3s", timeout="1s")
    ask(fwd, client)
    for name in (A, B, A):
        up(fwd, name).sockets[0].error_received(ConnectionRefusedError(111, "refused"))
    assert sent(fwd) == [A, B, A]
    assert [m.rcode() for m in client.got] == [dns.rcode.SERVFAIL]  # no storm, no silence


def test_a_looped_upstream_gets_no_queries() -> None:
    clock, client = Clock(), Client()
    fwd = forwarder(clock)
    fwd.loop_detected(up(fwd, A), "test")
    ask(fwd, client)
    assert sent(fwd) == [B]
    assert up(fwd, A).stats.loops == 1


def test_a_looped_upstream_in_an_older_order_is_skipped_using_a_try() -> None:
    clock, client = Clock(), Client()
    fwd = forwarder(clock, deadline="2s", timeout="1s")
    up(fwd, A).looped = True  # found while the order (A, B) was in force
    ask(fwd, client)
    assert sent(fwd) == [B]
    advance(fwd, clock, 1.0)  # B timed out: that was the last of its 2 tries
    assert sent(fwd) == [B] and client.got[-1].rcode() == dns.rcode.SERVFAIL


def test_only_looped_upstreams_servfail_at_once() -> None:
    clock, client = Clock(), Client()
    fwd = forwarder(clock, A)
    fwd.loop_detected(up(fwd, A), "test")
    ask(fwd, client)
    assert sent(fwd) == [] and client.got[-1].rcode() == dns.rcode.SERVFAIL
    assert fwd.stats.servfail_sent == 1 and fwd.stats.servfail_deadline == 0
