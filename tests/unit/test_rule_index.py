"""The rule index: same winner as trying every rule in order, fewer tries."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from proxy.core.model import Match
from proxy.core.rule_index import RuleIndex
from proxy.core.selectors import Selector


@dataclass
class R:
    label: str
    selector: Selector


def rules(*matches: dict) -> list[R]:
    return [R(str(i), Selector(Match.model_validate(m))) for i, m in enumerate(matches)]


def labels(found) -> list[str]:
    return [r.label for r in found]


def test_name_and_zone_rules_are_found_in_file_order_with_the_always_rules():
    index = RuleIndex(rules(
        {"suffix": "example.com"},        # 0
        {"qtype": "AAAA"},                # 1: no name key, tried for every query
        {"name": "www.example.com"},      # 2
        {"suffix": ["other.org", "com"]},  # 3
        {"glob": "*.example.com"},        # 4: glob is not indexed
    ))
    assert labels(index.candidates("www.example.com")) == ["0", "1", "2", "3", "4"]
    assert labels(index.candidates("api.example.com")) == ["0", "1", "3", "4"]
    assert labels(index.candidates("x.other.org")) == ["1", "3", "4"]
    assert labels(index.candidates("example.net")) == ["1", "4"]


def test_zones_match_on_label_boundaries_only():
    index = RuleIndex(rules({"suffix": "example.com"}))
    assert labels(index.candidates("example.com")) == ["0"]
    assert labels(index.candidates("a.b.example.com")) == ["0"]
    assert labels(index.candidates("xexample.com")) == []
    assert labels(index.candidates("example.com.evil")) == []


def test_a_rule_with_name_and_suffix_is_filed_under_its_names():
    index = RuleIndex(rules({"name": "a.example.com", "suffix": "example.com"}))
    assert labels(index.candidates("a.example.com")) == ["0"]
    assert labels(index.candidates("b.example.com")) == []


def test_a_root_suffix_selects_everything_and_is_not_indexed():
    index = RuleIndex(rules({"suffix": "."}, {"name": "x.test"}))
    assert labels(index.candidates("anything.test")) == ["0"]
    assert labels(index.candidates("x.test")) == ["0", "1"]


def test_without_name_keys_every_rule_is_a_candidate():
    every = rules({"qtype": "A"}, {"transport": "tcp"})
    assert labels(RuleIndex(every).candidates("x.test")) == ["0", "1"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_index_never_changes_which_rules_can_match(seed):
    """Against a plain scan: every rule that could match by name is a candidate."""
    rng = random.Random(seed)
    zones = ["a.test", "b.a.test", "c.test", "test"]
    names = [f"h{i}.{rng.choice(zones)}" for i in range(40)]
    specs = []
    for _ in range(60):
        kind = rng.choice(["name", "suffix", "qtype"])
        if kind == "name":
            specs.append({"name": rng.sample(names, 2)})
        elif kind == "suffix":
            specs.append({"suffix": rng.choice(zones)})
        else:
            specs.append({"qtype": "A"})
    compiled = rules(*specs)
    index = RuleIndex(compiled)
    for qname in names + ["other.example", "a.test", "xa.test"]:
        expected = []
        for rule, spec in zip(compiled, specs, strict=True):
            if "name" in spec:
                ok = qname in spec["name"]
            elif "suffix" in spec:
                ok = qname == spec["suffix"] or qname.endswith("." + spec["suffix"])
            else:
                ok = True
            if ok:
                expected.append(rule.label)
        assert labels(index.candidates(qname)) == expected, qname


def test_ten_thousand_name_rules_give_one_candidate():
    index = RuleIndex(rules(*({"name": f"h{i}.bench.test"} for i in range(10_000))))
    assert labels(index.candidates("h9999.bench.test")) == ["9999"]
    assert labels(index.candidates("nothing.bench.test")) == []


# --- through the engine ---------------------------------------------------------------

from random import Random  # noqa: E402

from dnslib import DNSRecord  # noqa: E402

from proxy.core import wire  # noqa: E402
from proxy.core.engine import Engine  # noqa: E402
from proxy.core.model import Rule, Scenario  # noqa: E402
from proxy.core.query import QueryView  # noqa: E402
from proxy.core.verdict import Forward, Reply  # noqa: E402
from support.engine_plans import load  # noqa: E402


def view(name: str) -> QueryView:
    return QueryView.parse(bytes(DNSRecord.question(name).pack()), "127.0.0.1", "udp")


def scenario(**extra) -> Scenario:
    return Scenario.model_validate({"name": "s", "phases": [
        {"name": "p", "duration": "1h", "rules": [
        {"match": {"name": f"h{i}.test"}, "fault": "nxdomain"} for i in range(0, 1000, 10)
    ] + [{"match": {"suffix": "stale.test"}, "fault": {"type": "stale"}}]}], **extra})


def test_the_engine_finds_the_indexed_rule_and_passes_the_others():
    engine = Engine()
    load(engine, scenario(), started_at=100.0, now=100.0)
    assert isinstance(engine.on_query(view("h990.test"), 101.0, Random(1)), Reply)
    assert engine.on_query(view("h991.test"), 101.0, Random(1)) is None
    assert engine.errors == 0


def test_before_the_first_phase_stale_names_are_recorded_without_errors():
    engine = Engine()
    load(engine, scenario(), started_at=200.0, now=100.0)  # the phase starts later
    verdict = engine.on_query(view("a.stale.test"), 101.0, Random(1))
    assert isinstance(verdict, Forward) and verdict.respond is not None
    assert engine.on_query(view("h10.test"), 101.0, Random(1)) is None  # not yet
    assert engine.errors == 0


def test_the_scenario_seed_makes_choices_reproducible():
    def choices(seed: int) -> list[bool]:
        engine = Engine()
        engine.add_run("r", Scenario.model_validate({"name": "s", "seed": seed, "phases": [
            {"name": "p", "duration": "1h", "rules": [
                {"match": {"probability": 0.5}, "fault": "servfail"}]}]}), 0.0, 0.0)
        rng = Random()  # the caller's generator: not used by a seeded run
        return [isinstance(engine.on_query(view(f"q{i}.test"), 1.0, rng), Reply) for i in range(64)]

    assert choices(42) == choices(42)
    assert choices(42) != choices(43)


# --- the screen: what the forwarder may skip without asking the engine ----------------

def raw_name(qname: str) -> bytes:
    data = bytes(DNSRecord.question(qname).pack())
    return data[12:wire.question_end(data) - 4].lower()


def screened_out(engine: Engine, qname: str, now: float) -> bool:
    """What the forwarder does: True when the query goes upstream unseen."""
    return not engine.screen(now).may_select(raw_name(qname))


@pytest.mark.parametrize("seed", range(6))
def test_a_screened_out_query_is_one_the_engine_would_pass(seed):
    """Against the engine itself, over random rules, names and times (phase
    boundaries included): the screen never hides a query a rule selects."""
    rng = random.Random(seed)
    zones = ["a.test", "B.a.test", "c.test", "test", "x\\.y.test"]
    names = [f"h{i}.{rng.choice(zones)}" for i in range(30)]
    names += ["xa.test", "other.example", "a.test"]
    kinds = ["name", "suffix", "both"] * 4 + ["glob", "qtype", "root"]

    def rule() -> dict:
        kind = rng.choice(kinds)
        match = {"name": {"name": rng.sample(names, 2)}, "suffix": {"suffix": rng.choice(zones)},
                 "both": {"name": rng.choice(names), "suffix": rng.choice(zones)},
                 "glob": {"glob": "h1*"}, "qtype": {"qtype": "AAAA"}, "root": {"suffix": "."},
                 }[kind]
        return {"match": match, "fault": rng.choice(["nxdomain", "servfail", "nodata"])}

    phases = [{"name": f"p{i}", "duration": "10s",
               "rules": [rule() for _ in range(rng.randint(0, 6))]}
              for i in range(3)]
    engine = Engine()
    engine.add_run("r", Scenario.model_validate({"name": "s", "phases": phases}), 100.0, 100.0)
    engine.add_rule("adhoc", Rule.model_validate(rule()), 100.0, expires_at=115.0)
    skipped = faulted = 0
    for step in range(400):
        now = 99.0 + step * 0.1  # before, through and after the three phases
        qname = rng.choice(names).upper() if step % 3 == 0 else rng.choice(names)
        hidden = screened_out(engine, qname, now)
        verdict = engine.on_query(view(qname), now, Random(1))
        assert not hidden or verdict is None, (qname, now)
        skipped += hidden
        faulted += isinstance(verdict, Reply)
    assert faulted and (skipped or not engine.screen(120.0).usable)


def test_the_screen_lasts_until_the_phase_ends_and_follows_the_runs():
    engine = Engine()
    engine.add_run("r", Scenario.model_validate({"name": "s", "phases": [
        {"name": "one", "duration": "10s",
         "rules": [{"match": {"name": "a.test"}, "fault": "nxdomain"}]},
        {"name": "two", "duration": "10s",
         "rules": [{"match": {"suffix": "b.test"}, "fault": "nxdomain"}]},
    ]}), 100.0, 100.0)
    first = engine.screen(101.0)
    assert first.usable and first.until == 110.0
    assert screened_out(engine, "b.test", 101.0) and not screened_out(engine, "A.test", 101.0)
    assert engine.screen(109.0) is first  # cached
    assert not screened_out(engine, "x.b.test", 110.0) and screened_out(engine, "a.test", 110.0)
    engine.pause("r", 111.0)
    assert screened_out(engine, "x.b.test", 111.0)  # nothing live
    engine.resume("r", 112.0)
    assert not screened_out(engine, "x.b.test", 112.0)


@pytest.mark.parametrize("rule, dry_run", [
    ({"match": {"glob": "*.test"}, "fault": "nxdomain"}, False),  # not filed under names
    ({"match": {"name": "a.test"}, "fault": {"type": "stale"}}, False),  # records answers
    ({"match": {"name": "a.test"}, "fault": "nxdomain"}, True),  # a dry run sees everything
])
def test_the_screen_is_off_when_the_engine_must_see_every_query(rule, dry_run):
    engine = Engine()
    engine.add_rule("x", Rule.model_validate(rule), 100.0, dry_run=dry_run)
    assert not engine.screen(101.0).usable
    plain = Engine()
    plain.add_rule("x", Rule.model_validate({"match": {"name": "a.test"}, "fault": "nxdomain"}),
                   100.0)
    assert plain.screen(101.0).usable
