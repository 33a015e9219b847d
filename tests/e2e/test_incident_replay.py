"""The incident library, run by the proxy.

AWS DynamoDB, October 2025 (scenarios/aws-dynamodb-2025.yaml and its
-nxdomain variant): replayed with --time-scale so that the whole incident
takes 15-21 s, in front of a fake upstream that serves
dynamodb.us-east-1.amazonaws.com (a new address on every answer, TTL 300,
so a frozen answer is recognisable) and the scenario's load-balancer names
(6 addresses each).  A client polls from before the proxy is up until after
the scenario ends; each reply is classified and placed in the phase it fell
in, with phase boundaries computed from the file, the time scale and the
run's start (read from the proxy's log).  Every phase must be seen doing
what the file says.

And every file in scenarios/ is started by the proxy (--scenario, a time
scale that makes it last a second): the proxy compiles it, runs it to the
end and answers queries as without the proxy afterwards.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from support import zone
from support.dnsutil import addresses
from support.fake_upstream import reply_to
from support.faults_support import (
    PhaseSpan,
    ask,
    assert_unaffected,
    phase_at,
    phase_bounds,
    scenario_start,
    soa_of,
    ttls,
)
from support.net import wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = REPO / "scenarios"
DYNAMO = "dynamodb.us-east-1.amazonaws.com."
NLB_ADDRESSES = tuple(f"10.20.0.{i}" for i in range(1, 7))


def nlb_names(path: Path) -> list[str]:
    """The load-balancer names the scenario's partial rule selects."""
    from proxy.loader import load_scenario

    names = []
    for phase in load_scenario(path).phases:
        for rule in phase.rules:
            if rule.fault.type == "partial":
                names += [n.rstrip(".").lower() + "." for n in rule.match.name]
    return names


class AwsUpstream:
    """Fake upstream for amazonaws.com: DynamoDB gets a new A on every answer."""

    def __init__(self, nlbs: list[str]) -> None:
        self.nlbs = set(nlbs)
        self.generation = 0
        self.lock = threading.Lock()

    def __call__(self, got):
        q = got.message
        if q is None:
            return None
        name = q.question[0].name.to_text().lower()
        rdtype = q.question[0].rdtype
        if name == DYNAMO:
            if rdtype == dns.rdatatype.A:
                with self.lock:
                    self.generation += 1
                    n = self.generation
                return reply_to(q, f"{name} 300 IN A 3.218.{n // 250}.{n % 250 + 1}")
            if rdtype == dns.rdatatype.AAAA:
                return reply_to(q, f"{name} 300 IN AAAA 2600:1f18::1")
            return reply_to(q)
        if name in self.nlbs:
            if rdtype == dns.rdatatype.A:
                return reply_to(q, *(f"{name} 300 IN A {a}" for a in NLB_ADDRESSES))
            return reply_to(q)
        return reply_to(q, rcode=dns.rcode.NXDOMAIN)


@dataclass
class Sample:
    t0: float  # sent (wall clock)
    t1: float  # answered
    name: str
    qtype: str
    kind: str  # live, stale, nodata, nxdomain, servfail, timeout, ...
    addresses: frozenset = frozenset()
    ttl: int | None = None


def classify(reply: dns.message.Message) -> str:
    rcode = reply.rcode()
    soa = soa_of(reply)
    fault_soa = soa is not None and next(iter(soa)).mname.to_text() == "ns.invalid."
    if rcode == dns.rcode.NXDOMAIN:
        return "nxdomain" if fault_soa and soa.ttl == 60 else "nxdomain?"
    if rcode != dns.rcode.NOERROR:
        return dns.rcode.to_text(rcode).lower()
    if not reply.answer:
        return "nodata" if fault_soa and soa.ttl == 60 else "empty"
    return {frozenset({300}): "live", frozenset({60}): "stale"}.get(frozenset(ttls(reply)),
                                                                    "ttl?")


