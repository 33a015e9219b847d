"""Faults: verdicts and reply bytes, decoded with dnspython (an independent parser)."""

from __future__ import annotations

import random
import struct
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from proxy.core import faults
from proxy.core.engine import Engine
from proxy.core.faults import FAULT_TYPES, REGISTRY, PhaseState, build_fault
from proxy.core.model import Rule
from proxy.core.query import QueryView
from proxy.core.stale import StaleStore
from proxy.core.verdict import Drop, Forward, Reply
from support.docs import fault_example
from support.engine_plans import set_rules

# --- helpers ---------------------------------------------------------------------


def query(name: str = "www.example.com", qtype: str = "A", *, edns: bool = False,
          do: bool = False, rd: bool = True, cd: bool = False, qid: int = 0x1234,
          transport: str = "udp", client: str = "192.0.2.10") -> QueryView:
    message = dns.message.make_query(name, qtype, use_edns=0 if edns or do else None,
                                     want_dnssec=do)
    message.id = qid
    message.flags = (dns.flags.RD if rd else 0) | (dns.flags.CD if cd else 0)
    return QueryView.parse(message.to_wire(), client, transport, "127.0.0.1:53")


def upstream(q: QueryView, answer: list[tuple[str, int, str, str]],
             authority: list[tuple[str, int, str, str]] = (),  # type: ignore[assignment]
             additional: list[tuple[str, int, str, str]] = (),  # type: ignore[assignment]
             rcode: int = 0) -> bytes:
    """The upstream's answer to q: (name, ttl, type, rdata) tuples per section."""
    asked = dns.message.from_wire(q.wire)
    message = dns.message.make_response(asked)
    if asked.edns >= 0:
        message.use_edns(0, asked.ednsflags, 1232)
    message.set_rcode(rcode)
    for section, rows in ((message.answer, answer), (message.authority, authority),
                          (message.additional, additional)):
        for name, ttl, rtype, rdata in rows:
            section.append(dns.rrset.from_text(dns.name.from_text(name), ttl, "IN", rtype, rdata))
    return message.to_wire()


def fault_of(spec: Any) -> faults.Fault:
    return build_fault(Rule.model_validate({"fault": spec}).fault, StaleStore())


def apply(spec: Any, q: QueryView, now: float = 0.0, seed: int = 1,
          phase: PhaseState | None = None) -> Any:
    return fault_of(spec).apply(q, now, random.Random(seed), phase or PhaseState())


def respond(spec: Any, q: QueryView, answer: bytes, now: float = 0.0, seed: int = 1,
            phase: PhaseState | None = None) -> bytes | None:
    fault = fault_of(spec)
    verdict = fault.apply(q, now, random.Random(seed), phase or PhaseState())
    assert isinstance(verdict, Forward) and verdict.respond is fault
    return fault.respond(q, answer, now, random.Random(seed), phase or PhaseState())


def reply_of(spec: Any, q: QueryView, **kwargs: Any) -> dns.message.Message:
    verdict = apply(spec, q, **kwargs)
    assert isinstance(verdict, Reply), verdict
    return decode(verdict.wire, q)


def decode(wire: bytes, q: QueryView) -> dns.message.Message:
    """Decode a reply and check what every synthesized reply must have."""
    message = dns.message.from_wire(wire)
    assert message.id == struct.unpack("!H", q.wire[:2])[0]
    assert message.flags & dns.flags.QR
    assert message.flags & dns.flags.RA
    assert not message.flags & dns.flags.AA
    assert bool(message.flags & dns.flags.RD) == bool(q.wire[2] & 0x01)
    assert bool(message.flags & dns.flags.CD) == bool(q.wire[3] & 0x10)
    assert wire[12 : q.qend] == q.wire[12 : q.qend]  # the question, byte for byte
    assert (message.edns >= 0) == (dns.message.from_wire(q.wire).edns >= 0)
    return message


def soa_of(message: dns.message.Message) -> tuple[str, int, Any]:
    (rrset,) = message.authority
    assert rrset.rdtype == dns.rdatatype.SOA
    return rrset.name.to_text(), rrset.ttl, rrset[0]


