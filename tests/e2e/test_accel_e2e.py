"""The C fast path (proxy/_relay.c, proxy/accel.py) against the real
resolver: what it relays it relays as the Python path does, what it must
not take it hands over, and its counts are the Python path's.

The first query from an address takes the Python path (its ACL check lets
the address onto the fast path), so each test warms its client up first.
`dnschaos_fast_path_queries_total` tells which path a query took."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest

from proxy.core import wire
from proxy.errors import MalformedQuery
from support import zone
from support.dnsutil import addresses, assert_same_reply, make_query, udp, udp_raw
from support.fake_upstream import silence, wrong_question
from support.full_send_buffer import BURST

from .gameday_helpers import TOKEN, api

pytestmark = pytest.mark.e2e

try:
    import proxy._relay  # noqa: F401
except ImportError:
    pytest.skip("the C relay is not built (python setup.py build_ext --inplace)",
                allow_module_level=True)
if os.environ.get("DNSCHAOS_ACCEL", "").strip() == "0":
    pytest.skip("DNSCHAOS_ACCEL=0: this run tests the pure-Python path",
                allow_module_level=True)

FAST = ("--timeout", "0.3", "--deadline", "1")
RELAY_LOG = "UDP fast path: the C relay"


def fast(proxy) -> float:
    return proxy.metric("dnschaos_fast_path_queries_total")


def wrong(proxy) -> float:
    return proxy.metric("dnschaos_upstream_replies_discarded_total", reason="wrong_question")


def warm(proxy, source: str = "127.0.0.1") -> None:
    """One query from `source`: its address passes the ACL and joins the fast path."""
    udp(make_query(zone.WWW, "A"), proxy.host, proxy.port, source=source, timeout=3)


@pytest.fixture(scope="module")
def pair(start_module_proxy, unbound):
    """The same proxy twice: with the fast path and without."""
    on = start_module_proxy(config={"admin_token": TOKEN})
    off = start_module_proxy("--no-accel", config={"admin_token": TOKEN})
    return on, off


def test_the_log_says_which_path(pair):
    on, off = pair
    assert RELAY_LOG in on.stderr_text()
    assert RELAY_LOG not in off.stderr_text() and "UDP fast path off" in off.stderr_text()


def test_answers_keep_the_client_id(pair, unbound):
    on, off = pair
    warm(on)
    before = fast(on)
    for txid in (0, 1, 0x1234, 0xFFFF):
        query = make_query(zone.WWW, "A")
        query.id = txid
        reply = udp(query, on.host, on.port)
        assert reply.id == txid
        assert_same_reply(reply, udp(query, unbound.host, unbound.port))
    assert fast(on) == before + 4
    assert fast(off) == 0  # the fallback never takes it


def test_a_reply_to_another_question_is_not_taken(start_proxy, fake_upstream):
    upstream = fake_upstream(wrong_question(then_right=True))
    proxy = start_proxy(*FAST, upstreams=[upstream])
    warm(proxy)
    before, mismatched = fast(proxy), wrong(proxy)
    reply = udp(make_query("right.example.test.", "A"), proxy.host, proxy.port)
    assert fast(proxy) == before + 1
    assert str(reply.question[0].name) == "right.example.test."
    assert [str(rrset.name) for rrset in reply.answer] == ["right.example.test."]
    assert wrong(proxy) == mismatched + 1
    # Without the right reply after it: only the deadline's SERVFAIL.
    upstream.handler = wrong_question()
    start = time.monotonic()
    reply = udp(make_query("right2.example.test.", "A"), proxy.host, proxy.port, timeout=3)
    assert reply.rcode() == dns.rcode.SERVFAIL and time.monotonic() - start >= 0.9


def _case_flipped(got):
    """The right answer, with the question's name in upper case (as 0x20 resolvers do)."""
    wire = bytearray(dns.message.make_response(got.message).to_wire())
    end = 12 + len(got.message.question[0].name.to_wire())
    wire[12:end] = bytes(wire[12:end]).upper()
    return bytes(wire)


def _other_type(got):
    """An answer for the same name but another type."""
    wire = bytearray(dns.message.make_response(got.message).to_wire())
    end = 12 + len(got.message.question[0].name.to_wire())
    wire[end:end + 2] = b"\x00\x10"  # TXT
    return bytes(wire)


