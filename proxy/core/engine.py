"""The engine: which rule, if any, applies to a query, and what it does.

How it works: the engine holds several *runs* at once, each with an id, its
own compiled plan and its own clock offset: ad hoc rules (one rule each,
optionally expiring) and scenario runs.  `add_run` compiles a whole
scenario up front (selectors, faults, limits; nothing is validated or
compiled per query) and computes when each phase starts and ends: phase i
starts at started_at + time_scale * (the durations before it).

`on_query` walks the live runs in order -- ad hoc rules first (oldest
first), then scenario runs by start time -- and within a run the rules of
its phase for `now` (cached; looked up again only when `now` leaves it) in
file order.  The first rule across all runs whose selector matches and whose
limit allows decides: its fault returns a verdict, or None to let the query
pass untouched (a flap that is off), and no later rule is tried.  A rule
whose limit is used up is skipped as if it did not match.

Dry runs only watch: every dry run sees every query, its first matching rule
counts the match, the client and the name (and whether its fault would have
done something), and the search for a real rule goes on, so a dry run never
changes an answer, not even by shadowing a real run's rule.

Pause freezes a run's own timeline: while paused it does nothing, and on
resume its phases continue where they were (its clock offset grows by the
pause; faults see this run time, see plan.py).  A paused *scheduled* run
therefore drifts off its schedule.  The hard end (`hard_end`, the maximum
duration) is wall time and ignores pauses: when it is reached the run ends,
whatever else happened.

A run ends when its last phase is over ("completed"), at its hard end
("max_duration"), or when removed.  An ended run applies nothing but keeps
its counters until `forget` drops it.  `active` is True while any run is
live (pending, running) and has rules; otherwise the transport skips the
engine.  `tick(now)` returns the runs that ended since the last call.

Stale answers: every rule whose fault can serve stale answers also gets a
side-effect-free copy of its selector (sampling keys ignored) that says
which names to record.  While such a run is live, queries for those names
get a `Forward(respond=...)` so the upstream's answer comes back through
`on_response` and into the (shared) store.  While a `source: last` rule is
active, the names it selects are not recorded, so it keeps serving the
answer from before it became active.  A phase with a `source: snapshot` rule
copies the store when it starts.

Affected clients are counted per (run, rule, client), bounded (counts.py).

A verdict with a delay carries the id of the run whose rule gave it
(`run`), so the transport can release the queries one run holds when that
run stops or pauses, and leave every other run's alone.

Faults fail open: an exception in a fault is counted in the rule's `errors`
and the query is forwarded unchanged (or the answer passed through).

Replies built here go out in a size the client takes: every Reply for a UDP
query, and every answer a response fault made longer, passes through
`replies.fit_udp` (TC=1 and the question only when too big).  A query whose
EDNS version is above 0 gets BADVERS instead of its rule's fault, as from a
real server, and counts nowhere in the rule (RFC 6891 6.1.3).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from random import Random
from typing import Any

from proxy.core import replies, wire
from proxy.core.counts import client_rows, count_client, rule_rows, run_rows
from proxy.core.faults import Fault, PhaseState
from proxy.core.model import Rule, Scenario
from proxy.core.plan import (
    ENDED,
    CompiledPhase,
    CompiledRule,
    Run,
    Screen,
    build_run,
    build_screen,
)
from proxy.core.query import QueryView
from proxy.core.stale import StaleStore
from proxy.core.verdict import Forward, Reply, Verdict

__all__ = ["ADHOC", "ENDED", "Engine", "Screen"]

ADHOC = "adhoc"

log = logging.getLogger("dnschaos.engine")


@dataclass(frozen=True, slots=True)
class _Respond:
    """What `on_response` must do with the upstream's answer (opaque to the transport)."""

    fault: Fault | None
    rule: CompiledRule | None
    phase: PhaseState | None
    record: bool
    run: Run | None = None


_RECORD_ONLY = Forward(respond=_Respond(None, None, None, True))