def addresses(message: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in message.answer for rd in rrset
                  if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA))


# --- every fault: applied and not applied, through the engine ----------------------
# The fault types come from the registry and each one's example from its
# section in docs/scenarios.md: a new fault needs no line here.


def test_every_fault_type_is_registered_and_documented() -> None:
    assert FAULT_TYPES == tuple(REGISTRY)
    for name, entry in REGISTRY.items():
        cls = entry.behaviour
        assert cls.type == name == entry.name
        doc = (cls.__doc__ or "").strip()
        assert doc and "\n" not in doc, name
        assert faults.describe_type(name) == doc
        line = fault_of(fault_example(name)).describe()
        assert line and "\n" not in line


@pytest.mark.parametrize("fault_type", FAULT_TYPES)
def test_every_fault_applied_and_not_applied(fault_type: str) -> None:
    engine = Engine()
    set_rules(engine, [Rule.model_validate({"match": {"suffix": "example.com"},
                                           "fault": fault_example(fault_type)})], 0.0, None, 0.0)
    rng = random.Random(1)
    # DO set: `dnssec` acts only on queries that ask for signatures.
    selected = query("www.example.com", do=True)
    assert isinstance(engine.on_query(selected, 1.0, rng), Reply | Drop | Forward)
    assert engine.on_query(query("www.example.org", do=True), 1.0, rng) is None
    assert engine.on_query(query("wwwexample.com", do=True), 1.0, rng) is None
    (stats,) = engine.stats()
    assert (stats["matched"], stats["injected"], stats["errors"]) == (1, 1, 0)


# --- negative answers --------------------------------------------------------------


@pytest.mark.parametrize(("spec", "rcode", "has_soa"), [
    ("nxdomain", dns.rcode.NXDOMAIN, True),
    ("nodata", dns.rcode.NOERROR, True),
    ("servfail", dns.rcode.SERVFAIL, False),
    ("refused", dns.rcode.REFUSED, False),
    ({"type": "servfail", "soa": {}}, dns.rcode.SERVFAIL, True),
    ({"type": "nxdomain", "soa": None}, dns.rcode.NXDOMAIN, False),
    ({"type": "rcode", "rcode": "NOTIMP"}, dns.rcode.NOTIMP, False),
    ({"type": "rcode", "rcode": 1}, dns.rcode.FORMERR, False),
    ({"type": "rcode", "rcode": "YXDOMAIN", "soa": {}}, dns.rcode.YXDOMAIN, True),
])
def test_rcode_replies(spec: Any, rcode: int, has_soa: bool) -> None:
    for q in (query(), query(edns=True), query(rd=False, cd=True, qid=7)):
        message = reply_of(spec, q)
        assert message.rcode() == rcode
        assert message.answer == []
        assert len(message.authority) == (1 if has_soa else 0)


@pytest.mark.parametrize(("name", "owner"), [
    ("www.example.com", "example.com."),
    ("a.b.c.example.com", "b.c.example.com."),
    ("com", "com."),
    ("WWW.Example.COM", "Example.COM."),  # the client's case, through a pointer
    (".", "."),
])
def test_soa_owner_defaults_to_the_parent_zone(name: str, owner: str) -> None:
    message = reply_of("nxdomain", query(name))
    assert soa_of(message)[0] == owner


def test_soa_fields_and_negative_ttl() -> None:
    spec = {"type": "nxdomain", "soa": {"zone": "amazonaws.com", "negative_ttl": 300,
                                       "mname": "ns1.example.", "rname": "ops.example.",
                                       "serial": 42}}
    owner, ttl, soa = soa_of(reply_of(spec, query("dynamodb.us-east-1.amazonaws.com")))
    assert (owner, ttl) == ("amazonaws.com.", 300)
    assert soa.minimum == 300 and soa.serial == 42
    assert soa.mname.to_text() == "ns1.example." and soa.rname.to_text() == "ops.example."


def test_default_negative_ttl_is_60() -> None:
    _, ttl, soa = soa_of(reply_of("nodata", query()))
    assert ttl == 60 and soa.minimum == 60


