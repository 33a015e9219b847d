"""The stale-answer store and the `stale` fault, end to end through the engine."""

from __future__ import annotations

import random
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

from proxy.core.engine import Engine
from proxy.core.model import Scenario
from proxy.core.query import QueryView
from proxy.core.stale import StaleStore, worth_recording
from proxy.core.verdict import Forward, Reply
from support.engine_plans import load


def query(name: str = "www.example.com", qtype: str = "A", *, qid: int = 0x1111,
          edns: bool = False, rd: bool = True) -> QueryView:
    message = dns.message.make_query(name, qtype, use_edns=0 if edns else None)
    message.id = qid
    message.flags = dns.flags.RD if rd else 0
    return QueryView.parse(message.to_wire(), "192.0.2.10", "udp", "127.0.0.1:53")


def upstream(q: QueryView, *addresses: str, ttl: int = 300, rcode: int = 0,
             extra: bool = False) -> bytes:
    asked = dns.message.from_wire(q.wire)
    message = dns.message.make_response(asked)  # AA clear, RA set, the query's EDNS
    message.set_rcode(rcode)
    name = asked.question[0].name
    if addresses:
        rdtype = "AAAA" if ":" in addresses[0] else "A"
        message.answer.append(dns.rrset.from_text_list(name, ttl, "IN", rdtype, list(addresses)))
    if extra:
        ns = dns.name.from_text("ns1.example.com")
        message.authority.append(dns.rrset.from_text(name.parent(), 900, "IN", "NS", ns.to_text()))
        message.additional.append(dns.rrset.from_text(ns, 900, "IN", "A", "10.0.0.53"))
    return message.to_wire()


def scenario(stale: dict | str, match: dict | None = None, first: list | None = None) -> Scenario:
    """Phase 'before' (60 s, recording), then phase 'incident' (60 s) with a stale rule."""
    return Scenario.model_validate({"name": "stale", "phases": [
        {"name": "before", "duration": 60, "rules": first or []},
        {"name": "incident", "duration": 60,
         "rules": [{"match": match or {"suffix": "example.com"}, "fault": stale}]},
    ]})


def with_tc(answer: bytes) -> bytes:
    return answer[:2] + bytes((answer[2] | 0x02,)) + answer[3:]


def resolve(engine: Engine, q: QueryView, now: float, answer: bytes,
            rng: random.Random | None = None) -> Any:
    """One query through the engine with `answer` from the upstream; the verdict and
    what the client got."""
    verdict = engine.on_query(q, now, rng or random.Random(1))
    if verdict is None:
        return None, answer
    if isinstance(verdict, Forward):
        if verdict.respond is None:
            return verdict, answer
        return verdict, engine.on_response(q, verdict, answer, now, random.Random(1))
    return verdict, verdict.wire if isinstance(verdict, Reply) else None


def addresses(wire: bytes) -> list[str]:
    return sorted(rd.to_text() for rrset in dns.message.from_wire(wire).answer for rd in rrset)


# --- the store ----------------------------------------------------------------------------


def test_store_is_lru_with_a_cap() -> None:
    q = query()
    answer = upstream(q, "10.0.0.1")
    store = StaleStore(capacity=2)
    assert store.record(("a", 1), answer) and store.record(("b", 1), answer)
    assert store.get(("a", 1)) == answer  # a is now the most recent
    store.record(("c", 1), answer)
    assert ("a", 1) in store and ("b", 1) not in store and ("c", 1) in store
    assert len(store) == 2
    snapshot = store.snapshot()
    store.clear()
    assert len(store) == 0 and len(snapshot) == 2
    with pytest.raises(ValueError):
        StaleStore(0)


@pytest.mark.parametrize(("answer", "kept"), [
    (lambda q: upstream(q, "10.0.0.1"), True),
    (lambda q: upstream(q), False),  # NODATA
    (lambda q: upstream(q, rcode=dns.rcode.NXDOMAIN), False),
    (lambda q: upstream(q, "10.0.0.1", rcode=dns.rcode.SERVFAIL), False),
    (lambda q: q.wire, False),  # a query, not a response
    (lambda q: upstream(q, "10.0.0.1")[:11], False),
    (lambda q: with_tc(upstream(q, "10.0.0.1")), False),
])
def test_only_real_answers_are_recorded(answer: Any, kept: bool) -> None:
    assert worth_recording(answer(query())) is kept


# --- source: last -------------------------------------------------------------------------