def test_the_question_is_compared_ignoring_case_only(start_proxy, fake_upstream):
    upstream = fake_upstream(_case_flipped)
    proxy = start_proxy(*FAST, upstreams=[upstream])
    warm(proxy)
    before, mismatched = fast(proxy), wrong(proxy)
    query = make_query("Case.Example.Test.", "A")
    reply = udp(query, proxy.host, proxy.port)
    assert reply.id == query.id and reply.rcode() == dns.rcode.NOERROR
    assert str(reply.question[0].name) == "CASE.EXAMPLE.TEST."
    assert fast(proxy) == before + 1 and wrong(proxy) == mismatched
    upstream.handler = _other_type
    reply = udp(make_query("case.example.test.", "A"), proxy.host, proxy.port, timeout=3)
    assert reply.rcode() == dns.rcode.SERVFAIL  # never taken: the deadline's answer
    assert wrong(proxy) >= mismatched + 1


def test_a_query_too_long_to_keep_takes_the_python_path(pair, unbound):
    on, _ = pair
    warm(on)
    query = make_query(zone.WWW, "A", options=[dns.edns.GenericOption(12, b"\x00" * 600)])
    assert len(query.to_wire()) > 512
    before = fast(on)
    reply = udp(query, on.host, on.port)
    assert reply.id == query.id and sorted(addresses(reply)) == sorted(zone.WWW_A)
    assert fast(on) == before


def test_timeouts_retry_on_the_next_upstream_then_servfail(start_proxy, fake_upstream, unbound):
    black_hole = fake_upstream(silence())
    proxy = start_proxy(*FAST, "--policy", "sequential", upstreams=[black_hole, unbound])
    warm(proxy)  # the black hole's first timeout: retried on unbound
    before = fast(proxy)
    timeouts = proxy.metric("dnschaos_upstream_timeouts_total", upstream=black_hole.hostport)
    start = time.monotonic()
    reply = udp(make_query(zone.host_name(3), "A"), proxy.host, proxy.port, timeout=3)
    took = time.monotonic() - start
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer
    assert 0.2 <= took < 0.9  # one attempt's wait, then the next upstream
    assert fast(proxy) == before + 1
    assert proxy.metric("dnschaos_upstream_timeouts_total",
                        upstream=black_hole.hostport) == timeouts + 1
    assert black_hole.count() >= 2

    both_dead = start_proxy(*FAST, upstreams=[fake_upstream(silence()),
                                              fake_upstream(silence())])
    udp(make_query(zone.WWW, "A"), both_dead.host, both_dead.port, timeout=3)
    before = fast(both_dead)
    start = time.monotonic()
    reply = udp(make_query(zone.WWW, "A"), both_dead.host, both_dead.port, timeout=3)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert 0.9 <= time.monotonic() - start < 1.8  # at the deadline, not before
    assert fast(both_dead) == before + 1
    assert both_dead.metric("dnschaos_servfail_sent_total", reason="deadline") == 2


def test_an_unreachable_upstream_sends_its_queries_on_at_once(start_proxy, fake_upstream,
                                                              unbound):
    """ICMP port unreachable on a relay socket: the upstream is marked down
    and the query waiting there goes to the next upstream without waiting
    out its attempt."""
    first = fake_upstream(tcp=False)
    proxy = start_proxy(*FAST, "--policy", "sequential", upstreams=[first, unbound])
    warm(proxy)  # answered by `first`, on the Python path
    first.stop()  # its port closed: the next query's datagram gets ICMP back
    before = fast(proxy)
    start = time.monotonic()
    reply = udp(make_query(zone.host_name(5), "A"), proxy.host, proxy.port, timeout=3)
    assert reply.rcode() == dns.rcode.NOERROR and zone.host_address(5) in addresses(reply)
    assert time.monotonic() - start < 0.25  # not an attempt's 0.25 s
    assert fast(proxy) == before + 1  # it went out on a relay socket
    assert proxy.metric("dnschaos_upstream_errors_total", upstream=first.hostport) == 1
    assert proxy.metric("dnschaos_upstream_timeouts_total", upstream=first.hostport) == 0
    assert proxy.health()[1]["upstreams"][first.hostport] == "down"


