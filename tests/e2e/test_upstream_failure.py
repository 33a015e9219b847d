"""Upstream failures: the client still gets a correct answer, or a SERVFAIL,
in time (never silence).

All proxies here run with `--timeout 0.3 --deadline 1`: four attempts of
0.25 s, SERVFAIL at 1 s.
"""

from __future__ import annotations

import concurrent.futures
import time

import dns.flags
import dns.rcode
import pytest

from support import zone
from support.dnsutil import addresses, assert_same_reply, make_query, tcp, udp
from support.fake_upstream import (
    Delayed,
    FakeUpstream,
    answer_a,
    garbage,
    reply_to,
    silence,
    wrong_id,
    wrong_question,
)
from support.net import closed_port, hostport, wait_until

pytestmark = pytest.mark.e2e

FAST = ("--timeout", "0.3", "--deadline", "1")
DEADLINE = 1.0
TRANSPORTS = {"udp": udp, "tcp": tcp}


def timed(send, query, proxy, timeout=DEADLINE + 2):
    start = time.monotonic()
    reply = send(query, proxy.host, proxy.port, timeout=timeout)
    return reply, time.monotonic() - start


def dead_upstream() -> str:
    return hostport("127.0.0.1", closed_port())


# --- one upstream dead ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_first(start_module_proxy, unbound):
    dead = dead_upstream()
    return start_module_proxy(*FAST, "--policy", "sequential", upstreams=[dead, unbound]), dead


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dead_first_upstream_still_answered_in_time(dead_first, unbound, transport):
    proxy, _ = dead_first
    send = TRANSPORTS[transport]
    query = make_query(zone.CNAME_HEAD, "A")
    timeouts = proxy.metric("dnschaos_upstream_timeouts_total")
    reply, _ = timed(send, query, proxy)
    # In time: the real answer, not the deadline's SERVFAIL, and the dead
    # upstream's error moved the query on without waiting out an attempt.
    assert_same_reply(reply, send(query, unbound.host, unbound.port))
    assert proxy.metric("dnschaos_upstream_timeouts_total") == timeouts


def test_dead_upstream_is_marked_down_and_skipped(dead_first, unbound):
    """A closed port answers with ICMP port unreachable: marked down at the
    first one, counted as an error, never as a timeout."""
    proxy, dead = dead_first
    for i in range(4):
        udp(make_query(zone.host_name(i), "A"), proxy.host, proxy.port, timeout=3)
    status, health = proxy.health()
    assert status == 200 and health["status"] == "ok"
    assert health["upstreams"] == {dead: "down", unbound.hostport: "up"}
    assert proxy.metric("dnschaos_upstream_up", upstream=dead) == 0
    assert proxy.metric("dnschaos_upstream_errors_total", upstream=dead) >= 1
    assert proxy.metric("dnschaos_upstream_timeouts_total", upstream=dead) == 0
    # Now tried last: answers come without asking the dead one first.
    asked = proxy.metric("dnschaos_upstream_requests_total", upstream=dead)
    timeouts = proxy.metric("dnschaos_upstream_timeouts_total")
    reply, _ = timed(udp, make_query(zone.WWW, "A"), proxy)
    assert addresses(reply) == set(zone.WWW_A)
    assert proxy.metric("dnschaos_upstream_requests_total", upstream=dead) == asked, \
        "the down upstream was still tried first"
    assert proxy.metric("dnschaos_upstream_timeouts_total") == timeouts


def test_dead_second_upstream_costs_nothing(start_proxy, unbound):
    dead = dead_upstream()
    proxy = start_proxy(*FAST, upstreams=[unbound, dead])
    query = make_query(zone.WWW, "AAAA")
    reply, _ = timed(udp, query, proxy)
    assert_same_reply(reply, udp(query, unbound.host, unbound.port))
    # Costs nothing: the dead one got no attempt, and no attempt timed out.
    assert proxy.metric("dnschaos_upstream_requests_total", upstream=dead) == 0
    assert proxy.metric("dnschaos_upstream_requests_total", upstream=unbound.hostport) >= 1
    assert proxy.metric("dnschaos_upstream_timeouts_total") == 0


