"""Replies the proxy builds itself, end to end: their size over UDP (RFC 1035
4.2.1, RFC 6891 6.2.5) and EDNS versions it does not speak (RFC 6891 6.1.3).

One proxy in front of the real unbound, one long phase; dig and dnspython
as clients.  A spoof of 40 A records is about 680 bytes: too big for a
client without EDNS or with `+bufsize=512`, which get TC=1 with the
question only (and dig, unless told `+ignore`, retries over TCP); a client
with a 1232-byte buffer or over TCP gets all 40.  A query with EDNS
version 1 for a faulted name gets the BADVERS unbound gives for any other
name, and the fault is not applied nor counted.
"""

from __future__ import annotations

import dns.flags
import dns.rcode
import pytest

from support import zone
from support.dnsutil import addresses, assert_same_reply, dig, make_query, udp_raw
from support.faults_support import (
    ask,
    assert_unaffected,
    ede_of,
    injected,
    matched,
    rule,
    write_scenario,
)

pytestmark = pytest.mark.e2e

FORTY = [f"192.0.2.{i}" for i in range(1, 41)]
SPOOF40, SPOOF2, LONG_EDE, NX, PLAIN = (zone.host_name(i) for i in (140, 141, 142, 143, 144))
EDE_TEXT = "x" * 700

SCENARIO = {"name": "reply-size", "phases": [{"name": "p", "duration": "1h", "rules": [
    rule("spoof40", {"name": SPOOF40}, {"type": "spoof", "a": FORTY}),
    rule("spoof2", {"name": SPOOF2}, {"type": "spoof", "a": FORTY[:2]}),
    rule("long-ede", {"name": LONG_EDE}, {"type": "nxdomain",
                                          "ede": {"code": 22, "text": EDE_TEXT}}),
    rule("nx", {"name": NX}, "nxdomain"),
]}]}


@pytest.fixture(scope="module")
def proxy(start_module_proxy, unbound, tmp_path_factory):
    path = write_scenario(tmp_path_factory.mktemp("size"), SCENARIO)
    return start_module_proxy("--scenario", str(path), upstreams=[unbound])


def _dig(proxy, name, *args):
    return dig(name, "A", *args, server=proxy.host, port=proxy.port)


def _truncated(result, *, edns: bool) -> None:
    """dig saw a TC reply with the question only (+ OPT for an EDNS query)."""
    assert "tc" in result.flags and result.status == "NOERROR", result.stdout
    message = result.message
    assert message.question and not message.answer and not message.authority, result.stdout
    assert (message.edns == 0) == edns, result.stdout
    assert not result.retried_over_tcp


# --- UDP size -----------------------------------------------------------------------


def test_a_big_spoof_is_truncated_for_a_client_without_edns(proxy):
    before = injected(proxy, "spoof40")
    _truncated(_dig(proxy, SPOOF40, "+noedns", "+ignore"), edns=False)
    reply = ask(proxy, SPOOF40, edns=None)
    assert reply.flags & dns.flags.TC and not reply.answer and reply.edns == -1
    assert len(reply.to_wire()) <= 512
    # Without +ignore dig retries over TCP and gets every record.
    retried = _dig(proxy, SPOOF40, "+noedns")
    assert retried.retried_over_tcp and addresses(retried.message) == set(FORTY)
    assert injected(proxy, "spoof40") == before + 4  # truncated or not, the fault was applied


def test_a_big_spoof_is_truncated_for_a_512_byte_edns_buffer(proxy):
    _truncated(_dig(proxy, SPOOF40, "+bufsize=512", "+ignore"), edns=True)
    for payload in (512, 100):  # below 512 counts as 512
        reply = ask(proxy, SPOOF40, payload=payload)
        assert reply.flags & dns.flags.TC and not reply.answer
        assert reply.edns == 0 and reply.payload == 1232  # the OPT is kept


def test_a_big_spoof_is_whole_for_a_big_buffer_and_over_tcp(proxy):
    for args in ((), ("+bufsize=1232",), ("+tcp",), ("+tcp", "+noedns")):
        result = _dig(proxy, SPOOF40, *args)
        assert "tc" not in result.flags and not result.retried_over_tcp, result.stdout
        assert addresses(result.message) == set(FORTY), result.stdout
    whole = ask(proxy, SPOOF40, payload=1232)
    assert not whole.flags & dns.flags.TC and len(whole.to_wire()) > 512
    assert addresses(whole) == set(FORTY)
    assert addresses(ask(proxy, SPOOF40, edns=None, transport="tcp")) == set(FORTY)


