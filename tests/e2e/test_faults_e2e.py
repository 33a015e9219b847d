"""Every fault type end to end: a scenario file, the real proxy process in
front of the real unbound (support.unbound), and what dnspython sees.

One proxy runs one long phase whose rules each target a different name of
the test zone (support.zone), mostly A queries only, from client 127.0.0.1
only.
Each test checks the fault where it applies (rcode, sections, SOA and
negative TTL, EDE, TC, TTLs, timing, the rule's counter in /metrics) and,
in the same test, where it does not: another name of the zone, another
query type, another client (127.0.0.2), each answered exactly as unbound
answers directly (assert_same_reply).

`stale` needs answers that change between phases, so it runs in its own
proxy in front of a fake upstream; so does the release of delayed queries
when a scenario ends.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from support import zone
from support.dnsutil import (
    TcpClient,
    addresses,
    assert_same_reply,
    dig,
    make_query,
    tcp,
    udp,
    udp_raw,
)
from support.fake_upstream import reply_to
from support.faults_support import (
    ask,
    assert_unaffected,
    ede_of,
    injected,
    matched,
    phase_bounds,
    rule,
    scenario_start,
    sleep_until,
    soa_of,
    timed_ask,
    ttls,
    write_scenario,
)
from support.net import wait_until

pytestmark = pytest.mark.e2e

ME = "127.0.0.1"  # the client every rule selects
OTHER = "127.0.0.2"  # a client no rule selects


def h(i: int) -> str:
    return zone.host_name(i)


def _r(name: str, target: str, fault, qtype="A", **match) -> dict:
    return rule(name, {"name": target, "qtype": qtype, "clients": ME, **match}, fault)


SPOOF_RECORDS = ["@ 60 IN CNAME elsewhere.example.net.",
                 "elsewhere.example.net. 60 IN A 198.51.100.9"]
TTL_NEGATIVE_NAME = "ttlneg.example.test."

RULES = [
    _r("nxdomain", h(10), {"type": "nxdomain", "soa": {"negative_ttl": 120}}),
    _r("nxdomain-ede", h(11), {"type": "nxdomain",
                               "soa": {"zone": "example.test", "negative_ttl": 300},
                               "ede": {"code": 22, "text": "No Reachable Authority"}}),
    _r("nxdomain-no-soa", h(12), {"type": "nxdomain", "soa": None}),
    _r("servfail", h(20), "servfail"),
    _r("servfail-ede", h(21), {"type": "servfail", "ede": {"code": 23, "text": "Network Error"}}),
    _r("refused", h(30), "refused"),
    _r("rcode-notimp", h(40), {"type": "rcode", "rcode": "NOTIMP"}),
    # By number: the name BADVERS is refused (see test_rcode_badvers_by_name).
    _r("rcode-badvers", h(41), {"type": "rcode", "rcode": 16}),
    _r("rcode-number", h(42), {"type": "rcode", "rcode": 6, "soa": {}}),
    _r("nodata", h(50), {"type": "nodata", "soa": {"negative_ttl": 45}}),
    _r("drop-hold", h(60), "drop"),
    _r("drop-close", h(62), {"type": "drop", "tcp": "close"}),
    _r("delay", h(70), {"type": "delay", "delay": "400ms"}),
    _r("delay-then", h(72), {"type": "delay", "delay": "400ms", "then": "servfail"}),
    _r("delay-jitter", h(74), {"type": "delay", "delay": "300ms", "jitter": "100ms"}),
    _r("spoof", h(80), {"type": "spoof", "a": ["192.0.2.66", "192.0.2.67"],
                        "aaaa": "2001:db8::66", "ttl": 300}, qtype=["A", "AAAA", "MX"]),
    _r("spoof-default", h(81), "spoof", qtype=["A", "AAAA"]),
    _r("spoof-records", h(82), {"type": "spoof", "records": SPOOF_RECORDS}),
    _r("spoof-cname", h(84), {"type": "spoof", "cname": "elsewhere.example.net",
                              "a": "198.51.100.10"}),
    _r("spoof-chain", h(85), {"type": "spoof",
                              "records": ["@ 60 IN CNAME alias.spoof.test.",
                                          "alias.spoof.test. 60 IN A 198.51.100.11"]}),
    _r("truncate", h(90), "truncate"),
    _r("ttl-set", h(100), {"type": "ttl", "set": 5}),
    _r("ttl-clamp", h(101), {"type": "ttl", "min": 5, "max": 60}),
    _r("ttl-scale", h(102), {"type": "ttl", "scale": 0.5}),
    _r("ttl-min", h(103), {"type": "ttl", "min": 7200}),
    _r("ttl-negative", TTL_NEGATIVE_NAME, {"type": "ttl", "set": 7}),
    _r("partial", zone.WWW, {"type": "partial", "share": 0.5, "period": "1h", "ttl": 7}),
    _r("partial-empty", h(110), {"type": "partial", "empty": 1.0, "period": "1h"}),
    _r("partial-one-address", h(111), {"type": "partial", "share": 0.9, "period": "1h"}),
    _r("partial-chain", zone.CNAME_HEAD, {"type": "partial", "share": 0.5, "period": "1h",
                                          "ttl": 9}),
    _r("corrupt-id", h(120), {"type": "corrupt", "mode": "wrong_id"}),
    _r("corrupt-question", h(121), {"type": "corrupt", "mode": "wrong_question"}),
    _r("corrupt-short", h(122), {"type": "corrupt", "mode": "short"}),
    _r("corrupt-random", h(123), {"type": "corrupt", "mode": "random"}),
    _r("flap", h(130), {"type": "flap", "period": "1s", "duty": 0.5, "fault": "servfail"}),
    _r("flap-ttl", h(131), {"type": "flap", "period": "1s", "duty": 0.5,
                            "fault": {"type": "ttl", "set": 1}}),
]
TARGETED = {r["match"]["name"] for r in RULES}
SCENARIO = {"name": "faults-e2e", "seed": 1,
            "phases": [{"name": "all-faults", "duration": "1h", "rules": RULES}]}


@pytest.fixture(scope="module")
def scenario_path(tmp_path_factory):
    return write_scenario(tmp_path_factory.mktemp("faults"), SCENARIO)


@pytest.fixture(scope="module")
def proxy(start_module_proxy, unbound, scenario_path):
    return start_module_proxy("--scenario", str(scenario_path), "--allow", "127.0.0.0/8",
                              upstreams=[unbound])


def _header_ok(reply: dns.message.Message) -> None:
    """What every reply a fault builds has: QR, RA, RD echoed, never AA."""
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RA
    assert reply.flags & dns.flags.RD
    assert not reply.flags & dns.flags.AA, reply


def _not_applied(proxy, unbound, name: str, neighbour: str, other_qtype: str = "AAAA",
                 transport: str = "udp") -> None:
    """The three ways a query escapes a rule: another name, another qtype, another client."""
    assert_unaffected(proxy, unbound, neighbour, "A", transport=transport)
    assert_unaffected(proxy, unbound, name, other_qtype, transport=transport)
    assert_unaffected(proxy, unbound, name, "A", transport=transport, source=OTHER)


# --- negative answers -----------------------------------------------------------------


def test_nxdomain(proxy, unbound):
    before = injected(proxy, "nxdomain")
    for transport in ("udp", "tcp"):
        reply = ask(proxy, h(10), transport=transport)
        assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer, reply
        _header_ok(reply)
        soa = soa_of(reply)
        assert soa is not None and soa.name.to_text() == zone.ORIGIN  # the parent zone
        assert soa.ttl == 120 and next(iter(soa)).minimum == 120
        assert ede_of(reply) == []
        assert reply.edns == 0 and reply.payload == 1232  # EDNS query: OPT in the reply
    assert injected(proxy, "nxdomain") == before + 2
    signed = ask(proxy, h(10), do=True)  # DO echoed
    assert signed.rcode() == dns.rcode.NXDOMAIN and signed.ednsflags & dns.flags.DO
    assert ask(proxy, h(10), edns=None).edns == -1  # no EDNS: no OPT
    assert injected(proxy, "nxdomain") == before + 4

    _not_applied(proxy, unbound, h(10), h(13))
    assert injected(proxy, "nxdomain") == before + 4
    labels = {"scenario": "faults-e2e", "phase": "all-faults", "rule": "nxdomain",
              "fault": "nxdomain"}
    assert proxy.metric("dnschaos_faults_injected_total", **labels) == before + 4
    assert proxy.metric("dnschaos_rule_matches_total", **labels) == before + 4


def test_nxdomain_with_ede_and_without_soa(proxy, unbound):
    reply = ask(proxy, h(11))
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert ede_of(reply) == [(22, "No Reachable Authority")]
    soa = soa_of(reply)
    assert soa.name.to_text() == zone.ORIGIN and soa.ttl == 300
    # No EDNS in the query: no OPT in the reply, so no EDE (RFC 6891).
    plain = ask(proxy, h(11), edns=None)
    assert plain.rcode() == dns.rcode.NXDOMAIN and plain.edns == -1 and soa_of(plain)

    bare = ask(proxy, h(12))
    assert bare.rcode() == dns.rcode.NXDOMAIN
    assert not bare.answer and not bare.authority and not bare.additional

    _not_applied(proxy, unbound, h(11), h(14))
    _not_applied(proxy, unbound, h(12), h(14), other_qtype="TXT")


def test_servfail(proxy, unbound):
    before = injected(proxy, "servfail")
    for transport in ("udp", "tcp"):
        reply = ask(proxy, h(20), transport=transport)
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert not reply.answer and not reply.authority, reply  # real SERVFAILs carry no SOA
        _header_ok(reply)
    assert injected(proxy, "servfail") == before + 2

    reply = ask(proxy, h(21))
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert ede_of(reply) == [(23, "Network Error")]

    _not_applied(proxy, unbound, h(20), h(22))
    _not_applied(proxy, unbound, h(21), h(22), transport="tcp")
    assert injected(proxy, "servfail") == before + 2


def test_refused(proxy, unbound):
    for transport in ("udp", "tcp"):
        reply = ask(proxy, h(30), transport=transport)
        assert reply.rcode() == dns.rcode.REFUSED and not reply.answer and not reply.authority
        _header_ok(reply)
    _not_applied(proxy, unbound, h(30), h(31))


def test_rcode(proxy, unbound):
    notimp = ask(proxy, h(40))
    assert notimp.rcode() == dns.rcode.NOTIMP and not notimp.authority
    _header_ok(notimp)

    # BADVERS (16) needs the extended rcode bits of an OPT record: the proxy
    # adds one even when the query had no EDNS.
    for edns in (0, None):
        badvers = ask(proxy, h(41), edns=edns)
        assert badvers.edns == 0, badvers
        assert badvers.rcode() == dns.rcode.BADVERS, badvers

    yxdomain = ask(proxy, h(42))  # rcode given as a number, with `soa: {}`
    assert yxdomain.rcode() == dns.rcode.YXDOMAIN
    soa = soa_of(yxdomain)
    assert soa is not None and soa.ttl == 60 and next(iter(soa)).mname.to_text() == "ns.invalid."

    _not_applied(proxy, unbound, h(40), h(43))
    _not_applied(proxy, unbound, h(41), h(43))
    _not_applied(proxy, unbound, h(42), h(43), other_qtype="MX")


def test_rcode_badvers_by_name(start_proxy, unbound, tmp_path):
    path = write_scenario(tmp_path, {"name": "badvers", "phases": [{
        "name": "p", "duration": "1h",
        "rules": [rule("badvers", {"name": h(41)}, {"type": "rcode", "rcode": "BADVERS"})]}]})
    proxy = start_proxy("--scenario", str(path), upstreams=[unbound])
    assert ask(proxy, h(41)).rcode() == dns.rcode.BADVERS


def test_nodata(proxy, unbound):
    for transport in ("udp", "tcp"):
        reply = ask(proxy, h(50), transport=transport)
        assert reply.rcode() == dns.rcode.NOERROR and not reply.answer, reply
        _header_ok(reply)
        soa = soa_of(reply)
        assert soa.name.to_text() == zone.ORIGIN and soa.ttl == 45
        assert next(iter(soa)).minimum == 45
    # Unbound's own NODATA (AAAA of the same name) is what the not-applied
    # case must still get, with the zone's real SOA.
    _not_applied(proxy, unbound, h(50), h(51))
    direct_nodata = ask(unbound, h(50), "AAAA")
    assert direct_nodata.rcode() == dns.rcode.NOERROR and not direct_nodata.answer
    assert soa_of(direct_nodata).ttl == zone.NEGATIVE_TTL


# --- no answer, late answer -----------------------------------------------------------


def test_drop_udp_times_out(proxy, unbound):
    before = injected(proxy, "drop-hold")
    start = time.monotonic()
    with pytest.raises(dns.exception.Timeout):
        ask(proxy, h(60), timeout=1.0)
    assert time.monotonic() - start >= 0.9
    assert injected(proxy, "drop-hold") == before + 1
    _not_applied(proxy, unbound, h(60), h(61))
    assert injected(proxy, "drop-hold") == before + 1


def test_drop_tcp_hold_keeps_the_connection_open_and_silent(proxy, unbound):
    with TcpClient(proxy.host, proxy.port, timeout=2.0) as client:
        client.send(make_query(h(60), "A"))
        with pytest.raises(TimeoutError):
            client.recv_wire(timeout=1.0)
        assert not client.is_closed_by_peer(0.3)
        # The held connection still carries other queries.
        query = make_query(h(61), "A")
        reply = client.query(query)
        assert_same_reply(reply, tcp(query, unbound.host, unbound.port))
    _not_applied(proxy, unbound, h(60), h(61), transport="tcp")


def test_drop_tcp_close_closes_the_connection(proxy, unbound):
    with TcpClient(proxy.host, proxy.port, timeout=2.0) as client:
        client.send(make_query(h(62), "A"))
        assert client.is_closed_by_peer(2.0)
    with pytest.raises(dns.exception.Timeout):  # over UDP, `tcp: close` is a plain drop
        ask(proxy, h(62), timeout=1.0)
    _not_applied(proxy, unbound, h(62), h(63), transport="tcp")
    _not_applied(proxy, unbound, h(62), h(63))


def _arrival_order(proxy, *asks):
    """Send each (name, qtype, source) from its own thread, in this order, at
    once: (the indexes in the order their answers arrived, the replies)."""
    order, replies, lock = [], {}, threading.Lock()

    def one(i, name, qtype, source):
        reply = ask(proxy, name, qtype, source=source)
        with lock:
            order.append(i)
            replies[i] = reply

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(asks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return order, replies


def test_delay(proxy, unbound):
    direct = ask(unbound, h(70))
    reply, elapsed = timed_ask(proxy, h(70))
    assert elapsed >= 0.35, elapsed
    assert_same_reply(reply, direct)
    reply, elapsed = timed_ask(proxy, h(70), transport="tcp")
    assert elapsed >= 0.35, elapsed
    assert_same_reply(reply, ask(unbound, h(70), transport="tcp"))

    # Unaffected queries are not delayed: the rule is not applied to them,
    # and each one's answer overtakes a delayed query sent just before it.
    for name, qtype, source in ((h(71), "A", None), (h(70), "AAAA", None), (h(70), "A", OTHER)):
        delayed = injected(proxy, "delay")
        order, got = _arrival_order(proxy, (h(70), "A", None), (name, qtype, source))
        assert order == [1, 0], (name, qtype, source, "answered after the delayed query")
        assert injected(proxy, "delay") == delayed + 1, "the delay applied to one query only"
        assert_same_reply(got[1], ask(unbound, name, qtype, source=source))
    # ...even while a delayed one is already held (UDP, and pipelined on one
    # TCP connection, where the later answer overtakes the delayed one).
    result = {}
    held = matched(proxy, "delay")
    slow = threading.Thread(target=lambda: result.update(slow=timed_ask(proxy, h(70))))
    slow.start()
    wait_until(lambda: matched(proxy, "delay") > held, timeout=2, what="the delayed query held")
    got, _ = timed_ask(proxy, h(71))
    assert slow.is_alive(), "the delayed query was answered first"
    slow.join()
    assert result["slow"][1] >= 0.35
    with TcpClient(proxy.host, proxy.port, timeout=3.0) as client:
        client.send(make_query(h(70), "A"), make_query(h(71), "A"))
        first, second = client.recv(), client.recv()
        assert addresses(first) == {zone.host_address(71)}
        assert addresses(second) == {zone.host_address(70)}
    _not_applied(proxy, unbound, h(70), h(71))


def test_delay_then_servfail_and_jitter(proxy, unbound):
    reply, elapsed = timed_ask(proxy, h(72))
    assert reply.rcode() == dns.rcode.SERVFAIL and elapsed >= 0.35, (reply, elapsed)
    _header_ok(reply)
    _not_applied(proxy, unbound, h(72), h(73))

    direct = ask(unbound, h(74))
    for _ in range(4):  # 300 ms +/- 100 ms
        reply, elapsed = timed_ask(proxy, h(74))
        assert elapsed >= 0.18, elapsed
        assert_same_reply(reply, direct)


def test_delayed_queries_are_released_when_the_scenario_ends(start_proxy, unbound, tmp_path):
    """A query held in a 5 s delay when the last phase ends is forwarded then,
    unfaulted (the `then: servfail` is gone too): every fault reverts."""
    path = write_scenario(tmp_path, {"name": "release-e2e", "phases": [
        {"name": "slow", "duration": 1.5, "rules": [
            rule("slow", {"name": h(1)}, {"type": "delay", "delay": "5s"}),
            rule("slow-servfail", {"name": h(2)},
                 {"type": "delay", "delay": "5s", "then": "servfail"})]}]})
    proxy = start_proxy("--scenario", str(path), upstreams=[unbound])
    (slow,) = phase_bounds(path, scenario_start(proxy))
    results = {}

    def held(name):
        # The client gives up before the 5 s delay ends: an answer at all
        # says the scenario's end released it.
        results[name] = timed_ask(proxy, name, timeout=4.0)
        results[name] += (time.time(),)

    threads = [threading.Thread(target=held, args=(name,)) for name in (h(1), h(2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in (h(1), h(2)):
        assert name in results, f"{name} not released"
        reply, elapsed, answered_at = results[name]
        assert_same_reply(reply, ask(unbound, name))
        assert answered_at >= slow.end - 0.05, (name, answered_at - slow.end)


# --- stale ------------------------------------------------------------------------------


class ChangingUpstream:
    """Fake upstream handler: A answers from `records`, which the test changes."""

    def __init__(self) -> None:
        self.records: dict[str, str] = {}
        self.asked: list[str] = []

    def __call__(self, got):
        q = got.message
        if q is None:
            return None
        name = q.question[0].name.to_text().lower()
        self.asked.append(name)
        if q.question[0].rdtype == dns.rdatatype.A and name in self.records:
            return reply_to(q, f"{name} 300 IN A {self.records[name]}")
        return reply_to(q)


def test_stale_serves_the_answer_from_before(start_proxy, fake_upstream, tmp_path):
    """Phase 1 (no rules) records answers; phase 2 serves them although the
    upstream moved on: `source: last` the last answer seen before the rule
    became active, `source: snapshot` the answers held when the phase began
    (here with `every: 2`: the other queries get through and are recorded,
    yet the snapshot does not follow); names never seen get the fallback.
    Phase 3 has no rules: the upstream's current answer again."""
    last, snap = "stale-last.example.test.", "stale-snap.example.test."
    never, fallback, other = ("stale-never.example.test.", "stale-fb.example.test.",
                              "other.example.test.")
    handler = ChangingUpstream()
    fake = fake_upstream(handler)
    path = write_scenario(tmp_path, {"name": "stale-e2e", "phases": [
        {"name": "warm-up", "duration": 2.0, "rules": []},
        {"name": "frozen", "duration": 1.5, "rules": [
            rule("last", {"name": last, "qtype": "A", "clients": ME},
                 {"type": "stale", "source": "last", "ttl": 42}),
            rule("snapshot", {"name": snap, "qtype": "A", "every": 2},
                 {"type": "stale", "source": "snapshot", "ttl": 43}),
            rule("never-seen", {"name": never}, {"type": "stale"}),
            rule("fallback", {"name": fallback},
                 {"type": "stale", "source": "snapshot",
                  "fallback": {"type": "nodata", "soa": {"negative_ttl": 33}}}),
        ]},
        {"name": "after", "duration": "1h", "rules": []},
    ]})
    proxy = start_proxy("--scenario", str(path), upstreams=[fake])
    warm, frozen, after = phase_bounds(path, scenario_start(proxy))

    def a(name, **kw):
        return addresses(ask(proxy, name, **kw))

    handler.records = {last: "192.0.2.11", snap: "192.0.2.21", other: "192.0.2.31"}
    assert a(last) == {"192.0.2.11"} and a(snap) == {"192.0.2.21"}
    handler.records = {last: "192.0.2.12", snap: "192.0.2.22", other: "192.0.2.32"}
    assert a(last) == {"192.0.2.12"} and a(snap) == {"192.0.2.22"}
    handler.records = {last: "192.0.2.13", snap: "192.0.2.23", other: "192.0.2.33"}
    assert time.time() < warm.end - 0.05, "the warm-up phase ended before the test recorded"

    sleep_until(frozen.start + 0.05)
    asked_before = len(handler.asked)
    for transport in ("udp", "tcp"):
        reply = ask(proxy, last, transport=transport)
        assert addresses(reply) == {"192.0.2.12"} and ttls(reply) == {42}, reply
        _header_ok(reply)
    assert handler.asked[asked_before:] == []  # served by the proxy, not asked upstream
    # every: 2 -> the 1st and 3rd query pass (and are recorded), the 2nd and 4th are stale.
    got = [ask(proxy, snap) for _ in range(4)]
    assert [(addresses(r), ttls(r)) for r in got] == [
        ({"192.0.2.23"}, {300}), ({"192.0.2.22"}, {43}),
        ({"192.0.2.23"}, {300}), ({"192.0.2.22"}, {43})]
    assert ask(proxy, never).rcode() == dns.rcode.SERVFAIL  # default fallback
    fb = ask(proxy, fallback)
    assert fb.rcode() == dns.rcode.NOERROR and not fb.answer and soa_of(fb).ttl == 33
    # Not applied: another name, another qtype, another client: the upstream's answer now.
    assert_unaffected(proxy, fake, other, "A")
    assert_unaffected(proxy, fake, last, "AAAA")
    assert_unaffected(proxy, fake, last, "A", source=OTHER)
    assert addresses(ask(proxy, last, source=OTHER)) == {"192.0.2.13"}
    assert time.time() < frozen.end - 0.05, "the stale phase ended before the test was done"

    sleep_until(after.start + 0.05)
    for name, address in ((last, "192.0.2.13"), (snap, "192.0.2.23")):
        reply = ask(proxy, name)
        assert addresses(reply) == {address} and ttls(reply) == {300}
        assert_unaffected(proxy, fake, name, "A")


