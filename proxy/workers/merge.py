"""Counts from several workers as one: per (run, rule) counts summed, per
(run, rule, client) fault and name counts summed (first_seen the earliest,
last_seen the latest), forwarder counters and histograms summed; an
upstream is up when any live worker sees it up.  Plain functions over the
picklable snapshots workers send (forwarder_snapshot, Engine.stats,
Engine.client_stats)."""

from __future__ import annotations

from typing import Any

from proxy.config import Settings
from proxy.stats import LATENCY_BUCKETS, Histogram, Stats, UpstreamStats

STAT_FIELDS = tuple(n for n in Stats.__slots__ if n not in ("qtypes", "rcodes", "latency"))
UPSTREAM_FIELDS = ("timeouts", "tcp_requests", "errors", "loops")


def merge_stats(local: list[dict[str, Any]],
                sources: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The local engine's rows (it knows which runs exist) with the counts of
    every source summed in; a source's rows are matched by run and position."""
    rows = [dict(row) for row in local]
    index: dict[tuple[str, int], dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for row in rows:
        n = seen.get(row["run"], 0)
        seen[row["run"]] = n + 1
        index[(row["run"], n)] = row
    for source in sources:
        seen = {}
        for row in source:
            n = seen.get(row["run"], 0)
            seen[row["run"]] = n + 1
            mine = index.get((row["run"], n))
            if mine is None or mine["rule"] != row["rule"]:
                continue  # a run the main process no longer holds
            for key in ("matched", "injected", "errors"):
                mine[key] += row[key]
    return rows


def merge_clients(local: Any, sources: list[list[dict[str, Any]]],
                  run: str | None = None) -> list[dict[str, Any]]:
    """Rows per (run, phase, rule, client): fault and name counts (names,
    faulted) summed, first_seen the earliest, last_seen the latest; only runs
    the local engine holds."""
    merged: dict[tuple, dict[str, Any]] = {}
    for source in sources:
        for row in source:
            if run is not None and row["run"] != run:
                continue
            if local is not None and local.get_run(row["run"]) is None:
                continue
            key = (row["run"], row["phase"], row["rule"], row["client"])
            mine = merged.get(key)
            if mine is None:
                merged[key] = mine = dict(row, faults=dict(row["faults"]),
                                          names=dict(row["names"]),
                                          faulted=dict(row.get("faulted") or {}))
                continue
            mine["first_seen"] = min(mine["first_seen"], row["first_seen"])
            mine["last_seen"] = max(mine["last_seen"], row["last_seen"])
            for part in ("faults", "names", "faulted"):
                counts = mine[part]
                for name, count in (row.get(part) or {}).items():
                    counts[name] = counts.get(name, 0) + count
    return list(merged.values())


class AggregateUpstream:
    """An upstream as every worker sees it: counters summed, up if any sees it up."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = UpstreamStats()
        self.requests = 0
        self.reply_count = 0
        self.up = False
        self.looped = False

    def sent(self) -> int:
        return self.requests

    def replies(self) -> int:
        return self.reply_count


def combine_forwarder(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Several forwarder snapshots as one (counters summed)."""
    total = sum_stats(snapshots)
    qtypes: dict[int, int] = {}
    for snap in snapshots:
        for qtype, count in snap["qtypes"].items():
            qtypes[qtype] = qtypes.get(qtype, 0) + count
    upstreams: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        for row in snap["upstreams"]:
            mine = upstreams.get(row["name"])
            if mine is None:
                upstreams[row["name"]] = dict(row, latency=(list(row["latency"][0]),
                                                            row["latency"][1]))
                continue
            for key in ("sent", "replies", *UPSTREAM_FIELDS):
                mine[key] += row[key]
            counts, seconds = mine["latency"]
            mine["latency"] = ([a + b for a, b in zip(counts, row["latency"][0], strict=False)],
                               seconds + row["latency"][1])
    return {"stats": {name: getattr(total, name) for name in STAT_FIELDS}, "qtypes": qtypes,
            "rcodes": list(total.rcodes),
            "latency": (list(total.latency.counts), total.latency.total),
            "inflight": 0, "upstreams": list(upstreams.values())}


def sum_stats(snapshots: list[dict[str, Any]]) -> Stats:
    total = Stats()
    for snap in snapshots:
        for name, value in snap["stats"].items():
            setattr(total, name, getattr(total, name) + value)
        for qtype, count in snap["qtypes"].items():
            total.qtypes[qtype] += count
        for rcode, count in enumerate(snap["rcodes"]):
            total.rcodes[rcode] += count
        _add_histogram(total.latency, snap["latency"])
    return total


def sum_upstreams(settings: Settings, live: list[dict[str, Any]],
                  retired: list[dict[str, Any]]) -> list[AggregateUpstream]:
    upstreams = {name: AggregateUpstream(name) for name in settings.upstreams}
    for snap, counts_up in [(s, True) for s in live] + [(s, False) for s in retired]:
        for row in snap["upstreams"]:
            upstream = upstreams.get(row["name"])
            if upstream is None:
                continue
            upstream.requests += row["sent"]
            upstream.reply_count += row["replies"]
            for name in UPSTREAM_FIELDS:
                setattr(upstream.stats, name, getattr(upstream.stats, name) + row[name])
            _add_histogram(upstream.stats.latency, row["latency"])
            if counts_up and row["up"]:
                upstream.up = True
            if counts_up and row.get("looped"):
                upstream.looped = True
    return list(upstreams.values())


def _add_histogram(into: Histogram, data: tuple[list[int], float]) -> None:
    counts, total = data
    for i, count in enumerate(counts[:len(LATENCY_BUCKETS) + 1]):
        into.counts[i] += count
    into.total += total


def forwarder_snapshot(forwarder: Any) -> dict[str, Any]:
    """A worker's forwarder counters, as plain picklable data."""
    flush = getattr(forwarder, "flush", None)  # the fast path's counters (test fakes have none)
    if flush is not None:
        flush()
    s = forwarder.stats
    return {
        "stats": {name: getattr(s, name) for name in STAT_FIELDS},
        "qtypes": {i: c for i, c in enumerate(s.qtypes) if c},
        "rcodes": list(s.rcodes),
        "latency": (list(s.latency.counts), s.latency.total),
        "inflight": forwarder.inflight,
        "upstreams": [
            {"name": u.name, "sent": u.sent(), "replies": u.replies(), "up": u.up,
             "looped": u.looped,
             "latency": (list(u.stats.latency.counts), u.stats.latency.total),
             **{name: getattr(u.stats, name) for name in UPSTREAM_FIELDS}}
            for u in forwarder.upstreams],
    }
