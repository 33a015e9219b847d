"""The engine, with the clock moved by hand."""

from __future__ import annotations

import random
import time
from typing import Any

import dns.message
import dns.rcode
import pytest
from dnslib import RR, DNSRecord

from proxy.core.engine import Engine
from proxy.core.model import Rule, Scenario
from proxy.core.query import QueryView
from proxy.core.verdict import Drop, Forward, Reply
from support.engine_plans import clear, current_phase, ends_at, load, scenario_of, set_rules


def query(name: str = "www.example.com", qtype: str = "A", *, client: str = "192.0.2.10",
          transport: str = "udp") -> QueryView:
    wire = bytes(DNSRecord.question(name, qtype).pack())
    return QueryView.parse(wire, client, transport, "127.0.0.1:53")


def scenario(*phases: dict, time_scale: float = 1.0) -> Scenario:
    return Scenario.model_validate({"name": "test", "time_scale": time_scale,
                                    "phases": list(phases)})


def rules(*specs: dict) -> list[Rule]:
    return [Rule.model_validate(spec) for spec in specs]


def rcode(verdict: Any) -> int | None:
    """The rcode of a Reply verdict, None for anything else."""
    if isinstance(verdict, Reply):
        return dns.message.from_wire(verdict.wire).rcode()
    return None


NX, SERVFAIL, REFUSED = dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.REFUSED

THREE_PHASES = scenario(
    {"name": "empty", "duration": "10s",
     "rules": [{"match": {"suffix": "example.com"}, "fault": "nxdomain"}]},
    {"name": "outage", "duration": "20s",
     "rules": [{"name": "down", "match": {"suffix": "example.com"}, "fault": "servfail"}]},
    {"name": "tail", "duration": "10s", "rules": [{"match": {"name": "x.example.com"},
                                                   "fault": "refused"}]},
    time_scale=0.5,
)


# --- phases ---------------------------------------------------------------------------


@pytest.mark.parametrize(("now", "phase", "expected"), [
    (99.9, None, None),  # not started yet
    (100.0, (0, "empty", 5.0), NX),
    (104.9, (0, "empty", 0.1), NX),
    (105.0, (1, "outage", 10.0), SERVFAIL),
    (114.0, (1, "outage", 1.0), SERVFAIL),
    (115.0, (2, "tail", 5.0), None),  # tail selects only x.example.com
    (120.0, None, None),  # over: everything reverts
    (1e9, None, None),
])
def test_phases_advance_with_time_scale(now: float, phase: Any, expected: int | None) -> None:
    engine = Engine()
    load(engine, THREE_PHASES, started_at=100.0, now=100.0)
    current = current_phase(engine, now)
    if phase is None:
        assert current is None
    else:
        assert current is not None
        assert current[:2] == phase[:2] and current[2] == pytest.approx(phase[2])
    assert rcode(engine.on_query(query(), now, random.Random(1))) == expected
    assert engine.on_query(query("www.example.org"), now, random.Random(1)) is None


def test_walking_the_clock_through_a_scenario() -> None:
    engine = Engine()
    load(engine, THREE_PHASES, started_at=100.0, now=100.0)
    assert engine.active and scenario_of(engine) == "test" and ends_at(engine) == 120.0
    seen = []
    for tenth in range(1000, 1210, 5):
        now = tenth / 10
        seen.append(rcode(engine.on_query(query("x.example.com"), now, random.Random(1))))
    assert seen == [NX] * 10 + [SERVFAIL] * 20 + [REFUSED] * 10 + [None] * 2
    assert not engine.active  # the transport skips the engine again


def test_load_after_the_end_is_inactive() -> None:
    engine = Engine()
    load(engine, THREE_PHASES, started_at=0.0, now=1000.0)
    assert not engine.active
    assert engine.on_query(query(), 1000.0, random.Random(1)) is None


def test_nothing_loaded_is_inactive() -> None:
    engine = Engine()
    assert not engine.active and current_phase(engine, 0.0) is None and engine.stats() == []
    assert engine.on_query(query(), 0.0, random.Random(1)) is None
    load(engine, scenario({"name": "quiet", "duration": "1m"}), 0.0, 0.0)
    assert not engine.active  # no rule: nothing to do


