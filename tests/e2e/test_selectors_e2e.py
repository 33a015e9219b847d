"""Every selector end to end, through the running proxy in front of the real
unbound (support.unbound).

One proxy runs one long phase; every rule spoofs a distinctive answer,
A 198.51.100.<k> with TTL k (other query types: an empty NOERROR whose SOA
has TTL k), so a reply tells which rule, if any, selected the query.  Each
test checks queries a rule selects (`selected`) and, in the same test, near
misses it must not select, answered exactly as unbound answers directly
(`assert_unaffected`).  The proxy listens on three addresses for `listener`
and allows 127.0.0.0/8; clients are told apart by their source address
(127.0.0.1, .2, .3...).  `ramp` and the scenario `seed` need their own
proxies (a short phase; two identical runs).
"""

from __future__ import annotations

import math
import time

import dns.message
import dns.rdatatype
import pytest

from support import zone
from support.faults_support import (
    ask,
    assert_unaffected,
    injected,
    matched,
    phase_bounds,
    rule,
    scenario_start,
    soa_of,
    write_scenario,
)
from support.net import free_port

pytestmark = pytest.mark.e2e

SPOOF_NET = "198.51.100."


def h(i: int) -> str:
    return zone.host_name(i)


def spoof(k: int) -> dict:
    return {"type": "spoof", "a": f"{SPOOF_NET}{k}", "ttl": k}


def fired(reply: dns.message.Message) -> int | None:
    """Which rule answered: k of its spoofed A 198.51.100.k (or of its SOA TTL), else None."""
    for rrset in reply.answer:
        if rrset.rdtype == dns.rdatatype.A:
            for rdata in rrset:
                if rdata.address.startswith(SPOOF_NET):
                    return int(rdata.address.rsplit(".", 1)[1])
    soa = soa_of(reply)
    if soa is not None and next(iter(soa)).mname.to_text() == "ns.invalid.":
        return soa.ttl
    return None


HASH_CLIENT_SEED, HASH_NAME_SEED = 3, 7


def selector_rules(listen2: str, listen3_host: str) -> list[dict]:
    r = rule
    return [
        r("name", {"name": [h(1), "HOST2.Example.Test."]}, spoof(1)),
        r("suffix", {"suffix": "host3.example.test"}, spoof(2)),
        r("glob", {"glob": ["*.glob.example.test", "host4?.example.test"]}, spoof(4)),
        r("regex", {"regex": [r"^host1[0-4][0-9]\.example\.test$", "rx"]}, spoof(5)),
        r("qtype", {"name": h(5), "qtype": ["AAAA", 16]}, spoof(6)),
        r("transport", {"name": h(6), "transport": "tcp"}, spoof(7)),
        r("clients-exclude", {"name": h(7), "clients": "127.0.0.0/8",
                              "exclude_clients": "127.0.0.2"}, spoof(8)),
        r("clients", {"name": h(8), "clients": "127.0.0.3/32"}, spoof(9)),
        r("listener", {"name": h(9), "listener": listen2}, spoof(10)),
        r("listener-host", {"name": h(11), "listener": listen3_host}, spoof(11)),
        r("every", {"name": h(12), "qtype": "A", "every": 3}, spoof(12)),
        r("first", {"name": h(13), "first": 2}, spoof(13)),
        r("hash-client", {"name": h(14), "hash": {"by": "client", "share": 0.5,
                                                  "seed": HASH_CLIENT_SEED}}, spoof(14)),
        r("hash-name", {"regex": r"^host2[0-9]\.example\.test$",
                        "hash": {"by": "name", "share": 0.5, "seed": HASH_NAME_SEED}}, spoof(15)),
        r("all", {"all": [{"suffix": "example.test"}, {"regex": r"^host15\."},
                          {"qtype": "A"}]}, spoof(16)),
        r("any", {"any": [{"name": h(16)}, {"name": h(17)}]}, spoof(17)),
        r("not", {"name": h(18), "not": {"qtype": "A"}}, spoof(18)),
        r("nested", {"all": [{"name": h(19)},
                             {"not": {"any": [{"transport": "tcp"},
                                              {"clients": "127.0.0.2"}]}}]}, spoof(19)),
        r("limit-count", {"name": h(30)}, spoof(20), limit={"count": 3}),
        r("limit-rate", {"name": h(31)}, spoof(21), limit={"per_second": 5}),
        r("probability-0", {"name": h(32), "probability": 0}, spoof(22)),
        r("probability-1", {"name": h(33), "probability": 1}, spoof(23)),
        r("probability-0.3", {"name": h(34), "probability": 0.3}, spoof(24)),
        r("narrow", {"name": h(35), "qtype": "AAAA"}, spoof(25)),
        r("broad", {"name": h(35)}, spoof(26)),
        r("shadowed", {"name": h(41)}, spoof(27)),  # the glob rule above wins
        r("suffix-txt", {"suffix": "example.test", "qtype": "TXT"}, spoof(3)),  # last: broad
    ]