def test_edns_is_echoed_with_the_do_bit() -> None:
    assert reply_of("nxdomain", query()).edns == -1
    with_edns = reply_of("nxdomain", query(edns=True))
    assert with_edns.edns == 0 and not with_edns.ednsflags & dns.flags.DO
    assert reply_of("nxdomain", query(do=True)).ednsflags & dns.flags.DO


def test_ede_only_for_edns_clients() -> None:
    spec = {"type": "servfail", "ede": {"code": 22, "text": "no reachable authority"}}
    message = reply_of(spec, query(edns=True))
    (option,) = message.options
    assert option.otype == dns.edns.EDE
    assert option.code == 22 and option.text == "no reachable authority"
    assert list(reply_of(spec, query()).options) == []  # no OPT for a client without EDNS
    assert list(reply_of("servfail", query(edns=True)).options) == []


def test_extended_rcode_travels_in_opt() -> None:
    # An OPT is needed for rcodes above 15, even for a client that sent none.
    for q in (query(), query(edns=True)):
        verdict = apply({"type": "rcode", "rcode": 16}, q)
        message = dns.message.from_wire(verdict.wire)
        assert message.rcode() == dns.rcode.BADVERS and message.edns == 0


def test_negative_reply_not_applied_to_other_names() -> None:
    engine = Engine()
    set_rules(engine, [Rule.model_validate({"match": {"name": "a.example.com"},
                                           "fault": "nxdomain"})], 0.0)
    assert engine.on_query(query("b.example.com"), 1.0, random.Random(1)) is None
    assert isinstance(engine.on_query(query("a.example.com"), 1.0, random.Random(1)), Reply)


# --- drop, delay, truncate -----------------------------------------------------------


@pytest.mark.parametrize(("spec", "close"), [
    ("drop", False), ({"type": "drop", "tcp": "hold"}, False),
    ({"type": "drop", "tcp": "close"}, True),
])
def test_drop(spec: Any, close: bool) -> None:
    assert apply(spec, query()) == Drop(close_tcp=close)


def test_fixed_delay_forwards() -> None:
    assert apply({"type": "delay", "delay": "150ms"}, query()) == Forward(delay=0.15)


def test_uniform_jitter_stays_in_bounds() -> None:
    fault = fault_of({"type": "delay", "delay": "1s", "jitter": "200ms"})
    rng = random.Random(3)
    delays = [fault.apply(query(), 0.0, rng, PhaseState()).delay for _ in range(2000)]
    assert all(0.8 <= d <= 1.2 for d in delays)
    assert min(delays) < 0.82 and max(delays) > 1.18


def test_normal_jitter_is_clamped_at_zero() -> None:
    fault = fault_of({"type": "delay", "delay": 0, "jitter": "1s", "distribution": "normal"})
    rng = random.Random(3)
    delays = [fault.apply(query(), 0.0, rng, PhaseState()).delay for _ in range(2000)]
    assert min(delays) == 0.0 and max(delays) > 1.0
    assert 900 <= delays.count(0.0) <= 1100  # half the draws are negative


def test_delay_then_a_fault_adds_the_delay() -> None:
    verdict = apply({"type": "delay", "delay": "2s", "then": "servfail"}, query())
    assert isinstance(verdict, Reply) and verdict.delay == 2.0
    assert dns.message.from_wire(verdict.wire).rcode() == dns.rcode.SERVFAIL
    assert apply({"type": "delay", "delay": "2s", "then": "drop"}, query()) == Drop(delay=2.0)
    ttl = apply({"type": "delay", "delay": "2s", "then": {"type": "ttl", "set": 1}}, query())
    assert isinstance(ttl, Forward) and ttl.delay == 2.0 and ttl.respond is not None


def test_delay_then_flap_off_forwards_late() -> None:
    spec = {"type": "delay", "delay": "1s",
            "then": {"type": "flap", "period": "10s", "duty": 0.5, "fault": "servfail"}}
    assert apply(spec, query(), now=7.0) == Forward(delay=1.0)
    assert isinstance(apply(spec, query(), now=2.0), Reply)