def test_zero_length_phases_are_skipped() -> None:
    engine = Engine()
    load(engine, scenario({"name": "skip", "duration": 0, "rules": [{"fault": "refused"}]},
                         {"name": "run", "duration": 10, "rules": [{"fault": "servfail"}]}),
                0.0, 0.0)
    assert current_phase(engine, 0.0) == (1, "run", 10.0)
    assert rcode(engine.on_query(query(), 0.0, random.Random(1))) == SERVFAIL


def test_clear_reverts_at_once() -> None:
    engine = Engine()
    load(engine, THREE_PHASES, 0.0, 0.0)
    assert isinstance(engine.on_query(query(), 1.0, random.Random(1)), Reply)
    clear(engine)
    assert not engine.active and engine.on_query(query(), 1.0, random.Random(1)) is None
    assert current_phase(engine, 1.0) is None


def test_set_rules_adhoc() -> None:
    engine = Engine()
    set_rules(engine, rules({"match": {"qtype": "AAAA"}, "fault": "drop"}), 50.0, 10.0, 50.0)
    assert engine.active and current_phase(engine, 55.0) == (0, "adhoc", 5.0)
    assert engine.on_query(query(qtype="AAAA"), 55.0, random.Random(1)) == Drop()
    assert engine.on_query(query(qtype="A"), 55.0, random.Random(1)) is None
    assert engine.on_query(query(qtype="AAAA"), 60.0, random.Random(1)) is None
    assert not engine.active
    set_rules(engine, rules({"fault": "drop"}), 0.0)  # no duration: until cleared
    assert engine.on_query(query(), 1e12, random.Random(1)) == Drop()


def test_load_replaces_the_previous_scenario() -> None:
    engine = Engine()
    set_rules(engine, rules({"fault": "drop"}), 0.0)
    load(engine, scenario({"name": "p", "duration": 10, "rules": [{"fault": "refused"}]}), 0.0, 0.0)
    assert rcode(engine.on_query(query(), 1.0, random.Random(1))) == REFUSED
    assert [s["fault"] for s in engine.stats()] == ["refused"]


# --- rules: order, limits -------------------------------------------------------------


def test_first_matching_rule_wins_in_file_order() -> None:
    engine = Engine()
    set_rules(engine, rules({"match": {"name": "a.example.com"}, "fault": "nxdomain"},
                           {"match": {"suffix": "example.com"}, "fault": "servfail"},
                           {"match": {"name": "a.example.com"}, "fault": "refused"}), 0.0)
    rng = random.Random(1)
    assert rcode(engine.on_query(query("a.example.com"), 1.0, rng)) == NX
    assert rcode(engine.on_query(query("b.example.com"), 1.0, rng)) == SERVFAIL
    assert engine.on_query(query("c.example.org"), 1.0, rng) is None
    assert [(s["matched"], s["injected"]) for s in engine.stats()] == [(1, 1), (1, 1), (0, 0)]


def test_a_rule_that_declines_still_wins() -> None:
    # A flap that is off lets the query pass untouched; later rules are not tried.
    engine = Engine()
    set_rules(engine, rules(
        {"fault": {"type": "flap", "period": 10, "duty": 0.5, "fault": "nxdomain"}},
        {"fault": "servfail"}), 0.0)
    assert rcode(engine.on_query(query(), 1.0, random.Random(1))) == NX
    assert engine.on_query(query(), 6.0, random.Random(1)) is None
    flap, servfail = engine.stats()
    assert (flap["matched"], flap["injected"], servfail["matched"]) == (2, 1, 0)


def test_limit_count_then_the_next_rule() -> None:
    engine = Engine()
    set_rules(engine, rules({"fault": "nxdomain", "limit": {"count": 2}},
                           {"match": {"name": "www.example.com"}, "fault": "servfail"}), 0.0)
    rng = random.Random(1)
    got = [rcode(engine.on_query(query(), 1.0, rng)) for _ in range(4)]
    assert got == [NX, NX, SERVFAIL, SERVFAIL]
    assert engine.on_query(query("other.example"), 1.0, rng) is None
    assert engine.stats()[0]["injected"] == 2


def test_limit_counts_injections_not_declines() -> None:
    engine = Engine()
    set_rules(engine, rules({"fault": "truncate", "limit": {"count": 1}}), 0.0)
    rng = random.Random(1)
    assert engine.on_query(query(transport="tcp"), 1.0, rng) is None  # declined, not counted
    assert isinstance(engine.on_query(query(), 1.0, rng), Reply)
    assert engine.on_query(query(), 1.0, rng) is None