class Engine:
    """Applies the rules of every live run to queries and responses.  Pure:
    the caller passes the clock value and the random generator in."""

    def __init__(self, stale_capacity: int = 10_000, client_cap: int = 10_000) -> None:
        self.store = StaleStore(stale_capacity)
        self.client_cap = client_cap
        self.active = False
        """False when no run is live (nothing loaded, all over or paused): the
        transport skips the engine."""
        self.errors = 0
        """Failures outside any rule's fault (recording stale answers)."""
        self._runs: dict[str, Run] = {}
        self._order: tuple[Run, ...] = ()
        """The live runs, in rule order."""
        self._seq = 0
        self._screen: Screen | None = None

    # --- runs ------------------------------------------------------------------------

    def add_run(self, run_id: str, scenario: Scenario, started_at: float, now: float, *,
                dry_run: bool = False, max_duration: float | None = None) -> Run:
        """Compile `scenario` and run it from `started_at` (wall-clock seconds)
        until its end or `started_at + max_duration`, alongside the other runs."""
        phases = []
        offset = 0.0
        for phase in scenario.phases:
            start = started_at + offset * scenario.time_scale
            offset += phase.duration
            phases.append((phase.name, start, started_at + offset * scenario.time_scale,
                           phase.rules))
        hard_end = math.inf if max_duration is None else started_at + max_duration
        run = self._install(run_id, scenario.name, phases, now, started_at=started_at,
                            dry_run=dry_run, hard_end=hard_end, adhoc=False)
        run.rng = Random(scenario.seed)
        return run

    def add_rule(self, run_id: str, rule: Rule, now: float, expires_at: float | None = None, *,
                 dry_run: bool = False) -> Run:
        """One ad hoc rule, applied before any scenario run's, until `expires_at`
        (None: until removed)."""
        end = math.inf if expires_at is None else expires_at
        return self._install(run_id, ADHOC, [(ADHOC, now, end, [rule])], now, started_at=now,
                             dry_run=dry_run, hard_end=end, adhoc=True)

    def stop_run(self, run_id: str, now: float, reason: str = "stopped") -> bool:
        """End a run at once (its counters stay until `forget`).  False when it
        was not live (unknown or already ended): a second stop is harmless."""
        run = self._runs.get(run_id)
        if run is None or run.ended is not None:
            return False
        self._end(run, reason, now)
        self._refresh()
        return True

    def pause(self, run_id: str, now: float) -> bool:
        run = self._runs.get(run_id)
        if run is None or run.ended is not None or run.paused_at is not None:
            return False
        run.paused_at = now
        run.current = None
        self._refresh()
        return True

    def resume(self, run_id: str, now: float) -> bool:
        run = self._runs.get(run_id)
        if run is None or run.ended is not None or run.paused_at is None:
            return False
        run.shift += now - run.paused_at
        run.paused_at = None
        self._refresh()
        self._check(run, now)
        self._refresh()
        return True

    def forget(self, run_id: str) -> bool:
        """Drop a run and its counters (stopping it first if it is live)."""
        run = self._runs.pop(run_id, None)
        if run is None:
            return False
        if run.ended is None:
            run.ended = "removed"
        self._refresh()
        return True

    def reset(self, now: float, reason: str = "reset") -> list[str]:
        """End every live run at once; the ids ended."""
        ended = [run.id for run in self._runs.values() if run.ended is None]
        for run_id in ended:
            self._end(self._runs[run_id], reason, now)
        self._refresh()
        return ended

    def tick(self, now: float) -> list[tuple[str, str]]:
        """Move every run to `now`; (run id, reason) of each run that ended
        since the last call (each returned once)."""
        for run in list(self._runs.values()):
            self._check(run, now)
        self._refresh()
        out = []
        for run in self._runs.values():
            if run.ended is not None and not run.reported:
                run.reported = True
                out.append((run.id, run.ended))
        return out

    def get_run(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    def run_ids(self) -> list[str]:
        return [run.id for run in self._sorted(self._runs.values())]

    # --- building ----------------------------------------------------------------------

    def _install(self, run_id: str, scenario: str,
                 phases: list[tuple[str, float, float, list[Rule]]], now: float, *,
                 started_at: float, dry_run: bool, hard_end: float, adhoc: bool) -> Run:
        old = self._runs.get(run_id)
        if old is not None and old.ended is None:
            raise ValueError(f"a run called {run_id!r} is already running")
        self._seq += 1
        run = build_run(run_id, scenario, phases, self.store, now, seq=self._seq,
                        started_at=started_at, dry_run=dry_run, hard_end=hard_end, adhoc=adhoc)
        rules = run.rules
        self._runs.pop(run_id, None)
        self._runs[run_id] = run
        if not rules:
            run.ended = "completed"  # nothing to do
            run.ended_at = now
        else:
            self._check(run, now)
        self._refresh()
        return run

    # --- run state ----------------------------------------------------------------------

    @staticmethod
    def _sorted(runs: Iterable[Run]) -> list[Run]:
        """Rule order: ad hoc rules first (oldest first), then runs by start time."""
        return sorted(runs, key=lambda r: (not r.adhoc, 0.0 if r.adhoc else r.started_at, r.seq))

    def _refresh(self) -> None:
        self._order = tuple(self._sorted(r for r in self._runs.values() if r.live))
        self.active = bool(self._order)
        self._screen = None

    def _end(self, run: Run, reason: str, now: float) -> None:
        run.ended = reason
        run.ended_at = now
        run.current = None

    def _check(self, run: Run, now: float) -> None:
        """End `run` if its hard end or its last phase is behind `now`."""
        if run.ended is not None:
            return
        done = run.paused_at is None and run.run_time(now) >= run.end
        if done and run.end + run.shift <= run.hard_end:
            self._end(run, "completed" if not run.adhoc else "expired", run.end + run.shift)
        elif now >= run.hard_end:
            self._end(run, "max_duration" if not run.adhoc else "expired", run.hard_end)

    # --- the hooks ---------------------------------------------------------------------

    def screen(self, now: float) -> Screen:
        """The names the engine may act on at `now` (cached until the runs
        change or a phase starts or ends).  Lets the transport skip decoding
        and `on_query` for most queries."""
        screen = self._screen
        if screen is None or not screen.since <= now < screen.until:
            screen = self._screen = build_screen(self._order, now)
        return screen

    def on_query(self, q: QueryView, now: float, rng: Random) -> Verdict | None:
        """The verdict for a query; None: forward it unchanged."""
        try:
            verdict: Verdict | None = None
            winner: CompiledRule | None = None
            winner_run: Run | None = None
            winner_state: PhaseState | None = None
            record = False
            unrecord = False
            changed = False
            for run in self._order:
                if now >= run.hard_end:
                    self._check(run, now)
                    changed = True
                    continue
                t = now - run.shift  # run time: what the run's phases and faults count in
                phase = run.phase_at(t, self.store)
                if phase is None:
                    self._check(run, now)
                    changed = True
                    continue
                draw = run.rng or rng
                if run.dry_run:
                    if phase.rules:
                        self._observe(phase, q, t, now, draw)
                    continue
                candidates = phase.rule_index.candidates(q.qname) if winner is None else ()
                if candidates:
                    progress = phase.progress(t)
                    for rule in candidates:
                        if rule.selector.matches(q, progress, draw) and (
                            rule.limiter is None or rule.limiter.allows(t)
                        ):
                            winner, winner_run, winner_state = rule, run, phase.state
                            break
                    if winner is not None:
                        verdict = self._apply(winner, q, t, now, draw, phase.state)
                if phase.record:
                    if any(s.matches(q) for s in phase.record):
                        record = True
                    if phase.unrecorded and any(s.matches(q) for s in phase.unrecorded):
                        unrecord = True
            if changed:
                self._refresh()
            record = record and not unrecord
            # A delayed verdict names its run, so that stopping the run lets
            # go of the queries it holds, and only those.
            held = None
            if verdict is not None and verdict.delay > 0 and winner is not None:
                held = winner.run
            if isinstance(verdict, Forward) and verdict.respond is not None:
                return Forward(verdict.delay, _Respond(verdict.respond, winner, winner_state,
                                                       record, winner_run), held)
            if record and verdict is None:
                return _RECORD_ONLY
            if record and isinstance(verdict, Forward):
                return Forward(verdict.delay, _RECORD_ONLY.respond, held)
            if type(verdict) is Reply and q.transport == "udp":
                fitted = replies.fit_udp(verdict.wire, q.wire, q.qend)
                if fitted is not verdict.wire:
                    verdict = Reply(fitted, verdict.delay)
            if held is not None and verdict is not None:  # held implies a verdict
                return dataclasses.replace(verdict, run=held)
            return verdict
        except Exception:  # noqa: BLE001 - fail open, whatever the bug
            self._failed(None, "a query")
            return None

    def _failed(self, rule: CompiledRule | None, what: str) -> None:
        """Count a failure inside the engine or a rule's fault, and log it with
        its traceback the 1st, 10th, 100th... time (a bug may fire per query)."""
        if rule is not None:
            rule.counters.errors += 1
            count, who = rule.counters.errors, f"rule {rule.name!r}"
        else:
            self.errors += 1
            count, who = self.errors, "the fault engine"
        if str(count).rstrip("0") == "1":
            log.error("%s failed on %s (failure %d); passed through unchanged", who, what,
                      count, exc_info=True)

    def _apply(self, rule: CompiledRule, q: QueryView, t: float, now: float, rng: Random,
               state: PhaseState) -> Verdict | None:
        if wire.edns_version(q.wire, q.qend):
            # An EDNS version we do not speak: a real server answers BADVERS
            # before looking at the question (RFC 6891 6.1.3), so the fault
            # is not applied and nothing is counted.
            return Reply(replies.empty_reply(q, wire.BADVERS))
        rule.counters.matched += 1
        try:
            verdict = rule.fault.apply(q, t, rng, state)
        except Exception:  # noqa: BLE001 - fail open, whatever the bug
            self._failed(rule, "a query")
            self._count_client(rule, q, now, None)
            return None
        if verdict is not None:
            rule.counters.injected += 1
            if rule.limiter is not None:
                rule.limiter.take()
        self._count_client(rule, q, now, rule.fault.type if verdict is not None else None)
        return verdict

    def _observe(self, phase: CompiledPhase, q: QueryView, t: float, now: float,
                 rng: Random) -> None:
        """A dry run: count what its first matching rule would have done."""
        progress = phase.progress(t)
        for rule in phase.rule_index.candidates(q.qname):
            if rule.selector.matches(q, progress, rng) and (
                rule.limiter is None or rule.limiter.allows(t)
            ):
                self._apply(rule, q, t, now, rng, phase.state)  # the verdict is thrown away
                return

    def _count_client(self, rule: CompiledRule, q: QueryView, now: float,
                      fault: str | None) -> None:
        count_client(rule.clients, q, now, fault, self.client_cap)

    def on_response(self, q: QueryView, verdict: Forward, answer: bytes, now: float,
                    rng: Random) -> bytes | None:
        """The bytes to send for the upstream's answer (None: drop)."""
        job = verdict.respond
        if not isinstance(job, _Respond):
            return answer
        if job.record:
            try:
                self.store.record((q.qname, q.qtype), answer)
            except Exception:  # noqa: BLE001 - fail open, whatever the bug
                self._failed(None, "recording an answer")
        if job.fault is None:
            return answer
        run = job.run
        if run is not None and not run.live:
            return answer  # stopped (or paused) since the query went out: no fault any more
        try:
            t = now - run.shift if run is not None else now
            draw = (run.rng if run is not None else None) or rng
            out = job.fault.respond(q, answer, t, draw, job.phase or PhaseState())
            if out is not None and len(out) > len(answer) and q.transport == "udp":
                # Rewritten longer than the upstream sized it for this client.
                out = replies.fit_udp(out, q.wire, q.qend)
            return out
        except Exception:  # noqa: BLE001 - fail open, whatever the bug
            self._failed(job.rule, "an answer")
            return answer

    # --- reading ------------------------------------------------------------------------

    def rules(self, run: str | None = None) -> list[CompiledRule]:
        """Every compiled rule of every run (or of `run`), in rule order."""
        return [rule for r in self._sorted(self._runs.values())
                if run is None or r.id == run for rule in r.rules]

    def describe(self) -> list[str]:
        """One line per rule: 'phase/rule: selector -> fault'."""
        return [f"{rule.phase}: {rule.describe()}" for rule in self.rules()]

    def stats(self, run: str | None = None) -> list[dict[str, Any]]:
        """Per rule: run, scenario, phase, phase_index, rule, fault, dry_run,
        matched, injected, errors."""
        return rule_rows(self.rules(run))

    def client_stats(self, run: str | None = None) -> list[dict[str, Any]]:
        """Per (run, rule, client): run, scenario, phase, rule, client, dry_run,
        first_seen, last_seen, faults {type: count}, names {name: count} (queries
        selected), faulted {name: count} (queries the fault changed)."""
        return client_rows(self.rules(run))

    def runs_info(self, now: float) -> list[dict[str, Any]]:
        """Per run: run, scenario, state, dry_run, phase, phase_index, remaining
        (seconds left in the phase; None outside a phase)."""
        return run_rows(self._sorted(self._runs.values()), now)