STATEFUL = {12, 13, 30, 31, 34}  # every/first/limit/probability: their own tests count


def expected_for_host(i: int) -> int | None:
    """The rule selecting `host<i> A` over UDP from 127.0.0.1 on the main listener."""
    from proxy.core.sampling import hash_share

    if i in (1, 2):
        return 1
    if i == 3:
        return 2
    if 40 <= i <= 49:
        return 4
    if 100 <= i <= 149:
        return 5
    if i == 7:
        return 8
    if i == 14:
        return 14 if hash_share(HASH_CLIENT_SEED, "127.0.0.1") < 0.5 else None
    if 20 <= i <= 29:
        return 15 if hash_share(HASH_NAME_SEED, f"host{i}.example.test") < 0.5 else None
    if i == 15:
        return 16
    if i in (16, 17):
        return 17
    if i == 19:
        return 19
    if i == 33:
        return 23
    if i == 35:
        return 26
    return None


class Listeners:
    def __init__(self) -> None:
        self.second = ("127.0.0.1", free_port("127.0.0.1"))
        self.third = ("127.0.0.7", free_port("127.0.0.7"))


@pytest.fixture(scope="module")
def listeners():
    return Listeners()


@pytest.fixture(scope="module")
def proxy(start_module_proxy, unbound, listeners, tmp_path_factory):
    second = f"{listeners.second[0]}:{listeners.second[1]}"
    third = f"{listeners.third[0]}:{listeners.third[1]}"
    path = write_scenario(tmp_path_factory.mktemp("selectors"), {
        "name": "selectors-e2e", "seed": 1,
        "phases": [{"name": "all-selectors", "duration": "1h",
                    "rules": selector_rules(second, listeners.third[0])}]})
    return start_module_proxy("--scenario", str(path), "--allow", "127.0.0.0/8",
                              "--listen", second, "--listen", third, upstreams=[unbound])


def selected(proxy, k: int, name: str, qtype: str = "A", *, addr=None, **kw) -> None:
    reply = ask(addr or proxy, name, qtype, **kw)
    assert fired(reply) == k, (name, qtype, kw, reply.to_text())


# --- names --------------------------------------------------------------------------------


def test_name(proxy, unbound):
    for name in (h(1), h(2), "HoSt1.EXAMPLE.test.", "host2.example.test."):
        selected(proxy, 1, name)
    selected(proxy, 1, h(1), "AAAA")  # every qtype
    for name in (h(10), "ahost1.example.test.", "x.host1.example.test."):
        assert_unaffected(proxy, unbound, name)


def test_suffix(proxy, unbound):
    for name in (h(3), "a.host3.example.test.", "a.b.HOST3.example.test."):
        selected(proxy, 2, name)
    for name in ("xhost3.example.test.", h(36), "host3x.example.test."):
        assert_unaffected(proxy, unbound, name)
    # suffix example.test (TXT only): the zone and everything in it, never xexample.test.
    for name in ("example.test.", zone.BIG_TXT, h(60)):
        selected(proxy, 3, name, "TXT")
    for name in ("xexample.test.", "example.testx."):
        assert_unaffected(proxy, unbound, name, "TXT")
    assert_unaffected(proxy, unbound, "xexample.test.", "A")


def test_glob(proxy, unbound):
    for name in ("a.glob.example.test.", "a.b.glob.example.test.", h(40), h(49)):
        selected(proxy, 4, name)
    for name in ("glob.example.test.", "aglob.example.test.", "host4.example.test.",
                 "host400.example.test."):
        assert_unaffected(proxy, unbound, name)
    selected(proxy, 5, h(140))  # not the glob's host4?: the regex rule's


def test_regex(proxy, unbound):
    for name in (h(100), "HOST149.example.test.", "arxb.example.test."):
        selected(proxy, 5, name)
    for name in (h(150), h(199), "ab.example.test.", "host100.example.test.x."):
        assert_unaffected(proxy, unbound, name)


def test_qtype(proxy, unbound):
    selected(proxy, 6, h(5), "AAAA")
    selected(proxy, 6, h(5), "TXT")  # by number (16)
    for qtype in ("A", "MX"):
        assert_unaffected(proxy, unbound, h(5), qtype)


def test_transport(proxy, unbound):
    selected(proxy, 7, h(6), transport="tcp")
    assert_unaffected(proxy, unbound, h(6), transport="udp")
    assert_unaffected(proxy, unbound, h(61), transport="tcp")


