"""The game-day console (proxy/console/) in a real browser: Playwright driving
Debian's Chromium against a real proxy with a real unbound behind it, and
real DNS traffic from dnspython on three loopback source addresses.

The tests run in file order on one page, as an operator would use it: load,
read the dependency map, try to start without the token (refused, visibly),
start with it (preview and preflight first), watch answers change and the
affected clients fill, pause, resume, stop, watch recovery, reset; then a
second proxy whose /metrics needs the token, asked for on load.  A
screenshot of each step goes to tests/artifacts/console/ (gitignored).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import dns.rcode
import pytest

from support import zone
from support.dnsutil import make_query, udp
from support.net import wait_until

from .gameday_helpers import TOKEN, api, write_scenarios

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
NX, OK = dns.rcode.NXDOMAIN, dns.rcode.NOERROR
# Who asks what: .2 and .3 ask for www (the scenario's name), .4 not (for
# host5, and for a name that is HTML, which the page must show as text).
HOSTILE = "<b>bold</b>.example.test."
CLIENTS = {"127.0.0.2": [zone.WWW, zone.host_name(1)], "127.0.0.3": [zone.WWW, zone.MX_TARGET],
           "127.0.0.4": [zone.host_name(5), HOSTILE]}
OUTAGE = {"name": "www-outage", "description": "www.example.test goes NXDOMAIN, then SERVFAIL",
          "phases": [
              {"name": "nxdomain", "duration": "10m",
               "rules": [{"name": "www-nx", "match": {"name": zone.WWW}, "fault": "nxdomain"}]},
              {"name": "servfail", "duration": "5m",
               "rules": [{"name": "www-sf", "match": {"name": zone.WWW}, "fault": "servfail"}]},
          ]}
SLOW_MAIL = {"name": "slow-mail", "description": "mail answers late",
             "phases": [{"name": "slow", "duration": "2m", "rules": [
                 {"name": "mail-delay", "match": {"name": zone.MX_TARGET},
                  "fault": {"type": "delay", "delay": "300ms"}}]}]}
NOBODY = {"name": "nobody", "description": "a name no client asks for",
          "phases": [{"name": "nx", "duration": "10m", "rules": [
              {"name": "ghost-nx", "match": {"name": "ghost.example.test."},
               "fault": "nxdomain"}]}]}
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="/usr/bin/chromium is not installed (make test installs it)"),
]


def rcode(proxy, source: str, name: str = zone.WWW) -> int:
    return udp(make_query(name, "A"), proxy.host, proxy.port, timeout=2.0,
               source=source).rcode()


class Traffic(threading.Thread):
    """Each client asks for its names every 0.2 s: bounded in count and time."""

    def __init__(self, port: int, limit: int = 2000, seconds: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.port, self.limit, self.seconds = port, limit, seconds
        self.stop_event = threading.Event()
        self.sent = 0

    def run(self) -> None:
        end = time.monotonic() + self.seconds
        while not self.stop_event.is_set() and time.monotonic() < end and self.sent < self.limit:
            for source, names in CLIENTS.items():
                for name in names:
                    try:
                        udp(make_query(name, "A"), "127.0.0.1", self.port, timeout=1.0,
                            source=source)
                    except Exception:  # noqa: BLE001 - a timeout here is a test's business
                        pass
                    self.sent += 1
            self.stop_event.wait(0.2)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


@pytest.fixture(scope="module")
def proxy(start_module_proxy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    write_scenarios(tmp / "scenarios", OUTAGE, SLOW_MAIL, NOBODY)
    proxy = start_module_proxy("--scenario-dir", str(tmp / "scenarios"),
                               config={"admin_token": TOKEN})
    traffic = Traffic(proxy.port)
    traffic.start()
    yield proxy
    traffic.stop()


class Browser:
    """One page, with every console message, page error, failed request and
    error response it saw."""

    def __init__(self, page) -> None:
        self.page = page
        self.console: list[str] = []
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.responses: list[tuple[int, str, str]] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url} {r.failure}"))
        page.on("response", lambda r: self.responses.append((r.status, r.request.method, r.url))
                if r.status >= 400 else None)

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture(scope="module")
def browser(proxy):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        context = chromium.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(8000)
        browser = Browser(context.new_page())
        browser.context = context
        yield browser
        context.close()
        chromium.close()


def expect(locator):
    from playwright.sync_api import expect as pw_expect
    return pw_expect(locator)


def attrs(locator, name: str) -> set[str | None]:
    """The attribute of every element matched, read at once (the page
    redraws its tables between polls)."""
    return set(locator.evaluate_all(f"els => els.map(e => e.getAttribute('{name}'))"))


def run_ids(proxy) -> list[str]:
    return [r["run"] for r in api(proxy, "GET", "/api/runs")[1]["runs"]]


def test_page_loads_with_no_errors(proxy, browser):
    page = browser.page
    response = page.goto(proxy.admin_url + "/")
    assert response.status == 200
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    expect(page.locator("#scenarios tbody tr[data-key='www-outage']")).to_contain_text(
        "www.example.test goes NXDOMAIN")
    expect(page.locator("#scenarios tbody tr[data-key='slow-mail']")).to_be_visible()
    expect(page.locator("#runs-empty")).to_be_visible()
    expect(page.locator("#conn")).to_have_text("live")
    # Queries per second from the /metrics counters: the traffic makes some.
    wait_until(lambda: page.locator("#qps").inner_text() not in ("-", "0.0"), timeout=8,
               what="a query rate")
    assert page.locator("#fps").inner_text() == "0.0"  # nothing faulted yet
    browser.shot("01-loaded")
    assert browser.console == [] and browser.errors == [] and browser.failed == []
    assert browser.responses == []  # no error response either


def test_dependency_table_lists_the_clients_that_queried(proxy, browser):
    page = browser.page
    rows = page.locator("#deps-table tbody tr[data-name]")
    wait_until(lambda: attrs(rows, "data-client") == set(CLIENTS),
               timeout=8, what="the three clients in the dependency table")
    pairs = {tuple(pair) for pair in rows.evaluate_all(
        "els => els.map(e => [e.dataset.client, e.dataset.name])")}
    assert pairs == {(c, n) for c, names in CLIENTS.items() for n in names}
    # The name that is HTML is text: no <b> element anywhere in the map.
    cell = page.locator(f"#deps-table tbody tr[data-client='127.0.0.4'] td:text-is('{HOSTILE}')")
    expect(cell).to_have_count(1)
    assert page.locator("#deps-section b").count() == 0
    graph = page.locator("#deps-graph")
    assert attrs(graph.locator("g[data-client]"), "data-client") \
        == set(CLIENTS)
    browser.shot("02-dependencies")
    # Filtered by client and time: only 127.0.0.4's names, and none an hour ahead.
    form = page.locator("#deps-filter")
    form.locator("input[name=client]").fill("127.0.0.4")
    form.locator("input[name=since]").fill("10m")
    form.locator("button").click()
    wait_until(lambda: attrs(rows, "data-client") == {"127.0.0.4"},
               timeout=8, what="the client filter")
    assert attrs(rows, "data-name") == set(CLIENTS["127.0.0.4"])
    form.locator("input[name=since]").fill(str(int(time.time()) + 3600))
    form.locator("button").click()
    expect(page.locator("#deps-state")).to_have_text("No client has queried yet in that window.")
    form.locator("input[name=client]").fill("")
    form.locator("input[name=since]").fill("")
    form.locator("button").click()
    wait_until(lambda: attrs(rows, "data-client") == set(CLIENTS),
               timeout=8, what="the map unfiltered again")


def test_start_without_the_token_is_refused_visibly(proxy, browser):
    page = browser.page
    page.locator("#scenarios tbody tr[data-key='www-outage'] button.start").click()
    expect(page.locator("#start-dialog")).to_be_visible()
    # The preview is a POST: it asks for the token first.
    expect(page.locator("#token-dialog")).to_be_visible()
    page.locator("#token-cancel").click()
    expect(page.locator("#message")).to_contain_text("refused, this needs the admin token")
    page.locator("#start-confirm").click()  # start, without a token
    expect(page.locator("#token-dialog")).to_be_visible()
    page.locator("#token-cancel").click()
    expect(page.locator("#message")).to_contain_text(
        "start www-outage: refused, this needs the admin token")
    expect(page.locator("#message")).to_have_class("error")
    expect(page.locator("#start-error")).to_contain_text("Authorization: Bearer")
    browser.shot("03-refused-without-token")
    page.locator("#start-cancel").click()
    assert run_ids(proxy) == []
    assert rcode(proxy, "127.0.0.2") == OK


def give_token(page) -> None:
    """A wrong token first (refused, asked again), then the right one."""
    expect(page.locator("#token-dialog")).to_be_visible()
    page.locator("#token-dialog input").fill("not-the-token-at-all")
    page.locator("#token-save").click()
    expect(page.locator("#message")).to_contain_text("the token given is wrong")
    expect(page.locator("#token-dialog")).to_be_visible()  # asked again
    page.locator("#token-dialog input").fill(TOKEN)
    page.locator("#token-save").click()
    expect(page.locator("#token-dialog")).to_be_hidden()


def test_start_from_the_page_changes_real_answers(proxy, browser):
    page = browser.page
    assert rcode(proxy, "127.0.0.2") == OK
    page.locator("#scenarios tbody tr[data-key='www-outage'] button.start").click()
    give_token(page)
    # The preview and the preflight come before the confirmation.
    expect(page.locator("#start-confirm")).to_be_enabled()
    expect(page.locator("#start-phases")).to_contain_text("www-nx → nxdomain")
    expect(page.locator("#preview-table")).to_contain_text("www-nx")
    expect(page.locator("#preflight")).to_contain_text("Preflight")
    browser.shot("04-preview")
    assert run_ids(proxy) == [] and rcode(proxy, "127.0.0.2") == OK  # nothing started yet
    page.locator("#start-confirm").click()
    expect(page.locator("#start-dialog")).to_be_hidden()
    expect(page.locator("#message")).to_contain_text("started www-outage-")
    (run,) = run_ids(proxy)
    row = page.locator(f"#runs tbody tr[data-key='{run}']")
    expect(row).to_contain_text("running")
    expect(row).to_contain_text("1/2 nxdomain")
    # Real answers changed: www is NXDOMAIN for the clients, host5 is not.
    assert rcode(proxy, "127.0.0.2") == NX and rcode(proxy, "127.0.0.3") == NX
    assert rcode(proxy, "127.0.0.4", zone.host_name(5)) == OK
    affected = page.locator("#affected tbody tr")
    wait_until(lambda: attrs(affected, "data-key")
               == {"127.0.0.2", "127.0.0.3"}, timeout=8, what="the affected clients")
    expect(page.locator("#affected tbody tr[data-key='127.0.0.2']")).to_contain_text(
        "nxdomain: ")
    expect(page.locator("#countdown")).to_contain_text("Phase 1 of 2")
    expect(page.locator("#recovery-state")).to_contain_text("Watched from the run's end")
    wait_until(lambda: page.locator("#fps").inner_text() not in ("-", "0.0"), timeout=8,
               what="a fault rate")
    browser.shot("05-running")


def test_pause_and_resume_from_the_page(proxy, browser):
    page = browser.page
    (run,) = run_ids(proxy)
    row = page.locator(f"#runs tbody tr[data-key='{run}']")
    row.locator("button.pause").click()
    expect(row.locator(".state")).to_have_text("paused")
    assert rcode(proxy, "127.0.0.2") == OK  # a paused run changes nothing
    expect(page.locator("#countdown")).to_contain_text("Paused in phase")
    browser.shot("06-paused")
    row.locator("button.resume").click()
    expect(row.locator(".state")).to_have_text("running")
    assert rcode(proxy, "127.0.0.2") == NX


def test_stop_reverts_the_answers(proxy, browser):
    page = browser.page
    (run,) = run_ids(proxy)
    row = page.locator(f"#runs tbody tr[data-key='{run}']")
    row.locator("button.stop").click()
    expect(row.locator(".state")).to_have_text("ended")
    assert rcode(proxy, "127.0.0.2") == OK and rcode(proxy, "127.0.0.3") == OK
    expect(page.locator("#countdown")).to_have_text(
        "Ended: stopped (stopped by console (token): stopped from the console)")
    # The affected clients stay listed: the run's report.
    expect(page.locator("#affected tbody tr[data-key='127.0.0.2']")).to_be_visible()
    browser.shot("07-stopped")
    # The only error answers were the refusals before the token was given
    # (Chromium logs each as "Failed to load resource"), all of them POSTs.
    refusals = [r for r in browser.responses if r[0] == 401]
    assert refusals and refusals == browser.responses
    assert {method for _, method, _ in refusals} == {"POST"}
    assert set(browser.console) == {"error: Failed to load resource: the server responded "
                                    "with a status of 401 (Unauthorized)"}
    assert browser.errors == [] and browser.failed == []


def test_recovery_is_shown_as_it_happens(proxy, browser):
    page = browser.page
    (run,) = run_ids(proxy)
    rows = page.locator("#recovery tbody tr")
    wait_until(lambda: attrs(rows, "data-key")
               >= {f"127.0.0.2 {zone.WWW}", f"127.0.0.3 {zone.WWW}"}, timeout=8,
               what="recovery entries")
    for client in ("127.0.0.2", "127.0.0.3"):  # they query on, and get answers again
        expect(page.locator(f"#recovery tbody tr[data-key='{client} {zone.WWW}']")
               ).to_contain_text("recovered")
    # Only the clients the run hit are watched: not .4, nor their other names.
    assert attrs(rows, "data-key") == {
        f"127.0.0.2 {zone.WWW}", f"127.0.0.3 {zone.WWW}"}
    browser.shot("08-recovery")


def test_reset_from_the_page_removes_an_ad_hoc_rule(proxy, browser):
    page = browser.page
    body = {"name": "host1-refused", "match": {"name": zone.host_name(1)}, "fault": "refused",
            "duration": "5m"}
    assert api(proxy, "POST", "/api/rules", body)[0] == 201
    assert rcode(proxy, "127.0.0.2", zone.host_name(1)) == dns.rcode.REFUSED
    row = page.locator("#rules tbody tr[data-key='host1-refused']")
    expect(row).to_contain_text("refused")
    page.locator("#reset-button").click()
    expect(page.locator("#confirm-text")).to_contain_text("every ad hoc rule is removed")
    browser.shot("10-reset-asked")
    page.locator("#confirm-ok").click()
    expect(page.locator("#message")).to_have_text(
        re.compile(r"reset: 0 run\(s\) stopped, 1 rule\(s\) removed$"))
    expect(row).to_have_count(0)
    assert rcode(proxy, "127.0.0.2", zone.host_name(1)) == OK
    assert rcode(proxy, "127.0.0.2") == OK
    # Nothing faults any more: the rate falls to 0 and stays there, though the
    # ended runs' series change and leave /metrics (they are not read as faults).
    wait_until(lambda: page.locator("#fps").inner_text() == "0.0", timeout=8, what="0 faults/s")
    readings = []
    for _ in range(3):
        page.wait_for_timeout(1100)  # one poll each
        readings.append(page.locator("#fps").inner_text())
    assert readings == ["0.0"] * 3


def test_preflight_warns_and_require_traffic_refuses(proxy, browser):
    page = browser.page
    page.locator("#scenarios tbody tr[data-key='nobody'] button.start").click()
    expect(page.locator("#preview-table tbody tr")).to_contain_text("ghost-nx")
    cells = page.locator("#preview-table tbody tr td")
    assert [cells.nth(i).inner_text() for i in (3, 4, 5)] == ["0", "0", "none"]
    expect(page.locator("#preflight")).to_contain_text("Preflight: 1 warning(s).")
    expect(page.locator("#preflight li")).to_contain_text(
        "no_traffic (nx/ghost-nx): no client asked for ghost.example.test.")
    expect(page.locator("#start-confirm")).to_have_text("start anyway")
    page.locator("#start-form input[name=require_traffic]").check()
    page.locator("#start-confirm").click()
    expect(page.locator("#start-error")).to_contain_text(
        "require_traffic: rules that would select no query: nx/ghost-nx")
    browser.shot("11-preflight-refused")
    page.locator("#start-cancel").click()
    assert [r for r in api(proxy, "GET", "/api/runs")[1]["runs"] if r["state"] != "ended"] == []


def test_reads_behind_the_token_ask_for_it_on_load(start_proxy, browser, unbound):
    """With metrics_auth, /metrics needs the token even on loopback: the
    page asks for it as it loads, and the rates come once it is given."""
    other = start_proxy(config={"admin_token": TOKEN, "metrics_auth": True})
    udp(make_query(zone.WWW, "A"), other.host, other.port, source="127.0.0.2")
    second = Browser(browser.context.new_page())
    page = second.page
    try:
        page.goto(other.admin_url + "/")
        expect(page.locator("#token-dialog")).to_be_visible()
        expect(page.locator("#token-why")).to_contain_text("needs its admin token to show")
        expect(page.locator("#conn")).to_have_text("token needed")
        assert page.locator("#qps").inner_text() == "-"
        second.shot("09-token-asked-on-load")
        page.locator("#token-dialog input").fill(TOKEN)
        page.locator("#token-save").click()
        expect(page.locator("#token-dialog")).to_be_hidden()
        expect(page.locator("#conn")).to_have_text("live (token)")
        wait_until(lambda: page.locator("#qps").inner_text() != "-", timeout=8,
                   what="a query rate once the token is given")
        assert {(status, method, url.rsplit("/", 1)[-1])
                for status, method, url in second.responses} == {(401, "GET", "metrics")}
        assert second.errors == [] and second.failed == []
    finally:
        page.close()
