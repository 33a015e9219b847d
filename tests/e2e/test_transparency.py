"""The proxy is transparent: through it, a client gets what the upstream
itself answers (records, TTLs within a second, rcode, flags, EDNS), over UDP
and TCP, with dnspython and with dig as clients.

Every case asks the real upstream (unbound, support.unbound) directly and
through one proxy, and compares the two replies with assert_same_reply.
Each case also checks the direct reply has the property the case is about
(TC set, RRSIGs present, NXDOMAIN...), so that a broken zone cannot make
the comparison pass vacuously.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from support import zone
from support.dnsutil import (
    addresses,
    assert_same_reply,
    cookie_option,
    dig,
    ecs_option,
    make_query,
    tcp,
    udp,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def proxy(start_module_proxy, unbound):
    return start_module_proxy(upstreams=[unbound])


def _types(message: dns.message.Message, section: str = "answer") -> set[str]:
    return {dns.rdatatype.to_text(r.rdtype) for r in getattr(message, section)}


@dataclass
class Case:
    qname: str
    qtype: str
    edns: bool = True
    do: bool = False
    options: tuple = ()  # names: "cookie", "ecs"
    rd: bool = True
    cd: bool = False
    # check(direct_reply, transport, signed_zone): what the case is about
    check: Callable[[dns.message.Message, str, bool], None] = field(default=lambda r, t, s: None)

    def query(self) -> dns.message.Message:
        opts = [{"cookie": cookie_option, "ecs": ecs_option}[o]() for o in self.options]
        return make_query(self.qname, self.qtype, edns=0 if self.edns else None, do=self.do,
                          options=opts, rd=self.rd, cd=self.cd)

    def dig_args(self) -> list[str]:
        args = [self.qname, self.qtype, "+noadflag"]
        args.append("+edns=0" if self.edns else "+noedns")
        if self.do:
            args.append("+dnssec")
        if "cookie" in self.options:
            args.append("+cookie=0102030405060708")
        if "ecs" in self.options:
            args.append("+subnet=192.0.2.0/24")
        if not self.rd:
            args.append("+norecurse")
        if self.cd:
            args.append("+cdflag")
        return args


def _noerror_with(*types: str):
    def check(reply, transport, signed):
        assert reply.rcode() == dns.rcode.NOERROR
        assert set(types) <= _types(reply), reply
    return check


def _addresses(*expected: str):
    def check(reply, transport, signed):
        assert addresses(reply) == set(expected), reply
    return check


def _cname_chain(reply, transport, signed):
    cnames = {r.name.to_text() for r in reply.answer if r.rdtype == dns.rdatatype.CNAME}
    assert cnames == set(zone.CNAME_CHAIN[:3]), reply
    assert addresses(reply) == set(zone.WWW_A)


def _txt(limit_udp: bool):
    """A big TXT: truncated (TC, no answer) over UDP when `limit_udp`, whole otherwise."""
    def check(reply, transport, signed):
        if transport == "udp" and limit_udp:
            assert reply.flags & dns.flags.TC and not reply.answer, reply
        else:
            assert not reply.flags & dns.flags.TC
            assert _types(reply) >= {"TXT"}
    return check


def _rcode_soa(rcode: int):
    def check(reply, transport, signed):
        assert reply.rcode() == rcode and not reply.answer
        assert "SOA" in _types(reply, "authority"), reply
        if signed and reply.ednsflags & dns.flags.DO:
            assert {"RRSIG", "NSEC"} <= _types(reply, "authority"), reply
    return check


def _signed_answer(reply, transport, signed):
    assert reply.ednsflags & dns.flags.DO, "DO bit not echoed"
    assert addresses(reply) == set(zone.WWW_A)
    if signed:
        assert "RRSIG" in _types(reply), reply
    else:
        pytest.skip("zone not signed (ldns-signzone missing): DO echo checked only")


def _signed_txt(reply, transport, signed):
    _txt(limit_udp=True)(reply, transport, signed)
    if transport == "tcp" and signed:
        assert "RRSIG" in _types(reply), reply


def _no_rrsig(reply, transport, signed):
    assert "RRSIG" not in _types(reply) and addresses(reply) == set(zone.WWW_A)


CASES = {
    "A": Case(zone.WWW, "A", check=_addresses(*zone.WWW_A)),
    "A-no-edns": Case(zone.WWW, "A", edns=False, check=_addresses(*zone.WWW_A)),
    "A-without-DO-no-RRSIG": Case(zone.WWW, "A", check=_no_rrsig),
    "AAAA": Case(zone.WWW, "AAAA", check=_addresses(*zone.WWW_AAAA)),
    "CNAME-chain-3-hops": Case(zone.CNAME_HEAD, "A", check=_cname_chain),
    "MX": Case(zone.MX_NAME, "MX", check=_noerror_with("MX")),
    "TXT-600-no-edns": Case(zone.BIG_TXT, "TXT", edns=False, check=_txt(limit_udp=True)),
    "TXT-600-edns-1232": Case(zone.BIG_TXT, "TXT", check=_txt(limit_udp=False)),
    "TXT-1500-edns-1232": Case(zone.HUGE_TXT, "TXT", check=_txt(limit_udp=True)),
    "NXDOMAIN": Case(zone.NXDOMAIN_NAME, "A", check=_rcode_soa(dns.rcode.NXDOMAIN)),
    "NODATA": Case(zone.NODATA_NAME, zone.NODATA_TYPE, check=_rcode_soa(dns.rcode.NOERROR)),
    "DO-A": Case(zone.WWW, "A", do=True, check=_signed_answer),
    "DO-NXDOMAIN": Case(zone.NXDOMAIN_NAME, "A", do=True,
                        check=_rcode_soa(dns.rcode.NXDOMAIN)),
    "DO-NODATA": Case(zone.NODATA_NAME, zone.NODATA_TYPE, do=True,
                      check=_rcode_soa(dns.rcode.NOERROR)),
    "DO-TXT-1500": Case(zone.HUGE_TXT, "TXT", do=True, check=_signed_txt),
    "DO-CD": Case(zone.WWW, "A", do=True, cd=True, check=_signed_answer),
    "RD-clear": Case(zone.WWW, "A", rd=False, check=_addresses(*zone.WWW_A)),
    "cookie": Case(zone.WWW, "A", options=("cookie",), check=_addresses(*zone.WWW_A)),
    "ECS": Case(zone.WWW, "A", options=("ecs",), check=_addresses(*zone.WWW_A)),
    "mixed-case-name": Case("wWw.ExAmPlE.tEsT.", "A", check=_addresses(*zone.WWW_A)),
}
TRANSPORTS = {"udp": udp, "tcp": tcp}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", CASES)
def test_dnspython_answer_is_the_upstreams(case, transport, proxy, unbound):
    c = CASES[case]
    send = TRANSPORTS[transport]
    query = c.query()
    direct = send(query, unbound.host, unbound.port)
    c.check(direct, transport, unbound.signed)
    through = send(query, proxy.host, proxy.port)
    assert through.id == query.id
    assert_same_reply(through, direct, context=f"{case} over {transport}")


DIG_MODES = {
    "udp": ["+ignore"],  # show a truncated reply as it is
    "udp-then-tcp": [],  # dig's default: retry over TCP on TC
    "tcp": ["+tcp"],
}


@pytest.mark.parametrize("mode", DIG_MODES)
@pytest.mark.parametrize("case", CASES)
def test_dig_answer_is_the_upstreams(case, mode, proxy, unbound):
    c = CASES[case]
    args = [*c.dig_args(), *DIG_MODES[mode]]
    direct = dig(*args, server=unbound.host, port=unbound.port)
    assert direct.answered, direct.stdout + direct.stderr
    if mode != "udp-then-tcp":
        c.check(direct.message, "tcp" if mode == "tcp" else "udp", unbound.signed)
    through = dig(*args, server=proxy.host, port=proxy.port)
    assert through.answered, through.stdout + through.stderr
    assert_same_reply(through.message, direct.message, context=f"dig {' '.join(args)}")
    assert through.edns_options == direct.edns_options
    assert through.retried_over_tcp == direct.retried_over_tcp


def test_dig_retries_truncated_answer_over_tcp(proxy, unbound):
    """TXT > 512 bytes without EDNS: TC over UDP, then dig's TCP retry gets it all."""
    through = dig(zone.BIG_TXT, "TXT", "+noedns", server=proxy.host, port=proxy.port)
    assert through.retried_over_tcp and through.status == "NOERROR"
    txt = [r for r in through.message.answer if r.rdtype == dns.rdatatype.TXT]
    assert txt and b"".join(next(iter(txt[0])).strings).decode() == "".join(zone.BIG_TXT_STRINGS)