@dataclass
class Replay:
    path: Path
    phases: list[PhaseSpan]
    samples: list[Sample] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.phases[-1].end

    def phase(self, name: str) -> PhaseSpan:
        return next(p for p in self.phases if p.name == name)

    def inside(self, phase: str, name: str = DYNAMO, qtype: str = "A",
               guard: float = 0.015) -> list[Sample]:
        """Samples sent and answered well inside the phase."""
        span = self.phase(phase)
        return [s for s in self.samples if s.name == name and s.qtype == qtype
                and span.start + guard <= s.t0 and s.t1 <= span.end - guard]

    def after_end(self, name: str = DYNAMO, qtype: str = "A") -> list[Sample]:
        return [s for s in self.samples if s.name == name and s.qtype == qtype
                and s.t0 >= self.end + 0.05]

    def summary(self) -> str:
        lines = []
        for span in self.phases:
            kinds: dict[str, int] = {}
            for s in self.samples:
                if s.name == DYNAMO and s.qtype == "A" and phase_at(self.phases, s.t0) == span:
                    kinds[s.kind] = kinds.get(s.kind, 0) + 1
            lines.append(f"{span.name} [{span.end - span.start:.3f}s]: {kinds}")
        return "\n".join(lines)


def run_replay(start_proxy, fake_upstream, path: Path, time_scale: float,
               extra: list[tuple[str, str]], attempts: int = 3) -> Replay:
    """Start the proxy on `path` and poll DynamoDB A (and every 5th round the
    `extra` (name, qtype) pairs) from before it is up until the scenario is
    over.  Retried (a fresh proxy) only when the poller got no answer in the
    run's warm-up, which is a few tens of milliseconds at this time scale."""
    replay: Replay | None = None
    for attempt in range(attempts):
        fake = fake_upstream(AwsUpstream(nlb_names(path)))
        proxy = start_proxy("--scenario", str(path), "--time-scale", repr(time_scale),
                            upstreams=[fake], wait=False)
        try:
            replay = poll(proxy, path, time_scale, extra)
        except AssertionError:
            log = proxy.stderr_text().lower()
            if proxy.alive() or not ("could not bind" in log or "already in use" in log):
                raise
            continue  # its port was taken between the pick and the bind: another one
        print(f"{path.name}, attempt {attempt + 1}:\n{replay.summary()}")  # shown on failure
        if warmed_up(replay):
            return replay
        proxy.stop()
    pytest.fail(f"the poller never got an answer during the warm-up of {path.name}:\n"
                + (replay.summary() if replay else "the proxy never bound its port"))


def warmed_up(replay: Replay) -> bool:
    """Whether an answer was recorded before the first faulty phase began."""
    first_fault = replay.phases[1].start
    return any(s.kind == "live" and s.t1 < first_fault for s in replay.samples)


def poll(proxy, path: Path, time_scale: float, extra: list[tuple[str, str]]) -> Replay:
    replay: Replay | None = None
    samples: list[Sample] = []
    deadline = time.time() + 60  # until the start is known
    rounds = 0
    answered = False
    while time.time() < deadline:
        rounds += 1
        if replay is None and rounds % 10 == 0:
            try:
                started = scenario_start(proxy, timeout=0)
            except AssertionError:
                if not proxy.alive():
                    raise AssertionError("the proxy exited:\n" + proxy.stderr_text()) from None
            else:
                replay = Replay(path, phase_bounds(path, started, time_scale), samples)
                deadline = replay.end + 0.6
        if replay is not None and time.time() > replay.phases[1].start + 0.05 \
                and not warmed_up(replay):
            return replay  # missed the warm-up: no point in watching the rest
        pairs = [(DYNAMO, "A")] + (extra if rounds % 5 == 0 else [])
        for name, qtype in pairs:
            t0 = time.time()
            try:
                # UDP to a port nobody listens on yet is silently lost: short
                # timeouts until the proxy answers, so the warm-up is not missed.
                reply = ask(proxy, name, qtype, timeout=0.5 if answered else 0.01)
            except (OSError, dns.exception.Timeout):
                if replay is not None and answered:
                    samples.append(Sample(t0, time.time(), name, qtype, "timeout"))
                continue
            answered = True
            samples.append(Sample(t0, time.time(), name, qtype, classify(reply),
                                  frozenset(addresses(reply)), min(ttls(reply), default=None)))
        # Fast before the start is known and in phases shorter than a second.
        now = phase_at(replay.phases, time.time()) if replay is not None else None
        fast = replay is None or now is None or now.end - now.start < 1.0
        time.sleep(0.001 if fast else 0.01)
    assert replay is not None, "no 'scenario ... started' line:\n" + proxy.stderr_text()
    return replay


