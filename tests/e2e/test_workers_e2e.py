"""`--workers 2`: two processes answer on one port (SO_REUSEPORT), every
admin change reaches both, /metrics sums them, a killed worker comes back
with the active rules, and no worker outlives the main process."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import dns.rcode
import pytest

from support import zone
from support.dnsutil import make_query, udp
from support.net import poll, wait_until

from .gameday_helpers import api

pytestmark = pytest.mark.e2e
NX, OK, SF = dns.rcode.NXDOMAIN, dns.rcode.NOERROR, dns.rcode.SERVFAIL
QUERIES = 120  # each from a fresh socket, so a fresh source port


def worker_pids(main_pid: int) -> set[int]:
    """Live (not zombie) children of `main_pid` running proxy.workers."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == main_pid and fields[0] != "Z" and b"proxy.workers" in cmdline:
            out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def port_holders(port: int, proto: str) -> set[int]:
    """PIDs with a listening socket on `port` (ss -l, udp or tcp)."""
    text = subprocess.run(["ss", "-lnpH", f"--{proto}", f"sport = :{port}"],
                          capture_output=True, text=True, check=True).stdout
    return {int(part.split("=")[1].split(",")[0])
            for part in text.replace(")", ",").split("pid")[1:]}


def ask_many(proxy, n: int = QUERIES) -> list[int]:
    return [udp(make_query(zone.WWW, "A"), proxy.host, proxy.port, timeout=2).rcode()
            for _ in range(n)]


@pytest.fixture(scope="module")
def proxy(start_module_proxy):
    proxy = start_module_proxy("--workers", "2")
    wait_until(lambda: len(worker_pids(proxy.pid)) == 2, timeout=5, what="two workers")
    return proxy


def test_two_workers_hold_the_port(proxy):
    pids = worker_pids(proxy.pid)
    assert len(pids) == 2 and proxy.pid not in pids
    if shutil.which("ss"):
        assert port_holders(proxy.port, "udp") == pids
        assert port_holders(proxy.port, "tcp") == pids
    log = proxy.stderr_text()
    for pid in pids:
        assert f"(pid {pid}), listening on {proxy.hostport}" in log


def test_queries_spread_over_workers_and_metrics_add_up(proxy):
    before = proxy.metric("dnschaos_queries_total")
    per_worker = {w: proxy.metric("dnschaos_worker_queries_total", worker=w) for w in "01"}
    assert ask_many(proxy) == [OK] * QUERIES
    assert proxy.metric("dnschaos_queries_total") - before == QUERIES
    assert proxy.metric("dnschaos_queries_total", transport="udp") >= QUERIES
    got = {w: proxy.metric("dnschaos_worker_queries_total", worker=w) - per_worker[w]
           for w in "01"}
    assert sum(got.values()) == QUERIES
    assert all(count > 0 for count in got.values()), got  # SO_REUSEPORT spread them
    assert proxy.metric("dnschaos_upstream_replies_total") >= QUERIES
    assert proxy.metric("dnschaos_request_duration_seconds_count") >= QUERIES
    assert proxy.metric("dnschaos_query_types_total", qtype="A") >= QUERIES
    assert proxy.health()[0] == 200


