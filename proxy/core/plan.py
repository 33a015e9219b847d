"""A run's compiled plan: its rules, phases and timeline, and the counts
kept per rule.  The engine (engine.py) holds runs and decides per query;
this module holds what it decides with.

How it works: `compile_phase` turns a phase's rules into `CompiledRule`s
once, when a run is added (selector, fault, limit; nothing is compiled per
query).  A `Run` keeps its phases in *run time*: run time = wall time -
`shift`, the seconds the run spent paused, so a paused run's phases resume
where they were.  Its `hard_end` stays wall time.  `PhaseState` (what faults
read) holds the phase's start in run time too.

Affected clients are counted per (run, rule, client) in `ClientRecord`s
(see counts.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from random import Random

from proxy.core import wire
from proxy.core.faults import Fault, PhaseState, build_fault
from proxy.core.faults.stale import Stale
from proxy.core.model import Limit, Rule
from proxy.core.rule_index import RuleIndex
from proxy.core.selectors import Selector
from proxy.core.stale import StaleStore

# Run states, as Engine.runs_info() shows them.
PENDING, RUNNING, PAUSED, ENDED = "pending", "running", "paused", "ended"


@dataclass(slots=True)
class Counters:
    """Per-rule counts, plain ints: cheap to bump on every query."""

    matched: int = 0
    """Queries this rule won (selected, within its limit)."""
    injected: int = 0
    """Queries whose fault did something (a verdict other than 'pass untouched');
    for dry runs: would have done something."""
    errors: int = 0
    """Exceptions raised by the fault; the query was forwarded unchanged."""


@dataclass(slots=True)
class ClientRecord:
    """What one client did to one rule."""

    first_seen: float
    last_seen: float
    faults: dict[str, int] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)
    """Names of the queries the rule selected."""
    faulted: dict[str, int] = field(default_factory=dict)
    """Names of the queries its fault changed."""


class Limiter:
    """A rule's `limit`: at most `count` faults in all, at most `per_second`
    (a token bucket holding max(1, per_second) tokens, full at the start)."""

    __slots__ = ("capacity", "rate", "remaining", "stamp", "tokens")

    def __init__(self, limit: Limit) -> None:
        self.remaining = limit.count
        self.rate = limit.per_second
        self.capacity = max(1.0, limit.per_second or 0.0)
        self.tokens = self.capacity
        self.stamp: float | None = None

    def allows(self, now: float) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.rate is None:
            return True
        if self.stamp is None:
            self.stamp = now
        elif now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens >= 1.0 - 1e-9  # float sums like 10 * 0.1 fall just short

    def take(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1
        if self.rate is not None:
            self.tokens -= 1.0


@dataclass(frozen=True, slots=True)
class CompiledRule:
    scenario: str
    phase: str
    phase_index: int
    name: str
    selector: Selector
    fault: Fault
    limiter: Limiter | None
    counters: Counters
    recorder: Selector | None
    """For rules that can serve stale answers: the names whose answers to record."""
    serves_last: bool
    """The rule serves `source: last` answers: its names are not recorded while it is active."""
    run: str = ""
    dry_run: bool = False
    clients: dict[str, ClientRecord] = field(default_factory=dict)
    """Affected clients by address (at most the engine's client_cap, then OTHER)."""

    def describe(self) -> str:
        return f"{self.name}: {self.selector.describe()} -> {self.fault.describe()}"


@dataclass(slots=True)
class CompiledPhase:
    index: int
    name: str
    start: float
    end: float
    rules: tuple[CompiledRule, ...]
    state: PhaseState
    takes_snapshot: bool
    record: tuple[Selector, ...] = ()
    """Names whose answers are recorded during this phase..."""
    unrecorded: tuple[Selector, ...] = ()
    """...except these (the `source: last` rules active now)."""
    rule_index: RuleIndex = field(default_factory=lambda: RuleIndex(()))
    """Finds the rules worth trying for a query name."""

    def progress(self, now: float) -> float:
        if math.isinf(self.end) or self.end <= self.start:
            return 0.0
        return min(1.0, max(0.0, (now - self.start) / (self.end - self.start)))


@dataclass(slots=True)
class Run:
    """One run: a compiled plan and its own timeline.  Times in the plan are
    run time; run time = wall time - `shift` (the seconds spent paused)."""

    id: str
    scenario: str
    adhoc: bool
    dry_run: bool
    seq: int
    started_at: float
    """Wall time the run started (or will start); its order among runs."""
    start: float
    end: float
    """First phase start and last phase end, run time."""
    hard_end: float
    """Wall time at which the run ends whatever else happened (math.inf: never)."""
    phases: tuple[CompiledPhase, ...]
    waiting: CompiledPhase
    """A rule-less pseudo-phase before the first phase starts (it still records)."""
    rules: tuple[CompiledRule, ...]
    shift: float = 0.0
    paused_at: float | None = None
    ended: str | None = None
    """None while live; else why it ended: completed, max_duration, stopped..."""
    ended_at: float | None = None
    current: CompiledPhase | None = None
    reported: bool = False
    """Whether tick() has returned it as ended."""
    rng: Random | None = None
    """The run's own generator, seeded from the scenario's `seed`, so the
    same scenario and queries give the same choices; None: the caller's."""

    @property
    def live(self) -> bool:
        return self.ended is None and self.paused_at is None

    def run_time(self, now: float) -> float:
        return (self.paused_at if self.paused_at is not None else now) - self.shift

    def phase_at(self, t: float, store: StaleStore) -> CompiledPhase | None:
        """The phase for run time `t` (cached); None once past the end."""
        current = self.current
        if current is not None and current.start <= t < current.end:
            return current
        if t >= self.end:
            self.current = None
            return None
        found = self.waiting
        for phase in self.phases:
            if phase.start <= t < phase.end:
                found = phase
                break
        if found.takes_snapshot:
            found.state.snapshot = store.snapshot()
        self.current = found
        return found

    def phase_info(self, now: float) -> tuple[int, str, float] | None:
        t = self.run_time(now)
        for phase in self.phases:
            if phase.start <= t < phase.end:
                return phase.index, phase.name, phase.end - t
        return None

    def state(self, now: float) -> str:
        if self.ended is not None:
            return ENDED
        if self.paused_at is not None:
            return PAUSED
        return PENDING if self.run_time(now) < self.start else RUNNING


@dataclass(frozen=True, slots=True)
class Screen:
    """What the transport may skip between `since` and `until` (wall clock):
    when `usable`, a query whose lower-cased wire-form name is neither in
    `names` nor under one of `zones` would pass the engine untouched, so it
    need not be decoded or shown to it.  Not usable while a dry run, a
    recording phase or a rule that is not filed under names is live."""

    usable: bool
    names: frozenset[bytes]
    zones: frozenset[bytes]
    since: float
    until: float

    def may_select(self, wire_name: bytes) -> bool:
        """Whether a live rule may select a query for this name (lower-cased
        wire form); False: the query can go upstream unseen."""
        return (not self.usable or wire_name in self.names
                or (bool(self.zones) and wire.under_zones(wire_name, self.zones)))


def compile_phase(scenario: str, index: int, name: str, start: float, end: float,
                  rules: list[Rule], store: StaleStore, *, run: str = "",
                  dry_run: bool = False) -> CompiledPhase:
    """A phase's rules compiled; `start` and `end` are run time."""
    compiled = []
    for number, rule in enumerate(rules):
        fault = build_fault(rule.fault, store)
        stale = [f for f in fault.walk() if isinstance(f, Stale)]
        compiled.append(CompiledRule(
            scenario=scenario,
            phase=name,
            phase_index=index,
            name=rule.name or f"{name}/{number}",
            selector=Selector(rule.match),
            fault=fault,
            limiter=Limiter(rule.limit) if rule.limit is not None else None,
            counters=Counters(),
            recorder=Selector(rule.match, sampling=False) if stale else None,
            serves_last=any(not f.snapshot for f in stale),
            run=run,
            dry_run=dry_run,
        ))
    takes_snapshot = any(isinstance(f, Stale) and f.snapshot
                         for rule in compiled for f in rule.fault.walk())
    return CompiledPhase(index, name, start, end, tuple(compiled), PhaseState(start),
                         takes_snapshot, rule_index=RuleIndex(compiled))


def build_screen(runs: Iterable[Run], now: float) -> Screen:
    """What the transport may skip at `now`, given the live runs in rule order."""
    usable = True
    names: set[bytes] = set()
    zones: set[bytes] = set()
    until = math.inf
    for run in runs:
        t = now - run.shift
        if t < run.start:  # not started: its waiting pseudo-phase
            phase: CompiledPhase | None = run.waiting
        else:
            phase = next((p for p in run.phases if p.start <= t < p.end), None)
        if phase is None or now >= run.hard_end:
            usable, until = False, now  # over: on_query ends it, then the runs change
            break
        until = min(until, run.hard_end, phase.end + run.shift)
        index = phase.rule_index
        if run.dry_run or phase.record or not index.screens:
            usable = False
        names |= index.wire_names
        zones |= index.wire_zones
    return Screen(usable, frozenset(names), frozenset(zones), now, until)


def build_run(run_id: str, scenario: str, phases: list[tuple[str, float, float, list[Rule]]],
              store: StaleStore, now: float, *, seq: int, started_at: float, dry_run: bool,
              hard_end: float, adhoc: bool) -> Run:
    """A run compiled from (name, start, end, rules) per phase, in run time."""
    compiled = [compile_phase(scenario, index, *spec, store, run=run_id, dry_run=dry_run)
                for index, spec in enumerate(phases)]
    rules = tuple(rule for phase in compiled for rule in phase.rules)
    # Names that any stale rule of the run may serve are recorded in every
    # phase, except while a `last` rule selecting them is active.
    recorders = () if dry_run else tuple(
        rule.recorder for rule in rules if rule.recorder is not None)
    for phase in compiled:
        phase.record = recorders
        phase.unrecorded = tuple(rule.recorder for rule in phase.rules
                                 if rule.recorder is not None and rule.serves_last
                                 and not dry_run)
    start = min((p.start for p in compiled), default=now)
    end = max((p.end for p in compiled), default=now)
    waiting = CompiledPhase(-1, "", -math.inf, start, (), PhaseState(), False, recorders)
    return Run(run_id, scenario, adhoc, dry_run, seq, started_at, start, end, hard_end,
               tuple(compiled), waiting, rules)
