"""The dependency map: which clients asked for which names, and what the
upstream answered them.  Always on, bounded, cheap per query.

How it works: the forwarder calls `answer(client, question, reply)` when an
upstream's reply comes back (and `timeout(client, question)` when a query
ends in SERVFAIL at its deadline).  The key is the client's address and the
question's raw bytes (name in wire form + type + class, as the client sent
it): two dict look-ups and a few integer increments, nothing decoded.  Names
are decoded, lower-cased and merged only when the map is read (`rows()`),
so a client that varies the case of its names (0x20) costs one entry per
spelling until then.

The clock: `now` is an attribute the transport sets from its periodic sweep
(`tick(now)`, every 50 ms), so first and last seen are accurate to a sweep
and no query reads the clock.  A client's last seen is that of its
latest question entry (queries beyond its names cap are only counted).

Bounds: at most `max_clients` client addresses (queries from later ones are
counted in `clients_overflow`), `max_names` questions per client and
`max_entries` questions over all clients (the rest counted in that client's
`names_overflow`).  One question entry (its list of 10 numbers, its key, its
slot in the dict) takes about 250 bytes (tests/unit/test_deps.py counts it),
so the default bound of 100,000 entries is ~25 MB per process in the worst
case, while a service asking for tens of names costs a few kB.  Each worker
process keeps its own map within the same caps.

Rows are plain JSON-able dicts and lists, so the maps of several worker
processes (and, later, of several proxies) are combined by `merge_rows`.
"""

from __future__ import annotations

from typing import Any

# A question entry is a list: first seen, last seen, last good answer, then
# one count per answer kind (the good ones first: a kind below SERVFAIL is good).
FIRST, LAST, LAST_GOOD = 0, 1, 2
DATA, NODATA, NXDOMAIN, REFUSED, OTHER, SERVFAIL, TIMEOUT = 3, 4, 5, 6, 7, 8, 9
KINDS = ("data", "nodata", "nxdomain", "refused", "other", "servfail", "timeout")
"""The answer kinds in entry order (DATA + i)."""
BAD = ("servfail", "timeout")
"""Answers that mean the name is not resolving (for recovery)."""
_KIND = tuple({0: DATA, 2: SERVFAIL, 3: NXDOMAIN, 5: REFUSED}.get(rcode, OTHER)
              for rcode in range(16))

DEFAULT_MAX_CLIENTS = 10_000
DEFAULT_MAX_NAMES = 1_000
DEFAULT_MAX_ENTRIES = 100_000


