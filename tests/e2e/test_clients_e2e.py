"""The faults as real clients see them: `dig`, and the system resolver
(glibc getaddrinfo) of a process whose /etc/resolv.conf points at the proxy.

glibc's resolv.conf takes no port, so the proxy also listens on
127.0.0.X:53 (a free X from 53 up; we run as root), and the lookups run in a
private mount namespace (`unshare -m`) where a tmp file
`nameserver 127.0.0.X / options timeout:1 attempts:1` is bind-mounted over
/etc/resolv.conf.  What glibc 2.36 gives here:

    NXDOMAIN            EAI_NONAME  "Name or service not known"
    NODATA (A and AAAA) EAI_NODATA  "No address associated with hostname"
    SERVFAIL, REFUSED,  EAI_AGAIN   "Temporary failure in name resolution"
    NOTIMP, timeouts,
    wrong ID/question,
    random bytes
    TC over UDP         retried over TCP: the real address
    answer cut short    EAI_AGAIN, or at once EAI_NONAME "not found" (by cut)

`getent ahosts` exits 2 for every one of these failures, so it cannot tell
"not found" from "temporary failure": the precise check is a small Python
program calling socket.getaddrinfo inside the namespace.  The tests skip
when `unshare -m` is not permitted.
"""

from __future__ import annotations

import re
import socket

import pytest

from support import zone
from support.dnsutil import assert_same_reply, dig
from support.faults_support import (
    getaddrinfo_in_namespace,
    getent_in_namespace,
    loopback_with_free_port,
    resolv_conf,
    rule,
    soa_of,
    unshare_problem,
    write_scenario,
)
from support.proxy_process import ProxyStartError

pytestmark = pytest.mark.e2e


def h(i: int) -> str:
    return zone.host_name(i)


def bare(name: str) -> str:
    return name.rstrip(".")


RULES = [
    rule("nxdomain", {"name": h(10)}, {"type": "nxdomain", "soa": {"negative_ttl": 60}}),
    rule("servfail", {"name": h(20)}, "servfail"),
    rule("drop", {"name": h(30)}, "drop"),
    rule("delay", {"name": h(40)}, {"type": "delay", "delay": "400ms"}),
    rule("nodata", {"name": h(50)}, {"type": "nodata", "soa": {"negative_ttl": 60}}),
    rule("refused", {"name": h(60)}, "refused"),
    rule("spoof", {"name": h(70)}, {"type": "spoof", "a": "192.0.2.66", "aaaa": "2001:db8::66"}),
    rule("truncate", {"name": h(80)}, "truncate"),
    rule("notimp", {"name": h(90)}, {"type": "rcode", "rcode": "NOTIMP"}),
    rule("wrong-id", {"name": h(91)}, {"type": "corrupt", "mode": "wrong_id"}),
    rule("too-slow", {"name": h(92)}, {"type": "delay", "delay": "1500ms"}),
    rule("short", {"name": h(93)}, {"type": "corrupt", "mode": "short"}),
    rule("random", {"name": h(94)}, {"type": "corrupt", "mode": "random"}),
    rule("wrong-question", {"name": h(95)}, {"type": "corrupt", "mode": "wrong_question"}),
]


class Dns53:
    """The proxy and the address it answers on at port 53."""

    def __init__(self, proxy, host: str) -> None:
        self.proxy = proxy
        self.host = host


@pytest.fixture(scope="module")
def dns53(start_module_proxy, unbound, tmp_path_factory):
    path = write_scenario(tmp_path_factory.mktemp("clients"), {
        "name": "clients-e2e", "phases": [{"name": "p", "duration": "1h", "rules": RULES}]})
    tried: list[str] = []
    for _ in range(3):  # another test run may take the address between check and bind
        try:
            host = loopback_with_free_port(53, skip=tried)
        except RuntimeError as exc:
            pytest.skip(f"cannot listen on port 53: {exc}")
        tried.append(host)
        try:
            proxy = start_module_proxy("--scenario", str(path), "--listen", f"{host}:53",
                                       upstreams=[unbound])
        except ProxyStartError as exc:
            if "already in use" in str(exc).lower():
                continue
            if "permission denied" in str(exc).lower():
                pytest.skip("no permission to listen on port 53")
            raise
        return Dns53(proxy, host)
    pytest.fail(f"could not listen on port 53 of any of {tried}")