def test_a_rule_applies_to_the_next_query_and_others_stay_fast(pair, unbound):
    on, _ = pair
    warm(on)
    body = {"name": "accel-www", "match": {"name": zone.WWW}, "fault": "refused",
            "duration": "5m"}
    assert api(on, "POST", "/api/rules", body)[0] == 201
    try:
        before = fast(on)
        hit = udp(make_query(zone.WWW, "A"), on.host, on.port)
        assert hit.rcode() == dns.rcode.REFUSED  # the very next query
        assert fast(on) == before  # the rule's name went through the engine
        other = make_query(zone.MX_TARGET, "A")
        reply = udp(other, on.host, on.port)
        assert_same_reply(reply, udp(other, unbound.host, unbound.port))  # unfaulted
        assert fast(on) == before + 1
    finally:
        assert api(on, "DELETE", "/api/rules/accel-www")[0] == 200
    before = fast(on)
    assert udp(make_query(zone.WWW, "A"), on.host, on.port).rcode() == dns.rcode.NOERROR
    assert fast(on) == before + 1


def test_zones_and_an_unscreened_rule(pair, unbound):
    """A suffix rule: the relay looks names up under its zones; a rule not
    filed under names (qtype only) turns the screen off: everything goes
    through the engine, and only what the rule selects is faulted."""
    on, _ = pair
    warm(on)
    body = {"name": "accel-mail", "match": {"suffix": "mail.example.test"},
            "fault": "nxdomain", "duration": "5m"}
    assert api(on, "POST", "/api/rules", body)[0] == 201
    try:
        before = fast(on)
        for name in ("mail.example.test.", "x.MAIL.example.test."):
            assert udp(make_query(name, "A"), on.host, on.port).rcode() == dns.rcode.NXDOMAIN
        assert fast(on) == before
        assert udp(make_query(zone.WWW, "A"), on.host, on.port).rcode() == dns.rcode.NOERROR
        assert udp(make_query("ail.example.test.", "A"), on.host, on.port).rcode() \
            == dns.rcode.NXDOMAIN  # not under the zone: the real NXDOMAIN, relayed fast
        assert fast(on) == before + 2
    finally:
        assert api(on, "DELETE", "/api/rules/accel-mail")[0] == 200
    body = {"name": "accel-txt", "match": {"qtype": "TXT"}, "fault": "refused",
            "duration": "5m"}
    assert api(on, "POST", "/api/rules", body)[0] == 201
    try:
        before = fast(on)
        assert udp(make_query(zone.WWW, "TXT"), on.host, on.port).rcode() == dns.rcode.REFUSED
        query = make_query(zone.WWW, "A")
        assert_same_reply(udp(query, on.host, on.port), udp(query, unbound.host, unbound.port))
        assert fast(on) == before  # the screen is off: nothing skips the engine
    finally:
        assert api(on, "DELETE", "/api/rules/accel-txt")[0] == 200
    before = fast(on)
    assert udp(make_query(zone.WWW, "TXT"), on.host, on.port).rcode() == dns.rcode.NOERROR
    assert fast(on) == before + 1


TRAFFIC = [(zone.WWW, "A"), (zone.WWW, "AAAA"), (zone.MX_TARGET, "A"), (zone.ORIGIN, "MX"),
           (zone.NXDOMAIN_NAME, "A"), (zone.CNAME_HEAD, "A"), (zone.WWW, "TXT"),
           (zone.host_name(7), "A")]
CLIENTS = ("127.0.0.61", "127.0.0.62", "127.0.0.63")
COUNTED = ("dnschaos_answers_total", "dnschaos_responses_total", "dnschaos_query_types_total",
           "dnschaos_queries_total", "dnschaos_upstream_requests_total",
           "dnschaos_upstream_responses_total")


def counted(proxy) -> dict:
    return {key: value for key, value in proxy.metrics().items()
            if key[0] in COUNTED and not any(k == "upstream" for k, _ in key[1])}


def test_counts_equal_the_fallbacks(pair):
    on, off = pair
    base = {p: counted(p) for p in pair}
    for proxy in pair:
        for client in CLIENTS:
            for name, qtype in TRAFFIC:
                udp(make_query(name, qtype), proxy.host, proxy.port, source=client)
    grown = [{key: value - base[p].get(key, 0) for key, value in counted(p).items()}
             for p in pair]
    assert grown[0] == grown[1]
    assert grown[0][("dnschaos_answers_total", frozenset())] == len(CLIENTS) * len(TRAFFIC)

    def deps(proxy):
        view = api(proxy, "GET", "/api/dependencies")[1]
        return {c["client"]: {(n["name"], n["queries"], str(n["qtypes"]), str(n["answers"]))
                              for n in c["names"]}
                for c in view["clients"] if c["client"] in CLIENTS}

    assert deps(on) == deps(off) and set(deps(on)) == set(CLIENTS)


def _expect_reply(data: bytes) -> bool:
    try:
        wire.question_end(data)
    except MalformedQuery as exc:
        return exc.rcode is not None
    return True