class DepMap:
    """Per client address, per question: counts of the upstream's answers."""

    def __init__(self, max_clients: int = DEFAULT_MAX_CLIENTS,
                 max_names: int = DEFAULT_MAX_NAMES,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_clients = max_clients
        self.max_names = max_names
        self.max_entries = max_entries
        self.entries = 0
        """Question entries over all clients (bounded by max_entries)."""
        self.clients: dict[str, dict[bytes, list[float]]] = {}
        """Client address -> question bytes -> entry (see FIRST... TIMEOUT)."""
        self.first_seen: dict[str, float] = {}
        self.names_overflow: dict[str, int] = {}
        """Queries of questions beyond max_names, per client (only clients with some)."""
        self.clients_overflow = 0
        self.now = 0.0

    def tick(self, now: float) -> None:
        """The wall time recorded for the next answers."""
        self.now = now

    def answer(self, client: str, question: bytes, reply: bytes) -> None:
        """The upstream's reply to `client`'s question (question section bytes).
        The reply path calls this per query: one call, two look-ups (`_entry`
        written out, to save a call per query)."""
        names = self.clients.get(client)
        if names is None:
            names = self._new_client(client)
            if names is None:
                return
        entry = names.get(question)
        if entry is None:
            entry = self._new_entry(client, names, question)
            if entry is None:
                return
        kind = _KIND[reply[3] & 15]
        if kind == DATA and not (reply[6] or reply[7]):
            kind = NODATA
        entry[kind] += 1
        entry[LAST] = now = self.now
        if kind < SERVFAIL:
            entry[LAST_GOOD] = now

    def timeout(self, client: str, question: bytes) -> None:
        """No upstream answered within the deadline."""
        entry = self._entry(client, question)
        if entry is not None:
            entry[TIMEOUT] += 1
            entry[LAST] = self.now

    def _entry(self, client: str, question: bytes) -> list[float] | None:
        """The entry of (client, question), made if the caps allow (None: counted)."""
        names = self.clients.get(client)
        if names is None:
            names = self._new_client(client)
            if names is None:
                return None
        return names.get(question) or self._new_entry(client, names, question)

    def _new_client(self, client: str) -> dict[bytes, list[float]] | None:
        if len(self.clients) >= self.max_clients:
            self.clients_overflow += 1
            return None
        self.first_seen[client] = self.now
        names: dict[bytes, list[float]] = {}
        self.clients[client] = names
        return names

    def _new_entry(self, client: str, names: dict[bytes, list[float]],
                   question: bytes) -> list[float] | None:
        if len(names) >= self.max_names or self.entries >= self.max_entries:
            self.names_overflow[client] = self.names_overflow.get(client, 0) + 1
            return None
        self.entries += 1
        now = self.now
        entry: list[float] = [now, now, 0.0, 0, 0, 0, 0, 0, 0, 0]
        names[question] = entry
        return entry

    def clear(self) -> None:
        self.entries = 0
        self.clients.clear()
        self.first_seen.clear()
        self.names_overflow.clear()
        self.clients_overflow = 0

    def rows(self) -> dict[str, Any]:
        """The map as plain data: {"clients": [client row], "clients_overflow": n};
        a client row: client (address), first_seen, last_seen, names_overflow,
        names: [name row]; a name row: name ("www.example.test."), qtype (number),
        queries, first_seen, last_seen, last_good (None: never), answers {kind: n}."""
        out = []
        for address, entries in list(self.clients.items()):
            names: dict[tuple[str, int], dict[str, Any]] = {}
            last = self.first_seen.get(address, 0.0)
            for question, entry in list(entries.items()):
                decoded = decode_question(question)
                last = max(last, entry[LAST])
                if decoded is None:
                    continue
                counts = {k: int(entry[DATA + i]) for i, k in enumerate(KINDS)}
                _add_name(names, {
                    "name": decoded[0], "qtype": decoded[1], "queries": sum(counts.values()),
                    "first_seen": entry[FIRST], "last_seen": entry[LAST],
                    "last_good": entry[LAST_GOOD] or None, "answers": counts,
                })
            out.append({"client": address, "first_seen": self.first_seen.get(address, 0.0),
                        "last_seen": last,
                        "names_overflow": self.names_overflow.get(address, 0),
                        "names": list(names.values())})
        return {"clients": out, "clients_overflow": self.clients_overflow}


def decode_question(question: bytes) -> tuple[str, int] | None:
    """(lower-case name with its trailing dot, qtype) from question bytes;
    None when they do not hold a plain uncompressed name."""
    labels = []
    pos = 0
    end = len(question) - 4
    while pos < end:
        length = question[pos]
        if length == 0:
            break
        if length > 63 or pos + 1 + length > end:
            return None
        raw = question[pos + 1:pos + 1 + length]
        labels.append(raw.decode("ascii", "backslashreplace").lower().replace(".", "\\."))
        pos += 1 + length
    else:
        return None
    if pos + 5 != len(question):
        return None
    qtype = int.from_bytes(question[pos + 1:pos + 3], "big")
    return ".".join(labels) + ".", qtype


def _add_name(names: dict[tuple[str, int], dict[str, Any]], row: dict[str, Any]) -> None:
    """Fold a name row into `names` by (name, qtype): counts summed, times min/max."""
    key = (row["name"], row["qtype"])
    mine = names.get(key)
    if mine is None:
        names[key] = dict(row, answers=dict(row["answers"]))
        return
    mine["queries"] += row["queries"]
    mine["first_seen"] = min(mine["first_seen"], row["first_seen"])
    mine["last_seen"] = max(mine["last_seen"], row["last_seen"])
    if row["last_good"] is not None:
        mine["last_good"] = max(mine["last_good"] or 0.0, row["last_good"])
    for kind, count in row["answers"].items():
        mine["answers"][kind] = mine["answers"].get(kind, 0) + count


def merge_rows(sources: list[dict[str, Any]]) -> dict[str, Any]:
    """Several maps' rows (workers, proxies) as one, by client address and
    (name, qtype)."""
    clients: dict[str, dict[str, Any]] = {}
    names: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    overflow = 0
    for source in sources:
        overflow += int(source.get("clients_overflow", 0))
        for row in source.get("clients", ()):
            address = row["client"]
            mine = clients.get(address)
            if mine is None:
                mine = clients[address] = {k: v for k, v in row.items() if k != "names"}
                names[address] = {}
            else:
                mine["first_seen"] = min(mine["first_seen"], row["first_seen"])
                mine["last_seen"] = max(mine["last_seen"], row["last_seen"])
                mine["names_overflow"] += row["names_overflow"]
            for name in row["names"]:
                _add_name(names[address], name)
    out = [dict(row, names=list(names[address].values())) for address, row in clients.items()]
    return {"clients": out, "clients_overflow": overflow}
