"""/metrics of a real proxy (in front of the real unbound) while a short
scenario runs: every metric in the README's table is there, faults are
counted per rule, affected clients are counted right, clients a rule did
not select are absent, and the client label cap and CIDR groups hold.

Clients are told apart by their source address on the loopback network
(127.0.0.2, 127.0.0.3, ...), which Linux routes to lo as a whole /8."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import dns.rcode
import pytest

from support import zone
from support.dnsutil import make_query, udp
from support.net import wait_until

from .gameday_helpers import TOKEN, api, write_scenarios

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

SCENARIO = """\
name: metrics-e2e
phases:
  - name: outage
    duration: 60s
    rules:
      - name: www-nxdomain
        match: {name: www.example.test, clients: [127.0.0.2/32, 127.0.0.3/32]}
        fault: nxdomain
      - name: mx-servfail
        match: {name: example.test, qtype: MX}
        fault: servfail
"""



def readme_metrics() -> dict[str, str]:
    """{metric name: type} from the README's Metrics table."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in
            re.finditer(r"^\| `(dnschaos_\w+)` \| (\w+) \|", section, re.MULTILINE)}


def add_dry_run_rule(proxy) -> bool:
    """A dry-run ad hoc rule over the admin API: SERVFAIL for www, for everyone."""
    request = urllib.request.Request(
        proxy.admin_url + "/api/rules", method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"name": "dry-www", "match": {"name": "www.example.test"},
                         "fault": "servfail", "dry_run": True}).encode())
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 201
    except urllib.error.HTTPError as err:
        raise AssertionError(f"POST /api/rules: {err.code} {err.read().decode()}") from None


AFTER_A_RUN = ("dnschaos_unrecovered_clients",)
WITH_CONTROL = ("dnschaos_control_connected", "dnschaos_control_leader")
"""Served only with `control` set: test_control_e2e.py checks their values."""
"""Metrics with samples only after a run ended (none ends in this test)."""


def ask(proxy, client: str, name: str = zone.WWW, rdtype: str = "A"):
    return udp(make_query(name, rdtype), proxy.host, proxy.port, source=client)


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "metrics-e2e.yaml"
    path.write_text(SCENARIO)
    return path


def test_every_readme_metric_is_served_with_the_right_values(start_proxy, scenario_file) -> None:
    proxy = start_proxy("--scenario", str(scenario_file), config={
        "client_groups": {"127.0.0.3/32": "payments", "127.0.0.96/27": "batch"},
        "client_label_cap": 3,
        "affected_window": "2s",
    })
    assert add_dry_run_rule(proxy)
    # 127.0.0.2 and .3 are selected for www (NXDOMAIN); .4 is not and gets the real answer.
    for _ in range(3):
        assert ask(proxy, "127.0.0.2").rcode() == dns.rcode.NXDOMAIN
    for _ in range(2):
        assert ask(proxy, "127.0.0.3").rcode() == dns.rcode.NXDOMAIN
    real = ask(proxy, "127.0.0.4")
    assert real.rcode() == dns.rcode.NOERROR and real.answer
    # MX SERVFAIL for anyone; first seen in this order, 10 ms apart, so with a cap of 3
    # labels (127.0.0.2 and payments already have two) .5 gets the last one and the
    # batch group (.100, .101) and .6 go to 'other'.
    for client in ("127.0.0.5", "127.0.0.100", "127.0.0.6", "127.0.0.101"):
        assert ask(proxy, client, zone.ORIGIN, "MX").rcode() == dns.rcode.SERVFAIL
        time.sleep(0.01)
    assert ask(proxy, "127.0.0.4", zone.MX_TARGET, "A").rcode() == dns.rcode.NOERROR

    m = proxy.metrics()
    names = {name for name, _ in m}
    text = proxy.metrics_text()
    missing = []
    for metric, kind in readme_metrics().items():
        if metric in names or f"{metric}_bucket" in names:
            continue
        if metric in AFTER_A_RUN and f"# TYPE {metric} " in text:
            continue  # declared; its samples come once a run ended (test_deps_e2e.py)
        if metric in WITH_CONTROL:
            assert f"# TYPE {metric} " not in text  # no control plane here
            continue
        missing.append(f"{metric} ({kind})")
    assert not missing, f"in the README table but not on /metrics: {missing}"

    def get(name: str, **labels: str) -> float | None:
        return m.get((name, frozenset(labels.items())))

    run = next(dict(k)["run"] for n, k in m if n == "dnschaos_run_info"
               and ("scenario", "metrics-e2e") in k)
    assert run.startswith("metrics-e2e-")
    rule = {"run": run, "scenario": "metrics-e2e", "phase": "outage"}
    assert get("dnschaos_faults_injected_total", **rule, rule="www-nxdomain",
               fault="nxdomain") == 5
    assert get("dnschaos_faults_injected_total", **rule, rule="mx-servfail",
               fault="servfail") == 4
    assert get("dnschaos_rule_matches_total", **rule, rule="www-nxdomain", fault="nxdomain") == 5
    assert get("dnschaos_affected_clients", run=run, scenario="metrics-e2e",
               rule="www-nxdomain") == 2
    assert get("dnschaos_affected_clients", run=run, scenario="metrics-e2e",
               rule="mx-servfail") == 4
    assert get("dnschaos_affected_clients_recent", run=run, scenario="metrics-e2e",
               rule="www-nxdomain") == 2
    assert get("dnschaos_active_phase", scenario="metrics-e2e", phase="outage") == 1
    assert get("dnschaos_build_info", version=__import__("proxy").__version__) == 1

    client_faults = {(dict(k)["client"], dict(k)["fault"]): v for (n, k), v in m.items()
                     if n == "dnschaos_client_faults_total"}
    assert client_faults == {
        ("127.0.0.2", "nxdomain"): 3,
        ("payments", "nxdomain"): 2,
        ("127.0.0.5", "servfail"): 1,
        ("other", "servfail"): 3,
    }
    # The dry-run rule saw www from .2, .3 and .4 and changed nothing (.4 got its answer).
    assert proxy.metric("dnschaos_dry_run_matches_total", rule="dry-www") == 6
    assert proxy.metric("dnschaos_dry_run_clients", rule="dry-www") == 3
    # The client no rule selected is nowhere in the client metrics.
    assert "127.0.0.4" not in text

    # The recent window (2 s here) empties while the run-long count stays.
    wait_until(lambda: proxy.metric("dnschaos_affected_clients_recent",
                                    rule="www-nxdomain") == 0, timeout=5,
               what="the recent window to empty")
    assert proxy.metric("dnschaos_affected_clients", rule="www-nxdomain") == 2


