"""Which rules of a phase are worth trying for a query.

A rule whose match has a top-level `name` or `suffix` key can only select
queries for those names, so it is filed under each name or zone; rules
without either are tried for every query.  `candidates(qname)` costs a dict
lookup for the name and one per label boundary (for the zones), whatever
the number of rules, and returns the rules in file order, so "first
matching rule wins" is unchanged: each candidate still runs its whole
selector.

`wire_names` and `wire_zones` hold the same names in wire form, for the
engine's `Screen`: the forwarder checks a query's raw name against them
without decoding it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.core.selectors import label_suffixes
from proxy.core.wire import name_to_wire


class RuleIndex:
    def __init__(self, rules: Sequence[Any]) -> None:
        self.rules = tuple(rules)
        self.by_name: dict[str, list[int]] = {}
        self.by_zone: dict[str, list[int]] = {}
        self.always: list[int] = []
        for position, rule in enumerate(self.rules):
            selector = rule.selector
            if selector.names is not None:
                for name in selector.names:
                    self.by_name.setdefault(name, []).append(position)
            elif selector.zones is not None and "" not in selector.zones:
                for zone in selector.zones:
                    self.by_zone.setdefault(zone, []).append(position)
            else:
                self.always.append(position)
        self.indexed = bool(self.by_name or self.by_zone)
        # A name with no wire form (an empty label, say) matches no query.
        self.wire_names = frozenset(filter(None, map(name_to_wire, self.by_name)))
        self.wire_zones = frozenset(filter(None, map(name_to_wire, self.by_zone)))

    @property
    def screens(self) -> bool:
        """Whether every rule is filed under names or zones, so that a name
        outside them has no candidate."""
        return not self.rules or (self.indexed and not self.always)

    def candidates(self, qname: str) -> Sequence[Any]:
        """The rules that may select a query for `qname`, in file order."""
        if not self.indexed:
            return self.rules
        found = self.by_name.get(qname)
        positions = list(found) if found else []
        if self.by_zone:
            by_zone = self.by_zone
            for zone in label_suffixes(qname):
                hits = by_zone.get(zone)
                if hits:
                    positions.extend(hits)
        if not positions and not self.always:
            return ()
        positions.extend(self.always)
        if len(positions) > 1:
            positions = sorted(set(positions))
        rules = self.rules
        return [rules[p] for p in positions]