def test_limit_per_second_token_bucket() -> None:
    engine = Engine()
    set_rules(engine, rules({"fault": "servfail", "limit": {"per_second": 2}}), 0.0)
    rng = random.Random(1)
    burst = [isinstance(engine.on_query(query(), 0.0, rng), Reply) for _ in range(5)]
    assert burst == [True, True, False, False, False]
    assert engine.on_query(query(), 0.49, rng) is None
    assert isinstance(engine.on_query(query(), 0.5, rng), Reply)
    injected = sum(isinstance(engine.on_query(query(), 1.0 + i / 100, rng), Reply)
                   for i in range(1000))
    assert 19 <= injected <= 22  # 2 per second over 10 s, plus what was saved up


def test_limit_per_second_below_one() -> None:
    engine = Engine()
    set_rules(engine, rules({"fault": "servfail", "limit": {"per_second": 0.1}}), 0.0)
    rng = random.Random(1)
    hits = [now for now in range(60) if engine.on_query(query(), float(now), rng)]
    assert hits == [0, 10, 20, 30, 40, 50]


# --- sampling through the engine ------------------------------------------------------


@pytest.mark.parametrize(("p", "low", "high"), [(0.0, 0, 0), (1.0, 1000, 1000)])
def test_probability_extremes(p: float, low: int, high: int) -> None:
    engine = Engine()
    set_rules(engine, rules({"match": {"probability": p}, "fault": "servfail"}), 0.0)
    rng = random.Random(2024)
    q = query()
    hits = sum(isinstance(engine.on_query(q, 1.0, rng), Reply) for _ in range(1000))
    assert low <= hits <= high


def test_probability_binomial_bounds() -> None:
    engine = Engine()
    set_rules(engine, rules({"match": {"probability": 0.3}, "fault": "servfail"}), 0.0)
    rng = random.Random(2024)
    q = query()
    hits = sum(isinstance(engine.on_query(q, 1.0, rng), Reply) for _ in range(10_000))
    assert 2817 <= hits <= 3183  # 3000 +/- 4 sigma
    assert engine.stats()[0]["injected"] == hits


def test_ramp_moves_across_the_phase() -> None:
    engine = Engine()
    load(engine, scenario(
        {"name": "before", "duration": 100},
        {"name": "recovery", "duration": 100, "rules": [
            {"match": {"probability": {"from": 1, "to": 0}}, "fault": "servfail"}]}),
        0.0, 0.0)
    rng = random.Random(7)
    q = query()

    def share(now: float) -> float:
        return sum(isinstance(engine.on_query(q, now, rng), Reply) for _ in range(2000)) / 2000

    assert share(50.0) == 0.0  # phase 0 has no rule
    assert share(100.0) == 1.0
    assert 0.70 <= share(125.0) <= 0.80
    assert 0.45 <= share(150.0) <= 0.55
    assert 0.20 <= share(175.0) <= 0.30
    assert share(199.99) <= 0.01
    assert share(200.0) == 0.0


def test_every_and_first_count_per_phase() -> None:
    engine = Engine()
    load(engine, scenario(
        {"name": "one", "duration": 10, "rules": [{"match": {"first": 1}, "fault": "servfail"}]},
        {"name": "two", "duration": 10, "rules": [{"match": {"first": 1}, "fault": "servfail"}]}),
        0.0, 0.0)
    rng = random.Random(1)
    got = [isinstance(engine.on_query(query(), now, rng), Reply) for now in (1.0, 2.0, 11.0, 12.0)]
    assert got == [True, False, True, False]


def test_flap_follows_the_phase_start() -> None:
    engine = Engine()
    load(engine, scenario(
        {"name": "calm", "duration": 7},
        {"name": "flapping", "duration": 100, "rules": [
            {"fault": {"type": "flap", "period": "4s", "duty": 0.5, "fault": "servfail"}}]}),
        0.0, 0.0)
    rng = random.Random(1)
    on = [isinstance(engine.on_query(query(), now, rng), Reply)
          for now in (6.0, 7.0, 8.9, 9.0, 10.9, 11.0, 12.9, 13.0)]
    assert on == [False, True, True, False, False, True, True, False]


