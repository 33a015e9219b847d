"""Recovery verification: after a run ends, did each client that got faults
for a name come back?

How it works: when a run ends, `Recovery.start` takes the (client address,
name) pairs the run's faults hit and the dependency map's counts for each
as they are then (the baseline).  `update(rows, now)` compares the map with
the baseline: a pair whose count of good answers (anything but SERVFAIL or
a timeout, from the upstream: faults never reach the map) grew is
`recovered`, `after` = its latest good answer - the run's end (exact when
the map is read at least once between the first and second good answer:
the game day reads it every tick); one that only got more SERVFAIL or
timeouts is `failing` (the upstream itself fails; watched on, it may still
recover); one with no new query at all is `watching`, and `unseen` when
the window closes (it stopped asking, crashed, or sits in a negative
cache).  Once the window has closed nothing changes any more."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy.core.deps import BAD

WATCHING, RECOVERED, FAILING, UNSEEN = "watching", "recovered", "failing", "unseen"
MAX_ENTRIES = 10_000
"""Pairs watched per run at most (the first ones, by client and name)."""


def _counts(rows: dict[str, Any]) -> dict[tuple[str, str], tuple[int, int, float]]:
    """(client, name) -> (good answers, bad answers, latest good answer time)."""
    out: dict[tuple[str, str], tuple[int, int, float]] = {}
    for client in rows.get("clients", ()):
        for n in client["names"]:
            key = (client["client"], n["name"])
            bad = sum(n["answers"].get(k, 0) for k in BAD)
            good = n["queries"] - bad
            old = out.get(key, (0, 0, 0.0))
            out[key] = (old[0] + good, old[1] + bad, max(old[2], n["last_good"] or 0.0))
    return out


@dataclass(slots=True)
class Entry:
    client: str
    name: str
    good: int
    bad: int
    status: str = WATCHING
    after: float | None = None


@dataclass(slots=True)
class Recovery:
    ended_at: float
    window: float
    entries: list[Entry] = field(default_factory=list)
    closed: bool = False

    @classmethod
    def start(cls, pairs: Iterable[tuple[str, str]], rows: dict[str, Any], ended_at: float,
              window: float) -> Recovery:
        """pairs: (client address, name with its trailing dot)."""
        counts = _counts(rows)
        entries = []
        for client, name in sorted(set(pairs))[:MAX_ENTRIES]:
            good, bad, _ = counts.get((client, name), (0, 0, 0.0))
            entries.append(Entry(client, name, good, bad))
        return cls(ended_at, window, entries)

    def update(self, rows: dict[str, Any], now: float) -> None:
        if self.closed:
            return
        counts = _counts(rows)
        for entry in self.entries:
            if entry.status == RECOVERED:
                continue
            good, bad, last_good = counts.get((entry.client, entry.name), (0, 0, 0.0))
            if good > entry.good:
                entry.status = RECOVERED
                entry.after = round(max(0.0, last_good - self.ended_at), 3)
            elif bad > entry.bad:
                entry.status = FAILING
        if now >= self.ended_at + self.window:
            self.closed = True
            for entry in self.entries:
                if entry.status == WATCHING:
                    entry.status = UNSEEN

    def unrecovered(self) -> int:
        """Distinct clients with a name not back yet."""
        return len({e.client for e in self.entries if e.status != RECOVERED})

    def summary(self) -> dict[str, Any]:
        return {"window": self.window, "closed": self.closed, "entries": [
            {"client": e.client, "name": e.name, "status": e.status, "after": e.after}
            for e in self.entries]}


def faulted_pairs(client_rows: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(client, name with its dot) of the engine's per-client rows whose
    fault changed at least one answer (the overflow client `other` and the
    overflow name `other` are left out: no one to watch)."""
    pairs = set()
    for row in client_rows:
        if row.get("dry_run") or row["client"] == "other":
            continue
        for name, count in (row.get("faulted") or {}).items():
            if count and name != "other":
                pairs.add((row["client"], name + "."))
    return sorted(pairs)