def test_truncated_upstream_answer_is_fetched_over_tcp_for_tcp_clients(proxy, unbound):
    """The proxy asks upstreams over UDP; a TCP client's query whose answer
    comes back truncated is retried over TCP, and the client gets it whole."""
    before = proxy.metric("dnschaos_truncated_retries_total")
    reply = tcp(make_query(zone.HUGE_TXT, "TXT"), proxy.host, proxy.port)
    assert not reply.flags & dns.flags.TC
    txt = next(iter(reply.answer[0]))
    assert b"".join(txt.strings).decode() == "".join(zone.HUGE_TXT_STRINGS)
    assert proxy.metric("dnschaos_truncated_retries_total") == before + 1
    assert proxy.metric("dnschaos_upstream_tcp_requests_total", upstream=unbound.hostport) >= 1


def test_many_names(proxy):
    """Every host0..hostN name resolves through the proxy to its own address."""
    for i in range(zone.HOST_COUNT):
        reply = udp(make_query(zone.host_name(i), "A"), proxy.host, proxy.port)
        assert addresses(reply) == {zone.host_address(i)}, zone.host_name(i)


def test_client_id_is_kept_for_any_id(proxy, unbound):
    for qid in (0, 1, 0x8000, 0xFFFF):
        query = make_query(zone.WWW, "A", qid=qid)
        reply = udp(query, proxy.host, proxy.port)
        assert reply.id == qid
        assert_same_reply(reply, udp(query, unbound.host, unbound.port))


