"""Blast-radius preview and preflight: who a scenario would hit, from the
dependency map, before it starts.

How it works: every (client address, name, qtype) of the map last seen
within the window is shown to each phase's rules as a query would be (the
rule's own compiled `Selector`, without its sampling keys, so the matching
is the engine's).  Rules are tried in order and the first that selects
wins, as in the engine: a rule that selects a query only with a share
(sampling) leaves the rest to the rules after it.  The share of a rule is
its top-level sampling: `probability` (a ramp: its mean), `every` (1/n),
`hash` (decided exactly per client or name, as the engine does); `first`
and `limit.count` cap the rule's expected faults.  Sampling inside nested
`all`/`any`/`not` is counted as selecting (an upper bound).  The map does
not know a query's transport or listener: such keys are taken to match.

`expected_faults` = the queries of the window x the share left by earlier
rules x the rule's share: how many faults the same traffic would get.

Preflight turns the preview into warnings: a rule no client's names reach
(`no_traffic`), a `clients` network with no client ever seen in it
(`unseen_client`), an upstream that is down (`upstream_unhealthy`) or
loops back to the proxy (`loop`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from proxy.core.model import Match, Ramp, Rule, Scenario
from proxy.core.query import QueryView, client_address
from proxy.core.sampling import hash_share
from proxy.core.selectors import Selector, normalize_name


@dataclass(frozen=True, slots=True)
class UpstreamHealth:
    name: str
    up: bool
    looped: bool


def _share(match: Match, client: str, name: str) -> float:
    """The part of selected queries the rule's top-level sampling keeps."""
    share = 1.0
    if match.hash is not None:
        key = client if match.hash.by == "client" else name
        if hash_share(match.hash.seed, key) >= match.hash.share:
            return 0.0
    if match.every is not None:
        share /= match.every
    p = match.probability
    if isinstance(p, Ramp):
        share *= (p.start + p.end) / 2
    elif p is not None:
        share *= p
    return share


def _cap(rule: Rule) -> int | None:
    caps = [c for c in (rule.match.first, rule.limit.count if rule.limit else None)
            if c is not None]
    return min(caps) if caps else None


def preview(scenario: Scenario, rows: dict[str, Any], now: float,
            window: float) -> dict[str, Any]:
    """{scenario, window, phases: [{name, rules: [{name, fault, queries,
    expected_faults, clients: [{client, queries, expected_faults, names:
    [{name, queries, expected_faults}]}]}]}]} (docs/openapi.yaml)."""
    since = now - window
    entries = []  # (client, name without the dot, qtype, queries)
    for client in rows.get("clients", ()):
        for n in client["names"]:
            if n["last_seen"] >= since:
                entries.append((client["client"], normalize_name(n["name"]), n["qtype"],
                                n["queries"]))
    phases = []
    for phase in scenario.phases:
        rules = [(rule, rule.name or f"{phase.name}/{i}", _map_selector(rule.match))
                 for i, rule in enumerate(phase.rules)]
        found: list[dict[str, dict[str, list[float]]]] = [{} for _ in rules]
        for client, name, qtype, queries in entries:
            view = QueryView(b"", 0, name, qtype, client, "udp", "")
            left = 1.0
            for index, (rule, _, selector) in enumerate(rules):
                if left <= 0.0:
                    break
                if not selector.matches(view):
                    continue
                share = _share(rule.match, client, name)
                counts = found[index].setdefault(client, {}).setdefault(name + ".", [0, 0.0])
                counts[0] += queries
                counts[1] += queries * left * share
                left *= 1.0 - share
        out_rules = []
        for (rule, rule_name, _), clients in zip(rules, found, strict=True):
            out_rules.append(_rule_row(rule, rule_name, clients))
        phases.append({"name": phase.name, "rules": out_rules})
    return {"scenario": scenario.name, "window": window, "phases": phases}


