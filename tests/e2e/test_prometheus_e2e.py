"""A real Prometheus (the Debian package) scrapes a real proxy every second
while a short two-phase scenario runs and clients on several loopback
addresses make queries; then every query of the Grafana dashboard
(docker/grafana/dashboards/dnschaos.json: panels, annotations, template
variables) is run against that Prometheus and must return data.

Grafana's variables are replaced as Grafana would with this setup:
$__rate_interval -> 15s (4 x the 1 s scrape interval, rounded up), $__range
-> 30s, $__interval -> 1s, $scenario (All) -> .*.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import dns.exception
import pytest

from support import zone
from support.dnsutil import make_query, udp
from support.net import free_port, wait_until
from support.procs import stop_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "dnschaos.json"
RUN_SECONDS = 24

SCENARIO = """\
name: prom-e2e
phases:
  - name: warmup
    duration: 12s
    rules:
      - name: mx-servfail
        match: {name: example.test, qtype: MX}
        fault: servfail
  - name: outage
    duration: 5m
    rules:
      - name: www-nxdomain
        match: {name: www.example.test, clients: [127.0.0.2/32, 127.0.0.3/32]}
        fault: nxdomain
      - name: mx-servfail
        match: {name: example.test, qtype: MX}
        fault: servfail
      - name: mail-slow
        match: {name: mail.example.test}
        fault: {type: delay, delay: 20ms}
"""

VARIABLES = {"$__rate_interval": "15s", "$__range": "30s", "$__interval": "1s",
             "$scenario": ".*"}


class Prometheus:
    """Started before the proxy (which picks its own ports); `scrape(target)`
    then hands it the target through a file_sd file, which it watches."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        config = directory / "prometheus.yml"
        self.targets = directory / "targets.json"
        self.targets.write_text("[]")
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: dnschaos\n"
            f"    file_sd_configs: [{{files: ['{self.targets}'], refresh_interval: 1s}}]\n")
        self.log = directory / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={config}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 f"--storage.tsdb.path={directory / 'data'}",
                 "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"

    def scrape(self, target: str) -> None:
        tmp = self.targets.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": [target]}]))
        tmp.rename(self.targets)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            if self.proc.poll() is not None:
                raise AssertionError("prometheus exited:\n" + self.log.read_text()) from None
            return False

    def api(self, path: str, **params: str) -> list:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{path} {params}: {err.code} {err.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]["result"] if isinstance(body["data"], dict) else body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)

    def query_range(self, expr: str, seconds: int = 30) -> list:
        end = time.time()
        return self.api("query_range", query=expr, start=f"{end - seconds:.3f}",
                        end=f"{end:.3f}", step="1")

    def stop(self) -> None:
        stop_process(self.proc)


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def has_values(result: list) -> bool:
    """Some series with some value that is a number (not NaN)."""
    for series in result:
        values = series.get("values") or [series.get("value")]
        if any(v and not math.isnan(float(v[1])) for v in values):
            return True
    return False


def dashboard_queries() -> list[tuple[str, str, bool]]:
    """(where, expr, instant) for every target, annotation and variable."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"],
                        bool(target.get("instant"))))
    for annotation in board["annotations"]["list"]:
        if annotation.get("expr"):
            out.append((f"annotation {annotation['name']!r}", annotation["expr"], False))
    for variable in board["templating"]["list"]:
        out.append((f"variable ${variable['name']}", variable["definition"], True))
    return out


def add_dry_run_rule(admin_url: str) -> bool:
    request = urllib.request.Request(
        admin_url + "/api/rules", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"name": "dry-mail", "match": {"name": "mail.example.test"},
                         "fault": "nxdomain", "dry_run": True}).encode())
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 201
    except urllib.error.HTTPError as err:
        raise AssertionError(f"POST /api/rules: {err.code} {err.read().decode()}") from None


def run_clients(proxy, stop: threading.Event) -> None:
    """About 40 queries a second from six loopback addresses."""
    questions = [(zone.WWW, "A"), (zone.ORIGIN, "MX"), (zone.MX_TARGET, "A"),
                 (zone.host_name(7), "A")]
    clients = [f"127.0.0.{i}" for i in range(2, 8)]
    n = 0
    while not stop.is_set():
        client = clients[n % len(clients)]
        name, rdtype = questions[(n // len(clients)) % len(questions)]
        try:
            udp(make_query(name, rdtype), proxy.host, proxy.port, source=client, timeout=1)
        except (dns.exception.DNSException, OSError):
            pass
        n += 1
        stop.wait(0.025)


@pytest.fixture
def prometheus_bin() -> None:
    if not shutil.which("prometheus"):
        pytest.skip("prometheus is not installed (Debian package; `make test` installs it)")


def test_dashboard_queries_return_data_from_prometheus(prometheus_bin, start_proxy,
                                                       tmp_path: Path) -> None:
    scenario = tmp_path / "prom-e2e.yaml"
    scenario.write_text(SCENARIO)
    prom = Prometheus(tmp_path)
    stop = threading.Event()
    load: threading.Thread | None = None
    try:
        wait_until(prom.ready, timeout=15, what="prometheus to be ready")
        proxy = start_proxy("--scenario", str(scenario),
                            config={"client_groups": {"127.0.0.2/32": "payments"}})
        started = time.monotonic()
        prom.scrape(proxy.admin_url.removeprefix("http://"))
        assert add_dry_run_rule(proxy.admin_url)
        load = threading.Thread(target=run_clients, args=(proxy, stop), daemon=True)
        load.start()
        # Prometheus picks the target up from the watched file; on a loaded
        # machine that has taken over 5 s, so the warm-up phase lasts 12 s.
        wait_until(lambda: prom.query('up{job="dnschaos"} == 1'), timeout=11,
                   what="the first scrape of the proxy")
        time.sleep(max(0.0, RUN_SECONDS - (time.monotonic() - started)))

        failures = []
        for where, expr, instant in dashboard_queries():
            if m := re.fullmatch(r"label_values\((.+), *(\w+)\)", expr):
                # Grafana runs this one as a label-values call, as here.
                values = prom.api(f"label/{m.group(2)}/values", **{"match[]": m.group(1)})
                if not values:
                    failures.append(f"{where}: {expr}")
                continue
            result = prom.query(substitute(expr)) if instant else prom.query_range(
                substitute(expr))
            if not has_values(result):
                failures.append(f"{where}: {expr}")
        assert not failures, "dashboard queries without data:\n" + "\n".join(failures)

        # The values behind the panels are the right ones.
        affected = {s["metric"]["rule"]: float(s["value"][1])
                    for s in prom.query('dnschaos_affected_clients{scenario="prom-e2e"}')}
        assert affected["www-nxdomain"] == 2 and affected["mx-servfail"] == 6
        clients = {s["metric"]["client"] for s in prom.query("dnschaos_client_faults_total")}
        assert "payments" in clients and "127.0.0.3" in clients
        assert "127.0.0.2" not in clients  # grouped
        phases = {s["metric"]["phase"] for s in prom.query_range(
            'dnschaos_active_phase{scenario="prom-e2e"}', seconds=60)}
        assert phases == {"warmup", "outage"}, "both phases appear as annotations"
    finally:
        stop.set()
        if load is not None and load.is_alive():
            load.join(5)
        prom.stop()