# --- unreachable: ICMP port unreachable ----------------------------------------------

SLOW = ("--timeout", "2", "--deadline", "4")  # two attempts of 2 s
SLOW_TIMEOUT = 2.0



def test_unreachable_upstream_is_skipped_at_once(start_proxy, unbound):
    """The first upstream's port is closed: its ICMP error sends the query to
    the next upstream at once, well before the 2 s attempt timeout; counted
    as an error, not a timeout, and logged as unreachable.  (The loop probe
    at start already finds it unreachable; with down_time 0 it is first in
    line again at once, so the query tries it.)"""
    dead = dead_upstream()
    proxy = start_proxy(*SLOW, "--policy", "sequential", upstreams=[dead, unbound],
                        config={"down_time": 0})
    wait_until(lambda: proxy.metric("dnschaos_upstream_up", upstream=dead) == 1, timeout=3)
    query = make_query(zone.WWW, "A")
    # The client gives up after one attempt timeout: waiting it out in the
    # proxy would end in dns.exception.Timeout here (and a timeout counted).
    reply, _ = timed(udp, query, proxy, timeout=SLOW_TIMEOUT)
    assert_same_reply(reply, udp(query, unbound.host, unbound.port))
    assert proxy.metric("dnschaos_upstream_requests_total", upstream=dead) == 1
    assert proxy.metric("dnschaos_upstream_errors_total", upstream=dead) >= 1
    assert proxy.metric("dnschaos_upstream_timeouts_total", upstream=dead) == 0
    # The good upstream: no error, no timeout, still up.
    assert proxy.metric("dnschaos_upstream_errors_total", upstream=unbound.hostport) == 0
    assert proxy.metric("dnschaos_upstream_timeouts_total", upstream=unbound.hostport) == 0
    assert proxy.metric("dnschaos_upstream_up", upstream=unbound.hostport) == 1
    log = proxy.stderr_text()
    assert f"upstream {dead} unreachable" in log
    assert "timeouts in a row" not in log


def test_all_unreachable_servfail_after_the_attempts_without_a_storm(start_proxy):
    """Every upstream unreachable: each attempt fails at once, the client gets
    SERVFAIL after its attempts (two here), and the proxy sends no more."""
    dead = [dead_upstream(), dead_upstream()]
    proxy = start_proxy(*SLOW, "--policy", "sequential", upstreams=dead)
    query = make_query(zone.WWW, "A")
    # Answered before one attempt timeout (the client's timer): no attempt waited out.
    reply, _ = timed(udp, query, proxy, timeout=SLOW_TIMEOUT)
    _assert_servfail_for(reply, query)
    time.sleep(0.3)
    sent = [proxy.metric("dnschaos_upstream_requests_total", upstream=u) for u in dead]
    assert sent == [1, 1], "one attempt each, no retry storm"
    assert proxy.metric("dnschaos_upstream_up") == 0
    assert proxy.metric("dnschaos_upstream_timeouts_total") == 0
    assert proxy.metric("dnschaos_servfail_sent_total", reason="deadline") == 1


# --- all dead ------------------------------------------------------------------------


def _assert_servfail_for(reply, query):
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.id == query.id and reply.flags & dns.flags.QR
    assert reply.question == query.question
    assert not reply.answer
    assert reply.edns == query.edns  # EDNS answered with EDNS


@pytest.fixture(scope="module")
def all_closed(start_module_proxy):
    return start_module_proxy(*FAST, upstreams=[dead_upstream(), dead_upstream()])


@pytest.fixture(scope="module")
def all_silent(start_module_proxy):
    fakes = [FakeUpstream(silence(), name=f"silent{i}").start() for i in range(2)]
    yield start_module_proxy(*FAST, upstreams=fakes), fakes
    for fake in fakes:
        fake.stop()


def concurrently(jobs):
    """Run the (send, query, proxy) jobs at once: the deadline is waited once."""
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: timed(*job), jobs))


