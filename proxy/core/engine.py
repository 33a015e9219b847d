"""The engine: which rule, if any, applies to a query, and what it does.

How it works: `load` compiles a whole scenario up front (selectors, faults,
limits; nothing is validated or compiled per query) and computes when each
phase starts and ends: phase i starts at started_at + time_scale * (the
durations before it).  `on_query` finds the phase for `now` (cached; looked
up again only when `now` leaves it), walks its rules in file order and the
first rule whose selector matches and whose limit allows decides: its fault
returns a verdict, or None to let the query pass untouched (a flap that is
off), and no later rule is tried.  A rule whose limit is used up is skipped
as if it did not match.  After the last phase nothing applies and `active`
turns False, so the transport skips the engine again.

Stale answers: every rule whose fault can serve stale answers also gets a
side-effect-free copy of its selector (sampling keys ignored) that says
which names to record.  While a scenario runs, queries for those names get
a `Forward(respond=...)` so the upstream's answer comes back through
`on_response` and into the store.  While a `source: last` rule is active,
the names it selects are not recorded, so it keeps serving the answer from
before it became active.  A phase with a `source: snapshot` rule copies the
store when it starts.

Faults fail open: an exception in a fault is counted in the rule's `errors`
and the query is forwarded unchanged (or the answer passed through).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from random import Random
from typing import Any

from proxy.core.faults import Fault, PhaseState, Stale, build_fault
from proxy.core.model import Limit, Rule, Scenario
from proxy.core.query import QueryView
from proxy.core.selectors import Selector
from proxy.core.stale import StaleStore
from proxy.core.verdict import Forward, Verdict

ADHOC = "adhoc"


@dataclass(slots=True)
class Counters:
    """Per-rule counts, plain ints: cheap to bump on every query."""

    matched: int = 0
    """Queries this rule won (selected, within its limit)."""
    injected: int = 0
    """Queries whose fault did something (a verdict other than 'pass untouched')."""
    errors: int = 0
    """Exceptions raised by the fault; the query was forwarded unchanged."""


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

    def progress(self, now: float) -> float:
        if math.isinf(self.end) or self.end <= self.start:
            return 0.0
        return min(1.0, max(0.0, (now - self.start) / (self.end - self.start)))

    def should_record(self, q: QueryView) -> bool:
        return (any(s.matches(q) for s in self.record)
                and not any(s.matches(q) for s in self.unrecorded))


@dataclass(frozen=True, slots=True)
class _Respond:
    """What `on_response` must do with the upstream's answer (opaque to the transport)."""

    fault: Fault | None
    rule: CompiledRule | None
    phase: PhaseState | None
    record: bool


_RECORD_ONLY = Forward(respond=_Respond(None, None, None, True))


@dataclass
class _Plan:
    scenario: str
    start: float
    end: float
    phases: tuple[CompiledPhase, ...]
    waiting: CompiledPhase
    """A rule-less pseudo-phase before the first phase starts (it still records)."""
    rules: tuple[CompiledRule, ...] = field(default=())