def test_one_client_port_is_spread_over_both_workers(proxy):
    """The kernel picks a worker per datagram at random (a BPF program on the
    port's SO_REUSEPORT group), not by a hash of the client's address and
    port: the queries of a client that keeps one source port (a downstream
    resolver's socket, a load generator) go to both workers about evenly.
    With the hash, all 200 would go to one worker."""
    per_worker = {w: proxy.metric("dnschaos_worker_queries_total", worker=w) for w in "01"}
    query = make_query(zone.WWW, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect((proxy.host, proxy.port))
        for qid in range(200):
            query.id = qid
            sock.send(query.to_wire())
            assert int.from_bytes(sock.recv(4096)[:2], "big") == qid
    got = {w: proxy.metric("dnschaos_worker_queries_total", worker=w) - per_worker[w]
           for w in "01"}
    assert sum(got.values()) == 200
    assert min(got.values()) >= 50, got  # 50/50 at random: below 50 has odds under 1e-12

def test_rule_reaches_every_worker_and_reset_reverts_them(proxy):
    body = {"name": "www-nx", "match": {"name": zone.WWW}, "fault": "nxdomain"}
    status, row = api(proxy, "POST", "/api/rules", body, token=None)
    assert status == 201, row
    assert ask_many(proxy) == [NX] * QUERIES  # whichever worker got each one
    labels = {"scenario": "adhoc", "rule": "www-nx", "fault": "nxdomain"}
    assert proxy.metric("dnschaos_faults_injected_total", **labels) == QUERIES
    assert proxy.metric("dnschaos_rule_matches_total", **labels) == QUERIES
    assert proxy.metric("dnschaos_client_faults_total", client="127.0.0.1") == QUERIES
    assert proxy.metric("dnschaos_affected_clients", rule="www-nx") == 1
    (rule,) = api(proxy, "GET", "/api/rules")[1]["rules"]
    assert (rule["matched"], rule["injected"]) == (QUERIES, QUERIES)
    assert api(proxy, "POST", "/api/reset", {}, token=None)[0] == 200
    assert ask_many(proxy) == [OK] * QUERIES


def test_a_limit_holds_across_workers(proxy):
    """`limit.count: 4` with two workers: 4 faults in all, not 4 per worker."""
    body = {"name": "www-capped", "match": {"name": zone.WWW}, "fault": "nxdomain",
            "limit": {"count": 4}}
    assert api(proxy, "POST", "/api/rules", body, token=None)[0] == 201
    try:
        answers = ask_many(proxy, 40)
        assert answers.count(NX) == 4 and answers.count(OK) == 36
        assert proxy.metric("dnschaos_faults_injected_total", rule="www-capped") == 4
    finally:
        assert api(proxy, "DELETE", "/api/rules/www-capped", token=None)[0] == 200


def test_removing_a_delay_rule_releases_held_queries_in_every_worker(proxy):
    from concurrent.futures import ThreadPoolExecutor

    body = {"name": "www-slow", "match": {"name": zone.WWW},
            "fault": {"type": "delay", "delay": "20s"}}
    assert api(proxy, "POST", "/api/rules", body, token=None)[0] == 201
    # The clients give up after 10 s, before the 20 s delay: an answer at all
    # says the query was released by the removal.
    with ThreadPoolExecutor(8) as pool:
        held = [pool.submit(lambda: udp(make_query(zone.WWW, "A"), proxy.host, proxy.port,
                                        timeout=10).rcode()) for _ in range(8)]
        wait_until(lambda: proxy.metric("dnschaos_rule_matches_total", rule="www-slow") == 8,
                   timeout=5, what="8 queries held")
        assert not any(f.done() for f in held)
        assert api(proxy, "DELETE", "/api/rules/www-slow", token=None)[0] == 200
        assert [f.result() for f in held] == [OK] * 8  # released, forwarded unfaulted


def test_removing_one_delay_rule_keeps_another_rules_held_queries(proxy):
    """Two ad hoc rules hold queries in the workers: removing one releases its
    own at once, unfaulted; the other's keep their 3 s delay and their SERVFAIL."""
    from concurrent.futures import ThreadPoolExecutor

    kept, gone = zone.host_name(40), zone.host_name(41)
    rules = [{"name": "kept-slow", "match": {"name": kept},
              "fault": {"type": "delay", "delay": "3s", "then": "servfail"}},
             {"name": "gone-slow", "match": {"name": gone},
              "fault": {"type": "delay", "delay": "20s"}}]
    for body in rules:
        assert api(proxy, "POST", "/api/rules", body, token=None)[0] == 201

    def timed(name: str) -> tuple[int, float]:
        # The client gives up after 15 s, before gone-slow's 20 s delay: an
        # answer to it at all says it was released by the removal.
        start = time.monotonic()
        reply = udp(make_query(name, "A"), proxy.host, proxy.port, timeout=15)
        return reply.rcode(), time.monotonic() - start

    try:
        with ThreadPoolExecutor(8) as pool:
            held = {name: [pool.submit(timed, name) for _ in range(4)] for name in (kept, gone)}
            wait_until(lambda: all(proxy.metric("dnschaos_rule_matches_total",
                                                rule=body["name"]) == 4 for body in rules),
                       timeout=5, what="8 queries held")
            assert api(proxy, "DELETE", "/api/rules/gone-slow", token=None)[0] == 200
            results = {name: [f.result() for f in futures] for name, futures in held.items()}
        assert all(rcode == SF and elapsed >= 2.9 for rcode, elapsed in results[kept]), results
        assert all(rcode == OK for rcode, _ in results[gone]), results
    finally:
        api(proxy, "POST", "/api/reset", {}, token=None)


def test_a_killed_worker_comes_back_with_the_active_rule(proxy):
    body = {"name": "www-nx2", "match": {"name": zone.WWW}, "fault": "nxdomain"}
    assert api(proxy, "POST", "/api/rules", body, token=None)[0] == 201
    old = worker_pids(proxy.pid)
    victim = min(old)
    os.kill(victim, signal.SIGKILL)
    new = wait_until(lambda: (lambda p: p if len(p) == 2 and victim not in p else None)(
        worker_pids(proxy.pid)), timeout=5, what="a new worker")
    restarted = poll(lambda: proxy.metric("dnschaos_worker_restarts_total") == 1
                     and "restarted (pid" in proxy.stderr_text(), timeout=10)
    assert restarted, (proxy.metric("dnschaos_worker_restarts_total"), proxy.stderr_text()[-3000:])
    log = proxy.stderr_text()
    assert f"(pid {victim}) exited with status -9; restarting it" in log
    if shutil.which("ss"):
        wait_until(lambda: port_holders(proxy.port, "udp") == new, timeout=5,
                   what="the new worker listening")
    assert ask_many(proxy) == [NX] * QUERIES  # the new worker has the rule too
    assert api(proxy, "POST", "/api/reset", {}, token=None)[0] == 200
    assert ask_many(proxy, 40) == [OK] * 40


def test_sigterm_stops_every_worker(start_proxy):
    proxy = start_proxy("--workers", "2")
    pids = wait_until(lambda: (lambda p: p if len(p) == 2 else None)(worker_pids(proxy.pid)),
                      timeout=5, what="two workers")
    assert udp(make_query(zone.WWW, "A"), proxy.host, proxy.port).rcode() == OK
    assert proxy.stop(timeout=10) == 0
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=5, what="workers gone")
    log = proxy.stderr_text()
    for pid in pids:
        assert f"(pid {pid}) stopped (status 0)" in log