def test_all_upstreams_closed_servfail_by_deadline(all_closed):
    """UDP and TCP, with and without EDNS, several queries at once: each
    gets a SERVFAIL by the deadline, and then /health says degraded."""
    queries = [(send, make_query(zone.host_name(i), "A", edns=0 if i % 2 else None))
               for i in range(12) for send in (udp, tcp)]
    results = concurrently([(send, query, all_closed) for send, query in queries])
    for (send, query), (reply, elapsed) in zip(queries, results, strict=True):
        _assert_servfail_for(reply, query)
        # SERVFAIL at the deadline, not never; 2x so a loaded machine cannot fail it.
        assert elapsed < 2 * DEADLINE, f"SERVFAIL after {elapsed:.2f} s over {send.__name__}"
    status, health = all_closed.health()
    assert status == 503 and health["status"] == "degraded"
    assert set(health["upstreams"].values()) == {"down"}
    assert all_closed.metric("dnschaos_servfail_sent_total", reason="deadline") >= len(queries)


def test_all_upstreams_silent_servfail_by_deadline(all_silent):
    proxy, fakes = all_silent
    by_deadline = proxy.metric("dnschaos_servfail_sent_total", reason="deadline")
    queries = [(send, make_query(zone.WWW, "A", do=True)) for send in (udp, tcp)]
    results = concurrently([(send, query, proxy) for send, query in queries])
    for (send, query), (reply, elapsed) in zip(queries, results, strict=True):
        _assert_servfail_for(reply, query)
        assert reply.ednsflags & dns.flags.DO
        # SERVFAIL at the deadline, not never; 2x so a loaded machine cannot fail it.
        assert elapsed < 2 * DEADLINE, f"SERVFAIL after {elapsed:.2f} s over {send.__name__}"
    assert proxy.metric("dnschaos_servfail_sent_total",
                        reason="deadline") == by_deadline + len(queries)
    assert all(f.count() >= 2 for f in fakes), "both upstreams should have been tried"


# --- a bad upstream in front of a good one -------------------------------------------


@pytest.fixture(scope="module")
def bad_then_good(start_module_proxy, unbound):
    """Proxy: sequential, a fake upstream first (its handler set per test),
    unbound second; max_fails high so the fake is never marked down."""
    fake = FakeUpstream(name="bad").start()
    proxy = start_module_proxy(*FAST, "--policy", "sequential", upstreams=[fake, unbound],
                               config={"max_fails": 1000})
    yield proxy, fake
    fake.stop()