# --- made-up answers ----------------------------------------------------------------------


def test_spoof(proxy, unbound):
    before = injected(proxy, "spoof")
    for transport in ("udp", "tcp"):
        a = ask(proxy, h(80), transport=transport)
        assert a.rcode() == dns.rcode.NOERROR and addresses(a) == {"192.0.2.66", "192.0.2.67"}
        assert ttls(a) == {300} and not a.authority and a.edns == 0
        _header_ok(a)
    aaaa = ask(proxy, h(80), "AAAA")
    assert addresses(aaaa) == {"2001:db8::66"} and ttls(aaaa) == {300}
    mx = ask(proxy, h(80), "MX")  # selected, but nothing made up for MX: empty NOERROR
    assert mx.rcode() == dns.rcode.NOERROR and not mx.answer and soa_of(mx).ttl == 300
    mixed = ask(proxy, "HoSt80.ExAmPlE.tEsT.", "A")
    assert addresses(mixed) == {"192.0.2.66", "192.0.2.67"}
    assert injected(proxy, "spoof") == before + 5

    default = ask(proxy, h(81))
    assert addresses(default) == {"192.0.2.1"} and ttls(default) == {60}
    assert addresses(ask(proxy, h(81), "AAAA")) == {"2001:db8::1"}

    chain = ask(proxy, h(82))
    cnames = [r for r in chain.answer if r.rdtype == dns.rdatatype.CNAME]
    assert [r.name.to_text() for r in cnames] == [h(82)]
    assert next(iter(cnames[0])).target.to_text() == "elsewhere.example.net."
    assert addresses(chain) == {"198.51.100.9"}
    cname_option = ask(proxy, h(84))
    assert [(r.name.to_text(), dns.rdatatype.to_text(r.rdtype)) for r in cname_option.answer] \
        == [(h(84), "CNAME"), ("elsewhere.example.net.", "A")]
    assert addresses(cname_option) == {"198.51.100.10"}

    _not_applied(proxy, unbound, h(80), h(83), other_qtype="TXT")
    _not_applied(proxy, unbound, h(81), h(83), other_qtype="MX")
    _not_applied(proxy, unbound, h(82), h(83))
    assert injected(proxy, "spoof") == before + 5


