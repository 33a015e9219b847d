"""Counts of several instances as one: what the API, `dnschaos report` and
the report files show with a control plane.  Pure functions over the rows
each instance writes (Engine.stats and Engine.client_stats of one run)."""

from __future__ import annotations

from typing import Any

from proxy.workers.merge import merge_clients


def merge_rule_rows(sources: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-rule rows of one run from every instance: matched, injected and
    errors summed per (phase, rule), in the order the first source has them."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for source in sources:
        for row in source:
            key = (row["phase"], row["rule"])
            mine = merged.get(key)
            if mine is None:
                merged[key] = dict(row)
                continue
            for name in ("matched", "injected", "errors"):
                mine[name] = mine.get(name, 0) + row.get(name, 0)
    return list(merged.values())


def merge_instances(rows: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                                  list[dict[str, Any]]]:
    """{instance: {"stats": [...], "clients": [...]}} -> (rule rows, client
    rows): a client seen by two instances is one row per (phase, rule) with
    its counts summed."""
    ordered = [rows[name] for name in sorted(rows)]
    stats = merge_rule_rows([r.get("stats") or [] for r in ordered])
    clients = merge_clients(None, [r.get("clients") or [] for r in ordered])
    return stats, clients