def test_last_answer_before_the_rule_is_served() -> None:
    engine = Engine()
    load(engine, scenario({"type": "stale", "ttl": 30}), 0.0, 0.0)
    q = query()
    for now, address in ((1.0, "10.0.0.1"), (2.0, "10.0.0.2")):
        verdict, got = resolve(engine, q, now, upstream(q, address))
        assert isinstance(verdict, Forward) and addresses(got) == [address]  # passed through
    # The incident: the answer from before it, for another client ID and letter case.
    client = query("WWW.Example.com", qid=0xBEEF, edns=True, rd=False)
    verdict, got = resolve(engine, client, 61.0, upstream(client, "10.9.9.9"))
    assert isinstance(verdict, Reply)
    message = dns.message.from_wire(got)
    assert message.id == 0xBEEF and message.rcode() == dns.rcode.NOERROR
    assert message.flags & dns.flags.QR and message.flags & dns.flags.RA
    assert not message.flags & (dns.flags.AA | dns.flags.RD)
    assert got[12 : client.qend] == client.wire[12 : client.qend]
    assert message.edns == 0
    assert addresses(got) == ["10.0.0.2"] and message.answer[0].ttl == 30
    # After the scenario everything reverts.
    assert engine.on_query(client, 120.0, random.Random(1)) is None


def test_not_applied_to_names_the_rule_does_not_select() -> None:
    engine = Engine()
    load(engine, scenario("stale"), 0.0, 0.0)
    other = query("www.example.org")
    assert engine.on_query(other, 1.0, random.Random(1)) is None  # not even recorded
    assert engine.on_query(other, 61.0, random.Random(1)) is None
    assert len(engine.store) == 0


def test_fallback_when_nothing_was_seen() -> None:
    engine = Engine()
    load(engine, scenario("stale"), 0.0, 0.0)
    verdict = engine.on_query(query("new.example.com"), 61.0, random.Random(1))
    assert dns.message.from_wire(verdict.wire).rcode() == dns.rcode.SERVFAIL
    engine2 = Engine()
    load(engine2, scenario({"type": "stale", "fallback": "nxdomain"}), 0.0, 0.0)
    verdict = engine2.on_query(query("new.example.com"), 61.0, random.Random(1))
    assert dns.message.from_wire(verdict.wire).rcode() == dns.rcode.NXDOMAIN


def test_keyed_by_name_and_type() -> None:
    engine = Engine()
    load(engine, scenario("stale"), 0.0, 0.0)
    a, aaaa = query(), query(qtype="AAAA")
    resolve(engine, a, 1.0, upstream(a, "10.0.0.1"))
    resolve(engine, aaaa, 1.0, upstream(aaaa, "2001:db8::7"))
    assert addresses(resolve(engine, a, 61.0, b"")[1]) == ["10.0.0.1"]
    assert addresses(resolve(engine, aaaa, 61.0, b"")[1]) == ["2001:db8::7"]


def test_recording_stops_while_a_last_rule_is_active() -> None:
    # Half the incident's queries pass to the upstream, which now answers
    # 10.0.0.99; the rule must keep serving the answer from before.
    engine = Engine()
    load(engine, scenario("stale", {"suffix": "example.com", "probability": 0.5}), 0.0, 0.0)
    q = query()
    resolve(engine, q, 1.0, upstream(q, "10.0.0.1"))
    rng = random.Random(5)
    outcomes = [resolve(engine, q, 61.0, upstream(q, "10.0.0.99"), rng) for _ in range(200)]
    served = [got for verdict, got in outcomes if isinstance(verdict, Reply)]
    passed = [got for verdict, got in outcomes if verdict is None]
    assert len(served) > 50 and len(passed) > 50 and len(served) + len(passed) == 200
    assert all(addresses(got) == ["10.0.0.1"] for got in served)
    assert addresses(engine.store.get(("www.example.com", 1))) == ["10.0.0.1"]


def test_recording_resumes_after_the_last_rule() -> None:
    engine = Engine()
    load(engine, Scenario.model_validate({"name": "s", "phases": [
        {"name": "incident", "duration": 10,
         "rules": [{"match": {"suffix": "example.com"}, "fault": "stale"}]},
        {"name": "after", "duration": 10},
        {"name": "again", "duration": 10,
         "rules": [{"match": {"suffix": "example.com"}, "fault": "stale"}]}]}), 0.0, 0.0)
    q = query()
    assert isinstance(engine.on_query(q, 1.0, random.Random(1)), Reply)  # fallback
    verdict, _ = resolve(engine, q, 11.0, upstream(q, "10.0.0.3"))
    assert isinstance(verdict, Forward)
    assert addresses(resolve(engine, q, 21.0, b"")[1]) == ["10.0.0.3"]


