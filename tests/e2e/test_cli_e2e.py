"""`dnschaos` client subcommands against a running proxy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dns.rcode
import pytest

from support import zone
from support.net import wait_until

from .gameday_helpers import LONG, TOKEN, TWO_PHASES, rcode_of, write_scenarios

ROOT = Path(__file__).resolve().parents[2]
NX, OK, SF = dns.rcode.NXDOMAIN, dns.rcode.NOERROR, dns.rcode.SERVFAIL


@pytest.fixture(scope="module")
def proxy(start_module_proxy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    write_scenarios(tmp / "scenarios", LONG, TWO_PHASES)
    return start_module_proxy("--scenario-dir", str(tmp / "scenarios"),
                              config={"admin_token": TOKEN})


def cli(proxy, *args: str, token: str | None = TOKEN, check: bool = True):
    argv = [sys.executable, "-m", "proxy", *args, "--admin", proxy.admin_url]
    if token:
        argv += ["--token", token]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def cli_json(proxy, *args: str):
    return json.loads(cli(proxy, *args, "--json").stdout)


def test_list_show_start_status_stop(proxy):
    out = cli(proxy, "scenario", "list").stdout
    assert out.splitlines()[0].split()[:3] == ["NAME", "PHASES", "DURATION"]
    assert "two-phases" in out and "long" in out
    assert "nx" in cli(proxy, "scenario", "show", "two-phases").stdout
    run = cli_json(proxy, "scenario", "start", "two-phases", "--time-scale", "2")["run"]
    assert rcode_of(proxy) == NX
    status = cli(proxy, "scenario", "status").stdout
    assert run in status and "running" in status
    assert cli_json(proxy, "scenario", "status", run)["phase"] == "nx"
    assert f"stop: {run}" in cli(proxy, "scenario", "stop", "two-phases", "--reason", "done").stdout
    assert rcode_of(proxy) == OK
    assert "nothing to do" in cli(proxy, "scenario", "stop", run).stdout  # harmless
    report = cli(proxy, "report", run).stdout
    assert "Why it ended: **stopped**" in report and "| 127.0.0.1 |" in report
    assert cli_json(proxy, "report", run)["clients"][0]["client"] == "127.0.0.1"
    assert run in cli(proxy, "report").stdout


def test_pause_resume_and_reset(proxy):
    run = cli_json(proxy, "scenario", "start", "long")["run"]
    assert rcode_of(proxy) == NX
    cli(proxy, "scenario", "pause", run)
    assert rcode_of(proxy) == OK
    assert cli_json(proxy, "scenario", "status", run)["state"] == "paused"
    cli(proxy, "scenario", "resume", run)
    assert rcode_of(proxy) == NX
    assert "1 run(s) stopped" in cli(proxy, "reset").stdout
    assert rcode_of(proxy) == OK


def test_time_limit_through_the_cli(proxy):
    run = cli_json(proxy, "scenario", "start", "long", "--max-duration", "1s")["run"]
    assert rcode_of(proxy) == NX
    wait_until(lambda: rcode_of(proxy) == OK, timeout=5, interval=0.1, what="time limit")
    assert cli_json(proxy, "report", run)["ended"] == "max_duration"


def test_scheduled_start_with_at(proxy):
    import time

    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    out = cli_json(proxy, "scenario", "start", "long", "--at", at)
    assert out["state"] == "pending"
    wait_until(lambda: rcode_of(proxy) == NX, timeout=6, interval=0.1, what="the start")
    cli(proxy, "reset")


def test_rules(proxy):
    out = cli(proxy, "rule", "add", "www-sf", "--qname", zone.WWW, "--fault", "servfail",
              "--for", "5m").stdout
    assert out.startswith("rule www-sf added until")
    assert rcode_of(proxy) == SF
    assert "www-sf" in cli(proxy, "rule", "list").stdout
    cli(proxy, "rule", "rm", "www-sf")
    assert rcode_of(proxy) == OK
    assert "no ad hoc rule" in cli(proxy, "rule", "list").stdout


def test_token_and_errors_are_reported(proxy):
    proc = cli(proxy, "reset", token=None, check=False)
    assert proc.returncode == 2 and "HTTP 401" in proc.stderr
    proc = cli(proxy, "scenario", "start", "nosuch", check=False)
    assert proc.returncode == 2 and "no scenario called 'nosuch'" in proc.stderr


def test_report_of_a_scenario_is_its_latest_run(proxy):
    runs = []
    for _ in range(2):
        run = cli_json(proxy, "scenario", "start", "two-phases")["run"]
        rcode_of(proxy)
        cli(proxy, "scenario", "stop", run)
        runs.append(run)
    assert runs[0] != runs[1]
    assert cli_json(proxy, "report", "two-phases")["run"] == runs[1]
    assert f"`{runs[1]}`" in cli(proxy, "report", "two-phases").stdout
    assert cli_json(proxy, "report", runs[0])["run"] == runs[0]  # a run id is still itself
    proc = cli(proxy, "report", "nosuch", check=False)
    assert proc.returncode == 2 and "no run or scenario called 'nosuch'" in proc.stderr


def test_output_piped_into_head_ends_quietly(start_proxy, tmp_path):
    """`dnschaos ... --json | head -1`: no BrokenPipeError traceback.  The output
    (a 300 KB description) is larger than a pipe holds, so the write after
    head has exited fails for sure."""
    big = dict(LONG, description="x" * 300_000)
    write_scenarios(tmp_path / "scenarios", big)
    proxy = start_proxy("--scenario-dir", str(tmp_path / "scenarios"))
    argv = [sys.executable, "-m", "proxy", "scenario", "list", "--json",
            "--admin", proxy.admin_url]
    whole = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30,
                           check=False)
    assert whole.returncode == 0 and len(whole.stdout) > 300_000  # not piped: all of it
    writer = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-1"], stdin=writer.stdout, stdout=subprocess.PIPE)
    writer.stdout.close()  # head alone holds the read end: its exit breaks the pipe
    first, _ = head.communicate(timeout=30)
    errors = writer.stderr.read().decode()
    writer.stderr.close()
    assert writer.wait(timeout=30) == 1
    assert first == b"{\n"
    assert "Traceback" not in errors and "BrokenPipeError" not in errors, errors
    assert errors == ""