BAD_REPLIES = {
    "garbage": (garbage(40), "unknown_id"),
    "garbage-with-right-id": (garbage(40, keep_id=True), "wrong_question"),
    "wrong-id": (wrong_id(), "unknown_id"),
    "wrong-question": (wrong_question(), "wrong_question"),
    "short": (lambda got: b"\x01", "unknown_id"),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("bad", BAD_REPLIES)
def test_bad_reply_is_discarded_and_next_upstream_answers(bad_then_good, unbound, bad,
                                                          transport):
    proxy, fake = bad_then_good
    handler, reason = BAD_REPLIES[bad]
    fake.handler = handler
    fake.clear()
    discarded = proxy.metric("dnschaos_upstream_replies_discarded_total")
    by_reason = proxy.metric("dnschaos_upstream_replies_discarded_total", reason=reason)
    asked = proxy.metric("dnschaos_upstream_requests_total", upstream=unbound.hostport)
    send = TRANSPORTS[transport]
    query = make_query(zone.WWW, "A")
    reply, _ = timed(send, query, proxy)
    # The next upstream's answer (not the deadline's SERVFAIL), from one attempt.
    assert_same_reply(reply, send(query, unbound.host, unbound.port))
    assert proxy.metric("dnschaos_upstream_requests_total",
                        upstream=unbound.hostport) == asked + 1
    assert fake.count() == 1, "the bad upstream should have been asked first"
    assert proxy.metric("dnschaos_upstream_replies_discarded_total") == discarded + 1
    if bad != "garbage":  # random bytes could, rarely, start with the pending ID
        assert proxy.metric("dnschaos_upstream_replies_discarded_total",
                            reason=reason) == by_reason + 1


@pytest.mark.parametrize("first", ["wrong-id", "wrong-question"])
def test_wrong_reply_then_right_one_is_answered_at_once(bad_then_good, unbound, first):
    """A forged or stray reply does not end the wait: the upstream's real
    reply, arriving just after, is the one the client gets."""
    proxy, fake = bad_then_good
    right = answer_a("192.0.2.99")
    fake.handler = (wrong_id(right, then_right=True) if first == "wrong-id"
                    else wrong_question(right, then_right=True))
    discarded = proxy.metric("dnschaos_upstream_replies_discarded_total")
    timeouts = proxy.metric("dnschaos_upstream_timeouts_total")
    asked = proxy.metric("dnschaos_upstream_requests_total", upstream=unbound.hostport)
    reply, _ = timed(udp, make_query("anything.example.", "A"), proxy)
    assert addresses(reply) == {"192.0.2.99"}
    assert proxy.metric("dnschaos_upstream_timeouts_total") == timeouts, \
        "the right reply should not wait for a timeout"
    assert proxy.metric("dnschaos_upstream_requests_total",
                        upstream=unbound.hostport) == asked, "no second attempt"
    assert proxy.metric("dnschaos_upstream_replies_discarded_total") == discarded + 1


def test_upstream_rcodes_are_passed_through(bad_then_good):
    """An upstream's own SERVFAIL/REFUSED is an answer, relayed as is."""
    proxy, fake = bad_then_good
    for rcode in (dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.NXDOMAIN):
        fake.handler = lambda got, rcode=rcode: reply_to(got.message, rcode=rcode, aa=False)
        timeouts = proxy.metric("dnschaos_upstream_timeouts_total")
        reply, _ = timed(udp, make_query("x.example.", "A"), proxy)
        assert reply.rcode() == rcode
        assert proxy.metric("dnschaos_upstream_timeouts_total") == timeouts, "not retried"


def test_truncated_reply_with_tcp_refused_gives_servfail_to_tcp_client(start_proxy):
    """The upstream answers TC over UDP but refuses TCP: a TCP client gets
    SERVFAIL in time; a UDP client gets the TC reply as it is."""

    def truncated(got):
        reply = reply_to(got.message)
        reply.flags |= dns.flags.TC
        return reply

    with FakeUpstream(truncated, tcp=False) as fake:
        proxy = start_proxy(*FAST, upstreams=[fake])
        query = make_query("big.example.", "TXT")
        reply, elapsed = timed(tcp, query, proxy)
        _assert_servfail_for(reply, query)
        # In time, not never; 2x so a loaded machine cannot fail it (the
        # metric below says why it came).
        assert elapsed < 2 * DEADLINE
        reply, _ = timed(udp, query, proxy)
        assert reply.flags & dns.flags.TC and reply.rcode() == dns.rcode.NOERROR
        assert proxy.metric("dnschaos_servfail_sent_total", reason="tcp_retry_failed") == 1


def test_tcp_retry_after_truncation_respects_the_deadline(start_proxy, fake_upstream):
    """Two dead upstreams use half the deadline, the third answers TC over
    UDP and never answers over TCP: the TCP client's SERVFAIL must still come
    at the deadline, not never."""

    def tc_then_hang(got):
        if got.transport == "tcp":
            return None  # accepts the connection, never answers
        reply = reply_to(got.message)
        reply.flags |= dns.flags.TC
        return Delayed(reply, 0.2)

    fake = fake_upstream(tc_then_hang)
    proxy = start_proxy(*FAST, upstreams=[dead_upstream(), dead_upstream(), fake])
    query = make_query("big.example.", "TXT")
    reply, elapsed = timed(tcp, query, proxy, timeout=5)
    _assert_servfail_for(reply, query)
    # The hung TCP retry was cut (at the deadline) rather than waited on
    # forever: a SERVFAIL for that reason, well inside a bound (2x the
    # deadline) that a loaded machine cannot miss.
    assert proxy.metric("dnschaos_servfail_sent_total", reason="tcp_retry_failed") == 1
    assert elapsed < 2 * DEADLINE, f"SERVFAIL after {elapsed:.2f} s"
