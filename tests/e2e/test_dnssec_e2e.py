"""The dnssec fault end to end: the signed test zone and its signed parent
zone `test.`, which delegates to it with a DS (support.unbound, one real
unbound serving both), as upstream; the real proxy in front; and a second
real unbound downstream of the proxy that validates from the parent's DS
as trust anchor down (support.validator) and reports Extended DNS Errors.
The module's `unbound` is that upstream, not the session's.

Each case adds one ad hoc rule through the admin API, empties the
validator's caches, and checks three things: the selected name through the
validator is SERVFAIL with the EDE code unbound 1.17 gives; an unselected
name through the same validator is NOERROR with the AD bit; and a client
that does not validate (dnspython straight to the proxy, DO and CD set)
still gets the records, damaged exactly as the mode says.

The .ru 2024 and Slack 2021 scenarios of the library are replayed too,
their placeholders set to the test zone and the validator's address, and
started through the API with a time scale that makes them last seconds.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import yaml

from proxy.core.spec import parse_duration
from support import zone
from support.dnsutil import assert_same_reply, make_query, udp
from support.faults_support import ede_of, injected
from support.net import wait_until
from support.unbound import Unbound, signing_tools_available
from support.validator import Validator, delv

from .gameday_helpers import TOKEN, api, write_scenarios

pytestmark = pytest.mark.e2e

SERVFAIL, NOERROR, NXDOMAIN = dns.rcode.SERVFAIL, dns.rcode.NOERROR, dns.rcode.NXDOMAIN
RRSIG, DNSKEY = dns.rdatatype.RRSIG, dns.rdatatype.DNSKEY
# RFC 8914 codes, as unbound 1.17 sets them.
BOGUS, DNSKEY_MISSING, RRSIGS_MISSING, NSEC_MISSING = 6, 9, 10, 12


def h(i: int) -> str:
    return zone.host_name(i)


REPO = Path(__file__).resolve().parents[2]
INCIDENTS = ("ru-dnssec-2024", "slack-dnssec-2021")


def on_the_test_zone(name: str) -> dict:
    """A library scenario with its placeholders set as its description says:
    the suffix to the signed test zone, the clients to the validator's."""
    scenario = yaml.safe_load((REPO / "scenarios" / f"{name}.yaml").read_text())
    for phase in scenario["phases"]:
        for rule in phase["rules"]:
            rule["match"].update(suffix=zone.ORIGIN.rstrip("."), clients="127.0.0.0/8")
    return scenario