def test_stale_with_authority_additional_and_opt() -> None:
    engine = Engine()
    load(engine, scenario({"type": "stale", "ttl": 7}), 0.0, 0.0)
    q = query(edns=True)
    resolve(engine, q, 1.0, upstream(q, "10.0.0.1", "10.0.0.2", extra=True))
    plain = query(qid=77)  # this client sent no EDNS: no OPT for it
    message = dns.message.from_wire(engine.on_query(plain, 61.0, random.Random(1)).wire)
    assert message.edns == -1
    assert [r.ttl for r in (*message.answer, *message.authority, *message.additional)] == [7] * 3
    assert addresses(message.to_wire()) == ["10.0.0.1", "10.0.0.2"]


def test_recording_alongside_another_rules_fault() -> None:
    delay = [{"match": {"suffix": "example.com"}, "fault": {"type": "delay", "delay": 1}}]
    ttl = [{"match": {"suffix": "example.com"}, "fault": {"type": "ttl", "set": 1}}]
    for first in (delay, ttl):
        engine = Engine()
        load(engine, scenario("stale", first=first), 0.0, 0.0)
        q = query()
        verdict, _ = resolve(engine, q, 1.0, upstream(q, "10.0.0.1"))
        assert isinstance(verdict, Forward) and verdict.respond is not None
        assert addresses(resolve(engine, q, 61.0, b"")[1]) == ["10.0.0.1"]


def test_capacity_is_configurable() -> None:
    engine = Engine(stale_capacity=1)
    load(engine, scenario("stale"), 0.0, 0.0)
    one, two = query("one.example.com"), query("two.example.com")
    resolve(engine, one, 1.0, upstream(one, "10.0.0.1"))
    resolve(engine, two, 2.0, upstream(two, "10.0.0.2"))
    assert len(engine.store) == 1
    assert dns.message.from_wire(resolve(engine, one, 61.0, b"")[1]).rcode() == dns.rcode.SERVFAIL
    assert addresses(resolve(engine, two, 61.0, b"")[1]) == ["10.0.0.2"]


def test_stale_inside_flap() -> None:
    engine = Engine()
    load(engine, scenario({"type": "flap", "period": 10, "duty": 0.5, "fault": "stale"}), 0.0, 0.0)
    q = query()
    resolve(engine, q, 1.0, upstream(q, "10.0.0.1"))
    assert addresses(resolve(engine, q, 61.0, b"")[1]) == ["10.0.0.1"]
    assert engine.on_query(q, 66.0, random.Random(1)) is None


# --- source: snapshot ----------------------------------------------------------------------


def test_snapshot_is_taken_when_the_phase_starts() -> None:
    # every: 2 lets one query in two reach the upstream, whose new answer is
    # recorded (snapshot rules do not stop recording) but not served.
    engine = Engine()
    load(engine, scenario({"type": "stale", "source": "snapshot"},
                         {"suffix": "example.com", "every": 2}), 0.0, 0.0)
    q = query()
    resolve(engine, q, 1.0, upstream(q, "10.0.0.1"))
    verdict, got = resolve(engine, q, 61.0, upstream(q, "10.0.0.2"))
    assert isinstance(verdict, Forward) and addresses(got) == ["10.0.0.2"]
    assert addresses(engine.store.get(("www.example.com", 1))) == ["10.0.0.2"]
    verdict, got = resolve(engine, q, 62.0, b"")
    assert isinstance(verdict, Reply) and addresses(got) == ["10.0.0.1"]


def test_snapshot_fallback_for_names_seen_only_after_the_phase_start() -> None:
    engine = Engine()
    load(engine, scenario({"type": "stale", "source": "snapshot", "fallback": "refused"},
                         {"suffix": "example.com", "every": 2}), 0.0, 0.0)
    q = query("late.example.com")
    resolve(engine, q, 61.0, upstream(q, "10.0.0.5"))  # recorded during the phase
    verdict = engine.on_query(q, 62.0, random.Random(1))
    assert dns.message.from_wire(verdict.wire).rcode() == dns.rcode.REFUSED
