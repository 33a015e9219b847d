"""When scheduled runs start: cron arithmetic on an injected clock.

How it works: a scenario's `schedule` (cron, five fields, in its explicit
`timezone`) gives its start times.  Everything here takes `now` (Unix
seconds) and returns Unix seconds; nothing reads the clock, so tests move
time by hand.  Because a run's phases are laid out from the *cron time*, not
from when a process noticed it, several proxies given the same file and
schedule move in step without talking to each other, and a proxy restarted
mid-run rejoins the phase the schedule is in (`occurrence_at`).

`Scheduler` keeps, per scheduled scenario, the last start it fired, and is
driven like aioquic's timers: `due(now)` returns the starts that are due,
`next_wakeup(now)` when to call it again.  Only the time-zone database is
read (once per zone, cached by zoneinfo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter


def check_cron(expression: str) -> None:
    """ValueError unless `expression` is a valid five-field cron expression."""
    if len(expression.split()) != 5:
        raise ValueError(f"invalid cron expression {expression!r}: expected five fields "
                         "(minute hour day-of-month month day-of-week), e.g. '0 14 * * TUE'")
    if not croniter.is_valid(expression):
        raise ValueError(f"invalid cron expression {expression!r}")


def check_timezone(name: str) -> None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as "
                         "'UTC' or 'Europe/Paris'") from None


def next_start(cron: str, tz: str, after: float) -> float:
    """The first cron time strictly after `after`."""
    base = datetime.fromtimestamp(after, ZoneInfo(tz))
    return float(croniter(cron, base).get_next(float))


def last_start(cron: str, tz: str, at: float) -> float:
    """The latest cron time at or before `at`."""
    # croniter's get_prev is strict: step just past `at` so a start exactly at `at` counts.
    base = datetime.fromtimestamp(at + 1e-3, ZoneInfo(tz))
    return float(croniter(cron, base).get_prev(float))


def occurrence_at(cron: str, tz: str, now: float, length: float) -> float | None:
    """The start of the occurrence that covers `now` (start <= now < start +
    length), or None when the schedule is between occurrences."""
    start = last_start(cron, tz, now)
    return start if now < start + length else None


def parse_time(text: str) -> float:
    """An ISO 8601 time with an explicit zone ('2026-12-01T14:00Z',
    '2026-12-01T15:00+01:00') as Unix seconds."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: write e.g. 2026-12-01T14:00Z") from None
    if moment.tzinfo is None:
        raise ValueError(f"time {text!r} has no zone: add Z or an offset such as +01:00")
    return moment.timestamp()


def format_time(seconds: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC ('2026-12-01T14:00:00Z')."""
    if seconds is None or math.isinf(seconds):
        return None
    text = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


@dataclass
class Entry:
    cron: str
    tz: str
    length: float
    """How long one occurrence lasts (its hard maximum duration)."""
    fired: float = -math.inf
    """The start last returned by `due`."""


@dataclass
class Scheduler:
    """The scheduled scenarios and which of their starts are due."""

    entries: dict[str, Entry] = field(default_factory=dict)

    def set(self, name: str, cron: str, tz: str, length: float, now: float) -> None:
        """Add or change a schedule.  A new entry whose occurrence covers `now`
        is due at once (a restart rejoins the current phase); a changed one
        keeps what it already fired."""
        old = self.entries.get(name)
        entry = Entry(cron, tz, length)
        if old is not None:
            entry.fired = old.fired
        self.entries[name] = entry

    def remove(self, name: str) -> None:
        self.entries.pop(name, None)

    def due(self, now: float) -> list[tuple[str, float]]:
        """(scenario, start) for each schedule whose occurrence covers `now`
        and was not returned yet; each start is returned once.  A start missed
        altogether (the process was asleep past its whole length) is skipped."""
        out = []
        for name, entry in self.entries.items():
            start = occurrence_at(entry.cron, entry.tz, now, entry.length)
            if start is not None and start > entry.fired:
                entry.fired = start
                out.append((name, start))
        return out

    def next_wakeup(self, now: float) -> float | None:
        """The earliest next start of any schedule (None: nothing scheduled)."""
        starts = [next_start(e.cron, e.tz, now) for e in self.entries.values()]
        return min(starts) if starts else None

    def upcoming(self, name: str, now: float) -> float | None:
        entry = self.entries.get(name)
        return next_start(entry.cron, entry.tz, now) if entry else None
