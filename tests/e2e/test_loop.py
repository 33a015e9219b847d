"""Forwarding loops: an upstream that is the proxy itself, or that forwards
back to it.

- At start: an upstream that one of the proxy's own listeners receives
  (the same address and port, or any address of this machine at the port
  of a wildcard listener) is refused in one line.
- At run time: loop probes find a loop through another forwarder (a second
  dnschaos, or unbound forwarding everything back); the looped upstream gets
  no queries, a query gets SERVFAIL at once, and nothing storms: the proxies
  send nothing more and stay idle.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dns.rcode
import pytest

from support import zone
from support.dnsutil import addresses, make_query, tcp, udp
from support.fake_upstream import answer_a
from support.net import free_port, hostport, ipv6_loopback_available, poll, wait_until
from support.procs import stop_process
from support.proxy_process import REPO

pytestmark = pytest.mark.e2e

CLK_TCK = os.sysconf("SC_CLK_TCK")
ATTEMPTS = 3  # the defaults: deadline 3 s in attempts of 1 s


# --- refused at start -----------------------------------------------------------------


def run_proxy(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "run", "--admin", "off", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


LOOPS = {
    "same address": ("127.0.0.1:{p}", "127.0.0.1:{p}"),
    "IPv4 wildcard, loopback": ("0.0.0.0:{p}", "127.0.0.1:{p}"),
    "IPv4 wildcard, other loopback address": ("0.0.0.0:{p}", "127.0.0.9:{p}"),
    "IPv4 wildcard, unspecified upstream": ("0.0.0.0:{p}", "0.0.0.0:{p}"),
    "IPv6 wildcard, IPv4 loopback": ("[::]:{p}", "127.0.0.1:{p}"),
    "IPv6 loopback": ("[::1]:{p}", "[::1]:{p}"),
}


@pytest.mark.parametrize("case", LOOPS)
def test_upstream_that_is_an_own_listener_is_refused(case):
    port = free_port()
    listen, upstream = (text.format(p=port) for text in LOOPS[case])
    if "::" in listen + upstream and not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback")
    proc = run_proxy("--listen", listen, "--upstream", upstream)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert upstream in lines[0] and listen in lines[0] and "loop" in lines[0]
    assert "Traceback" not in proc.stderr


def test_loop_is_refused_from_the_config_file_and_with_workers(tmp_path):
    port = free_port()
    config = tmp_path / "loop.yaml"
    config.write_text(f'listen: ["0.0.0.0:{port}"]\nupstreams: ["127.0.0.1:{port}"]\n')
    for args in (["--config", str(config)], ["--config", str(config), "--workers", "2"]):
        proc = run_proxy(*args)
        assert proc.returncode == 2, proc.stderr
        assert f"upstream 127.0.0.1:{port} reaches this proxy's own listener 0.0.0.0:{port}" \
            in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_upstream_beside_a_listener_is_not_refused(start_proxy, unbound):
    """Not a loop: another loopback address at the listener's port, or the
    listener's address at another port (unbound's)."""
    port = free_port()
    proxy = start_proxy("--listen", f"127.0.0.1:{port}",
                        upstreams=[f"127.0.0.2:{port}", unbound])
    reply = udp(make_query(zone.WWW, "A"), proxy.host, proxy.port, timeout=5)
    assert addresses(reply) == set(zone.WWW_A)
    assert proxy.metric("dnschaos_upstream_looped") == 0


# --- found at run time ----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children (worker processes)."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK



def assert_idle(procs, seconds: float = 3.0) -> list[float]:
    """Each process (a pid) used under 5 % of a core over `seconds`."""
    before = [cpu_seconds(pid) for pid in procs]
    time.sleep(seconds)
    shares = [(cpu_seconds(pid) - b) / seconds for pid, b in zip(procs, before, strict=True)]
    assert all(share < 0.05 for share in shares), f"CPU shares {shares}: a loop storms"
    return shares


def proxy_pair(start_proxy, *extra: str):
    """proxy A forwards to proxy B, which forwards back to A (a second
    listener of A's, on a port chosen first)."""
    back = free_port()
    b = start_proxy(upstreams=[f"127.0.0.1:{back}"])
    a = start_proxy("--listen", f"127.0.0.1:{back}", *extra, upstreams=[b])
    return a, b


@pytest.mark.parametrize("workers", [1, 2])
def test_loop_through_another_proxy_is_found_and_does_not_storm(start_proxy, workers):
    a, b = proxy_pair(start_proxy, "--workers", str(workers))
    # Each worker finds it (the looped gauge says whether any did).
    found = poll(lambda: a.metric("dnschaos_upstream_loops_total") >= workers)
    sent_before = a.metric("dnschaos_upstream_requests_total", upstream=b.hostport)
    b_before = b.metric("dnschaos_queries_total")
    at_deadline = a.metric("dnschaos_servfail_sent_total", reason="deadline")
    no_upstream = a.metric("dnschaos_servfail_sent_total", reason="no_upstream")
    query = make_query(zone.WWW, "A")
    reply = udp(query, a.host, a.port, timeout=5)
    shares = assert_idle([a.pid, b.pid])
    sent = a.metric("dnschaos_upstream_requests_total", upstream=b.hostport) - sent_before
    b_got = b.metric("dnschaos_queries_total") - b_before
    assert sent <= ATTEMPTS and b_got <= ATTEMPTS, (sent, b_got, shares)
    assert found, "the loop was not found"
    # SERVFAIL at once: for want of an upstream, not after waiting out the deadline.
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert a.metric("dnschaos_servfail_sent_total", reason="no_upstream") == no_upstream + 1
    assert a.metric("dnschaos_servfail_sent_total", reason="deadline") == at_deadline
    assert sent == 0, "nothing is forwarded to a looped upstream"
    assert a.metric("dnschaos_upstream_looped", upstream=b.hostport) == 1
    status, health = a.health()
    assert status == 503 and health["upstreams"] == {b.hostport: "looped"}
    assert "forwarding loop" in a.stderr_text()
    # Over TCP as well.
    assert tcp(query, a.host, a.port, timeout=5).rcode() == dns.rcode.SERVFAIL


def test_loop_probe_is_answered_not_forwarded_and_logged_once(start_proxy):
    a, b = proxy_pair(start_proxy)
    wait_until(lambda: a.metric("dnschaos_upstream_looped") == 1)
    # A's probe reached A through B and was answered there: B forwarded it
    # once and got an answer, nothing went round again.
    time.sleep(0.5)
    assert b.metric("dnschaos_upstream_requests_total") == 1
    assert b.metric("dnschaos_answers_total") == 1
    for _ in range(3):
        udp(make_query(zone.WWW, "A"), a.host, a.port, timeout=5)
    assert a.stderr_text().count("forwarding loop") == 1


def test_a_looped_upstream_is_skipped_for_the_next(start_proxy, unbound):
    """One upstream loops, the other answers: clients get answers, the
    looped one gets nothing."""
    back = free_port()
    b = start_proxy(upstreams=[f"127.0.0.1:{back}"])
    a = start_proxy("--listen", f"127.0.0.1:{back}", "--policy", "round_robin",
                    upstreams=[b, unbound])
    wait_until(lambda: a.metric("dnschaos_upstream_looped", upstream=b.hostport) == 1)
    assert a.metric("dnschaos_upstream_looped", upstream=unbound.hostport) == 0
    for _ in range(6):
        reply = udp(make_query(zone.WWW, "A"), a.host, a.port, timeout=5)
        assert addresses(reply) == set(zone.WWW_A)
    assert a.metric("dnschaos_upstream_requests_total", upstream=b.hostport) == 0
    assert a.metric("dnschaos_upstream_requests_total", upstream=unbound.hostport) == 6
    assert a.health()[0] == 200


def test_no_loop_no_looped_upstream(start_proxy, unbound):
    """The probe to a real resolver finds nothing (unbound answers it
    itself), and clients get unbound's answers."""
    proxy = start_proxy(upstreams=[unbound])
    reply = udp(make_query(zone.WWW, "A"), proxy.host, proxy.port, timeout=5)
    assert addresses(reply) == set(zone.WWW_A)
    assert proxy.metric("dnschaos_upstream_looped", upstream=unbound.hostport) == 0
    assert proxy.metric("dnschaos_upstream_loops_total", upstream=unbound.hostport) == 0
    assert "forwarding loop" not in proxy.stderr_text()


UNBOUND_FORWARDER = """\
server:
    interface: 127.0.0.1@{port}
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    module-config: "iterator"
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{back}
remote-control:
    control-enable: no
"""


@pytest.fixture
def unbound_forwarding_to(tmp_path):
    """Factory: a real unbound that forwards every name to 127.0.0.1:back."""
    started = []

    def start(back: int) -> str:
        port = free_port()
        conf = tmp_path / "forwarder.conf"
        conf.write_text(UNBOUND_FORWARDER.format(port=port, dir=tmp_path, back=back))
        with open(tmp_path / "forwarder.log", "wb") as log:
            proc = subprocess.Popen(["unbound", "-d", "-c", str(conf)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started.append(proc)
        time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "forwarder.log").read_text()
        return hostport("127.0.0.1", port)

    yield start
    for proc in started:
        stop_process(proc)


def test_loop_through_unbound_is_found(start_proxy, unbound_forwarding_to):
    back = free_port()
    forwarder = unbound_forwarding_to(back)
    a = start_proxy("--listen", f"127.0.0.1:{back}", upstreams=[forwarder])
    found = poll(lambda: a.metric("dnschaos_upstream_looped", upstream=forwarder) == 1)
    reply = udp(make_query(zone.WWW, "A"), a.host, a.port, timeout=5)
    assert_idle([a.pid])
    assert a.metric("dnschaos_upstream_requests_total", upstream=forwarder) <= ATTEMPTS
    assert found and reply.rcode() == dns.rcode.SERVFAIL
    assert a.metric("dnschaos_upstream_requests_total", upstream=forwarder) == 0


def test_looped_upstream_is_used_again_once_the_loop_is_gone(start_proxy, fake_upstream):
    """B, which forwarded back, is replaced by a resolver on the same port:
    the next periodic probe (10 s) gets a real answer (NXDOMAIN), and A
    forwards to it again."""
    a, b = proxy_pair(start_proxy)
    wait_until(lambda: a.metric("dnschaos_upstream_looped", upstream=b.hostport) == 1)
    b.stop()
    fake = fake_upstream(answer_a("192.0.2.7"), port=b.port)
    assert a.metric("dnschaos_upstream_looped", upstream=b.hostport) == 1
    assert udp(make_query(zone.WWW, "A"), a.host, a.port, timeout=5).rcode() == dns.rcode.SERVFAIL
    wait_until(lambda: a.metric("dnschaos_upstream_looped", upstream=b.hostport) == 0,
               timeout=15)
    reply = udp(make_query(zone.WWW, "A"), a.host, a.port, timeout=5)
    assert addresses(reply) == {"192.0.2.7"}
    assert fake.count() == 1
    assert "no longer loops back to this proxy" in a.stderr_text()