# --- response-side faults -------------------------------------------------------------


def test_response_fault_goes_through_on_response() -> None:
    engine = Engine()
    set_rules(engine, rules({"match": {"suffix": "example.com"},
                            "fault": {"type": "ttl", "set": 3}}),
                     0.0)
    q = query()
    verdict = engine.on_query(q, 1.0, random.Random(1))
    assert isinstance(verdict, Forward) and verdict.respond is not None
    answer = DNSRecord.parse(q.wire).reply()
    answer.add_answer(*RR.fromZone("www.example.com. 300 A 10.0.0.1"))
    out = engine.on_response(q, verdict, bytes(answer.pack()), 1.0, random.Random(1))
    assert dns.message.from_wire(out).answer[0].ttl == 3
    assert engine.on_query(query("www.example.org"), 1.0, random.Random(1)) is None


def test_delay_then_response_fault_keeps_both() -> None:
    engine = Engine()
    set_rules(engine, rules({"fault": {"type": "delay", "delay": "1s",
                                      "then": {"type": "corrupt", "mode": "wrong_id"}}}), 0.0)
    q = query()
    verdict = engine.on_query(q, 1.0, random.Random(1))
    assert isinstance(verdict, Forward) and verdict.delay == 1.0
    answer = bytes(DNSRecord.parse(q.wire).reply().pack())
    assert engine.on_response(q, verdict, answer, 2.0, random.Random(1))[:2] != answer[:2]


def test_on_response_passes_foreign_verdicts_through() -> None:
    engine = Engine()
    assert engine.on_response(query(), Forward(respond=object()), b"abc", 0.0,
                              random.Random(1)) == b"abc"


# --- failing open -----------------------------------------------------------------------


def test_a_fault_that_raises_fails_open_on_query() -> None:
    engine = Engine()
    set_rules(engine, rules({"fault": "nxdomain"}), 0.0)
    (rule,) = engine.rules()

    def boom(*args: Any) -> None:
        raise RuntimeError("bug")

    rule.fault.apply = boom  # type: ignore[method-assign]
    assert engine.on_query(query(), 1.0, random.Random(1)) is None
    (stats,) = engine.stats()
    assert (stats["matched"], stats["injected"], stats["errors"]) == (1, 0, 1)


def test_a_fault_that_raises_fails_open_on_response() -> None:
    engine = Engine()
    set_rules(engine, rules({"fault": "partial"}), 0.0)
    q = query()
    verdict = engine.on_query(q, 1.0, random.Random(1))
    garbage = q.wire[:2] + b"\x81\x80\x00\x01\x00\x05"  # counts that lie
    assert engine.on_response(q, verdict, garbage, 1.0, random.Random(1)) == garbage
    assert engine.stats()[0]["errors"] == 1


def test_engine_never_reads_the_clock_or_global_random(monkeypatch: pytest.MonkeyPatch) -> None:
    queries = [query(qtype=qtype) for qtype in ("A", "AAAA", "MX") * 20]  # dnslib draws IDs

    def forbidden(*args: Any) -> None:
        raise AssertionError("the engine must not read the clock or the global random")

    for name in ("time", "monotonic", "perf_counter"):
        monkeypatch.setattr(time, name, forbidden)
    for name in ("random", "uniform", "gauss", "randint", "randrange", "randbytes"):
        monkeypatch.setattr(random, name, forbidden)
    engine = Engine()
    set_rules(engine, rules(
        {"match": {"probability": 0.5, "qtype": "A"}, "fault": {"type": "delay", "delay": 1,
                                                                 "jitter": 1}},
        {"match": {"qtype": "AAAA"}, "fault": {"type": "corrupt", "mode": "random"}},
        {"match": {"qtype": "MX"}, "fault": "stale"}), 0.0)
    rng = random.Random(1)
    for q in queries:
        engine.on_query(q, 1.0, rng)
    assert all(s["errors"] == 0 for s in engine.stats()) and engine.errors == 0


# --- reading ----------------------------------------------------------------------------