@pytest.fixture(scope="module")
def proxy(dns53):
    return dns53.proxy


# --- dig ----------------------------------------------------------------------------------


def _dig(target, *args, timeout: float = 2.0):
    host, port = (target.host, 53) if isinstance(target, Dns53) else (target.host, target.port)
    return dig(*args, server=host, port=port, timeout=timeout)


def _query_time_ms(result) -> int:
    found = re.search(r";; Query time: (\d+) msec", result.stdout)
    assert found, result.stdout
    return int(found.group(1))


def _dig_unaffected(proxy, unbound, *args) -> None:
    through = _dig(proxy, *args)
    direct = _dig(unbound, *args)
    assert through.status == direct.status and through.answered, through.stdout
    assert_same_reply(through.message, direct.message, context=" ".join(args))


def test_dig_nxdomain_servfail_refused_nodata(dns53, proxy, unbound):
    nx = _dig(dns53, h(10), "A")
    assert nx.status == "NXDOMAIN" and soa_of(nx.message).ttl == 60, nx.stdout
    assert _dig(proxy, h(10), "AAAA").status == "NXDOMAIN"
    servfail = _dig(dns53, h(20), "A")
    assert servfail.status == "SERVFAIL" and not servfail.message.answer
    assert _dig(dns53, h(60), "A").status == "REFUSED"
    assert _dig(dns53, h(90), "A").status == "NOTIMP"
    nodata = _dig(dns53, h(50), "A")
    assert nodata.status == "NOERROR" and not nodata.message.answer
    assert soa_of(nodata.message).ttl == 60
    for name in (h(11), h(21), h(51), h(61), zone.NXDOMAIN_NAME):
        _dig_unaffected(proxy, unbound, name, "A")


def test_dig_drop_times_out(dns53, proxy, unbound):
    result = _dig(dns53, h(30), "A", timeout=1.0)
    assert result.returncode == 9 and not result.answered, result.stdout
    assert "timed out" in result.stdout and "no servers could be reached" in result.stdout
    tcp = _dig(dns53, h(30), "A", "+tcp", timeout=1.0)  # held open, silent
    assert tcp.returncode == 9 and not tcp.answered, tcp.stdout
    slow = _dig(dns53, h(92), "A", timeout=1.0)  # 1.5 s delay > dig's 1 s
    assert slow.returncode == 9 and "timed out" in slow.stdout
    _dig_unaffected(proxy, unbound, h(31), "A")


def test_dig_delay_shows_in_query_time(dns53, proxy, unbound):
    slow = _dig(dns53, h(40), "A")
    assert slow.status == "NOERROR" and _query_time_ms(slow) >= 350, slow.stdout
    direct = _dig(unbound, h(40), "A")
    assert_same_reply(slow.message, direct.message)
    fast = _dig(dns53, h(41), "A")
    assert _query_time_ms(fast) < _query_time_ms(slow), (fast.stdout, slow.stdout)
    _dig_unaffected(proxy, unbound, h(41), "A")


def test_dig_spoof_truncate_wrong_id(dns53, proxy, unbound):
    spoofed = _dig(dns53, h(70), "A")
    assert spoofed.status == "NOERROR"
    assert [r.to_text() for rrset in spoofed.message.answer for r in rrset] == ["192.0.2.66"]
    truncated = _dig(dns53, h(80), "A")
    assert truncated.retried_over_tcp and truncated.status == "NOERROR", truncated.stdout
    assert_same_reply(truncated.message, _dig(unbound, h(80), "A", "+tcp").message)
    wrong = _dig(dns53, h(91), "A", timeout=1.0)  # dig ignores the mismatched ID, waits, gives up
    assert not wrong.answered and wrong.returncode == 9, wrong.stdout
    other = _dig(dns53, h(95), "A", timeout=1.0)
    assert "Question section mismatch" in other.stdout and other.returncode == 9, other.stdout
    short = _dig(dns53, h(93), "A", timeout=1.0)
    assert short.returncode == 9 or "malformed" in short.stdout, short.stdout
    _dig_unaffected(proxy, unbound, h(71), "A")
    _dig_unaffected(proxy, unbound, h(81), "A")