def test_workers_exit_when_the_main_process_is_killed(start_proxy):
    proxy = start_proxy("--workers", "2")
    pids = wait_until(lambda: (lambda p: p if len(p) == 2 else None)(worker_pids(proxy.pid)),
                      timeout=5, what="two workers")
    os.kill(proxy.pid, signal.SIGKILL)
    proxy.proc.wait(5)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    leftover = [pid for pid in pids if alive(pid)]
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, "workers outlived the main process"


def test_queries_sent_while_the_workers_start_are_all_answered(start_proxy):
    """From the first answer on, every query is answered, including those that
    reach the port while the other worker is still starting: no socket in the
    port's SO_REUSEPORT group holds queries nobody will read.  (Before, the
    main process held the port with sockets of its own until every worker was
    ready, and the queries the kernel gave them were lost.)  A bounded load:
    64 client sockets (source ports), one query every 0.5 ms, for at most 15 s."""
    # The client sockets hold their ports before the proxy's port is picked:
    # bound later, one could get the port the proxy has not bound yet, and
    # then read the other sockets' queries as if they were answers.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    proxy = start_proxy("--workers", "2", admin=False, wait=False)
    query = bytearray(make_query(zone.WWW, "A").to_wire())
    sent: dict[tuple[int, int], float] = {}  # (socket, query ID) -> when
    answered: set[tuple[int, int]] = set()
    first: float | None = None  # when the first answered query was sent

    def read_answers() -> None:
        nonlocal first
        for number in select.select(socks, [], [], 0)[0]:
            sock = socks.index(number)
            while True:
                try:
                    data, source = number.recvfrom(4096)
                except (BlockingIOError, ConnectionRefusedError):
                    break  # refused: sent before any worker listened
                if source != (proxy.host, proxy.port) or len(data) < 3 or not data[2] & 0x80:
                    continue  # only a response from the proxy is an answer
                key = (sock, int.from_bytes(data[:2], "big"))
                answered.add(key)
                if key in sent and (first is None or sent[key] < first):
                    first = sent[key]

    try:
        for sock in socks:
            sock.setblocking(False)
        end, count = time.monotonic() + 15, 0
        while time.monotonic() < end and count < 60_000:
            sock, qid = count % len(socks), count // len(socks)
            count += 1
            query[0:2] = qid.to_bytes(2, "big")
            try:
                socks[sock].sendto(query, (proxy.host, proxy.port))
                sent[(sock, qid)] = time.monotonic()
            except OSError:
                pass
            read_answers()
            if first is not None:
                end = min(end, first + 1.5)
            time.sleep(0.0005)
        poll(lambda: read_answers() or all(
            key in answered for key, at in sent.items() if first is not None and at >= first),
            timeout=3)
    finally:
        for sock in socks:
            sock.close()
    assert first is not None, "no query was answered"
    after = [key for key, at in sent.items() if at >= first]
    lost = [key for key in after if key not in answered]
    assert len(after) > 1000 and not lost, (len(after), len(lost), proxy.stderr_text()[-3000:])
    assert len(worker_pids(proxy.pid)) == 2
