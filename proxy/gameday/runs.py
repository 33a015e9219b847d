"""The runs manager: starts, stops, pauses and finishes runs in the engine,
fires schedules, runs probes, writes reports.

How it works: every operation reads the clock through `clock` (injected in
tests) and drives the pure engine and scheduler with that `now`.  A
background task calls `tick()` every TICK seconds: it collects the runs the
engine ended (completed, max duration), starts scheduled runs that are due,
records phase changes, and starts probe monitors.  Ending a run, whatever
the cause, goes through `_finish`: stop it in the engine, release the
queries it holds in a fault's delay (`release(run id)`, the forwarder's
release_delayed), stop its probes, build and write its report, and forget it
in the engine.  Every step is idempotent: a second stop is harmless.

Releases go by engine run id, so one run's end never lets go of another
run's held queries: pausing a run releases that run's; removing or expiring
an ad hoc rule releases that rule's (each ad hoc rule is an engine run of
its own, `rule:<name>`); reset and shutdown release everything.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any

from proxy.core.deps import merge_rows
from proxy.core.engine import Engine
from proxy.core.model import Rule, Scenario, cap_warning, wanted_length
from proxy.core.preview import UpstreamHealth, preflight, preview, selects_nothing
from proxy.core.schedule import Scheduler, format_time, next_start, parse_time
from proxy.gameday.catalog import Catalog, Changes
from proxy.gameday.probes import Checker, ProbeMonitor, check
from proxy.gameday.records import (
    AdhocRecord,
    Conflict,
    EndedRun,
    NotFound,
    Refused,
    RunRecord,
    rule_run,
)
from proxy.gameday.recoveries import RecoveryWatches
from proxy.gameday.report import build_report, write_report
from proxy.runtime import cancel_and_wait

log = logging.getLogger("dnschaos.gameday")

TICK = 0.1
KEEP_REPORTS = 100
KEEP_SKIPPED = 20
KEEP_ENDED = 100
"""Ended runs whose final counts /metrics still shows, at most (the oldest go first)."""




class GameDay:
    def __init__(self, engine: Engine, *, max_run_duration: float = 4 * 3600.0,
                 catalog: Catalog | None = None, report_dir: str | None = None,
                 clock: Callable[[], float] = time.time,
                 release: Callable[[str | None], int] = lambda run: 0,
                 checker: Checker = check, ended_run_retention: float = 600.0,
                 before_tick: Callable[[float], Awaitable[None]] | None = None,
                 deps: Callable[[], dict[str, Any]] | None = None,
                 upstreams: Callable[[], list[UpstreamHealth]] | None = None,
                 recovery_window: float = 600.0) -> None:
        """before_tick(now): awaited by the background loop before each tick
        (with worker processes: gathers the counts of runs about to end).
        deps(): the dependency map's rows (core/deps.py, merged across
        workers); upstreams(): their health, for preflight."""
        self.engine = engine
        self.deps = deps or (lambda: merge_rows([]))
        self.upstreams = upstreams or (lambda: [])
        self.before_tick = before_tick
        self.max_run_duration = max_run_duration
        self.ended_run_retention = ended_run_retention
        self.catalog = catalog or Catalog()
        self.report_dir = report_dir
        self.clock = clock
        self.release = release
        self.checker = checker
        self.scheduler = Scheduler()
        self.runs: dict[str, RunRecord] = {}
        """Live runs (pending, running, paused)."""
        self.rules: dict[str, AdhocRecord] = {}
        self.reports: dict[str, dict[str, Any]] = {}
        """Reports of ended runs, newest last (at most KEEP_REPORTS)."""
        self.recoveries = RecoveryWatches(recovery_window, KEEP_REPORTS, lambda: self.deps(),
                                          self.reports, lambda: self.report_dir)
        """Whether the clients of each ended run come back (gameday/recoveries.py)."""
        self.skipped: list[dict[str, Any]] = []
        """Scheduled starts not made because the scenario's file was refused
        (the last KEEP_SKIPPED)."""
        self.ended_rule_errors = 0
        """Rule errors of every run the engine has forgotten since the start:
        dnschaos_engine_errors_total adds them, so the counter never goes down
        when a run ends."""
        self.ended: dict[str, EndedRun] = {}
        """Final counts of ended runs and removed ad hoc rules, oldest first,
        for `ended_run_retention` seconds after they ended (see ended_runs)."""
        self.finished: dict[str, RunRecord] = {}
        """The records of the runs in `reports` (a control plane rebuilds their
        reports with every instance's counts)."""
        self.on_due: Callable[[Scenario, float], None] | None = None
        """With a control plane: called for each scheduled start that is due,
        instead of starting it here (the fleet's leader appends the start)."""
        self.on_abort: Callable[[str, str], None] | None = None
        """With a control plane: a failed probe's abort, appended to the log."""
        self.on_expired: Callable[[str], None] | None = None
        """With a control plane: an ad hoc rule that expired here (noted in the log)."""
        self.on_counts: Callable[[str, list[Any], list[Any]], None] | None = None
        """With a control plane: a run's final counts here, as it ends."""
        self._task: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()

    # --- scenarios and schedules -----------------------------------------------------

    def reload(self) -> Changes:
        """Re-read the scenario directory and update the schedules."""
        changes = self.catalog.reload()
        self._sync_schedules()
        return changes

    def add_scenario(self, scenario: Scenario, file: str | None = None) -> None:
        self.catalog.add(scenario, file)
        self._sync_schedules()

    def _sync_schedules(self) -> None:
        now = self.clock()
        wanted = {}
        for name, entry in self.catalog.scenarios.items():
            s = entry.scenario
            if s.schedule and s.timezone:
                wanted[name] = s
        for name in list(self.scheduler.entries):
            if name not in wanted:
                self.scheduler.remove(name)
                log.info("schedule of %s removed", name)
        for name, s in wanted.items():
            old = self.scheduler.entries.get(name)
            if old is None or (old.cron, old.tz) != (s.schedule, s.timezone):
                log.info("scenario %s scheduled %r (%s); next start %s", name, s.schedule,
                         s.timezone, format_time(_next(s, now)))
            self.scheduler.set(name, s.schedule, s.timezone, self.run_length(s), now)  # type: ignore[arg-type]

    def run_length(self, scenario: Scenario, max_duration: float | None = None) -> float:
        """The hard maximum duration of a run: the request's, else the scenario's
        max_duration, else its total length; capped by max_run_duration."""
        return min(wanted_length(scenario, max_duration), self.max_run_duration)

    def length_warnings(self, scenario: Scenario, max_duration: float | None = None) -> list[str]:
        """A warning when max_run_duration cuts the run short, else none."""
        warning = cap_warning(f"scenario {scenario.name}", wanted_length(scenario, max_duration),
                              self.max_run_duration)
        return [warning] if warning else []

    # --- runs ---------------------------------------------------------------------------

    def start(self, scenario: str | Scenario, *, at: float | None = None, dry_run: bool = False,
              time_scale: float | None = None, max_duration: float | None = None,
              trigger: str = "api", who: str | None = None) -> RunRecord:
        """Start a run now (or at `at`, wall time).  Its phases follow the wall
        clock from its start."""
        scenario, start, length, warnings = self.prepare_start(
            scenario, at=at, time_scale=time_scale, max_duration=max_duration)
        return self._add(scenario, start, length, dry_run=dry_run, trigger=trigger, who=who,
                         warnings=warnings)

    def prepare_start(self, scenario: str | Scenario, *, at: float | None = None,
                      time_scale: float | None = None, max_duration: float | None = None
                      ) -> tuple[Scenario, float, float, list[str]]:
        """What a start needs, checked: (scenario, start time, hard length,
        warnings); raises as start() does."""
        now = self.clock()
        if isinstance(scenario, str):
            found = self.catalog.get(scenario)
            if found is None:
                raise NotFound(f"no scenario called {scenario!r}")
            stale = self.catalog.stale(scenario)
            if stale is not None:
                raise Refused(scenario, stale, self.catalog.problems.get(stale, []))
            scenario = found
        if time_scale is not None:
            if not time_scale > 0:
                raise ValueError("time_scale must be greater than 0")
            scenario = scenario.model_copy(update={"time_scale": time_scale})
        if max_duration is not None and not max_duration > 0:
            raise ValueError("max_duration must be greater than 0")
        start = now if at is None else at
        length = self.run_length(scenario, max_duration)
        if start + length <= now:
            raise ValueError(f"a run starting at {format_time(start)} would already be over")
        return scenario, start, length, self.length_warnings(scenario, max_duration)

    def _add(self, scenario: Scenario, start: float, length: float, *, dry_run: bool,
             trigger: str, who: str | None, warnings: list[str]) -> RunRecord:
        now = self.clock()
        run_id = self._new_id(scenario.name, start)
        self.engine.add_run(run_id, scenario, start, now, dry_run=dry_run, max_duration=length)
        record = RunRecord(run_id, scenario, dry_run, trigger, who, start, start + length,
                           length, now, warnings)
        self.runs[run_id] = record
        for warning in warnings:
            log.warning("run %s: %s", run_id, warning)
        self._event(record, now, "scheduled" if start > now else "started",
                    f"{trigger}{' by ' + who if who else ''}; phases "
                    f"{scenario.total_duration:.1f}s, limit {length:.1f}s"
                    + ("; dry run" if dry_run else ""))
        log.info("run %s of scenario %s %s%s: %d phases, %.1f s, hard limit %.1f s",
                 run_id, scenario.name, "starts at " + str(format_time(start)) if start > now
                 else "started", " (dry run)" if dry_run else "", len(scenario.phases),
                 scenario.total_duration, length)
        self._observe(record, now)
        return record

    def _new_id(self, name: str, start: float) -> str:
        stamp = datetime.fromtimestamp(start, UTC).strftime("%Y%m%dT%H%M%SZ")
        base = f"{name}-{stamp}"
        run_id, n = base, 1
        while run_id in self.runs or run_id in self.reports or self.engine.get_run(run_id):
            n += 1
            run_id = f"{base}-{n}"
        return run_id

    def resolve(self, ref: str) -> list[RunRecord]:
        """A run id, or a scenario name (its live runs)."""
        if ref in self.runs:
            return [self.runs[ref]]
        found = [r for r in self.runs.values() if r.scenario.name == ref]
        if found:
            return found
        if ref in self.reports or self.catalog.get(ref) is not None:
            return []  # known, but nothing live: stopping again is harmless
        raise NotFound(f"no run or scenario called {ref!r}")

    def stop(self, ref: str, *, reason: str = "stopped", detail: str = "") -> list[str]:
        """Stop runs at once; the ids stopped ([] when already over: harmless)."""
        stopped = []
        for record in self.resolve(ref):
            if self._finish(record, reason, detail):
                stopped.append(record.id)
        return stopped

    def pause(self, ref: str) -> list[str]:
        now = self.clock()
        done = []
        for record in self.resolve(ref):
            if self.engine.pause(record.id, now):
                self._event(record, now, "paused")
                self.release(record.id)
                done.append(record.id)
        return done

    def resume(self, ref: str) -> list[str]:
        now = self.clock()
        done = []
        for record in self.resolve(ref):
            if self.engine.resume(record.id, now):
                self._event(record, now, "resumed")
                done.append(record.id)
        self.tick()
        return done

    def reset(self, *, detail: str = "reset: every fault healed") -> dict[str, list[str]]:
        """Heal everything at once: every run stopped, every ad hoc rule removed."""
        now = self.clock()
        self.engine.reset(now, "reset")  # one step: the very next query sees no fault
        stopped = [r.id for r in list(self.runs.values()) if self._finish(r, "reset", detail)]
        rules = list(self.rules)
        for name in rules:
            self._remove_rule(name)
        self.release(None)  # every run ended: every held query goes
        return {"runs": stopped, "rules": rules}

    async def abort(self, run_id: str, detail: str) -> None:
        record = self.runs.get(run_id)
        if record is not None:
            self._finish(record, "aborted", detail)

    # --- ad hoc rules -------------------------------------------------------------------

    def add_rule(self, name: str, rule: Rule, *, duration: float | None, dry_run: bool = False,
                 who: str | None = None) -> AdhocRecord:
        """An ad hoc rule, first in line, for `duration` seconds (capped by
        max_run_duration; None: the cap)."""
        now = self.clock()
        if not name or "/" in name:
            raise ValueError("a rule needs a name without '/'")
        if name in self.rules:
            raise Conflict(f"a rule called {name!r} exists: remove it first")
        length = min(duration if duration is not None else math.inf, self.max_run_duration)
        if not length > 0:
            raise ValueError("duration must be greater than 0")
        warning = cap_warning(f"rule {name}", duration, self.max_run_duration)
        rule = rule.model_copy(update={"name": name})
        self.engine.add_rule(rule_run(name), rule, now, now + length, dry_run=dry_run)
        record = AdhocRecord(name, rule, dry_run, now, now + length, who,
                             [warning] if warning else [])
        self.rules[name] = record
        log.info("ad hoc rule %s added for %.1f s%s", name, length,
                 " (dry run)" if dry_run else "")
        if warning:
            log.warning("%s", warning)
        return record

    def remove_rule(self, name: str) -> bool:
        if name not in self.rules:
            raise NotFound(f"no rule called {name!r}")
        self._remove_rule(name)
        self.release(rule_run(name))
        return True

    def _remove_rule(self, name: str) -> None:
        record = self.rules.pop(name, None)
        run_id = rule_run(name)
        run = self.engine.get_run(run_id)
        if record is not None and run is not None:
            self._keep_ended(run_id, run.scenario, record.dry_run, self.clock(),
                             self.engine.stats(run_id), self.engine.client_stats(run_id))
        self.engine.forget(run_id)
        log.info("ad hoc rule %s removed", name)


    # --- the clock ------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.clock()
        if self.ended:
            self._expire_ended(now)
        if self.watching():
            self.recoveries.update(now)
        for run_id, reason in self.engine.tick(now):
            record = self.runs.get(run_id)
            if record is not None:
                detail = (f"hard time limit of {record.max_duration:.1f}s reached"
                          if reason == "max_duration" else "")
                self._finish(record, reason, detail)
            elif run_id.startswith("rule:") and run_id[5:] in self.rules:
                log.info("ad hoc rule %s expired", run_id[5:])
                self._remove_rule(run_id[5:])
                self.release(run_id)
                if self.on_expired is not None:
                    self.on_expired(run_id[5:])
        for name, start in self.scheduler.due(now):
            scenario = self.catalog.get(name)
            if scenario is None:
                continue
            stale = self.catalog.stale(name)
            if stale is not None:  # never run the version before a refused edit
                self._skip(name, start, stale)
                continue
            if any(r.scenario.name == name and r.started_at == start for r in self.runs.values()):
                continue
            if self.on_due is not None:
                self.on_due(scenario, start)
                continue
            length = self.run_length(scenario)
            joined = " (rejoining the schedule mid-run)" if now - start > 1.0 else ""
            log.info("schedule of %s fires for %s%s", name, format_time(start), joined)
            self._add(scenario, start, length, dry_run=False, trigger="schedule", who=None,
                      warnings=self.length_warnings(scenario))
        for record in list(self.runs.values()):
            self._observe(record, now)

    def _skip(self, name: str, start: float, file: str) -> None:
        problems = "; ".join(p.render() for p in self.catalog.problems.get(file, []))
        log.error("schedule of %s due at %s skipped: its file %s was changed and refused "
                  "(the version before is not run in its place): %s", name,
                  format_time(start), file, problems)
        self.skipped.append({"scenario": name, "start": format_time(start), "file": file,
                             "error": problems})
        del self.skipped[:-KEEP_SKIPPED]

    def _observe(self, record: RunRecord, now: float) -> None:
        """Phase changes into the timeline and the log; probes once running."""
        run = self.engine.get_run(record.id)
        if run is None or run.ended is not None:
            return
        info = run.phase_info(now) if run.paused_at is None else None
        index = info[0] if info else None
        if index is not None and index != record.phase_seen:
            phase = run.phases[index]
            begin = max(record.added_at, phase.start + run.shift)
            if record.timeline and record.timeline[-1].get("end") is None:
                record.timeline[-1]["end"] = begin
            record.timeline.append({"index": index, "phase": phase.name, "start": begin,
                                    "end": None})
            record.phase_seen = index
            log.info("run %s: phase %d %r begins (%.1f s)", record.id, index + 1, phase.name,
                     info[2])  # type: ignore[index]
        if record.probes is None and record.scenario.probes and now >= record.started_at:
            record.probes = ProbeMonitor(record.scenario.probes,
                                         partial(self._abort_soon, record.id),
                                         self.checker, lambda: self.clock())
            try:
                record.probes.start()
            except RuntimeError:  # no event loop (unit tests driving tick by hand)
                pass

    def _abort_soon(self, run_id: str, why: str) -> None:
        record = self.runs.get(run_id)
        if record is not None and self.on_abort is not None:
            self.on_abort(run_id, why)  # the fleet's run: its stop goes through the log
        elif record is not None:
            self._finish(record, "aborted", why)

    def _finish(self, record: RunRecord, reason: str, detail: str = "") -> bool:
        """End a run for good: no fault from the very next query, held queries
        released, report written.  False when it was already finished."""
        if self.runs.get(record.id) is not record:
            return False
        now = self.clock()
        self.engine.stop_run(record.id, now, reason)
        run = self.engine.get_run(record.id)
        del self.runs[record.id]
        self.release(record.id)
        ended_at = run.ended_at if run is not None and run.ended_at is not None else now
        record.reason, record.detail, record.ended_at = reason, detail, ended_at
        if record.timeline and record.timeline[-1].get("end") is None:
            record.timeline[-1]["end"] = ended_at
        self._event(record, ended_at, reason, detail)
        if record.probes is not None:
            monitor = record.probes
            try:
                task = asyncio.get_running_loop().create_task(monitor.stop())
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            except RuntimeError:
                pass
        stats, clients = self.engine.stats(record.id), self.engine.client_stats(record.id)
        if self.on_counts is not None:
            self.on_counts(record.id, stats, clients)
        record.report = self._report(record, stats, clients)
        if not record.dry_run:
            record.report["recovery"] = self.recoveries.begin(record.id, clients, ended_at)
        self._keep_ended(record.id, record.scenario.name, record.dry_run, ended_at, stats, clients)
        self.engine.forget(record.id)
        self.reports[record.id] = record.report
        self.finished[record.id] = record
        while len(self.reports) > KEEP_REPORTS:
            del self.reports[next(iter(self.reports))]
        while len(self.finished) > KEEP_REPORTS:
            del self.finished[next(iter(self.finished))]
        log.info("run %s ended: %s%s; every fault of it reverted", record.id, reason,
                 f" ({detail})" if detail else "")
        if self.report_dir:
            try:
                paths = write_report(self.report_dir, record.report)
                log.info("report of run %s written to %s", record.id,
                         ", ".join(str(p) for p in paths))
            except OSError as exc:
                log.error("cannot write the report of run %s: %s", record.id, exc)
        return True

    def _report(self, record: RunRecord, stats: list[dict[str, Any]] | None = None,
                clients: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return build_report(record.as_run(),
                            self.engine.stats(record.id) if stats is None else stats,
                            self.engine.client_stats(record.id) if clients is None else clients,
                            record.probes.summary() if record.probes else [])

    # --- preview, preflight, recovery ---------------------------------------------------

    def scenario(self, ref: str | Scenario) -> Scenario:
        if isinstance(ref, Scenario):
            return ref
        found = self.catalog.get(ref)
        if found is None:
            raise NotFound(f"no scenario called {ref!r}")
        return found

    def preview(self, ref: str | Scenario, window: float = 3600.0) -> dict[str, Any]:
        """Who the scenario would hit, from the dependency map of the last
        `window` seconds, with its preflight warnings (core/preview.py)."""
        scenario = self.scenario(ref)
        rows = self.deps()
        result = preview(scenario, rows, self.clock(), window)
        result["preflight"] = preflight(scenario, result, rows, self.upstreams())
        result["preflight"]["selects_nothing"] = selects_nothing(result)
        return result

    def watching(self) -> bool:
        """Whether a recovery window is still open."""
        return self.recoveries.watching()

    def recovery(self, run_id: str) -> dict[str, Any] | None:
        return self.recoveries.summary(run_id)

    def unrecovered(self) -> list[tuple[str, str, int]]:
        """(run, scenario, clients not back yet) of each watched run, while its
        window is open or its other series are kept (ended_run_retention)."""
        return self.recoveries.unrecovered(self.clock(), lambda run_id: run_id in self.ended)

    # --- ended runs' final counts, for /metrics ------------------------------------------

    def _keep_ended(self, run_id: str, scenario: str, dry_run: bool, ended_at: float,
                    stats: list[dict[str, Any]], clients: list[dict[str, Any]]) -> None:
        self.ended.pop(run_id, None)
        self.ended_rule_errors += sum(int(row.get("errors", 0)) for row in stats)
        slim = [{k: v for k, v in row.items() if k not in ("names", "faulted")} for row in clients]
        self.ended[run_id] = EndedRun(run_id, scenario, dry_run, ended_at, stats, slim)
        self._expire_ended(self.clock())

    def _expire_ended(self, now: float) -> None:
        keep = self.ended_run_retention
        for run_id in [r for r, e in self.ended.items() if e.ended_at + keep <= now]:
            del self.ended[run_id]
        while len(self.ended) > KEEP_ENDED:
            del self.ended[next(iter(self.ended))]

    def ended_runs(self, now: float) -> list[EndedRun]:
        """Runs that ended less than `ended_run_retention` seconds before `now`,
        with their final counts (the engine forgets a run when it ends)."""
        self._expire_ended(now)
        return list(self.ended.values())

    def report(self, ref: str) -> dict[str, Any]:
        """The report of an ended run, or the report so far of a live one; `ref`
        is a run id or a scenario name (its latest run)."""
        self.tick()  # a run the engine just ended is finished (and reported) first
        run_id = self.latest_run(ref)
        if run_id in self.reports:
            return self.reports[run_id]
        return self._report(self.runs[run_id])

    def latest_run(self, ref: str) -> str:
        """`ref` if it is a run id, else the id of the scenario `ref`'s run that
        started last (live or ended), else of its run still to start."""
        if ref in self.reports or ref in self.runs:
            return ref
        now = self.clock()
        live = [r for r in self.runs.values() if r.scenario.name == ref]
        started = [(r.started_at, r.added_at, r.id) for r in live if r.started_at <= now]
        started += [(parse_time(report["started_at"]), math.inf, run_id)
                    for run_id, report in self.reports.items() if report["scenario"] == ref]
        if started:
            return max(started)[2]
        if live:
            return min(live, key=lambda r: r.started_at).id
        if self.catalog.get(ref) is not None:
            raise NotFound(f"scenario {ref!r} has no run yet")
        raise NotFound(f"no run or scenario called {ref!r}")

    @contextmanager
    def at(self, now: float) -> Iterator[None]:
        """Read `now` as the clock meanwhile: a control plane applies an entry
        of its log at the entry's own time, so every instance reaches the same
        state."""
        clock = self.clock
        self.clock = lambda: now
        try:
            yield
        finally:
            self.clock = clock

    @staticmethod
    def _event(record: RunRecord, now: float, event: str, detail: str = "") -> None:
        record.events.append({"time": now, "event": event, "detail": detail})

    # --- life cycle ---------------------------------------------------------------------

    def start_background(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="gameday tick")

    async def _loop(self) -> None:
        while True:
            try:
                if self.before_tick is not None:
                    await self.before_tick(self.clock())
                self.tick()
            except Exception:  # noqa: BLE001 - keep ticking; one bad tick must not stop runs ending
                log.exception("game day tick failed")
            await asyncio.sleep(TICK)

    async def close(self) -> None:
        """Shutdown: stop the loop, end every run (reports written), stop probes."""
        await cancel_and_wait(self._task)
        self._task = None
        monitors = [r.probes for r in self.runs.values() if r.probes is not None]
        for record in list(self.runs.values()):
            self._finish(record, "shutdown", "the proxy stopped")
        for name in list(self.rules):
            self._remove_rule(name)
        self.release(None)  # the ad hoc rules' too: nothing is left hanging
        for monitor in monitors:
            await monitor.stop()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def _next(scenario: Scenario, now: float) -> float | None:
    if scenario.schedule and scenario.timezone:
        return next_start(scenario.schedule, scenario.timezone, now)
    return None