def test_dig_many_names_unaffected(proxy, unbound):
    for i in range(150, 200, 2):
        _dig_unaffected(proxy, unbound, h(i), "A")
    _dig_unaffected(proxy, unbound, zone.WWW, "AAAA")
    _dig_unaffected(proxy, unbound, zone.CNAME_HEAD, "A")


# --- glibc --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resolv(dns53, tmp_path_factory):
    problem = unshare_problem()
    if problem:
        pytest.skip(problem)
    return resolv_conf(tmp_path_factory.mktemp("resolv"), dns53.host)


EXPECTED_ERRORS = {
    h(10): {socket.EAI_NONAME},  # NXDOMAIN: not found
    h(50): {socket.EAI_NODATA, socket.EAI_NONAME},  # NODATA: no address
    h(20): {socket.EAI_AGAIN},  # SERVFAIL: temporary failure
    h(60): {socket.EAI_AGAIN},  # REFUSED
    h(90): {socket.EAI_AGAIN},  # NOTIMP
    h(30): {socket.EAI_AGAIN},  # no answer: timeout
    h(91): {socket.EAI_AGAIN},  # only an answer with the wrong ID: timeout
    h(92): {socket.EAI_AGAIN},  # answer after the 1 s timeout
    h(94): {socket.EAI_AGAIN},  # random bytes: ignored, timeout
    h(95): {socket.EAI_AGAIN},  # the answer to another question: ignored, timeout
    # The real answer cut short: ignored (timeout) when the cut falls in the
    # question, else glibc gives up at once with "not found" (EAI_NONAME):
    # a malformed reply turns into a permanent failure for the application.
    h(93): {socket.EAI_AGAIN, socket.EAI_NONAME},
    zone.NXDOMAIN_NAME: {socket.EAI_NONAME},  # unbound's own NXDOMAIN, unaffected
}
EXPECTED_ADDRESSES = {
    h(40): [zone.host_address(40)],  # delayed, then the real answer
    h(70): ["192.0.2.66", "2001:db8::66"],  # spoofed
    h(80): [zone.host_address(80)],  # TC over UDP, then TCP: the real answer
    zone.WWW: sorted(zone.WWW_A + zone.WWW_AAAA),
    zone.MX_TARGET: [zone.MAIL_A],
    **{h(i): [zone.host_address(i)] for i in (1, 11, 21, 31, 51, 61, 71, 81, 91)},
    **{h(i): [zone.host_address(i)] for i in range(150, 200)},
}


def test_glibc_getaddrinfo(resolv):
    names = sorted(EXPECTED_ERRORS) + sorted(EXPECTED_ADDRESSES)
    results = getaddrinfo_in_namespace(resolv, [bare(n) for n in names])
    problems = []
    for name in names:
        got = results[bare(name)]
        if name in EXPECTED_ERRORS:
            if got.ok or got.errno not in EXPECTED_ERRORS[name]:
                problems.append(f"{name}: {got}, want errno in {EXPECTED_ERRORS[name]}")
        elif not got.ok or got.addresses != EXPECTED_ADDRESSES[name]:
            problems.append(f"{name}: {got}, want {EXPECTED_ADDRESSES[name]}")
    assert not problems, "\n".join(problems)
    # Timing: the delay shows; the timeouts took glibc's 1 s; the rest is
    # quick: done before the 400 ms delayed lookup started with them (no
    # glibc retry, which would take its 1 s timeout).
    delayed = results[bare(h(40))].elapsed
    assert delayed >= 0.35
    for name in (h(30), h(91), h(92), h(94), h(95)):
        assert results[bare(name)].elapsed >= 0.9, (name, results[bare(name)])
    for name in (h(1), h(10), h(20), h(50)):
        assert results[bare(name)].elapsed < delayed, (name, results[bare(name)], delayed)


def test_getent_exit_codes(resolv):
    found = getent_in_namespace(resolv, bare(h(1)))
    assert found.returncode == 0 and zone.host_address(1) in found.stdout, found
    spoofed = getent_in_namespace(resolv, bare(h(70)))
    assert spoofed.returncode == 0 and "192.0.2.66" in spoofed.stdout
    # getent: 2 ("key not found") for NXDOMAIN and for SERVFAIL alike.
    for name in (h(10), h(20)):
        failed = getent_in_namespace(resolv, bare(name))
        assert failed.returncode == 2 and not failed.stdout, (name, failed)
