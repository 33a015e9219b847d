"""Recovery watches of ended runs: for each run, whether the clients it hit
get the upstream's real answers again (core/recovery.py holds the state of
one run; this module keeps one per run, bounded, and writes the report's
final recovery section when a window closes)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from proxy.core.recovery import Recovery, faulted_pairs
from proxy.gameday.report import write_report

log = logging.getLogger("dnschaos.gameday")


class RecoveryWatches:
    def __init__(self, window: float, keep: int, deps: Callable[[], dict[str, Any]],
                 reports: dict[str, dict[str, Any]],
                 report_dir: Callable[[], str | None]) -> None:
        self.window = window
        self.keep = keep
        self.deps = deps
        self.reports = reports
        """The game day's reports by run: each watched run's gets its section."""
        self.report_dir = report_dir
        """Where reports go, read when one is written (a replay turns it off)."""
        self.runs: dict[str, Recovery] = {}
        """The watch of each ended run with clients to watch, oldest first."""

    def begin(self, run_id: str, clients: list[dict[str, Any]], ended_at: float) -> dict[str, Any]:
        """Watch the (client, name) pairs that got faults in a run that just
        ended; returns the report's first recovery section."""
        recovery = Recovery.start(faulted_pairs(clients), self.deps(), ended_at, self.window)
        if not recovery.entries:
            recovery.closed = True  # no client got a fault: nothing to watch
        else:
            self.runs[run_id] = recovery
            while len(self.runs) > self.keep:
                del self.runs[next(iter(self.runs))]
        return recovery.summary()

    def watching(self) -> bool:
        """Whether a recovery window is still open."""
        return any(not r.closed for r in self.runs.values())

    def update(self, now: float) -> None:
        rows = self.deps()
        for run_id, recovery in self.runs.items():
            if recovery.closed:
                continue
            recovery.update(rows, now)
            report = self.reports.get(run_id)
            if report is None:
                continue
            report["recovery"] = recovery.summary()
            directory = self.report_dir()
            if recovery.closed and directory:
                try:
                    write_report(directory, report)  # the final recovery section
                except OSError as exc:
                    log.error("cannot rewrite the report of run %s: %s", run_id, exc)

    def summary(self, run_id: str) -> dict[str, Any] | None:
        recovery = self.runs.get(run_id)
        if recovery is not None:
            return recovery.summary()
        report = self.reports.get(run_id)
        return report.get("recovery") if report is not None else None

    def unrecovered(self, now: float, kept: Callable[[str], bool]) -> list[tuple[str, str, int]]:
        """(run, scenario, clients not back yet) of each watched run, while its
        window is open or `kept(run)` (its other series are still served)."""
        out = []
        for run_id, recovery in self.runs.items():
            if now >= recovery.ended_at + recovery.window and not kept(run_id):
                continue  # window over and the run's other series gone: this one goes too
            report = self.reports.get(run_id)
            scenario = report["scenario"] if report is not None else ""
            out.append((run_id, scenario, recovery.unrecovered()))
        return out
