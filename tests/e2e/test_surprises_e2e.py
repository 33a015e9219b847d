"""What the proxy no longer does silently: run the old version of a scenario
whose newest file was refused, cut a run or rule to max_run_duration without
a word, fault every name for a rule that forgot its selector."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dns.rcode
import pytest

from support import zone

from .gameday_helpers import LONG, TOKEN, api, rcode_of, write_scenarios

ROOT = Path(__file__).resolve().parents[2]
NX, OK, SF = dns.rcode.NXDOMAIN, dns.rcode.NOERROR, dns.rcode.SERVFAIL


@pytest.fixture(scope="module")
def proxy(start_module_proxy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("surprises")
    write_scenarios(tmp / "scenarios", LONG)
    proxy = start_module_proxy("--scenario-dir", str(tmp / "scenarios"),
                               "--max-run-duration", "30m", config={"admin_token": TOKEN})
    proxy.scenarios = tmp / "scenarios"
    return proxy


def cli(proxy, *args: str):
    return subprocess.run([sys.executable, "-m", "proxy", *args, "--admin", proxy.admin_url,
                           "--token", TOKEN], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)


def reload(proxy) -> dict:
    status, out = api(proxy, "POST", "/api/reload", {})
    assert status == 200, out
    return out


def test_a_refused_edit_refuses_the_start(proxy):
    file = proxy.scenarios / "edited.yaml"
    good = (f"name: edited\nphases:\n  - name: outage\n    duration: 1h\n"
            f"    rules: [{{match: {{name: {zone.WWW}}}, fault: nxdomain}}]\n")
    line = 4  # of the duration
    file.write_text(good)
    reload(proxy)
    status, run = api(proxy, "POST", "/api/scenarios/edited/start", {})
    assert status == 201 and rcode_of(proxy) == NX  # the valid version runs
    api(proxy, "POST", "/api/reset", {})
    file.write_text(good.replace("duration: 1h", "duration: soon"))
    assert str(file) in reload(proxy)["errors"]
    status, out = api(proxy, "POST", "/api/scenarios/edited/start", {})
    assert status == 409, out
    assert out["file"] == str(file)
    ((problem),) = out["problems"]
    assert (problem["line"], problem["field"]) == (line, "phases[0].duration")
    assert f"{file}:{line}: phases[0].duration: invalid duration 'soon'" in out["error"]
    assert rcode_of(proxy) == OK  # nothing started
    assert api(proxy, "GET", "/api/scenarios/edited")[1]["refused_file"] == str(file)
    # The CLI prints the file's error and fails.
    proc = cli(proxy, "scenario", "start", "edited")
    assert proc.returncode != 0 and "HTTP 409" in proc.stderr
    assert f"{file}:{line}: phases[0].duration" in proc.stderr
    assert rcode_of(proxy) == OK
    # Another scenario is not affected; the fixed file starts again.
    assert api(proxy, "POST", "/api/scenarios/long/start", {})[0] == 201
    api(proxy, "POST", "/api/reset", {})
    file.write_text(good)
    reload(proxy)
    assert api(proxy, "POST", "/api/scenarios/edited/start", {})[0] == 201
    api(proxy, "POST", "/api/reset", {})


def test_a_run_cut_by_max_run_duration_says_so(proxy):
    status, run = api(proxy, "POST", "/api/scenarios/long/start", {})
    assert status == 201
    assert run["warnings"] == [
        "scenario long asks for 1h but max_run_duration is 30m: it stops after 30m"]
    assert run["max_duration"] == 1800 and 1790 < run["time_left"] <= 1800
    api(proxy, "POST", "/api/reset", {})
    status, run = api(proxy, "POST", "/api/scenarios/long/start", {"max_duration": "10m"})
    assert status == 201 and run["warnings"] == [] and run["max_duration"] == 600
    api(proxy, "POST", "/api/reset", {})
    proc = cli(proxy, "scenario", "start", "long")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ("warning: scenario long asks for 1h but max_run_duration is 30m: "
                           "it stops after 30m\n")
    assert "hard end" in proc.stdout
    api(proxy, "POST", "/api/reset", {})
    status, scenario = api(proxy, "GET", "/api/scenarios/long")
    assert scenario["max_duration"] == 1800 and len(scenario["warnings"]) == 1


def test_a_rule_cut_by_max_run_duration_says_so(proxy):
    proc = cli(proxy, "rule", "add", "long-rule", "--qname", zone.WWW, "--fault", "servfail",
               "--for", "10h")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ("warning: rule long-rule asks for 10h but max_run_duration is 30m: "
                           "it stops after 30m\n")
    (row,) = api(proxy, "GET", "/api/rules")[1]["rules"]
    assert row["duration"] == 1800 and row["warnings"]
    api(proxy, "DELETE", "/api/rules/long-rule")
    status, row = api(proxy, "POST", "/api/rules", {"name": "short", "fault": "servfail",
                                                    "match": {"name": zone.WWW},
                                                    "duration": "5m"})
    assert status == 201 and row["warnings"] == [] and row["duration"] == 300
    api(proxy, "DELETE", "/api/rules/short")


def test_a_rule_without_selector_needs_match_all(proxy):
    other = zone.MX_TARGET
    for body in ({"name": "everything", "fault": "servfail"},
                 {"name": "everything", "fault": "servfail", "match": {}}):
        status, out = api(proxy, "POST", "/api/rules", body)
        assert status == 400 and '"match": "all"' in out["error"], out
    assert api(proxy, "GET", "/api/rules")[1]["rules"] == [] and rcode_of(proxy) == OK
    proc = cli(proxy, "rule", "add", "everything", "--fault", "servfail")
    assert proc.returncode != 0
    assert "a rule needs a selector (--qname, --suffix, --client, --match) or --all" in proc.stderr
    assert rcode_of(proxy) == OK
    proc = cli(proxy, "rule", "add", "everything", "--all", "--qname", zone.WWW,
               "--fault", "servfail")
    assert proc.returncode != 0 and "--all selects every query" in proc.stderr
    # Asked for outright, it faults every name.
    proc = cli(proxy, "rule", "add", "everything", "--all", "--fault", "servfail", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["match"] == "all"
    assert rcode_of(proxy) == SF and rcode_of(proxy, other) == SF
    api(proxy, "DELETE", "/api/rules/everything")
    status, out = api(proxy, "POST", "/api/rules", {"name": "everything", "fault": "servfail",
                                                    "match": "all"})
    assert status == 201 and out["match"] == "all"
    assert rcode_of(proxy, other) == SF
    api(proxy, "DELETE", "/api/rules/everything")
    assert rcode_of(proxy, other) == OK