def test_truncate_udp_sets_tc_and_tcp_passes() -> None:
    q = query(edns=True)
    verdict = apply("truncate", q)
    message = decode(verdict.wire, q)
    assert message.flags & dns.flags.TC
    assert message.rcode() == dns.rcode.NOERROR and message.answer == []
    assert apply("truncate", query(transport="tcp")) is None


# --- spoof ----------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "name", "qtype", "expected"), [
    ("spoof", "www.example.com", "A", ["192.0.2.1"]),
    ("spoof", "www.example.com", "AAAA", ["2001:db8::1"]),
    ({"type": "spoof", "a": ["203.0.113.5", "203.0.113.6"]}, "x.example", "A",
     ["203.0.113.5", "203.0.113.6"]),
    ({"type": "spoof", "a": "203.0.113.5"}, "x.example", "AAAA", []),  # NODATA-like
    ({"type": "spoof", "a": "203.0.113.5", "aaaa": "2001:db8::5"}, "x.example", "AAAA",
     ["2001:db8::5"]),
    ({"type": "spoof", "a": "203.0.113.5"}, "x.example", "MX", []),
])
def test_spoof_addresses(spec: Any, name: str, qtype: str, expected: list[str]) -> None:
    q = query(name, qtype, edns=True)
    message = reply_of(spec, q)
    assert message.rcode() == dns.rcode.NOERROR
    assert addresses(message) == expected
    if expected:
        assert all(rrset.name.to_text() == name + "." and rrset.ttl == 60
                   for rrset in message.answer)
        assert message.authority == []
    else:
        assert message.answer == [] and soa_of(message)[1] == 60


def test_spoof_keeps_the_clients_case_and_ttl() -> None:
    q = query("WwW.ExAmple.com")
    message = reply_of({"type": "spoof", "ttl": 5}, q)
    (rrset,) = message.answer
    assert rrset.name.to_text() == "WwW.ExAmple.com." and rrset.ttl == 5


def test_spoof_cname_then_addresses_of_the_target() -> None:
    spec = {"type": "spoof", "cname": "rogue.example.net", "a": "198.51.100.7"}
    message = reply_of(spec, query("www.myetherwallet.com"))
    cname, a = message.answer
    assert cname.rdtype == dns.rdatatype.CNAME and cname[0].target.to_text() == "rogue.example.net."
    assert a.name.to_text() == "rogue.example.net." and a[0].address == "198.51.100.7"
    only = reply_of(spec, query("www.myetherwallet.com", "CNAME"))
    assert [r.rdtype for r in only.answer] == [dns.rdatatype.CNAME]


def test_spoof_zone_records() -> None:
    spec = {"type": "spoof", "records": ['@ 30 IN TXT "v=spf1 -all"', "A 10.9.8.7",
                                         "@ MX 10 mail.example.net."]}
    txt = reply_of(spec, query("example.org", "TXT"))
    assert txt.answer[0].ttl == 30 and txt.answer[0][0].to_text() == '"v=spf1 -all"'
    a = reply_of(spec, query("example.org", "A"))
    assert addresses(a) == ["10.9.8.7"] and a.answer[0].ttl == 60
    mx = reply_of(spec, query("example.org", "MX"))
    assert mx.answer[0][0].exchange.to_text() == "mail.example.net."
    everything = reply_of(spec, query("example.org", "ANY"))
    assert len(everything.answer) == 3
    assert reply_of(spec, query("example.org", "AAAA")).answer == []


