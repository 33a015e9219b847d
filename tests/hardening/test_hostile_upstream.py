"""A hostile or broken upstream: replies under wrong IDs, for wrong
questions, a flood of replies, forged replies from another address.  None
reaches the client (cache-poisoning style checks); the ones the proxy sees
are counted in dnschaos_upstream_replies_discarded_total, the ones from
another address never get past the kernel (connected sockets)."""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import dns.message
import dns.rcode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core import wire
from support.dnsutil import addresses, make_query, udp
from support.fake_upstream import Delayed, answer_a, reply_to, wrong_id, wrong_question

from . import (
    CLIENT,
    LISTENER,
    FakeClient,
    answer_of,
    make_forwarder,
    sent_upstream,
    upstream_socket_ports,
)

REAL = "192.0.2.53"
POISON = "203.0.113.66"


def _discarded(proxy, reason: str) -> float:
    return proxy.metric("dnschaos_upstream_replies_discarded_total", reason=reason)


# --- wrong IDs, wrong questions ------------------------------------------------------


def test_wrong_id_then_right_answer(start_proxy, fake_upstream):
    fake = fake_upstream(wrong_id(answer_a(REAL), then_right=True))
    proxy = start_proxy(upstreams=[fake])
    before = _discarded(proxy, "unknown_id")
    for i in range(5):
        reply = udp(make_query(f"w{i}.example.test.", "A"), proxy.host, proxy.port)
        assert addresses(reply) == {REAL}
    assert _discarded(proxy, "unknown_id") - before == 5


def test_only_wrong_ids_give_servfail_at_the_deadline(start_proxy, fake_upstream):
    fake = fake_upstream(wrong_id(answer_a(POISON)))
    proxy = start_proxy("--timeout", "0.5s", "--deadline", "1s", upstreams=[fake])
    before = _discarded(proxy, "unknown_id")
    at_deadline = proxy.metric("dnschaos_servfail_sent_total", reason="deadline")
    start = time.monotonic()
    reply = udp(make_query("only-wrong.example.test.", "A"), proxy.host, proxy.port, timeout=3)
    took = time.monotonic() - start
    assert reply.rcode() == dns.rcode.SERVFAIL and not reply.answer
    # The deadline's SERVFAIL: it waited (>= 0.9 s) and came (the upper bound,
    # 2x the deadline, only says "not never" and cannot fail on a slow machine).
    assert proxy.metric("dnschaos_servfail_sent_total", reason="deadline") == at_deadline + 1
    assert 0.9 <= took < 2.0
    assert _discarded(proxy, "unknown_id") - before == 2  # one per attempt


def test_wrong_question_never_reaches_the_client(start_proxy, fake_upstream):
    fake = fake_upstream(wrong_question(answer_a(REAL), name="victim.example.test.",
                                        then_right=True))
    proxy = start_proxy(upstreams=[fake])
    before = _discarded(proxy, "wrong_question")
    for i in range(5):
        reply = udp(make_query(f"q{i}.example.test.", "A"), proxy.host, proxy.port)
        assert addresses(reply) == {REAL}
        assert str(reply.question[0].name) == f"q{i}.example.test."
    assert _discarded(proxy, "wrong_question") - before == 5


def test_only_wrong_questions_give_servfail(start_proxy, fake_upstream):
    fake = fake_upstream(wrong_question(name="victim.example.test."))
    proxy = start_proxy("--timeout", "0.5s", "--deadline", "1s", upstreams=[fake])
    reply = udp(make_query("asked.example.test.", "A"), proxy.host, proxy.port, timeout=3)
    assert reply.rcode() == dns.rcode.SERVFAIL and not reply.answer


# --- a flood ---------------------------------------------------------------------------


def test_reply_flood_delivers_exactly_one_answer(start_proxy, fake_upstream):
    """Per query the upstream sends the right answer, 100 duplicates and 100
    replies under random IDs: the client gets exactly one datagram, the
    other 200 are discarded and counted."""
    def flood(got):
        right = reply_to(got.message, f"{got.qname} 300 IN A {REAL}").to_wire()
        noise = [os.urandom(2) + right[2:] for _ in range(100)]
        return [right] + [right] * 100 + noise

    fake = fake_upstream(flood)
    proxy = start_proxy(upstreams=[fake])
    before = _discarded(proxy, "unknown_id") + _discarded(proxy, "wrong_question")
    queries = 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        for i in range(queries):
            query = make_query(f"flood{i}.example.test.", "A")
            sock.sendto(query.to_wire(), proxy.addr)
            reply = dns.message.from_wire(sock.recv(65535))
            assert reply.id == query.id and addresses(reply) == {REAL}
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            extra = sock.recv(65535)
            raise AssertionError(f"a second datagram reached the client: {extra!r}")
    # A random ID can hit another pending query of the same socket by chance,
    # then it fails the question check: counted under wrong_question.
    discarded = _discarded(proxy, "unknown_id") + _discarded(proxy, "wrong_question") - before
    assert discarded == queries * 200
    assert proxy.metric("dnschaos_answers_total") == queries