def _map_selector(match: Match) -> Selector:
    """The rule's selector without its sampling, and without the keys the map
    does not know (transport, listener): those count as matching, the rest
    must still match."""
    if match.transport is not None or match.listener is not None:
        match = match.model_copy(update={"transport": None, "listener": None})
    return Selector(match, sampling=False)


def _rule_row(rule: Rule, name: str, clients: dict[str, dict[str, list[float]]]
              ) -> dict[str, Any]:
    client_rows: list[dict[str, Any]] = []
    for client, names in clients.items():
        name_rows: list[dict[str, Any]] = [
            {"name": n, "queries": int(c[0]), "expected_faults": round(c[1], 6)}
            for n, c in sorted(names.items(), key=lambda kv: (-kv[1][0], kv[0]))]
        client_rows.append({"client": client, "queries": int(sum(c[0] for c in names.values())),
                            "expected_faults": round(sum(c[1] for c in names.values()), 6),
                            "names": name_rows})
    client_rows.sort(key=lambda r: (-int(r["queries"]), str(r["client"])))
    expected = sum(float(r["expected_faults"]) for r in client_rows)
    cap = _cap(rule)
    if cap is not None:
        expected = min(expected, float(cap))
    return {"name": name, "fault": rule.fault.type,
            "queries": sum(int(r["queries"]) for r in client_rows),
            "expected_faults": round(expected, 6), "clients": client_rows}


def _rule_names(match: Match) -> str:
    parts = [*(match.name or ()), *(f"*.{s}" for s in match.suffix or ()),
             *(match.glob or ()), *(f"/{r}/" for r in match.regex or ())]
    return ", ".join(parts) or "any name"


def _window_text(window: float) -> str:
    if window % 3600 == 0:
        hours = int(window // 3600)
        return "the last hour" if hours == 1 else f"the last {hours} hours"
    if window % 60 == 0:
        minutes = int(window // 60)
        return "the last minute" if minutes == 1 else f"the last {minutes} minutes"
    return f"the last {window:g} s"


def preflight(scenario: Scenario, result: dict[str, Any], rows: dict[str, Any],
              upstreams: Iterable[UpstreamHealth]) -> dict[str, Any]:
    """{ok, warnings: [{kind, rule, message}]} for a preview `result`.  ok:
    no warning.  `no_traffic` for every rule that selects nothing."""
    warnings: list[dict[str, Any]] = []
    window = _window_text(float(result["window"]))
    seen = []
    for client in rows.get("clients", ()):
        try:
            seen.append(client_address(client["client"]))
        except ValueError:
            continue
    for phase, out in zip(scenario.phases, result["phases"], strict=True):
        for rule, row in zip(phase.rules, out["rules"], strict=True):
            label = f"{phase.name}/{row['name']}"
            if not row["clients"]:
                warnings.append({"kind": "no_traffic", "rule": label, "message": (
                    f"no client asked for {_rule_names(rule.match)} in {window}: are clients "
                    "pointed at the proxy? node-local caches, hostNetwork pods and "
                    "application caches bypass it")})
            for cidr in rule.match.clients or ():
                network = ipaddress.ip_network(cidr, strict=False)
                if not any(address in network for address in seen):
                    warnings.append({"kind": "unseen_client", "rule": label, "message": (
                        f"rule {label} selects clients {cidr}, and no client in it has "
                        "queried the proxy")})
    for upstream in upstreams:
        if upstream.looped:
            warnings.append({"kind": "loop", "rule": None, "message": (
                f"upstream {upstream.name} sends queries back to the proxy (a forwarding "
                "loop): it gets no queries")})
        elif not upstream.up:
            warnings.append({"kind": "upstream_unhealthy", "rule": None, "message": (
                f"upstream {upstream.name} is down: faults will be hard to tell from its "
                "failures")})
    return {"ok": not warnings, "warnings": warnings}


def selects_nothing(result: dict[str, Any]) -> list[str]:
    """The rules (phase/rule) of a preview that select no query."""
    return [f"{phase['name']}/{rule['name']}" for phase in result["phases"]
            for rule in phase["rules"] if not rule["clients"]]