def check_warm_up_and_stale(replay: Replay) -> None:
    warm = [s for s in replay.inside("warm-up")]
    assert all(s.kind == "live" for s in warm), replay.summary()
    stale = replay.inside("stale-plan")
    assert len(stale) >= 5, replay.summary()
    # The stale answer is the last one the proxy saw before the phase began.
    first_stale = min(s.t0 for s in replay.samples if s.kind == "stale")
    before = [s for s in replay.samples if s.name == DYNAMO and s.qtype == "A"
              and s.kind == "live" and s.t1 <= first_stale]
    frozen = before[-1].addresses
    assert all(s.kind == "stale" and s.addresses == frozen for s in stale), (
        frozen, [(s.kind, set(s.addresses)) for s in stale][:10], replay.summary())


def check_recovery_tail(replay: Replay, failing: str) -> None:
    tail = replay.inside("recovery-tail")
    assert len(tail) >= 20, replay.summary()
    assert {s.kind for s in tail} == {failing, "live"}, replay.summary()
    span = replay.phase("recovery-tail")
    middle = (span.start + span.end) / 2
    early = [s.kind == failing for s in tail if s.t1 < middle]
    late = [s.kind == failing for s in tail if s.t0 >= middle]
    assert early and late
    # probability from 1 to 0: about 3/4 failing in the first half, 1/4 in the second.
    assert sum(early) / len(early) > sum(late) / len(late), replay.summary()
    assert sum(early) / len(early) > 0.4 and sum(late) / len(late) < 0.6, replay.summary()