class Engine:
    """Applies the loaded scenario's rules to queries and responses.  Pure:
    the caller passes the clock value and the random generator in."""

    def __init__(self, stale_capacity: int = 10_000) -> None:
        self.store = StaleStore(stale_capacity)
        self.active = False
        """False when nothing is loaded (or the scenario is over): the transport skips the engine."""
        self.errors = 0
        """Failures outside any rule's fault (recording stale answers)."""
        self._plan: _Plan | None = None
        self._current: CompiledPhase | None = None

    # --- loading -------------------------------------------------------------------

    def load(self, scenario: Scenario, started_at: float, now: float) -> None:
        """Compile `scenario` and run it from `started_at` (wall-clock seconds)."""
        phases = []
        offset = 0.0
        for phase in scenario.phases:
            start = started_at + offset * scenario.time_scale
            offset += phase.duration
            phases.append((phase.name, start, started_at + offset * scenario.time_scale,
                           phase.rules))
        self._install(scenario.name, phases, now)

    def set_rules(self, rules: list[Rule], phase_started_at: float,
                  phase_duration: float | None = None, now: float | None = None,
                  *, name: str = ADHOC) -> None:
        """Run ad-hoc rules as a one-phase scenario named `name`; no duration: until cleared."""
        end = math.inf if phase_duration is None else phase_started_at + phase_duration
        self._install(name, [(name, phase_started_at, end, rules)],
                      phase_started_at if now is None else now)

    def clear(self) -> None:
        """Revert everything at once: no rules, nothing recorded."""
        self._plan = None
        self._current = None
        self.active = False
        self.store.clear()

    def _install(self, scenario: str, phases: list[tuple[str, float, float, list[Rule]]],
                 now: float) -> None:
        compiled = [self._compile_phase(scenario, index, *spec)
                    for index, spec in enumerate(phases)]
        rules = tuple(rule for phase in compiled for rule in phase.rules)
        # Names that any stale rule of the scenario may serve are recorded in
        # every phase, except while a `last` rule selecting them is active.
        recorders = tuple(rule.recorder for rule in rules if rule.recorder is not None)
        for phase in compiled:
            phase.record = recorders
            phase.unrecorded = tuple(rule.recorder for rule in phase.rules
                                     if rule.recorder is not None and rule.serves_last)
        start = min((p.start for p in compiled), default=now)
        end = max((p.end for p in compiled), default=now)
        waiting = CompiledPhase(-1, "", -math.inf, start, (), PhaseState(), False, recorders)
        self.clear()
        self._plan = _Plan(scenario, start, end, tuple(compiled), waiting, rules)
        if rules:
            self.active = True
            self._phase_at(now)

    def _compile_phase(self, scenario: str, index: int, name: str, start: float, end: float,
                       rules: list[Rule]) -> CompiledPhase:
        compiled = []
        for number, rule in enumerate(rules):
            fault = build_fault(rule.fault, self.store)
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
            ))
        takes_snapshot = any(isinstance(f, Stale) and f.snapshot
                             for rule in compiled for f in rule.fault.walk())
        return CompiledPhase(index, name, start, end, tuple(compiled), PhaseState(start),
                             takes_snapshot)

    # --- phases ----------------------------------------------------------------------

    def _phase_at(self, now: float) -> CompiledPhase | None:
        current = self._current
        if current is not None and current.start <= now < current.end:
            return current
        plan = self._plan
        if plan is None:
            return None
        if now >= plan.end:
            self._current = None
            self.active = False  # the scenario is over: everything reverts
            return None
        found = plan.waiting
        for phase in plan.phases:
            if phase.start <= now < phase.end:
                found = phase
                break
        if found.takes_snapshot:
            found.state.snapshot = self.store.snapshot()
        self._current = found
        return found

    def current_phase(self, now: float) -> tuple[int, str, float] | None:
        """(index, name, seconds left) of the phase running at `now`, or None."""
        if self._plan is None:
            return None
        for phase in self._plan.phases:
            if phase.start <= now < phase.end:
                return phase.index, phase.name, phase.end - now
        return None

    @property
    def scenario(self) -> str | None:
        """The loaded scenario's name."""
        return self._plan.scenario if self._plan is not None else None

    @property
    def ends_at(self) -> float | None:
        """When the loaded scenario is over (math.inf for ad-hoc rules without a duration)."""
        return self._plan.end if self._plan is not None else None

    # --- the hooks ---------------------------------------------------------------------

    def on_query(self, q: QueryView, now: float, rng: Random) -> Verdict | None:
        """The verdict for a query; None: forward it unchanged."""
        try:
            phase = self._phase_at(now)
            if phase is None:
                return None
            verdict: Verdict | None = None
            winner = None
            if phase.rules:
                progress = phase.progress(now)
                for rule in phase.rules:
                    if rule.selector.matches(q, progress, rng) and (
                        rule.limiter is None or rule.limiter.allows(now)
                    ):
                        winner = rule
                        break
            if winner is not None:
                verdict = self._apply(winner, q, now, rng, phase.state)
            record = bool(phase.record) and phase.should_record(q)
            if isinstance(verdict, Forward) and verdict.respond is not None:
                return Forward(verdict.delay, _Respond(verdict.respond, winner, phase.state, record))
            if record and verdict is None:
                return _RECORD_ONLY
            if record and isinstance(verdict, Forward):
                return Forward(verdict.delay, _RECORD_ONLY.respond)
            return verdict
        except Exception:  # noqa: BLE001 - fail open, whatever the bug
            self.errors += 1
            return None

    @staticmethod
    def _apply(rule: CompiledRule, q: QueryView, now: float, rng: Random,
               state: PhaseState) -> Verdict | None:
        rule.counters.matched += 1
        try:
            verdict = rule.fault.apply(q, now, rng, state)
        except Exception:  # noqa: BLE001 - fail open, whatever the bug
            rule.counters.errors += 1
            return None
        if verdict is not None:
            rule.counters.injected += 1
            if rule.limiter is not None:
                rule.limiter.take()
        return verdict

    def on_response(self, q: QueryView, verdict: Forward, wire: bytes, now: float,
                    rng: Random) -> bytes | None:
        """The bytes to send for the upstream's answer `wire` (None: drop)."""
        job = verdict.respond
        if not isinstance(job, _Respond):
            return wire
        if job.record:
            try:
                self.store.record((q.qname, q.qtype), wire)
            except Exception:  # noqa: BLE001 - fail open, whatever the bug
                self.errors += 1
        if job.fault is None:
            return wire
        try:
            return job.fault.respond(q, wire, now, rng, job.phase or PhaseState())
        except Exception:  # noqa: BLE001 - fail open, whatever the bug
            if job.rule is not None:
                job.rule.counters.errors += 1
            else:
                self.errors += 1
            return wire

    # --- reading ------------------------------------------------------------------------

    def rules(self) -> list[CompiledRule]:
        """Every compiled rule of the loaded scenario, phase by phase."""
        return list(self._plan.rules) if self._plan is not None else []

    def describe(self) -> list[str]:
        """One line per rule: 'phase/rule: selector -> fault'."""
        return [f"{rule.phase}: {rule.describe()}" for rule in self.rules()]

    def stats(self) -> list[dict[str, Any]]:
        """Per rule: scenario, phase, phase_index, rule, fault, matched, injected, errors."""
        return [
            {
                "scenario": rule.scenario,
                "phase": rule.phase,
                "phase_index": rule.phase_index,
                "rule": rule.name,
                "fault": rule.fault.type,
                "matched": rule.counters.matched,
                "injected": rule.counters.injected,
                "errors": rule.counters.errors,
            }
            for rule in self.rules()
        ]
