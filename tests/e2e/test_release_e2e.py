"""Releasing held queries, against the running proxy and a real unbound: when
a run stops or pauses, or an ad hoc rule is removed or expires, only the
queries *it* holds in a delay are forwarded at once, unfaulted; the queries
other runs hold keep their delay and their fault.  A TCP `drop` + `close`
held in a delay and released by stopping its run is answered like any other
released query, and its connection goes on counting its queries right."""

from __future__ import annotations

import threading
import time

import dns.rcode
import pytest

from support import zone
from support.dnsutil import TcpClient, addresses, make_query, udp
from support.net import wait_until

from .gameday_helpers import TOKEN, api, write_scenarios

pytestmark = pytest.mark.e2e

SF, OK = dns.rcode.SERVFAIL, dns.rcode.NOERROR
HELD_A, HELD_C, HELD_B = zone.host_name(21), zone.host_name(22), zone.host_name(23)


def one_rule(name: str, rule: str, match: dict, fault: dict) -> dict:
    return {"name": name, "phases": [{"name": "p", "duration": "1h", "rules": [
        {"name": rule, "match": match, "fault": fault}]}]}


SLOW_SERVFAIL = one_rule("slow-servfail", "a-slow", {"name": HELD_A},
                         {"type": "delay", "delay": "3s", "then": "servfail"})
SLOW_OTHER = one_rule("slow-other", "c-slow", {"name": HELD_C},
                      {"type": "delay", "delay": "20s"})
DROP_CLOSE = one_rule("drop-close", "t-drop", {"name": zone.host_name(30)},
                      {"type": "delay", "delay": "2s", "then": {"type": "drop", "tcp": "close"}})
SLOW_FORWARD = one_rule("slow-forward", "s-slow", {"name": zone.host_name(31)},
                        {"type": "delay", "delay": "2.5s"})


@pytest.fixture
def proxy(start_proxy, tmp_path):
    write_scenarios(tmp_path / "scenarios", SLOW_SERVFAIL, SLOW_OTHER, DROP_CLOSE, SLOW_FORWARD)
    return start_proxy("--scenario-dir", str(tmp_path / "scenarios"),
                       config={"admin_token": TOKEN, "tcp_idle_timeout": "1s"})


def start(proxy, scenario: str) -> str:
    status, run = api(proxy, "POST", f"/api/scenarios/{scenario}/start", {})
    assert status == 201, run
    return run["run"]


def matched(proxy, rule: str) -> float:
    return proxy.metric("dnschaos_rule_matches_total", rule=rule)


def ask_in_background(proxy, name: str, got: dict) -> threading.Thread:
    """The client gives up after 15 s, before a 20 s delay would end: got[name]
    set at all says a query held that long was released."""

    def ask() -> None:
        begin = time.monotonic()
        reply = udp(make_query(name, "A"), proxy.host, proxy.port, timeout=15)
        got[name] = (reply, time.monotonic() - begin)

    thread = threading.Thread(target=ask)
    thread.start()
    return thread


def test_ending_one_run_releases_only_its_own_held_queries(proxy):
    """Run A holds a query 3 s, then SERVFAIL; run C and ad hoc rule B hold
    theirs 20 s.  Pausing C releases C's query, B's expiry releases B's; A's
    still gets its SERVFAIL after its full 3 s."""
    start(proxy, "slow-servfail")
    other = start(proxy, "slow-other")
    body = {"name": "b-slow", "match": {"name": HELD_B},
            "fault": {"type": "delay", "delay": "20s"}, "duration": "1.5s"}
    assert api(proxy, "POST", "/api/rules", body)[0] == 201
    got: dict = {}
    threads = [ask_in_background(proxy, name, got) for name in (HELD_A, HELD_C, HELD_B)]
    wait_until(lambda: all(matched(proxy, r) == 1 for r in ("a-slow", "c-slow", "b-slow")),
               timeout=5, interval=0.05, what="three queries held")
    assert api(proxy, "POST", f"/api/runs/{other}/pause", {}) == (200, {"paused": [other]})
    for thread in threads:
        thread.join(25)
    # Not released: A kept its delay and its fault.
    reply, elapsed = got[HELD_A]
    assert reply.rcode() == SF and elapsed >= 2.9, (dns.rcode.to_text(reply.rcode()), elapsed)
    # Released: forwarded unfaulted, before their 20 s (answered at all).
    for name, index in ((HELD_C, 22), (HELD_B, 23)):
        assert name in got, f"{name} not released"
        reply, _ = got[name]
        assert reply.rcode() == OK and addresses(reply) == {zone.host_address(index)}
    assert got[HELD_C][1] < got[HELD_B][1]  # the pause came first, then the expiry
    assert api(proxy, "GET", "/api/rules")[1]["rules"] == []


def test_a_tcp_drop_close_released_by_stopping_its_run(proxy):
    """Not stopped, the drop closes the connection after its delay, unanswered;
    stopped while it waits, the query is answered and the connection lives on:
    a later query held 2.5 s by another run (longer than the 1 s idle timeout)
    still gets its answer, because the connection counts it as outstanding."""
    run = start(proxy, "drop-close")
    start(proxy, "slow-forward")
    dropped, slow = zone.host_name(30), zone.host_name(31)

    with TcpClient(proxy.host, proxy.port, timeout=5) as client:  # the fault applies
        begin = time.monotonic()
        client.send(make_query(dropped, "A", qid=1), make_query(zone.WWW, "A", qid=2))
        reply = client.recv()
        assert reply.id == 2 and addresses(reply) == set(zone.WWW_A)
        assert client.is_closed_by_peer(5)
        assert time.monotonic() - begin >= 1.9

    with TcpClient(proxy.host, proxy.port, timeout=5) as client:  # released by the stop
        client.send(make_query(dropped, "A", qid=3), make_query(zone.WWW, "A", qid=4))
        reply = client.recv()
        assert reply.id == 4 and addresses(reply) == set(zone.WWW_A)
        wait_until(lambda: matched(proxy, "t-drop") == 2, timeout=5, interval=0.05,
                   what="the drop held")
        assert api(proxy, "POST", f"/api/runs/{run}/stop", {}) == (200, {"stopped": [run]})
        reply = client.recv()
        assert reply.id == 3 and addresses(reply) == {zone.host_address(30)}
        begin = time.monotonic()
        client.send(make_query(slow, "A", qid=5))
        reply = client.recv(5)
        assert reply is not None, "the connection was closed while a query was held"
        assert reply.id == 5 and addresses(reply) == {zone.host_address(31)}
        assert time.monotonic() - begin >= 2.4
        assert client.query(make_query(zone.WWW, "A", qid=6)).id == 6
    assert proxy.metric("dnschaos_tcp_connections_closed_total", reason="idle") == 0
    wait_until(lambda: proxy.metric("dnschaos_inflight_queries") == 0, timeout=3,
               what="nothing in flight")
