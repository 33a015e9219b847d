"""The dependency map as the API shows it: map rows (proxy/core/deps.py,
merged across workers) folded per client or `client_groups` name, filtered
by client, name suffix and time, and turned around per name (`by=name`).

Group names are applied when the map is read, so changing `client_groups`
regroups the data already kept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.core.codes import qtype_name
from proxy.core.selectors import label_suffixes, normalize_name


def client_view(rows: dict[str, Any], group: Callable[[str], str], now: float, *,
                client: str | None = None, suffix: str | None = None,
                since: float | None = None) -> dict[str, Any]:
    """{now, since, clients: [...], clients_overflow} (docs/openapi.yaml)."""
    zone = normalize_name(suffix) if suffix else None
    folded: dict[str, dict[str, Any]] = {}
    for row in rows.get("clients", ()):
        address = row["client"]
        name = group(address)
        if client is not None and client not in (name, address):
            continue
        picked = [n for n in row["names"]
                  if (since is None or n["last_seen"] >= since)
                  and (zone is None or zone in label_suffixes(normalize_name(n["name"])))]
        if not picked and (since is not None or zone is not None):
            continue
        mine = folded.get(name)
        if mine is None:
            mine = folded[name] = {"client": name, "addresses": [], "queries": 0,
                                   "first_seen": row["first_seen"],
                                   "last_seen": row["last_seen"], "names_overflow": 0,
                                   "_names": {}}
        mine["addresses"].append(address)
        mine["first_seen"] = min(mine["first_seen"], row["first_seen"])
        mine["last_seen"] = max(mine["last_seen"], row["last_seen"])
        mine["names_overflow"] += row["names_overflow"]
        for n in picked:
            entry = mine["_names"].get(n["name"])
            if entry is None:
                entry = mine["_names"][n["name"]] = {
                    "name": n["name"], "queries": 0, "qtypes": {},
                    "answers": {}, "first_seen": n["first_seen"], "last_seen": n["last_seen"]}
            entry["queries"] += n["queries"]
            mine["queries"] += n["queries"]
            qtype = qtype_name(n["qtype"])
            entry["qtypes"][qtype] = entry["qtypes"].get(qtype, 0) + n["queries"]
            for kind, count in n["answers"].items():
                entry["answers"][kind] = entry["answers"].get(kind, 0) + count
            entry["first_seen"] = min(entry["first_seen"], n["first_seen"])
            entry["last_seen"] = max(entry["last_seen"], n["last_seen"])
    clients = []
    for mine in sorted(folded.values(), key=lambda c: (-c["queries"], c["client"])):
        mine["addresses"].sort()
        mine["names"] = sorted(mine.pop("_names").values(),
                               key=lambda n: (-n["queries"], n["name"]))
        clients.append(mine)
    return {"now": now, "since": since, "clients": clients,
            "clients_overflow": rows.get("clients_overflow", 0)}


def name_view(view: dict[str, Any]) -> dict[str, Any]:
    """A client view turned around: {now, since, names: [{name, queries,
    clients: [{client, queries}]}]}."""
    names: dict[str, dict[str, Any]] = {}
    for client in view["clients"]:
        for n in client["names"]:
            entry = names.setdefault(n["name"], {"name": n["name"], "queries": 0, "clients": []})
            entry["queries"] += n["queries"]
            entry["clients"].append({"client": client["client"], "queries": n["queries"]})
    for entry in names.values():
        entry["clients"].sort(key=lambda c: (-c["queries"], c["client"]))
    return {"now": view["now"], "since": view["since"],
            "names": sorted(names.values(), key=lambda n: (-n["queries"], n["name"])),
            "clients_overflow": view["clients_overflow"]}
