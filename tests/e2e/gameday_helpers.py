"""Helpers for the game-day end-to-end tests: scenario files, API calls."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import dns.rcode
import yaml

from support import zone
from support.dnsutil import make_query, udp
from support.net import wait_until

TOKEN = "s3cret-token-for-tests"

TWO_PHASES = {
    "name": "two-phases",
    "phases": [
        {"name": "nx", "duration": "2s",
         "rules": [{"name": "www-nx", "match": {"name": zone.WWW}, "fault": "nxdomain"}]},
        {"name": "sf", "duration": "2s",
         "rules": [{"name": "www-sf", "match": {"name": zone.WWW}, "fault": "servfail"}]},
    ],
}
LONG = {"name": "long", "phases": [
    {"name": "outage", "duration": "1h",
     "rules": [{"name": "www-nx", "match": {"name": zone.WWW}, "fault": "nxdomain"}]}]}
SLOW = {"name": "slow", "phases": [
    {"name": "slow", "duration": "1h",
     "rules": [{"name": "www-slow", "match": {"name": zone.WWW},
                "fault": {"type": "delay", "delay": "20s"}}]}]}


def write_scenarios(directory: Path, *scenarios: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for scenario in scenarios:
        (directory / f"{scenario['name']}.yaml").write_text(yaml.safe_dump(scenario))
    return directory


def api(proxy: Any, method: str, path: str, body: Any = None, token: str | None = TOKEN,
        user: str = "tester") -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", "X-Dnschaos-User": user}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(proxy.admin_url + path, data=data, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            text = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as err:
        text, status = err.read().decode(), err.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def rcode_of(proxy: Any, name: str = zone.WWW, timeout: float = 2.0) -> int:
    return udp(make_query(name, "A"), proxy.host, proxy.port, timeout=timeout).rcode()


def wait_rcode(proxy: Any, expected: int, timeout: float = 6.0) -> None:
    wait_until(lambda: rcode_of(proxy) == expected, timeout=timeout, interval=0.1,
               what=f"{dns.rcode.to_text(expected)} for {zone.WWW}")


def run_state(proxy: Any, run: str) -> dict:
    status, row = api(proxy, "GET", f"/api/runs/{run}")
    assert status == 200, row
    return row


def wait_state(proxy: Any, run: str, state: str, timeout: float = 8.0) -> dict:
    return wait_until(lambda: (lambda r: r if r["state"] == state else None)(run_state(proxy, run)),
                      timeout=timeout, interval=0.1, what=f"run {run} {state}")  # type: ignore[return-value]