def test_stats_and_describe() -> None:
    engine = Engine()
    load(engine, THREE_PHASES, 0.0, 0.0)
    engine.on_query(query(), 1.0, random.Random(1))
    engine.on_query(query("x.example.org"), 1.0, random.Random(1))
    assert engine.stats() == [
        {"run": "test", "scenario": "test", "phase": "empty", "phase_index": 0,
         "rule": "empty/0", "fault": "nxdomain", "dry_run": False,
         "matched": 1, "injected": 1, "errors": 0},
        {"run": "test", "scenario": "test", "phase": "outage", "phase_index": 1,
         "rule": "down", "fault": "servfail", "dry_run": False,
         "matched": 0, "injected": 0, "errors": 0},
        {"run": "test", "scenario": "test", "phase": "tail", "phase_index": 2,
         "rule": "tail/0", "fault": "refused", "dry_run": False,
         "matched": 0, "injected": 0, "errors": 0},
    ]
    assert engine.describe() == [
        "empty: empty/0: suffix example.com -> NXDOMAIN (negative TTL 60s)",
        "outage: down: suffix example.com -> SERVFAIL",
        "tail: tail/0: name x.example.com -> REFUSED",
    ]


# --- the size of replies built for UDP clients (RFC 1035 4.2.1, RFC 6891 6.2.5) ------------


FORTY = [f"192.0.2.{i}" for i in range(1, 41)]


def edns_query(name: str = "www.example.com", qtype: str = "A", *, edns: int | None = None,
               payload: int = 1232, transport: str = "udp", do: bool = False,
               cd: bool = False) -> QueryView:
    if edns is None:
        message = dns.message.make_query(name, qtype, use_edns=False)
    else:
        message = dns.message.make_query(name, qtype, use_edns=edns, payload=payload,
                                         want_dnssec=do)
    if cd:
        message.flags |= dns.flags.CD
    return QueryView.parse(message.to_wire(), "192.0.2.10", transport, "127.0.0.1:53")


def big_answer(q: QueryView, count: int = 40) -> bytes:
    """An upstream-style answer with `count` A records."""
    answer = DNSRecord.parse(q.wire).reply()
    for address in FORTY[:count]:
        answer.add_answer(*RR.fromZone(f"{q.qname}. 300 A {address}"))
    return bytes(answer.pack())


def reply_of(verdict: Any) -> dns.message.Message:
    assert isinstance(verdict, Reply), verdict
    return dns.message.from_wire(verdict.wire)


BIG_REPLIES = {
    "spoof": {"type": "spoof", "a": FORTY},
    "delay-then-spoof": {"type": "delay", "delay": "2s", "then": {"type": "spoof", "a": FORTY}},
    "flap-spoof": {"type": "flap", "period": "10s", "duty": 1.0,
                   "fault": {"type": "spoof", "a": FORTY}},
    "stale": {"type": "stale", "source": "last"},
    "nxdomain-long-ede": {"type": "nxdomain", "ede": {"code": 22, "text": "x" * 700}},
}


@pytest.mark.parametrize("fault", sorted(BIG_REPLIES))
@pytest.mark.parametrize("edns, payload, transport, truncated", [
    (None, 0, "udp", True),  # no EDNS: 512 bytes
    (0, 512, "udp", True),
    (0, 100, "udp", True),  # below 512 counts as 512
    (0, 1232, "udp", False),
    (0, 4096, "udp", False),
    (None, 0, "tcp", False),  # TCP takes it whole
    (0, 512, "tcp", False),
])
def test_replies_the_proxy_builds_fit_the_udp_client(fault, edns, payload, transport, truncated):
    engine = Engine()
    set_rules(engine, rules({"match": {"suffix": "example.com"}, "fault": BIG_REPLIES[fault]}), 0.0)
    q = edns_query(edns=edns, payload=payload, transport=transport)
    engine.store.record((q.qname, q.qtype), big_answer(q))  # what `stale` serves
    verdict = engine.on_query(q, 1.0, random.Random(1))
    reply = reply_of(verdict)
    small = fault == "nxdomain-long-ede" and edns is None  # no OPT, so no EDE: small
    truncated = truncated and not small
    assert bool(reply.flags & dns.flags.TC) == truncated, reply
    assert truncated or small or len(verdict.wire) > 512  # whole, and over 512 bytes
    assert verdict.delay == (2.0 if fault == "delay-then-spoof" else 0.0)
    if truncated:
        assert len(verdict.wire) <= 512
        assert not reply.answer and not reply.authority and reply.question
        assert reply.edns == (-1 if edns is None else 0)
    elif fault != "nxdomain-long-ede":
        assert len(reply.answer[0]) == 40
    assert engine.stats()[0]["injected"] == 1