def test_a_small_spoof_is_not_truncated(proxy):
    for args in (("+noedns",), ("+bufsize=512",)):
        result = _dig(proxy, SPOOF2, *args, "+ignore")
        assert "tc" not in result.flags and addresses(result.message) == set(FORTY[:2])
    assert addresses(ask(proxy, SPOOF2, edns=None)) == set(FORTY[:2])


def test_an_ede_too_long_for_the_buffer_goes_out_truncated_without_options(proxy):
    cut = ask(proxy, LONG_EDE, payload=512)
    assert cut.flags & dns.flags.TC and cut.rcode() == dns.rcode.NXDOMAIN
    assert cut.edns == 0 and ede_of(cut) == [] and not cut.authority
    whole = ask(proxy, LONG_EDE, payload=1232)
    assert not whole.flags & dns.flags.TC and ede_of(whole) == [(22, EDE_TEXT)]
    assert whole.authority  # the SOA
    plain = ask(proxy, LONG_EDE, edns=None)  # no OPT, so no EDE: small
    assert not plain.flags & dns.flags.TC and plain.edns == -1 and plain.authority


# --- EDNS version 1 -------------------------------------------------------------------


def test_edns_version_1_to_a_faulted_name_gets_unbounds_badvers(proxy, unbound):
    before = (injected(proxy, "nx"), matched(proxy, "nx"), injected(proxy, "spoof40"))
    answered = proxy.metric("dnschaos_faulted_queries_total")
    for name in (NX, SPOOF40):
        for transport in ("udp", "tcp"):
            for do in (False, True):
                through = ask(proxy, name, edns=1, do=do, transport=transport)
                direct = ask(unbound, name, edns=1, do=do, transport=transport)
                assert direct.rcode() == dns.rcode.BADVERS  # unbound's, for comparison
                assert_same_reply(through, direct, context=f"{name} {transport} do={do}")
    # Byte for byte but the ID, the question's letter case kept.
    query = make_query("HoSt143.ExAmple.TEST.", "A", edns=1, do=True, cd=True)
    raw_through = udp_raw(query.to_wire(), proxy.host, proxy.port)
    raw_direct = udp_raw(query.to_wire(), unbound.host, unbound.port)
    assert raw_through == raw_direct and raw_through[:2] == query.to_wire()[:2]
    # dig sees the same header and OPT from both.
    got = _dig(proxy, NX, "+edns=1", "+noednsnegotiation")
    want = dig(NX, "A", "+edns=1", "+noednsnegotiation", server=unbound.host, port=unbound.port)
    assert got.status == want.status == "BADVERS"
    assert got.flags == want.flags == {"qr", "rd", "ra"}
    assert_same_reply(got.message, want.message)
    # Not faulted, so not counted.
    assert (injected(proxy, "nx"), matched(proxy, "nx"), injected(proxy, "spoof40")) == before
    assert proxy.metric("dnschaos_faulted_queries_total") == answered + 8 + 1 + 1  # by the proxy
    # dig's default: on BADVERS it retries with version 0, which gets the fault.
    retried = _dig(proxy, NX, "+edns=1")
    assert "BADVERS, retrying with EDNS version 0" in retried.stdout
    assert retried.status == "NXDOMAIN"
    assert injected(proxy, "nx") == before[0] + 1


def test_edns_version_0_still_gets_the_fault(proxy):
    before = injected(proxy, "nx")
    assert ask(proxy, NX, edns=0).rcode() == dns.rcode.NXDOMAIN
    assert ask(proxy, NX, edns=None).rcode() == dns.rcode.NXDOMAIN
    assert _dig(proxy, NX, "+edns=0").status == "NXDOMAIN"
    assert injected(proxy, "nx") == before + 3


def test_edns_version_1_to_a_name_no_rule_selects_is_forwarded(proxy, unbound):
    for transport in ("udp", "tcp"):
        reply = assert_unaffected(proxy, unbound, PLAIN, "A", edns=1, transport=transport)
        assert reply.rcode() == dns.rcode.BADVERS  # unbound's own
    assert_unaffected(proxy, unbound, PLAIN, "A")