def test_spoof_cname_chain(proxy, unbound):
    reply = ask(proxy, h(85))
    chain = [(r.name.to_text(), dns.rdatatype.to_text(r.rdtype), next(iter(r)).to_text())
             for r in reply.answer]
    assert chain == [(h(85), "CNAME", "alias.spoof.test."),
                     ("alias.spoof.test.", "A", "198.51.100.11")]
    _not_applied(proxy, unbound, h(84), h(86))


def test_spoof_relative_name_in_record_data_is_refused(tmp_path):
    """Only owners may be relative to the query name: a relative CNAME target
    is refused when the file loads, with file, line and field."""
    path = tmp_path / "relative.yaml"
    path.write_text(
        "name: relative\n"
        "phases:\n"
        "  - name: p\n"
        "    duration: 1m\n"
        "    rules:\n"
        "      - fault:\n"
        "          type: spoof\n"
        "          records: ['@ 60 IN CNAME www', 'www 60 IN A 198.51.100.11']\n")
    result = subprocess.run([sys.executable, "-m", "proxy", "validate", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{path}:8: phases[0].rules[0].fault.records" in result.stderr
    assert "must be absolute" in result.stderr


def test_truncate(proxy, unbound):
    before = injected(proxy, "truncate")
    reply = ask(proxy, h(90))
    assert reply.flags & dns.flags.TC and reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer and not reply.authority
    # TCP is forwarded normally.
    assert_same_reply(ask(proxy, h(90), transport="tcp"), ask(unbound, h(90), transport="tcp"))
    assert injected(proxy, "truncate") == before + 1
    # dig sees TC, retries over TCP and gets the real answer.
    through = dig(h(90), "A", server=proxy.host, port=proxy.port)
    direct = dig(h(90), "A", "+tcp", server=unbound.host, port=unbound.port)
    assert through.retried_over_tcp, through.stdout
    assert through.status == "NOERROR" and through.message is not None
    assert addresses(through.message) == {zone.host_address(90)}
    assert_same_reply(through.message, direct.message)
    _not_applied(proxy, unbound, h(90), h(91))
    plain = dig(h(91), "A", server=proxy.host, port=proxy.port)
    assert not plain.retried_over_tcp


# --- rewritten answers ------------------------------------------------------------------


def _with_ttl(message: dns.message.Message, ttl: int, sections=("answer",)) -> dns.message.Message:
    copy = dns.message.from_wire(message.to_wire())
    for section in sections:
        for rrset in getattr(copy, section):
            rrset.ttl = ttl
    return copy


def test_ttl(proxy, unbound):
    for i, expected in ((100, 5), (101, 60), (102, zone.TTL // 2), (103, 7200)):
        direct = ask(unbound, h(i))
        assert ttls(direct) == {zone.TTL}
        reply = ask(proxy, h(i))
        assert ttls(reply) == {expected}
        assert_same_reply(reply, _with_ttl(direct, expected), context=h(i))
        reply = ask(proxy, h(i), transport="tcp")
        assert ttls(reply) == {expected}
    # Negative answers: the SOA's TTL is rewritten too.
    direct = ask(unbound, TTL_NEGATIVE_NAME)
    assert direct.rcode() == dns.rcode.NXDOMAIN
    reply = ask(proxy, TTL_NEGATIVE_NAME)
    assert soa_of(reply).ttl == 7
    assert_same_reply(reply, _with_ttl(direct, 7, ("authority",)))

    _not_applied(proxy, unbound, h(100), h(104))
    _not_applied(proxy, unbound, h(103), h(104), other_qtype="TXT")


def test_partial(proxy, unbound):
    from proxy.core.sampling import hash_share

    # share 0.5 of two addresses: one removed, the one ranked first by the
    # (period, name, address) hash; the same for every query of the period.
    ranked = sorted(zone.WWW_A, key=lambda a: hash_share(0, f"www.example.test/{a}"))
    for _ in range(3):
        reply = ask(proxy, zone.WWW)
        assert reply.rcode() == dns.rcode.NOERROR
        assert addresses(reply) == {ranked[1]} and ttls(reply) == {7}, reply

    # With DNSSEC: the reply is the upstream's, less one A, every answer TTL 7
    # (RRSIG too), header and EDNS (DO) untouched.
    expected = dns.message.from_wire(ask(unbound, zone.WWW, do=True).to_wire())
    for rrset in expected.answer:
        if rrset.rdtype == dns.rdatatype.A:
            for rdata in [rd for rd in rrset if rd.address == ranked[0]]:
                rrset.discard(rdata)
        rrset.ttl = 7
    assert_same_reply(ask(proxy, zone.WWW, do=True), expected)

    empty = ask(proxy, h(110))  # empty: 1.0 -> no records at all
    assert empty.rcode() == dns.rcode.NOERROR and not empty.answer

    # At least one address stays: a single address is left alone.
    assert_same_reply(ask(proxy, h(111)), ask(unbound, h(111)))

    chain = ask(proxy, zone.CNAME_HEAD)  # the CNAMEs stay, one of the two A goes
    cnames = {r.name.to_text() for r in chain.answer if r.rdtype == dns.rdatatype.CNAME}
    assert cnames == set(zone.CNAME_CHAIN[:3])
    assert len(addresses(chain)) == 1 and addresses(chain) <= set(zone.WWW_A)
    assert ttls(chain) == {9}

    assert_unaffected(proxy, unbound, zone.WWW, "AAAA")
    assert_unaffected(proxy, unbound, zone.MX_TARGET, "A")
    assert_unaffected(proxy, unbound, zone.WWW, "A", source=OTHER)
    assert_unaffected(proxy, unbound, zone.CNAME_HEAD, "A", transport="tcp", source=OTHER)
    _not_applied(proxy, unbound, h(110), h(112))


# --- broken answers ---------------------------------------------------------------------


def test_corrupt_wrong_id(proxy, unbound):
    query = make_query(h(120), "A")
    raw = udp_raw(query.to_wire(), proxy.host, proxy.port, timeout=2.0)
    assert raw is not None
    assert struct.unpack("!H", raw[:2])[0] != query.id
    parsed = dns.message.from_wire(raw)  # a well-formed answer, for another ID
    assert_same_reply(parsed, udp(query, unbound.host, unbound.port))
    with pytest.raises(dns.query.BadResponse):  # what dnspython makes of it
        udp(query, proxy.host, proxy.port)
    with pytest.raises(dns.query.BadResponse):
        tcp(query, proxy.host, proxy.port)
    _not_applied(proxy, unbound, h(120), h(124))


def test_corrupt_wrong_question(proxy, unbound):
    query = make_query(h(121), "A")
    raw = udp_raw(query.to_wire(), proxy.host, proxy.port, timeout=2.0)
    parsed = dns.message.from_wire(raw)
    assert parsed.id == query.id
    # The first label replaced by one of the same length: 'host121' -> 'xxxxxxx'.
    assert parsed.question[0].name.to_text() == "xxxxxxx.example.test."
    assert not query.is_response(parsed)
    with pytest.raises(dns.query.BadResponse):
        udp(query, proxy.host, proxy.port)
    _not_applied(proxy, unbound, h(121), h(124))


def test_corrupt_short_and_random(proxy, unbound):
    query = make_query(h(122), "A")
    full = udp(query, unbound.host, unbound.port).to_wire()
    for _ in range(5):
        raw = udp_raw(query.to_wire(), proxy.host, proxy.port, timeout=2.0)
        assert raw is not None and 12 <= len(raw) < len(full)
        assert raw[:2] == query.to_wire()[:2]
        with pytest.raises(dns.exception.DNSException):
            dns.message.from_wire(raw)
    with pytest.raises(dns.exception.DNSException):
        udp(query, proxy.host, proxy.port)

    query = make_query(h(123), "A")
    for _ in range(5):
        raw = udp_raw(query.to_wire(), proxy.host, proxy.port, timeout=2.0)
        assert raw is not None and raw[:2] == query.to_wire()[:2]  # the client's ID: it parses
        try:
            parsed = dns.message.from_wire(raw)
        except Exception:  # noqa: BLE001 - any parse error is the expected outcome
            continue
        assert not query.is_response(parsed), parsed
    _not_applied(proxy, unbound, h(122), h(124))
    _not_applied(proxy, unbound, h(123), h(124))


# --- on and off ---------------------------------------------------------------------------


def test_flap(proxy, unbound):
    """On for the first half of every second counted from the phase start
    (the scenario's start, read from the proxy's log), off for the rest."""
    started = scenario_start(proxy)
    direct = ask(unbound, h(130))
    direct_ttl = ask(unbound, h(131))
    seen = {"on": 0, "off": 0}
    end = time.time() + 2.2
    while time.time() < end:
        t0 = time.time()
        reply = ask(proxy, h(130))
        reply_ttl = ask(proxy, h(131))
        t1 = time.time()
        phase = ((t0 - started) % 1.0, (t1 - started) % 1.0)
        if phase[0] <= phase[1] and 0.05 <= phase[0] and phase[1] <= 0.45:
            assert reply.rcode() == dns.rcode.SERVFAIL, reply
            assert ttls(reply_ttl) == {1}
            seen["on"] += 1
        elif phase[0] <= phase[1] and 0.55 <= phase[0] and phase[1] <= 0.95:
            assert_same_reply(reply, direct)
            assert_same_reply(reply_ttl, direct_ttl)
            seen["off"] += 1
        time.sleep(0.03)
    assert seen["on"] >= 5 and seen["off"] >= 5, seen
    _not_applied(proxy, unbound, h(130), h(132))


# --- everything else ----------------------------------------------------------------------


def test_names_and_clients_no_rule_selects_are_answered_as_without_proxy(proxy, unbound):
    """Every host0..host199 that no rule names, A and AAAA; and every
    targeted name asked from a client no rule selects."""
    before = sum(injected(proxy, r["name"]) for r in RULES)
    untouched = [h(i) for i in range(zone.HOST_COUNT) if h(i) not in TARGETED]
    assert len(untouched) > 150
    for name in untouched:
        assert_unaffected(proxy, unbound, name, "A")
    for name in untouched[::10]:
        assert_unaffected(proxy, unbound, name, "AAAA", transport="tcp")
    for name in sorted(TARGETED):
        assert_unaffected(proxy, unbound, name, "A", source=OTHER)
    assert sum(injected(proxy, r["name"]) for r in RULES) == before
    assert proxy.metric("dnschaos_engine_errors_total") == 0