def test_a_small_reply_is_not_truncated_over_udp():
    engine = Engine()
    set_rules(engine, rules({"fault": {"type": "spoof", "a": FORTY[:2]}}), 0.0)
    for edns in (None, 0):
        reply = reply_of(engine.on_query(edns_query(edns=edns, payload=512), 1.0,
                                         random.Random(1)))
        assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == 2


@pytest.mark.parametrize("grow, transport, truncated", [
    (400, "udp", True),  # rewritten past the client's 512 bytes
    (100, "udp", False),  # longer, but it still fits
    (400, "tcp", False),
    (0, "udp", False),  # not longer: left as it is, even over 512
])
def test_answers_rewritten_longer_fit_the_udp_client(grow, transport, truncated):
    engine = Engine()
    set_rules(engine, rules({"fault": {"type": "ttl", "set": 5}}), 0.0)
    (rule,) = engine.rules()
    q = edns_query(transport=transport)
    answer = big_answer(q, 20 if grow else 40)
    rewritten = big_answer(q, 20 + grow // 16) if grow else answer
    rule.fault.respond = lambda *args: rewritten  # type: ignore[method-assign]
    verdict = engine.on_query(q, 1.0, random.Random(1))
    out = engine.on_response(q, verdict, answer, 1.0, random.Random(1))
    if truncated:
        message = dns.message.from_wire(out)
        assert message.flags & dns.flags.TC and not message.answer and len(out) <= 512
    else:
        assert out == rewritten


# --- EDNS versions the proxy does not speak (RFC 6891 6.1.3) --------------------------------


@pytest.mark.parametrize("fault", ["spoof", "nxdomain", "servfail", "truncate", "drop",
                                   {"type": "delay", "delay": "1s"}, {"type": "ttl", "set": 5},
                                   {"type": "corrupt", "mode": "random"}, "stale"])
def test_edns_version_above_0_gets_badvers_instead_of_the_fault(fault):
    engine = Engine()
    set_rules(engine, rules({"match": {"suffix": "example.com"}, "fault": fault}), 0.0)
    q = edns_query(edns=1, do=True, cd=True)
    reply = reply_of(engine.on_query(q, 1.0, random.Random(1)))
    # What unbound answers to `dig +edns=1 +noednsnegotiation`.
    assert reply.rcode() == dns.rcode.BADVERS and q.wire[3] & 0x0F == 0
    assert reply.id == dns.message.from_wire(q.wire).id
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RA
    assert reply.flags & dns.flags.RD and reply.flags & dns.flags.CD
    assert not reply.flags & (dns.flags.AA | dns.flags.TC)
    assert reply.question == dns.message.from_wire(q.wire).question
    assert not reply.answer and not reply.authority
    assert reply.edns == 0 and reply.payload == 1232 and reply.ednsflags & dns.flags.DO
    assert not reply.options
    # Not faulted, so not counted.
    assert engine.stats()[0]["matched"] == engine.stats()[0]["injected"] == 0
    assert engine.client_stats() == []
    # Version 0 and no EDNS get the fault (`stale` its fallback); another
    # name goes upstream untouched.
    for edns in (0, None):
        engine.on_query(edns_query(edns=edns), 1.0, random.Random(1))
    assert engine.stats()[0]["injected"] == 2
    assert engine.on_query(edns_query("www.example.org", edns=1), 1.0, random.Random(1)) is None


def test_badvers_does_not_use_up_a_limit_or_count_in_a_dry_run():
    engine = Engine()
    set_rules(engine, rules({"fault": "nxdomain", "limit": {"count": 1}}), 0.0)
    engine.add_rule("watch", Rule.model_validate({"fault": "servfail"}), 0.0, dry_run=True)
    assert reply_of(engine.on_query(edns_query(edns=1), 1.0, random.Random(1))).rcode() \
        == dns.rcode.BADVERS
    assert reply_of(engine.on_query(edns_query(edns=0), 1.0, random.Random(1))).rcode() \
        == dns.rcode.NXDOMAIN
    assert [(s["matched"], s["injected"]) for s in engine.stats()] == [(1, 1), (1, 1)]