def test_spoof_records_with_cname_chain_and_loop() -> None:
    spec = {"type": "spoof", "records": ["@ CNAME lb.example.net.", "lb.example.net. A 10.0.0.1"]}
    message = reply_of(spec, query("app.example.org"))
    assert [r.rdtype for r in message.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    loop = {"type": "spoof", "records": ["@ CNAME a.loop.", "a.loop. CNAME b.loop.",
                                         "b.loop. CNAME a.loop."]}
    assert len(reply_of(loop, query("x.example")).answer) <= 8  # ends


def test_spoof_bad_records_fail_at_validation() -> None:
    with pytest.raises(ValueError, match="invalid record"):
        Rule.model_validate({"fault": {"type": "spoof", "records": ["@ A not-an-ip"]}})


# --- response-side: ttl --------------------------------------------------------------


def ttls(wire: bytes) -> dict[str, list[int]]:
    message = dns.message.from_wire(wire)
    return {name: [rrset.ttl for rrset in section]
            for name, section in (("answer", message.answer), ("authority", message.authority),
                                  ("additional", message.additional))}


@pytest.mark.parametrize(("spec", "expected"), [
    ({"type": "ttl", "set": 7}, [7, 7, 7]),
    ({"type": "ttl", "min": 100}, [300, 100, 1200]),
    ({"type": "ttl", "max": 60}, [60, 5, 60]),
    ({"type": "ttl", "min": 10, "max": 200}, [200, 10, 200]),
    ({"type": "ttl", "scale": 0.5}, [150, 2, 600]),  # rounded half to even
    ({"type": "ttl", "scale": 10**7}, [2**31 - 1, 5 * 10**7, 2**31 - 1]),  # capped at 2^31-1
    ({"type": "ttl", "scale": 0}, [0, 0, 0]),
])
def test_ttl_rewrites_every_section_but_opt(spec: Any, expected: list[int]) -> None:
    q = query(do=True)
    answer = upstream(q, [("www.example.com", 300, "A", "10.0.0.1")],
                      [("example.com", 5, "NS", "ns1.example.com.")],
                      [("ns1.example.com", 1200, "A", "10.0.0.53")])
    out = respond(spec, q, answer)
    got = ttls(out)
    assert [*got["answer"], *got["authority"], *got["additional"]] == expected
    message = dns.message.from_wire(out)
    assert message.edns == 0 and message.ednsflags & dns.flags.DO  # OPT's TTL untouched
    assert addresses(message) == ["10.0.0.1"]


def test_ttl_not_applied_leaves_answer_alone() -> None:
    engine = Engine()
    set_rules(engine, [Rule.model_validate({"match": {"name": "a.example"},
                                           "fault": {"type": "ttl", "set": 1}})], 0.0)
    assert engine.on_query(query("b.example"), 1.0, random.Random(1)) is None


# --- response-side: partial ---------------------------------------------------------


def eight(q: QueryView, reverse: bool = False) -> bytes:
    rows = [("lb.example.com", 60, "A", f"10.0.0.{i}") for i in range(1, 9)]
    message = dns.message.make_response(dns.message.from_wire(q.wire))
    rrset = dns.rrset.from_text_list(dns.name.from_text("lb.example.com"), 60, "IN", "A",
                                     [r[3] for r in (rows[::-1] if reverse else rows)])
    message.answer.append(rrset)
    return message.to_wire()


def test_partial_removes_a_share_and_keeps_one() -> None:
    q = query("lb.example.com")
    phase = PhaseState(start_run_time=0.0)
    kept = addresses(dns.message.from_wire(
        respond({"type": "partial", "share": 0.25}, q, eight(q), phase=phase)))
    assert len(kept) == 6
    kept = addresses(dns.message.from_wire(
        respond({"type": "partial", "share": 1.0}, q, eight(q), phase=phase)))
    assert len(kept) == 1
    single = upstream(q, [("lb.example.com", 60, "A", "10.0.0.1")])
    assert respond({"type": "partial", "share": 1.0}, q, single, phase=phase) == single


def test_partial_is_stable_within_a_period_and_rerolled_across() -> None:
    q = query("lb.example.com")
    spec = {"type": "partial", "share": 0.5, "period": "30s"}
    phase = PhaseState(start_run_time=100.0)

    def kept(now: float, reverse: bool = False) -> list[str]:
        wire = respond(spec, q, eight(q, reverse), now=now, seed=int(now), phase=phase)
        return addresses(dns.message.from_wire(wire))

    first = kept(100.0)
    assert len(first) == 4
    assert kept(110.0) == first and kept(129.9, reverse=True) == first
    periods = {tuple(kept(100.0 + 30 * k)) for k in range(10)}
    assert len(periods) > 1


def test_partial_empty_and_ttl() -> None:
    q = query("lb.example.com")
    empty = respond({"type": "partial", "empty": 1.0}, q, eight(q))
    assert addresses(dns.message.from_wire(empty)) == []
    never = respond({"type": "partial", "share": 0.0, "empty": 0.0, "ttl": 9}, q, eight(q))
    message = dns.message.from_wire(never)
    assert len(addresses(message)) == 8 and message.answer[0].ttl == 9


def test_partial_empty_share_over_periods() -> None:
    q = query("lb.example.com")
    spec = {"type": "partial", "share": 0.0, "empty": 0.3, "period": 10}
    empties = sum(
        not addresses(dns.message.from_wire(respond(spec, q, eight(q), now=10.0 * k)))
        for k in range(400))
    assert 83 <= empties <= 157  # 120 +/- 4 sigma


def test_partial_leaves_answers_without_addresses() -> None:
    q = query("example.com", "MX")
    answer = upstream(q, [("example.com", 60, "MX", "10 mail.example.com.")])
    assert respond("partial", q, answer) == answer


# --- response-side and query-side: corrupt ----------------------------------------------


def test_corrupt_wrong_id() -> None:
    q = query()
    answer = upstream(q, [("www.example.com", 60, "A", "10.0.0.1")])
    out = respond({"type": "corrupt", "mode": "wrong_id"}, q, answer)
    assert out[:2] != answer[:2] and out[2:] == answer[2:]


def test_corrupt_wrong_question() -> None:
    q = query()
    answer = upstream(q, [("www.example.com", 60, "A", "10.0.0.1")])
    out = respond({"type": "corrupt", "mode": "wrong_question"}, q, answer)
    message = dns.message.from_wire(out)
    assert message.question[0].name.to_text() == "xxx.example.com."
    assert addresses(message) == ["10.0.0.1"] and out[:2] == answer[:2]


def test_corrupt_short() -> None:
    q = query()
    answer = upstream(q, [("www.example.com", 60, "A", "10.0.0.1")])
    for seed in range(20):
        out = respond({"type": "corrupt", "mode": "short"}, q, answer, seed=seed)
        assert 12 <= len(out) < len(answer) and answer.startswith(out)
        with pytest.raises(dns.exception.DNSException):
            dns.message.from_wire(out)


def test_corrupt_random_keeps_the_id() -> None:
    q = query()
    for seed in range(20):
        verdict = apply({"type": "corrupt", "mode": "random"}, q, seed=seed)
        assert isinstance(verdict, Reply)
        assert 12 <= len(verdict.wire) <= 512 and verdict.wire[:2] == q.wire[:2]


# --- flap -------------------------------------------------------------------------------


@pytest.mark.parametrize(("now", "on"), [
    (100.0, True), (105.9, True), (106.0, False), (109.9, False), (110.0, True), (116.5, False),
    (99.0, False),  # before the phase start, counted backwards: 9 s into a period
])
def test_flap_duty_cycle_from_the_phase_start(now: float, on: bool) -> None:
    spec = {"type": "flap", "period": "10s", "duty": 0.6, "fault": "nxdomain"}
    verdict = apply(spec, query(), now=now, phase=PhaseState(start_run_time=100.0))
    assert isinstance(verdict, Reply) if on else verdict is None


@pytest.mark.parametrize(("duty", "expected"), [(0.0, False), (1.0, True)])
def test_flap_extremes(duty: float, expected: bool) -> None:
    spec = {"type": "flap", "period": "10s", "duty": duty, "fault": "servfail"}
    for now in range(30):
        verdict = apply(spec, query(), now=float(now))
        assert isinstance(verdict, Reply) if expected else verdict is None


def test_flap_of_a_response_fault() -> None:
    spec = {"type": "flap", "period": 2, "fault": {"type": "ttl", "set": 3}}
    fault = fault_of(spec)
    verdict = fault.apply(query(), 0.5, random.Random(1), PhaseState())
    assert isinstance(verdict, Forward) and verdict.respond is fault.fault
    assert fault.apply(query(), 1.5, random.Random(1), PhaseState()) is None