@pytest.fixture(scope="module")
def unbound(tmp_path_factory):
    """The upstream: the signed test zone and its signed parent, which
    delegates to it with its DS (so the trust anchor is the parent's)."""
    if not shutil.which("unbound") or not signing_tools_available():
        pytest.skip("unbound or ldns-signzone is not installed (run `make test`)")
    server = Unbound(tmp_path_factory.mktemp("signed"), parent=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(start_module_proxy, unbound, tmp_path_factory):
    scenarios = write_scenarios(tmp_path_factory.mktemp("dnssec") / "scenarios",
                                *(on_the_test_zone(name) for name in INCIDENTS))
    return start_module_proxy("--allow", "127.0.0.0/8", "--scenario-dir", str(scenarios),
                              upstreams=[unbound], config={"admin_token": TOKEN})


@pytest.fixture(scope="module")
def validator(proxy, unbound, tmp_path_factory):
    server = Validator(tmp_path_factory.mktemp("validator"), proxy, unbound.trust_anchor).start()
    yield server
    server.stop()


@contextlib.contextmanager
def dnssec_rule(proxy, match: dict, **fault) -> Iterator[str]:
    name = "dnssec-" + fault["break"].replace("_", "-")
    status, body = api(proxy, "POST", "/api/rules",
                       {"name": name, "match": match, "fault": {"type": "dnssec", **fault},
                        "duration": "5m"})
    assert status == 201, body
    try:
        yield name
    finally:
        assert api(proxy, "DELETE", f"/api/rules/{name}")[0] == 200


def resolve(validator, name: str, qtype: str = "A") -> dns.message.Message:
    return udp(make_query(name, qtype, do=True), validator.host, validator.port, timeout=5)


def raw(target, name: str, qtype: str = "A", **kw) -> dns.message.Message:
    """What a client that does not validate gets (DO and CD: no validation on the way)."""
    return udp(make_query(name, qtype, do=True, cd=True, **kw), target.host, target.port)


def assert_servfail(reply: dns.message.Message, code: int) -> None:
    assert reply.rcode() == SERVFAIL, reply
    assert [c for c, _ in ede_of(reply)] == [code], ede_of(reply)


def assert_validates(reply: dns.message.Message, rcode: int = NOERROR) -> None:
    assert reply.rcode() == rcode, reply
    assert reply.flags & dns.flags.AD, reply
    assert ede_of(reply) == []


def sigs(message: dns.message.Message, section: str = "answer") -> list:
    return [rd for rrset in getattr(message, section) if rrset.rdtype == RRSIG for rd in rrset]


def test_validator_validates_the_zone_through_the_proxy(validator):
    validator.flush()
    assert_validates(resolve(validator, zone.WWW))
    assert_validates(resolve(validator, zone.NXDOMAIN_NAME), NXDOMAIN)
    ds = resolve(validator, zone.ORIGIN, "DS")  # the parent's, through the proxy
    assert_validates(ds)
    assert [r.rdtype for r in ds.answer if r.rdtype != RRSIG] == [dns.rdatatype.DS]


def test_bogus_signature(proxy, unbound, validator):
    with dnssec_rule(proxy, {"name": h(1)}, **{"break": "bogus_signature"}):
        validator.flush()
        assert_servfail(resolve(validator, h(1)), BOGUS)
        assert_validates(resolve(validator, h(101)))
        seen, real = raw(proxy, h(1)), raw(unbound, h(1))
        assert [rrset.to_text() for rrset in seen.answer if rrset.rdtype != RRSIG] == \
            [rrset.to_text() for rrset in real.answer if rrset.rdtype != RRSIG]
        (got,), (want,) = sigs(seen), sigs(real)
        assert got.signature == bytes(b ^ 0xFF for b in want.signature)
        assert got.replace(signature=want.signature) == want  # only the signature changed


@pytest.mark.parametrize(("mode", "i", "bind_reason"), [
    ("expired_signature", 2, "RRSIG has expired"),
    ("not_yet_valid", 3, "RRSIG validity period has not begun"),
])
def test_signature_times(proxy, unbound, validator, tmp_path, mode, i, bind_reason):
    """The validity times are part of the signed data, so the moved window
    also fails the crypto.  unbound verifies the crypto first and says
    bogus (EDE 6, not 7 or 8); BIND (delv) checks the times first and
    names them."""
    with dnssec_rule(proxy, {"name": h(i)}, **{"break": mode}):
        validator.flush()
        reply = resolve(validator, h(i))
        assert_servfail(reply, BOGUS)
        assert "signature crypto failed" in ede_of(reply)[0][1]
        assert_validates(resolve(validator, h(100 + i)))
        trace = delv(proxy, h(i), "A", unbound.trust_key, tmp_path)
        assert f"resolution failed: {bind_reason}" in trace, trace
        assert "fully validated" in delv(proxy, h(100 + i), "A", unbound.trust_key, tmp_path)
        (got,), (want,) = sigs(raw(proxy, h(i))), sigs(raw(unbound, h(i)))
        week = 7 * 86400
        if mode == "expired_signature":
            assert got.expiration == want.inception - week
        else:
            assert got.inception == want.expiration + week
        assert got.expiration - got.inception == want.expiration - want.inception
        assert got.signature == want.signature


@pytest.mark.parametrize(("i", "qtypes", "code"), [
    (4, None, NSEC_MISSING),
    (8, "A", RRSIGS_MISSING),
])
def test_strip_signatures(proxy, unbound, validator, i, qtypes, code):
    """An unsigned answer in a signed zone: unbound asks for a DS at the
    name (is it an insecure delegation?).  When the rule strips that
    answer's proof too (every query type selected) it says NSEC Missing;
    when only the A answer is stripped, RRSIGs Missing."""
    match = {"name": h(i)} | ({"qtype": qtypes} if qtypes else {})
    with dnssec_rule(proxy, match, **{"break": "strip_signatures"}):
        validator.flush()
        assert_servfail(resolve(validator, h(i)), code)
        assert_validates(resolve(validator, h(100 + i)))
        seen = raw(proxy, h(i))
        assert sigs(seen) == [] and [r.to_text() for r in seen.answer] == \
            [r.to_text() for r in raw(unbound, h(i)).answer if r.rdtype != RRSIG]


@pytest.mark.parametrize("denial", ["bogus", "strip"])
def test_bad_denial(proxy, unbound, validator, denial):
    name, other = f"nosuch-{denial}.example.test.", f"absent-{denial}.example.test."
    with dnssec_rule(proxy, {"name": name}, **{"break": "bad_denial", "denial": denial}):
        validator.flush()
        assert_servfail(resolve(validator, name), BOGUS if denial == "bogus" else NSEC_MISSING)
        assert_validates(resolve(validator, other), NXDOMAIN)
        seen, real = raw(proxy, name), raw(unbound, name)
        assert seen.rcode() == real.rcode() == NXDOMAIN
        nsec = {dns.rdatatype.NSEC, dns.rdatatype.NSEC3}
        if denial == "strip":
            assert {r.rdtype for r in seen.authority} == {dns.rdatatype.SOA, RRSIG}
            assert all(sig.type_covered not in nsec for sig in sigs(seen, "authority"))
        else:
            assert [r.to_text() for r in seen.authority if r.rdtype != RRSIG] == \
                [r.to_text() for r in real.authority if r.rdtype != RRSIG]
            for got, want in zip(sigs(seen, "authority"), sigs(real, "authority"), strict=True):
                changed = got.signature != want.signature
                assert changed == (got.type_covered in nsec)


@pytest.mark.parametrize(("mode", "code"), [
    ("empty_dnskey", DNSKEY_MISSING),
    ("ds_mismatch", DNSKEY_MISSING),
])
def test_key_faults(proxy, unbound, validator, mode, code):
    """The DNSKEY query at the apex is the one selected: every name fails
    while the rule is there, and validates again once it is gone."""
    name = h(5 if mode == "empty_dnskey" else 6)
    with dnssec_rule(proxy, {"name": zone.ORIGIN, "qtype": "DNSKEY"}, **{"break": mode}):
        validator.flush()
        assert_servfail(resolve(validator, name), code)
        seen, real = raw(proxy, zone.ORIGIN, "DNSKEY"), raw(unbound, zone.ORIGIN, "DNSKEY")
        keys = [rd for rrset in seen.answer if rrset.rdtype == DNSKEY for rd in rrset]
        real_keys = [rd for rrset in real.answer if rrset.rdtype == DNSKEY for rd in rrset]
        if mode == "empty_dnskey":
            assert seen.rcode() == NOERROR and seen.answer == [] and keys == []
        else:
            changed = [(k.flags, k.key != w.key) for k, w in zip(keys, real_keys, strict=True)]
            assert sorted(changed) == [(256, False), (257, True)]
    validator.flush()
    assert_validates(resolve(validator, name))


def test_not_applied_without_do(proxy, unbound, validator):
    """A query without DO gets no RRSIGs: the fault leaves it alone, and
    the rule does not count it as injected."""
    with dnssec_rule(proxy, {"name": h(7)}, **{"break": "bogus_signature"}) as rule_name:
        plain = make_query(h(7), "A")
        assert_same_reply(udp(plain, proxy.host, proxy.port),
                          udp(plain, unbound.host, unbound.port))
        assert injected(proxy, rule_name) == 0
        assert sigs(raw(proxy, h(7))) != sigs(raw(unbound, h(7)))  # DO: damaged
        assert injected(proxy, rule_name) == 1


# --- the incident library, replayed on the test zone -----------------------------------


def fresh(validator, name: str, qtype: str = "A") -> dns.message.Message:
    validator.flush()
    return resolve(validator, name, qtype)


def state(reply: dns.message.Message) -> tuple[int, tuple[int, ...], bool]:
    return (reply.rcode(), tuple(c for c, _ in ede_of(reply)), bool(reply.flags & dns.flags.AD))


def start_incident(proxy, name: str, seconds: float) -> str:
    scenario = on_the_test_zone(name)
    total = sum(parse_duration(p["duration"]) for p in scenario["phases"])
    status, run = api(proxy, "POST", f"/api/scenarios/{name}/start",
                      {"time_scale": seconds / total})
    assert status == 201, run
    return run["run"]


def test_ru_2024_replay(proxy, validator):
    """The suffix covers the zone's DNSKEY answer too, so the chain of trust
    breaks at the key: every name SERVFAIL with EDE 9 (DNSKEY Missing:
    "signature crypto failed ... for trust anchor"), validated after."""
    start_incident(proxy, "ru-dnssec-2024", 4.0)
    failing = (SERVFAIL, (DNSKEY_MISSING,), False)
    wait_until(lambda: state(fresh(validator, zone.WWW)) == failing,
               timeout=3, interval=0.1, what="bogus signatures")
    reply = fresh(validator, h(9))
    assert state(reply) == failing and "signature crypto failed" in ede_of(reply)[0][1]
    assert state(fresh(validator, zone.NXDOMAIN_NAME)) == failing
    assert raw(proxy, h(9)).answer  # a client that does not validate gets the records
    wait_until(lambda: state(fresh(validator, zone.WWW)) == (NOERROR, (), True),
               timeout=8, interval=0.2, what="the end of the incident")


def test_slack_2021_replay(proxy, validator):
    """Phase 1: the AAAA NODATA proof fails (EDE 6), A still validates;
    phase 2: everything unsigned, every name fails; stopped, it validates
    again."""
    run = start_incident(proxy, "slack-dnssec-2021", 15.0)  # 4h + 20h: phase 1 lasts 2.5 s
    nodata = zone.NODATA_NAME, zone.NODATA_TYPE
    wait_until(lambda: state(fresh(validator, *nodata)) == (SERVFAIL, (BOGUS,), False),
               timeout=2, interval=0.05, what="the broken NODATA proof")
    assert state(resolve(validator, zone.NODATA_NAME, "A")) == \
        (NOERROR, (), True)
    # The unsigned DNSKEY answer breaks the chain of trust: RRSIGs Missing.
    wait_until(lambda: state(fresh(validator, zone.WWW)) == (SERVFAIL, (RRSIGS_MISSING,), False),
               timeout=4, interval=0.1, what="the unsigned rollback")
    assert state(fresh(validator, zone.NXDOMAIN_NAME)) == (SERVFAIL, (RRSIGS_MISSING,), False)
    assert api(proxy, "POST", f"/api/runs/{run}/stop", {})[0] == 200  # the day, cut short
    assert state(fresh(validator, zone.WWW)) == (NOERROR, (), True)
    assert state(fresh(validator, *nodata)) == (NOERROR, (), True)