def test_no_scenario_no_client_series(start_proxy) -> None:
    """Before any run there are no client series at all; queries pass."""
    proxy = start_proxy()
    assert ask(proxy, "127.0.0.2").rcode() == dns.rcode.NOERROR
    m = proxy.metrics()
    assert not [k for k in m if k[0] in ("dnschaos_client_faults_total",
                                        "dnschaos_affected_clients",
                                        "dnschaos_active_phase")]


# --- ended runs: their series stay, under their run id ---------------------------------


def no_duplicate_samples(text: str) -> list[tuple[str, frozenset]]:
    """Every (name, labels) of the exposition, parsed by prometheus_client;
    fails when two samples share them."""
    from prometheus_client.parser import text_string_to_metric_families

    keys = [(s.name, frozenset(s.labels.items()))
            for family in text_string_to_metric_families(text) for s in family.samples]
    duplicates = {k for k in keys if keys.count(k) > 1}
    assert not duplicates, f"samples with the same name and labels: {sorted(duplicates)}"
    return keys


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ended_run_counts_are_scraped_after_stop_and_runs_stay_apart(
        start_proxy, tmp_path: Path, workers: str) -> None:
    write_scenarios(tmp_path / "scenarios", {"name": "again", "phases": [
        {"name": "outage", "duration": "1h",
         "rules": [{"name": "www-nx", "match": {"name": zone.WWW}, "fault": "nxdomain"}]}]})
    proxy = start_proxy("--scenario-dir", str(tmp_path / "scenarios"), "--workers", workers,
                        config={"admin_token": TOKEN})
    if workers != "1":
        wait_until(lambda: ("dnschaos_worker_queries_total", frozenset({("worker", "1")}))
                   in proxy.metrics(), timeout=5, what="two workers")

    def run_once(queries: int) -> str:
        status, row = api(proxy, "POST", "/api/scenarios/again/start", {})
        assert status == 201, row
        for _ in range(queries):
            assert ask(proxy, "127.0.0.2").rcode() == dns.rcode.NXDOMAIN
        status, body = api(proxy, "POST", f"/api/runs/{row['run']}/stop", {})
        assert status == 200 and body["stopped"] == [row["run"]], body
        return row["run"]

    rule = {"scenario": "again", "phase": "outage", "rule": "www-nx", "fault": "nxdomain"}
    first = run_once(5)
    # Scraped only after the stop: the counts are there, under the run's id.
    assert ask(proxy, "127.0.0.2").rcode() == dns.rcode.NOERROR  # the fault is gone
    m = proxy.metrics()
    assert m.get(("dnschaos_faults_injected_total",
                  frozenset({"run": first, **rule}.items()))) == 5
    assert m.get(("dnschaos_rule_matches_total", frozenset({"run": first, **rule}.items()))) == 5
    assert m.get(("dnschaos_client_faults_total", frozenset(
        {"client": "127.0.0.2", "run": first, "scenario": "again",
         "fault": "nxdomain"}.items()))) == 5
    assert m.get(("dnschaos_run_info", frozenset(
        {"run": first, "scenario": "again", "state": "ended", "phase": "",
         "dry_run": "false"}.items()))) == 1

    second = run_once(3)
    assert second != first
    keys = no_duplicate_samples(proxy.metrics_text())
    injected = {dict(k)["run"]: v for (n, k), v in proxy.metrics().items()
                if n == "dnschaos_faults_injected_total" and ("scenario", "again") in k}
    assert injected == {first: 5, second: 3}
    assert len([k for k in keys if k[0] == "dnschaos_affected_clients"]) == 2