def test_comparator_sees_every_kind_of_difference(unbound):
    """assert_same_reply itself: a sanity check that it is not lenient."""
    from support.dnsutil import reply_differences

    base = udp(make_query(zone.WWW, "A", options=[cookie_option()]), unbound.host, unbound.port)
    assert reply_differences(base, base) == []

    def mutated(change):
        copy = dns.message.from_wire(base.to_wire())
        change(copy)
        return copy

    def set_ttl(m, ttl):
        m.answer[0].ttl = ttl

    same_id_only = mutated(lambda m: setattr(m, "id", (m.id + 1) & 0xFFFF))
    assert reply_differences(same_id_only, base) == []
    assert reply_differences(mutated(lambda m: set_ttl(m, zone.TTL - 1)), base) == []
    assert reply_differences(mutated(lambda m: set_ttl(m, zone.TTL - 2)), base)
    assert reply_differences(mutated(lambda m: m.set_rcode(dns.rcode.SERVFAIL)), base)
    assert reply_differences(mutated(lambda m: setattr(m, "flags", m.flags ^ dns.flags.AA)),
                             base)
    assert reply_differences(mutated(lambda m: m.answer.clear()), base)
    assert reply_differences(mutated(lambda m: m.use_edns(0, 0, 4096)), base)
    assert reply_differences(mutated(lambda m: m.use_edns(0, dns.flags.DO, base.payload)), base)
    assert reply_differences(mutated(lambda m: m.use_edns(False)), base)
    assert reply_differences(
        mutated(lambda m: m.use_edns(0, 0, base.payload, options=[ecs_option()])), base)
    other = udp(make_query(zone.WWW, "AAAA"), unbound.host, unbound.port)
    assert reply_differences(other, base)