def _packets(count: int) -> list[bytes]:
    rng = random.Random(20261202)
    good = make_query(zone.WWW, "A").to_wire()
    out = [b"", b"\x00", good[:11], good[:12], good[:-1], good[:12] + b"\xc0\x0c\x00\x01\x00\x01",
           good[:2] + b"\x81\x00" + good[4:], good[:2] + b"\x28\x00" + good[4:],
           good[:4] + b"\x00\x02" + good[6:]]
    while len(out) < count:
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        out.append(bytes(data[:rng.randint(0, len(data))]) if rng.random() < 0.3
                   else bytes(data))
    return out


def test_malformed_packets_get_the_fallbacks_replies(pair):
    on, off = pair
    warm(on)
    for data in _packets(120):
        timeout = 1.0 if _expect_reply(data) else 0.1
        got = [udp_raw(data, p.host, p.port, timeout=timeout) for p in pair]
        assert got[0] == got[1], data
    assert on.alive()
    reply = udp(make_query(zone.WWW, "A"), on.host, on.port)
    assert reply.rcode() == dns.rcode.NOERROR


def test_loop_probes_and_hinfo_take_the_python_path(pair):
    on, _ = pair
    warm(on)
    before = fast(on)
    query = make_query(zone.WWW, "HINFO")
    assert udp(query, on.host, on.port).id == query.id
    assert fast(on) == before


def test_truncated_answers_are_relayed_as_they_are(pair, unbound):
    on, _ = pair
    warm(on)
    query = make_query(zone.HUGE_TXT, "TXT", edns=None)
    before = fast(on)
    reply = udp(query, on.host, on.port)
    assert reply.flags & dns.flags.TC and reply.id == query.id
    assert_same_reply(reply, udp(query, unbound.host, unbound.port))
    assert fast(on) == before + 1


def test_ids_of_many_queries_in_flight(pair):
    """A burst: each answer goes to its own query, under its own ID."""
    on, _ = pair
    warm(on)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sent = {}
        for i in range(64):
            query = make_query(zone.host_name(i), "A")
            query.id = 1000 + i
            sent[query.id] = zone.host_name(i)
            sock.sendto(query.to_wire(), (on.host, on.port))
        got = {}
        while len(got) < len(sent):
            data = sock.recv(4096)
            message = dns.message.from_wire(data)
            got[message.id] = str(message.question[0].name)
    assert got == sent


def test_workers_relay_too(start_proxy, unbound):
    proxy = start_proxy("--workers", "2", config={"admin_token": TOKEN})
    assert proxy.stderr_text().count(RELAY_LOG) == 2  # one line per worker
    before = {name: proxy.metric(name) for name in (
        "dnschaos_fast_path_queries_total", "dnschaos_answers_total")}
    queries = proxy.metric("dnschaos_queries_total", transport="udp")
    for i in range(20):  # from 20 source ports: the kernel spreads them over the workers
        query = make_query(zone.host_name(i), "A")
        assert udp(query, proxy.host, proxy.port).id == query.id
    grown = {name: proxy.metric(name) - value for name, value in before.items()}
    assert grown["dnschaos_answers_total"] == 20
    assert proxy.metric("dnschaos_queries_total", transport="udp") - queries == 20
    # At most each worker's first query from this address took the Python path.
    assert 18 <= grown["dnschaos_fast_path_queries_total"] <= 20


def test_replies_the_kernel_does_not_take_are_counted(tmp_path):
    """A full send buffer, for real: in a network namespace of its own
    (tests/support/full_send_buffer.py) the proxy's replies to clients are
    held in a slow queue while 2,000 queries arrive, so most replies find
    the listener's send buffer full.  Each one lost is counted, none the
    client got, and no more than the kernel refused; with nothing held,
    nothing is counted and every query is answered."""
    if not all(shutil.which(tool) for tool in ("unshare", "ip", "tc")):
        pytest.skip("unshare, ip or tc is missing (iproute2 comes with `make test`)")
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "support.full_send_buffer", str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "unshare" in proc.stderr and "ermission" in proc.stderr:
        pytest.skip(f"unshare -n is not permitted here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["answered_before"] == 200 and got["unsent_before"] == 0, got
    assert got["unsent"] > BURST // 2, got
    assert got["unsent"] <= BURST - got["answered_held"], got
    assert got["unsent"] <= got["kernel_sndbuf_errors"], got
    assert got["fast"] >= BURST, got  # the held burst went the C relay's way
    assert got["answered_after"] == 200, got