@pytest.mark.slow
def test_aws_dynamodb_2025_replay(start_proxy, fake_upstream):
    """NOERROR variant, six phases in 21 s: warm-up (48 ms), stale-plan
    (0.24 s), empty-record (3.8 s), recovery-tail (0.36 s), ec2 (4.1 s),
    nlb-flap (12.5 s)."""
    from proxy.core.sampling import hash_share

    path = SCENARIOS / "aws-dynamodb-2025.yaml"
    nlbs = nlb_names(path)
    assert len(nlbs) == 2
    replay = run_replay(start_proxy, fake_upstream, path, 0.0004,
                        [(n, "A") for n in nlbs] + [(DYNAMO, "AAAA")])
    assert [p.name for p in replay.phases] == [
        "warm-up", "stale-plan", "empty-record", "recovery-tail", "ec2-launch-failures",
        "nlb-flap"]

    check_warm_up_and_stale(replay)
    empty = replay.inside("empty-record")
    assert len(empty) >= 50 and all(s.kind == "nodata" for s in empty), replay.summary()
    aaaa = replay.inside("empty-record", qtype="AAAA")
    assert aaaa and all(s.kind == "nodata" for s in aaaa)  # qtype [A, AAAA]
    check_recovery_tail(replay, "nodata")
    ec2 = replay.inside("ec2-launch-failures")
    assert len(ec2) >= 50 and all(s.kind == "live" for s in ec2), replay.summary()
    for name in nlbs:
        whole = replay.inside("ec2-launch-failures", name)
        assert whole and all(s.addresses == set(NLB_ADDRESSES) and s.ttl == 300 for s in whole)

    # nlb-flap: DynamoDB is fine; each NLB name loses 2 of its 6 addresses (share 0.3),
    # or all of them when the period's `empty` roll (5%) hits; kept ones get TTL 60.
    flap = replay.phase("nlb-flap")
    assert all(s.kind == "live" for s in replay.inside("nlb-flap")), replay.summary()
    for name in nlbs:
        seen = replay.inside("nlb-flap", name)
        assert len(seen) >= 20, replay.summary()
        key = name.rstrip(".")
        for s in seen:
            period = int((s.t0 - flap.start) // 20.0)
            if hash_share(period, f"{key}/empty") < 0.05:
                assert s.kind == "empty" and not s.addresses, s
                continue
            ranked = sorted(NLB_ADDRESSES, key=lambda a, p=period: hash_share(p, f"{key}/{a}"))
            assert s.addresses == set(ranked[2:]) and s.ttl == 60, (s, ranked)

    # After the last phase every fault is gone.
    for name in [DYNAMO] + nlbs:
        after = replay.after_end(name)
        assert after and all(s.kind == "live" for s in after), (name, replay.summary())
    assert all(s.addresses == set(NLB_ADDRESSES) for s in replay.after_end(nlbs[0]))


@pytest.mark.slow
def test_aws_dynamodb_2025_nxdomain_replay(start_proxy, fake_upstream):
    """NXDOMAIN variant, four phases in 14.4 s: warm-up (0.16 s), stale-plan
    (0.78 s), name-gone (12.2 s), recovery-tail (1.2 s)."""
    path = SCENARIOS / "aws-dynamodb-2025-nxdomain.yaml"
    replay = run_replay(start_proxy, fake_upstream, path, 0.0013,
                        [(DYNAMO, "AAAA"), (DYNAMO, "TXT")])
    assert [p.name for p in replay.phases] == ["warm-up", "stale-plan", "name-gone",
                                               "recovery-tail"]
    check_warm_up_and_stale(replay)
    gone = replay.inside("name-gone")
    assert len(gone) >= 100 and all(s.kind == "nxdomain" for s in gone), replay.summary()
    for qtype in ("AAAA", "TXT"):  # the whole name is gone, every qtype
        other = replay.inside("name-gone", qtype=qtype)
        assert other and all(s.kind == "nxdomain" for s in other), qtype
    check_recovery_tail(replay, "nxdomain")
    after = replay.after_end()
    assert after and all(s.kind == "live" for s in after), replay.summary()


# --- every library file starts -----------------------------------------------------------


def _healthy(proxy) -> bool | None:
    """True when answering; None when it exited; False while starting."""
    if not proxy.alive():
        return None
    try:
        proxy.health()
        return True
    except OSError:
        return False


def _wait_started(proxy, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = _healthy(proxy)
        if state is not None:
            if state:
                return True
        elif "already in use" in proxy.stderr_text().lower():
            return False  # a port taken by a sibling's upstream socket: start again
        else:
            raise AssertionError(f"proxy exited:\n{proxy.stderr_text()}")
        time.sleep(0.05)
    raise AssertionError(f"proxy not answering after {timeout} s:\n{proxy.stderr_text()}")


LIBRARY = sorted(p.name for p in SCENARIOS.glob("*.yaml"))


@pytest.mark.slow
def test_every_library_scenario_runs(start_proxy, unbound):
    """Each file in scenarios/ starts with the proxy (--scenario, a time scale
    that makes it last one second), runs to its end, and the proxy then
    answers as without it."""
    from proxy.loader import load_scenario

    assert len(LIBRARY) >= 10
    started, scale_of = {}, {}
    for name in LIBRARY:
        scenario = load_scenario(SCENARIOS / name)
        scale_of[name] = 1.0 / sum(p.duration for p in scenario.phases)
        started[name] = (scenario, start_proxy("--scenario", str(SCENARIOS / name),
                                               "--time-scale", repr(scale_of[name]),
                                               wait=False))
    for name, (scenario, proxy) in started.items():
        if not _wait_started(proxy):  # started all at once, so no retry on a port clash
            started[name] = (scenario, start_proxy("--scenario", str(SCENARIOS / name),
                                                   "--time-scale", repr(scale_of[name])))
    for name, (scenario, proxy) in started.items():
        found = re.search(rf"scenario {re.escape(scenario.name)} started: (\d+) phases",
                          proxy.stderr_text())
        assert found and int(found.group(1)) == len(scenario.phases), (name, proxy.stderr_text())
        wait_until(lambda p=proxy, s=scenario: re.search(rf"{re.escape(s.name)}\S* ended",
                                                         p.stderr_text()),
                   timeout=20, what=f"{name} to end")
        for host in (zone.WWW, zone.host_name(7)):
            assert_unaffected(proxy, unbound, host, "A")
        text = proxy.stderr_text()
        assert "Traceback" not in text and " ERROR " not in text, (name, text)
        assert proxy.metric("dnschaos_engine_errors_total") == 0, name
        proxy.stop()