# --- forged replies from another address ---------------------------------------------


def _forged(query_wire: bytes, txid: int) -> bytes:
    message = dns.message.from_wire(query_wire)
    forged = reply_to(message, f"{message.question[0].name} 86400 IN A {POISON}")
    forged.id = txid
    return forged.to_wire()


def test_upstream_sockets_are_found_in_proc(start_proxy, fake_upstream):
    fake = fake_upstream(answer_a(REAL))
    proxy = start_proxy(upstreams=[fake])
    ports = upstream_socket_ports(proxy.pid, fake.addr)
    assert len(ports) == 16  # upstream_sockets default
    for i in range(20):
        udp(make_query(f"p{i}.example.test.", "A"), proxy.host, proxy.port)
    assert {r.peer[1] for r in fake.received} <= set(ports)


@pytest.mark.parametrize("source", ["other-port", "other-address"])
def test_forged_replies_from_another_address_never_reach_the_client(start_proxy,
                                                                   fake_upstream, source):
    """One upstream socket, the real answer 1.5 s late; meanwhile a forger
    sends a poisoned answer under every one of the 65,536 IDs to that
    socket, from 127.0.0.1:<another port> or from 127.0.0.2:<the upstream's
    port>.  The connected socket never delivers them: the client gets the
    real answer and the proxy does not even see (count) the forgeries."""
    seen: list = []

    def late(got):
        seen.append(got)
        return Delayed(reply_to(got.message, f"{got.qname} 300 IN A {REAL}"), 1.5)

    fake = fake_upstream(late)
    proxy = start_proxy("--timeout", "3s", "--deadline", "3s",
                        config={"upstream_sockets": 1}, upstreams=[fake])
    (port,) = upstream_socket_ports(proxy.pid, fake.addr)
    before = _discarded(proxy, "unknown_id") + _discarded(proxy, "wrong_question")
    query = make_query("bank.example.test.", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as forger:
        forger.bind(("127.0.0.1", 0) if source == "other-port" else ("127.0.0.2", fake.port))
        client.settimeout(4)
        client.sendto(query.to_wire(), proxy.addr)
        end = time.monotonic() + 1
        while not seen and time.monotonic() < end:
            time.sleep(0.005)
        assert seen, "the upstream never got the query"
        template = _forged(seen[0].wire, 0)
        sent = 0
        start = time.monotonic()
        for txid in range(65536):
            try:
                forger.sendto(struct.pack("!H", txid) + template[2:], ("127.0.0.1", port))
                sent += 1
            except BlockingIOError:
                pass
        forge_time = time.monotonic() - start
        # Every forgery went out while the proxy still waited: no answer yet.
        answered_early = select.select([client], [], [], 0)[0]
        reply = dns.message.from_wire(client.recv(65535))
    assert not answered_early, f"forging took {forge_time:.2f} s: the real answer came first"
    assert sent >= 65000
    assert addresses(reply) == {REAL}, reply
    counted = _discarded(proxy, "unknown_id") + _discarded(proxy, "wrong_question") - before
    assert counted == 0, "forged datagrams got past the connected socket"
    print(f"\n{source}: {sent} forged replies in {forge_time:.2f} s, none delivered")


# --- in process: any bytes from the upstream -----------------------------------------


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=300), st.sampled_from(["match-id", "keep-question", "raw"]))
def test_any_upstream_bytes_reach_the_client_only_as_a_valid_answer(data, how):
    fwd = make_forwarder(sockets=1)
    client = FakeClient()
    query = make_query("www.example.test.", "A").to_wire()
    fwd.handle(query, CLIENT, client, False, LISTENER)
    ((sock, sent),) = sent_upstream(fwd)
    if how == "match-id":
        data = sent[:2] + data[2:]
    elif how == "keep-question":
        good = answer_of(sent)
        data = sent[:2] + data[2:4] + good[4:] + data[len(good):]
    sock.datagram_received(data, sock.upstream.addr)
    question = query[12:wire.question_end(query)]
    valid = (data[:2] == sent[:2] and len(data) >= 12 and data[2] & 0x80
             and data[4:6] == b"\x00\x01"
             and data[12:12 + len(question)].lower() == question.lower())
    stats = fwd.stats
    if valid:
        assert client.replies == [(query[:2] + data[2:], CLIENT)]
        assert not sock.pending
    else:
        assert not client.replies
        assert stats.unmatched_replies + stats.mismatched_replies == 1
        assert len(sock.pending) == 1  # still waiting for the real answer

