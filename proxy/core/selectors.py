"""Compile a `Match` into a fast matcher.

How it works: `Selector(match)` turns every key of the match into a small
check on the QueryView, done once when a scenario loads.  `matches(q,
progress, rng)` runs the plain checks first (names, qtype, transport,
clients, listener), then the nested `all` / `any` / `not`, and only then the
sampling keys in this order: `hash`, `every`, `first`, `probability`.  So
`every` and `first` count only queries that every other key selected, and
the random generator is used only when a query got that far.

Names are compared normalized: lower case, without the trailing dot.  A
`glob` is fnmatch-style and `*` also matches dots: '*.example.com' matches
'a.b.example.com' (but not 'example.com' itself).  A `suffix` matches on
label boundaries: 'example.com' matches itself and 'x.example.com', never
'xexample.com'; the root ('' or '.') matches every name.

`Selector(match, sampling=False)` ignores the sampling keys: the engine uses
it to decide, without side effects, which names a stale rule may serve.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterator
from random import Random

from proxy.core.codes import qtype_name, qtype_number
from proxy.core.model import HashSample, Match, Ramp
from proxy.core.query import QueryView, client_address
from proxy.core.sampling import hash_share

Check = Callable[[QueryView], bool]

_CLIENT_CACHE_SIZE = 4096  # distinct client addresses remembered per selector


def normalize_name(name: str) -> str:
    """'Example.COM.' -> 'example.com'; '.' -> '' (the root)."""
    name = name.strip().lower()
    return name[:-1] if name.endswith(".") and not name.endswith("\\.") else name


def label_suffixes(name: str) -> Iterator[str]:
    """The name and each parent on a label boundary, ending with '' (the root):
    'a.b.c' -> 'a.b.c', 'b.c', 'c', ''.  Escaped dots ('\\.') are not boundaries."""
    yield name
    if "\\" not in name:
        pos = name.find(".")
        while pos != -1:
            yield name[pos + 1 :]
            pos = name.find(".", pos + 1)
    else:
        pos = 0
        while pos < len(name):
            if name[pos] == "\\":
                pos += 2 if not name[pos + 1 : pos + 2].isdigit() else 4
                continue
            if name[pos] == ".":
                yield name[pos + 1 :]
            pos += 1
    if name:
        yield ""


class Selector:
    """A compiled `Match`.  Holds the `every` / `first` counters, so each rule
    gets its own Selector."""

    __slots__ = (
        "_all",
        "_any",
        "_checks",
        "_every",
        "_first",
        "_hash",
        "_not",
        "_probability",
        "_sampling",
        "_seen_every",
        "_seen_first",
        "_text",
        "names",
        "zones",
    )

    def __init__(self, match: Match, *, sampling: bool = True) -> None:
        self._checks: tuple[Check, ...] = tuple(_plain_checks(match))
        self._all = tuple(Selector(m, sampling=sampling) for m in match.all or ())
        self._any = tuple(Selector(m, sampling=sampling) for m in match.any or ())
        self._not: Selector | None = None
        # Without sampling, a `not` around a sampled match cannot be decided
        # up front; it is left out (selecting too much is harmless there).
        if match.not_ is not None and (sampling or not _has_sampling(match.not_)):
            self._not = Selector(match.not_, sampling=sampling)
        self._sampling = sampling and _has_own_sampling(match)
        self._hash: HashSample | None = match.hash
        self._every = match.every
        self._first = match.first
        self._probability: float | Ramp | None = match.probability
        self._seen_every = 0
        self._seen_first = 0
        self._text = _describe(match)
        # The top-level name keys, which every selected query must satisfy:
        # the rule index files rules under them.
        self.names = frozenset(normalize_name(n) for n in match.name) if match.name else None
        self.zones = frozenset(normalize_name(s) for s in match.suffix) if match.suffix else None

    def matches(self, q: QueryView, progress: float = 0.0, rng: Random | None = None) -> bool:
        """Does this query match?  `progress` (0..1) is how far the phase has
        gone, for ramps; `rng` draws `probability`."""
        for check in self._checks:
            if not check(q):
                return False
        for sub in self._all:
            if not sub.matches(q, progress, rng):
                return False
        if self._any and not any(sub.matches(q, progress, rng) for sub in self._any):
            return False
        if self._not is not None and self._not.matches(q, progress, rng):
            return False
        if self._sampling:
            return self._sample(q, progress, rng)
        return True

    def _sample(self, q: QueryView, progress: float, rng: Random | None) -> bool:
        if self._hash is not None:
            key = q.client if self._hash.by == "client" else q.qname
            if hash_share(self._hash.seed, key) >= self._hash.share:
                return False
        if self._every is not None:
            self._seen_every += 1
            if self._seen_every % self._every:
                return False
        if self._first is not None:
            if self._seen_first >= self._first:
                return False
            self._seen_first += 1
        if self._probability is not None:
            p = self._probability
            if isinstance(p, Ramp):
                p = p.start + (p.end - p.start) * min(1.0, max(0.0, progress))
            # random() is in [0, 1): p = 0 never selects, p = 1 always does.
            if rng is None or not rng.random() < p:
                return False
        return True

    def describe(self) -> str:
        """One line: 'suffix example.com, qtype A, p=0.3'; 'every query' when empty."""
        return self._text

    def __repr__(self) -> str:
        return f"Selector({self._text})"


# --- the plain (deterministic) checks --------------------------------------


def _plain_checks(match: Match) -> list[Check]:
    checks: list[Check] = []
    if match.transport is not None:
        transport = match.transport
        checks.append(lambda q: q.transport == transport)
    if match.qtype is not None:
        qtypes = frozenset(qtype_number(t) for t in match.qtype)
        checks.append(lambda q: q.qtype in qtypes)
    if match.name is not None:
        names = frozenset(normalize_name(n) for n in match.name)
        checks.append(lambda q: q.qname in names)
    if match.suffix is not None:
        checks.append(_suffix_check(match.suffix))
    if match.glob is not None:
        # One regex for all patterns; fnmatch's '*' also crosses dots.
        pattern = "|".join(fnmatch.translate(normalize_name(g)) for g in match.glob)
        glob = re.compile(pattern)
        checks.append(lambda q: glob.match(q.qname) is not None)
    if match.regex is not None:
        regexes = tuple(re.compile(r) for r in match.regex)
        checks.append(lambda q: any(r.search(q.qname) for r in regexes))
    if match.listener is not None:
        checks.append(_listener_check(match.listener))
    if match.clients is not None or match.exclude_clients is not None:
        checks.append(_client_check(match.clients, match.exclude_clients))
    return checks


def _suffix_check(suffixes: list[str]) -> Check:
    # A set of zones, probed with each label boundary of the name: the cost
    # depends on the name's depth, not on how many zones the rule lists.
    zones = frozenset(normalize_name(s) for s in suffixes)
    if "" in zones:
        return lambda q: True

    def check(q: QueryView) -> bool:
        return any(s in zones for s in label_suffixes(q.qname))

    return check


def _listener_check(listeners: list[str]) -> Check:
    """'127.0.0.2:53' matches that address and port; a bare address
    ('127.0.0.2', '::1') matches it on any port."""
    exact: set[str] = set()
    hosts: set[str] = set()
    for entry in listeners:
        entry = entry.strip()
        try:
            hosts.add(str(ipaddress.ip_address(entry.strip("[]"))))
        except ValueError:
            exact.add(entry)

    def check(q: QueryView) -> bool:
        if q.listener in exact:
            return True
        if hosts:
            return q.listener.rpartition(":")[0].strip("[]") in hosts
        return False

    return check


def _client_check(include: list[str] | None, exclude: list[str] | None) -> Check:
    inc = [ipaddress.ip_network(c) for c in include] if include is not None else None
    exc = [ipaddress.ip_network(c) for c in exclude or ()]
    cache: dict[str, bool] = {}

    def decide(client: str) -> bool:
        try:
            address = client_address(client)
        except ValueError:
            return False
        if inc is not None and not any(address in net for net in inc):
            return False
        return not any(address in net for net in exc)

    def check(q: QueryView) -> bool:
        result = cache.get(q.client)
        if result is None:
            if len(cache) >= _CLIENT_CACHE_SIZE:
                cache.clear()  # bounded: a scan of many addresses cannot grow it
            result = cache[q.client] = decide(q.client)
        return result

    return check


def _has_own_sampling(match: Match) -> bool:
    return (match.probability is not None or match.every is not None
            or match.first is not None or match.hash is not None)


def _has_sampling(match: Match) -> bool:
    nested = [*(match.all or ()), *(match.any or ()), *((match.not_,) if match.not_ else ())]
    return _has_own_sampling(match) or any(_has_sampling(m) for m in nested)


# --- describe ---------------------------------------------------------------


def _describe(match: Match) -> str:
    parts: list[str] = []

    def listed(key: str, values: list[str] | None) -> None:
        if values is not None:
            parts.append(f"{key} {','.join(values)}")

    listed("name", match.name)
    listed("suffix", match.suffix)
    listed("glob", match.glob)
    listed("regex", match.regex)
    if match.qtype is not None:
        parts.append("qtype " + ",".join(qtype_name(qtype_number(t)) for t in match.qtype))
    if match.transport is not None:
        parts.append(match.transport)
    listed("clients", match.clients)
    listed("not clients", match.exclude_clients)
    listed("listener", match.listener)
    for key, subs in (("all", match.all), ("any", match.any)):
        if subs:
            parts.append(f"{key}({'; '.join(_describe(m) for m in subs)})")
    if match.not_ is not None:
        parts.append(f"not({_describe(match.not_)})")
    if match.hash is not None:
        parts.append(f"hash {match.hash.share:g} of {match.hash.by}s")
    if match.every is not None:
        parts.append(f"every {match.every}")
    if match.first is not None:
        parts.append(f"first {match.first}")
    if isinstance(match.probability, Ramp):
        parts.append(f"p={match.probability.start:g}->{match.probability.end:g}")
    elif match.probability is not None:
        parts.append(f"p={match.probability:g}")
    return ", ".join(parts) or "every query"