def test_clients_and_exclude_clients(proxy, unbound):
    for source in ("127.0.0.1", "127.0.0.3", "127.0.0.9"):
        selected(proxy, 8, h(7), source=source)
    assert_unaffected(proxy, unbound, h(7), source="127.0.0.2")  # excluded
    selected(proxy, 9, h(8), source="127.0.0.3")
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.4"):
        assert_unaffected(proxy, unbound, h(8), source=source)
    selected(proxy, 9, h(8), source="127.0.0.3", transport="tcp")


def test_listener(proxy, unbound, listeners):
    selected(proxy, 10, h(9), addr=listeners.second)
    selected(proxy, 10, h(9), addr=listeners.second, transport="tcp")
    assert_unaffected(proxy, unbound, h(9))
    assert_unaffected(proxy, unbound, h(9), proxy_addr=listeners.third)
    selected(proxy, 11, h(11), addr=listeners.third)  # a bare address: any port
    assert_unaffected(proxy, unbound, h(11))
    assert_unaffected(proxy, unbound, h(11), proxy_addr=listeners.second)
    assert_unaffected(proxy, unbound, h(10), proxy_addr=listeners.third)


# --- sampling -----------------------------------------------------------------------------


def test_every(proxy, unbound):
    """Every 3rd A query of host12; the AAAA queries in between are not counted."""
    got = []
    for _ in range(9):
        got.append(fired(ask(proxy, h(12))))
        assert_unaffected(proxy, unbound, h(12), "AAAA")
    assert got == [None, None, 12] * 3
    assert injected(proxy, "every") == 3


def test_first(proxy, unbound):
    got = [fired(ask(proxy, h(13))) for _ in range(5)]
    assert got == [13, 13, None, None, None]
    assert_unaffected(proxy, unbound, h(13))
    assert_unaffected(proxy, unbound, h(13), source="127.0.0.2")


def test_hash_by_client(proxy, unbound):
    from proxy.core.sampling import hash_share

    expected = {f"127.0.0.{i}": hash_share(HASH_CLIENT_SEED, f"127.0.0.{i}") < 0.5
                for i in range(1, 21)}
    assert 3 <= sum(expected.values()) <= 17  # a mix, so the test means something
    for _round in range(2):  # the same clients stay affected
        for source, chosen in expected.items():
            if chosen:
                selected(proxy, 14, h(14), source=source)
            else:
                assert_unaffected(proxy, unbound, h(14), source=source)


def test_hash_by_name(proxy, unbound):
    from proxy.core.sampling import hash_share

    names = [h(i) for i in range(20, 30)]
    expected = {n: hash_share(HASH_NAME_SEED, n.rstrip(".")) < 0.5 for n in names}
    assert 2 <= sum(expected.values()) <= 8
    for _round in range(2):  # the same names stay affected, for every client
        for name, chosen in expected.items():
            for source in ("127.0.0.1", "127.0.0.2"):
                if chosen:
                    selected(proxy, 15, name, source=source)
                else:
                    assert_unaffected(proxy, unbound, name, source=source)


def test_probability_0_and_1(proxy, unbound):
    for _ in range(200):
        assert fired(ask(proxy, h(32))) is None
        assert fired(ask(proxy, h(33))) == 23
    assert injected(proxy, "probability-0") == 0
    assert injected(proxy, "probability-1") >= 200
    assert_unaffected(proxy, unbound, h(32))


def test_probability_0_3_over_2000_queries(proxy, unbound):
    """Binomial(2000, 0.3): mean 600, sd 20.5; accept 4 sd either side."""
    n, p = 2000, 0.3
    before = injected(proxy, "probability-0.3")
    hits = 0
    direct = ask(unbound, h(34))
    for _ in range(n):
        reply = ask(proxy, h(34))
        if fired(reply) == 24:
            hits += 1
        else:
            assert reply.answer == direct.answer  # the others: unbound's answer
    sd = math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) <= 4 * sd, hits
    assert injected(proxy, "probability-0.3") - before == hits
    assert_unaffected(proxy, unbound, h(37))


