"""What the game day keeps of its runs and ad hoc rules, and its errors.

Plain records, filled in by the runs manager (runs.py) and read by the
views (views.py), the report and the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.core.model import Rule, Scenario
from proxy.errors import DnschaosError, FieldProblem
from proxy.gameday.probes import ProbeMonitor


class NotFound(DnschaosError):
    """No such scenario, run or rule."""


class Conflict(DnschaosError):
    """The request conflicts with the current state."""


class Refused(Conflict):
    """The scenario's file was changed and refused: the catalog holds an older
    version, which must not run in its place unnoticed."""

    def __init__(self, name: str, file: str, problems: list[FieldProblem]) -> None:
        self.name, self.file, self.problems = name, file, problems
        super().__init__(
            f"scenario {name!r} is not started: its file {file} was changed and refused "
            "(the proxy still holds the version before it); fix the file, then start "
            "again:\n" + "\n".join(p.render() for p in problems))


@dataclass
class RunRecord:
    id: str
    scenario: Scenario
    dry_run: bool
    trigger: str
    who: str | None
    started_at: float
    """When the run's first phase starts (wall time; in the future for `at`)."""
    hard_end: float
    max_duration: float
    added_at: float
    warnings: list[str] = field(default_factory=list)
    """Why the run is shorter than asked (max_run_duration)."""
    timeline: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    probes: ProbeMonitor | None = None
    reason: str | None = None
    detail: str = ""
    ended_at: float | None = None
    report: dict[str, Any] | None = None
    phase_seen: int | None = None

    def as_run(self) -> dict[str, Any]:
        return {
            "id": self.id, "scenario": self.scenario.name, "dry_run": self.dry_run,
            "trigger": self.trigger, "who": self.who, "started_at": self.started_at,
            "ended_at": self.ended_at, "reason": self.reason, "detail": self.detail,
            "timeline": self.timeline, "events": self.events,
        }


@dataclass(frozen=True)
class EndedRun:
    """The final counts of a run (or ad hoc rule) the engine has forgotten,
    kept so /metrics shows what it counted after the last scrape."""

    run: str
    scenario: str
    dry_run: bool
    ended_at: float
    stats: list[dict[str, Any]]
    """engine.stats(run) as it ended."""
    clients: list[dict[str, Any]]
    """engine.client_stats(run) as it ended, without the names (not in /metrics)."""


@dataclass
class AdhocRecord:
    name: str
    rule: Rule
    dry_run: bool
    added_at: float
    expires_at: float | None
    who: str | None
    warnings: list[str] = field(default_factory=list)


def rule_run(name: str) -> str:
    """The engine run an ad hoc rule lives in: each rule is a run of its own."""
    return f"rule:{name}"
