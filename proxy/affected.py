"""Who was affected: client addresses turned into bounded metric labels.

How it works: the engine keeps, per (run, rule, client address), when the
client was first and last hit and how many faults of each type it got
(`engine.client_stats()`).  At scrape time these rows are read and:

- `ClientGroups` names each address: the most specific CIDR of the
  configured `client_groups` map that contains it (`10.1.2.0/24: payments`),
  or else the address itself.  Lookups are cached per address.
- `ClientLabels` bounds the label values: the first `cap` names seen keep
  their own label for the life of the process; every later name is counted
  under `other`.  Names are admitted in order of their earliest `first_seen`
  (ties by name), so the choice does not depend on dict order or scrape
  timing beyond which clients had been seen by then.  A name never moves
  between its own label and `other`, so every counter stays monotonic.
- `affected_counts` counts distinct addresses per (run, scenario, rule), over
  the whole run and over the recent window.

Everything here works on plain row lists, so rows gathered from several
worker processes can be concatenated and fed in unchanged.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from proxy.core.query import client_address

OTHER = "other"
"""The label value of clients past the cap (and of the engine's own overflow)."""

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientGroups:
    """Address -> group name by the most specific matching CIDR, else the address."""

    def __init__(self, groups: Mapping[str, str] | None = None, cache_size: int = 65536) -> None:
        networks = [(ipaddress.ip_network(cidr, strict=False), name)
                    for cidr, name in (groups or {}).items()]
        # Longest prefix first: the first network that contains an address wins.
        networks.sort(key=lambda item: item[0].prefixlen, reverse=True)
        self._v4 = [(n, name) for n, name in networks if n.version == 4]
        self._v6 = [(n, name) for n, name in networks if n.version == 6]
        self._cache: dict[str, str] = {}
        self._cache_size = cache_size

    def __call__(self, client: str) -> str:
        found = self._cache.get(client)
        if found is not None:
            return found
        found = self._lookup(client)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[client] = found
        return found

    def _lookup(self, client: str) -> str:
        if client == OTHER or not (self._v4 or self._v6):
            return client
        try:
            address = client_address(client)  # ::ffff:10.1.2.3 is 10.1.2.3
        except ValueError:
            return client
        for network, name in (self._v4 if address.version == 4 else self._v6):
            if address in network:
                return name
        return client


class ClientLabels:
    """At most `cap` distinct label values; the rest are `other`.  Sticky."""

    def __init__(self, cap: int) -> None:
        self.cap = max(0, cap)
        self._labelled: set[str] = set()
        self._overflow: set[str] = set()

    def admit(self, first_seen: Mapping[str, float]) -> None:
        """Decide for every name not decided yet, earliest first_seen first."""
        new = [n for n in first_seen
               if n not in self._labelled and n not in self._overflow and n != OTHER]
        for name in sorted(new, key=lambda n: (first_seen[n], n)):
            if len(self._labelled) < self.cap:
                self._labelled.add(name)
            else:
                self._overflow.add(name)
                if len(self._overflow) > 100_000:  # only a memo: forgetting keeps them 'other'
                    self._overflow.clear()

    def __call__(self, name: str) -> str:
        return name if name in self._labelled else OTHER

    @property
    def labelled(self) -> frozenset[str]:
        return frozenset(self._labelled)


def _run(row: Mapping[str, Any]) -> str:
    """The row's run id (an engine without runs: its scenario stands for it)."""
    return str(row.get("run") or row.get("scenario") or "")


def _injected(row: Mapping[str, Any]) -> int:
    return sum(int(v) for v in (row.get("faults") or {}).values())


def affected_counts(rows: Iterable[Mapping[str, Any]], now: float, window: float,
                    dry_run: bool = False) -> dict[tuple[str, str, str], tuple[int, int]]:
    """{(run, scenario, rule): (distinct clients over the run, distinct within `window`)}.

    A client counts as affected by a rule when it received at least one of
    its faults (with `dry_run`: the dry-run rows, where the faults are the
    ones that would have been injected).  Recent: the rule selected the
    client within the last `window` seconds.  The engine's overflow row,
    `other`, counts as one client: the numbers are then a lower bound."""
    ever: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    recent: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for row in rows:
        if bool(row.get("dry_run")) != dry_run:
            continue
        if _injected(row) <= 0:
            continue
        key = (_run(row), str(row.get("scenario") or ""), str(row.get("rule") or ""))
        client = str(row.get("client") or OTHER)
        ever[key].add(client)
        if float(row.get("last_seen") or 0.0) >= now - window:
            recent[key].add(client)
    return {key: (len(clients), len(recent.get(key, ()))) for key, clients in ever.items()}


class ClientFaults:
    """Per-client fault counters with bounded labels, from client_stats rows."""

    def __init__(self, groups: Mapping[str, str] | None, cap: int) -> None:
        self.groups = ClientGroups(groups)
        self.labels = ClientLabels(cap)

    def counts(self, rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str, str], int]:
        """{(client label, run, scenario, fault type): faults received}; dry-run rows skipped."""
        live = [row for row in rows if not row.get("dry_run")]
        first_seen: dict[str, float] = {}
        named: list[tuple[str, Mapping[str, Any]]] = []
        for row in live:
            name = self.groups(str(row.get("client") or OTHER))
            seen = float(row.get("first_seen") or 0.0)
            if _injected(row) > 0 and seen < first_seen.get(name, float("inf")):
                first_seen[name] = seen
            named.append((name, row))
        self.labels.admit(first_seen)
        out: dict[tuple[str, str, str, str], int] = defaultdict(int)
        for name, row in named:
            label = self.labels(name)
            run, scenario = _run(row), str(row.get("scenario") or "")
            for fault, count in (row.get("faults") or {}).items():
                if count:
                    out[(label, run, scenario, str(fault))] += int(count)
        return dict(out)