@pytest.mark.slow
def test_ramp_and_empty_match(start_proxy, unbound, tmp_path):
    """probability {from: 1, to: 0} across a 5 s phase: selected mostly early,
    rarely late; the queries it lets go fall to the next rule, whose empty
    match selects every query.  After the phase the scenario is over and
    every query is answered as without the proxy."""
    duration = 5.0
    path = write_scenario(tmp_path, {"name": "ramp-e2e", "phases": [
        {"name": "ramp", "duration": duration, "rules": [
            rule("ramp", {"name": h(1), "probability": {"from": 1.0, "to": 0.0}}, spoof(1)),
            rule("everything", {}, spoof(2)),
        ]}]})
    proxy = start_proxy("--scenario", str(path), upstreams=[unbound])
    (ramp,) = phase_bounds(path, scenario_start(proxy))
    samples = []
    while time.time() < ramp.end - 0.05:
        t0 = time.time()
        got = fired(ask(proxy, h(1)))
        samples.append(((t0 + time.time()) / 2, got))
        time.sleep(0.005)
    assert {got for _, got in samples} <= {1, 2}
    assert fired(ask(proxy, h(2))) == 2 and fired(ask(proxy, h(150), "AAAA")) == 2

    def share(lo: float, hi: float) -> tuple[float, int]:
        window = [got for t, got in samples
                  if lo <= (t - ramp.start) / duration < hi]
        return sum(1 for g in window if g == 1) / max(1, len(window)), len(window)

    early, n_early = share(0.05, 0.30)  # expected about 0.82
    late, n_late = share(0.70, 0.95)  # expected about 0.17
    assert n_early >= 40 and n_late >= 40, (n_early, n_late)
    assert early > 0.6 and late < 0.4, (early, late)

    while time.time() < ramp.end + 0.2:
        time.sleep(0.02)
    for i in (1, 2, 3):
        assert_unaffected(proxy, unbound, h(i))


# --- combinations, order, limits --------------------------------------------------------


def test_all_any_not(proxy, unbound):
    selected(proxy, 16, h(15))
    assert_unaffected(proxy, unbound, h(15), "AAAA")  # all: qtype A too
    assert_unaffected(proxy, unbound, h(150))  # 'host150.' does not match '^host15\.'
    selected(proxy, 17, h(16))
    selected(proxy, 17, h(17), "AAAA")
    assert_unaffected(proxy, unbound, h(18))  # not: A is the excluded qtype
    selected(proxy, 18, h(18), "AAAA")
    selected(proxy, 18, h(18), "TXT")
    selected(proxy, 19, h(19))  # all + not(any(...))
    assert_unaffected(proxy, unbound, h(19), transport="tcp")
    assert_unaffected(proxy, unbound, h(19), source="127.0.0.2")
    selected(proxy, 19, h(19), source="127.0.0.3")


def test_first_matching_rule_wins(proxy, unbound):
    selected(proxy, 25, h(35), "AAAA")  # the narrow rule, listed first
    selected(proxy, 26, h(35), "A")
    selected(proxy, 4, h(41))  # the glob listed before the rule naming host41
    assert injected(proxy, "shadowed") == 0


def test_limit_count(proxy, unbound):
    got = [fired(ask(proxy, h(30))) for _ in range(6)]
    assert got == [20, 20, 20, None, None, None]
    assert injected(proxy, "limit-count") == 3 and matched(proxy, "limit-count") == 3
    assert_unaffected(proxy, unbound, h(30))


def test_limit_per_second(proxy, unbound):
    """A bucket of 5 tokens, full at the start, refilled at 5 a second."""

    def burst() -> tuple[list, float]:
        start = time.monotonic()
        got = [fired(ask(proxy, h(31))) for _ in range(15)]
        return got, time.monotonic() - start

    got, elapsed = burst()
    assert got[:5] == [21] * 5, got
    assert got.count(21) <= 5 + int(elapsed * 5) + 1, (got, elapsed)
    time.sleep(1.0)  # refilled (capped at 5)
    got, elapsed = burst()
    assert got[:5] == [21] * 5, got
    assert got.count(21) <= 5 + int(elapsed * 5) + 1, (got, elapsed)
    assert None in got
    assert_unaffected(proxy, unbound, h(38))


# --- many names ---------------------------------------------------------------------------


def test_many_names(proxy, unbound):
    """host0..host199: those no rule selects are answered exactly as unbound
    answers; the others by the rule the selectors say."""
    untouched = 0
    for i in range(zone.HOST_COUNT):
        if i in STATEFUL:
            continue
        k = expected_for_host(i)
        if k is None:
            assert_unaffected(proxy, unbound, h(i))
            untouched += 1
        else:
            selected(proxy, k, h(i))
    assert untouched >= 100
    assert proxy.metric("dnschaos_engine_errors_total") == 0


# --- the scenario seed ------------------------------------------------------------------


def test_same_seed_same_choices(start_proxy, unbound, tmp_path):
    path = write_scenario(tmp_path, {"name": "seeded", "seed": 42, "phases": [
        {"name": "p", "duration": "1h",
         "rules": [rule("coin", {"name": h(1), "probability": 0.5}, spoof(1))]}]})
    patterns = []
    for _ in range(2):
        proxy = start_proxy("--scenario", str(path), upstreams=[unbound])
        patterns.append([fired(ask(proxy, h(1))) for _ in range(64)])
        proxy.stop()
    assert 0 < patterns[0].count(1) < 64
    assert patterns[0] == patterns[1]
