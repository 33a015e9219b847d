"""One plan at a time on an Engine, for the engine and fault tests: what the
engine's retired single-plan API (load, set_rules, clear, current_phase,
scenario, ends_at) did, written over its runs.  The proxy drives the engine
through the game-day manager (proxy/gameday/runs.py) only."""

from __future__ import annotations

import math

from proxy.core.engine import ADHOC, Engine
from proxy.core.model import Rule, Scenario
from proxy.core.plan import Run


def clear(engine: Engine) -> None:
    """Revert everything at once: no runs, nothing recorded."""
    for run_id in engine.run_ids():
        engine.forget(run_id)
    engine.store.clear()


def load(engine: Engine, scenario: Scenario, started_at: float, now: float) -> None:
    """Replace everything with `scenario`, run from `started_at`."""
    clear(engine)
    engine.add_run(scenario.name, scenario, started_at, now)


def set_rules(engine: Engine, rules: list[Rule], phase_started_at: float,
              phase_duration: float | None = None, now: float | None = None,
              *, name: str = ADHOC) -> None:
    """Replace everything with ad hoc rules as a one-phase run named `name`;
    no duration: until cleared."""
    clear(engine)
    end = math.inf if phase_duration is None else phase_started_at + phase_duration
    engine._install(name, name, [(name, phase_started_at, end, rules)],
                    phase_started_at if now is None else now, started_at=phase_started_at,
                    dry_run=False, hard_end=math.inf, adhoc=True)


def current_phase(engine: Engine, now: float) -> tuple[int, str, float] | None:
    """(index, name, seconds left) of the phase running at `now` in the
    first run (in rule order) that has one, or None."""
    for run_id in engine.run_ids():
        run = engine.get_run(run_id)
        if run is not None and (run.ended is None or run.ended == "completed"):
            info = run.phase_info(now)
            if info is not None:
                return info
    return None


def first_run(engine: Engine) -> Run | None:
    ids = engine.run_ids()
    live = [i for i in ids if engine.get_run(i).live]  # type: ignore[union-attr]
    return engine.get_run((live or ids)[0]) if ids else None


def scenario_of(engine: Engine) -> str | None:
    """The first live run's scenario name (else the first run's)."""
    run = first_run(engine)
    return run.scenario if run else None


def ends_at(engine: Engine) -> float | None:
    """When the first run is over (math.inf for ad hoc rules without a duration)."""
    run = first_run(engine)
    return None if run is None else min(run.end + run.shift, run.hard_end)
