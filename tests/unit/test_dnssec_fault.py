"""The dnssec fault's wire rewrites: exactly the bytes each mode names
change, every other record is kept as it was (decoded with dnspython, an
independent parser), queries without DO pass, and damaged answers never
crash (the engine forwards them unchanged)."""

from __future__ import annotations

import random
import struct
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pydantic
import pytest

from proxy.core import wire
from proxy.core.engine import Engine
from proxy.core.faults import PhaseState, build_fault
from proxy.core.faults.dnssec import DEFAULT_SHIFT
from proxy.core.model import Rule
from proxy.core.query import QueryView
from proxy.core.replies import without_records
from proxy.core.stale import StaleStore
from proxy.core.verdict import Forward
from support.engine_plans import set_rules

ZONE = "example.com."
INCEPTION, EXPIRATION = 1_700_000_000, 1_702_592_000  # a 30-day window
SIG = bytes(range(64))


def query(name: str, qtype: str = "A", *, do: bool = True) -> QueryView:
    message = dns.message.make_query(name, qtype, use_edns=0, want_dnssec=do)
    message.id = 0x4242
    return QueryView.parse(message.to_wire(), "192.0.2.10", "udp", "127.0.0.1:53")


def rrsig(covered: str, owner: str, *, sig: bytes = SIG, key_tag: int = 1111) -> str:
    labels = len(dns.name.from_text(owner).labels) - 1
    import base64

    return (f"{covered} 13 {labels} 3600 {EXPIRATION} {INCEPTION} {key_tag} {ZONE} "
            + base64.b64encode(sig).decode())


def answer(q: QueryView, sections: dict[str, list[tuple[str, str, str]]],
           rcode: int = 0) -> bytes:
    """The upstream's answer: per section, (owner, type, rdata) rows, TTL 300."""
    message = dns.message.make_response(dns.message.from_wire(q.wire))
    message.use_edns(0, dns.flags.DO, 1232)
    message.set_rcode(rcode)
    for section, rows in sections.items():
        for owner, rtype, rdata in rows:
            rrset = dns.rrset.from_text(owner, 300, "IN", rtype, rdata)
            getattr(message, section).append(rrset)
    return message.to_wire()


def www_answer(q: QueryView) -> bytes:
    """A signed CNAME to an A, the zone's signed NS in authority."""
    return answer(q, {
        "answer": [("www.example.com.", "CNAME", "web.example.com."),
                   ("www.example.com.", "RRSIG", rrsig("CNAME", "www.example.com.")),
                   ("web.example.com.", "A", "192.0.2.1"),
                   ("web.example.com.", "RRSIG", rrsig("A", "web.example.com.", sig=SIG[::-1]))],
        "authority": [(ZONE, "NS", "ns.example.com."),
                      (ZONE, "RRSIG", rrsig("NS", ZONE))],
    })


def nxdomain_answer(q: QueryView) -> bytes:
    return answer(q, {"authority": [
        (ZONE, "SOA", "ns.example.com. hostmaster.example.com. 1 3600 600 86400 300"),
        (ZONE, "RRSIG", rrsig("SOA", ZONE)),
        ("mail.example.com.", "NSEC", "web.example.com. A RRSIG NSEC"),
        ("mail.example.com.", "RRSIG", rrsig("NSEC", "mail.example.com.")),
    ]}, rcode=3)


def dnskey_answer(q: QueryView, *, ksk: bool = True) -> bytes:
    flags = 257 if ksk else 256
    return answer(q, {"answer": [
        (ZONE, "DNSKEY", f"{flags} 3 13 " + "A" * 86 + "=="),
        (ZONE, "DNSKEY", "256 3 13 " + "B" * 86 + "=="),
        (ZONE, "RRSIG", rrsig("DNSKEY", ZONE)),
    ]})


def fault(spec: dict[str, Any]) -> Any:
    return build_fault(Rule.model_validate({"fault": {"type": "dnssec", **spec}}).fault,
                       StaleStore())


def rewrite(spec: dict[str, Any], q: QueryView, data: bytes) -> bytes:
    f = fault(spec)
    assert isinstance(f.apply(q, 0.0, random.Random(1), PhaseState()), Forward)
    out = f.respond(q, data, 0.0, random.Random(1), PhaseState())
    assert out is not None
    return out


def rows(message: dns.message.Message, section: str) -> list[str]:
    return [rrset.to_text() for rrset in getattr(message, section)]


def changed_bytes(before: bytes, after: bytes) -> list[int]:
    assert len(before) == len(after)
    return [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]


def signature_ranges(data: bytes) -> list[range]:
    return [range(sig.signature, sig.end) for sig in
            (wire.rrsig_fields(data, s) for s in wire.layout(data)[1] if s.rtype == wire.RRSIG)]


# --- the modes -----------------------------------------------------------------------


def test_bogus_signature_inverts_only_the_signature_bytes() -> None:
    q = query("www.example.com.")
    data = www_answer(q)
    out = rewrite({"break": "bogus_signature"}, q, data)
    ranges = signature_ranges(data)
    assert len(ranges) == 3
    assert changed_bytes(data, out) == [i for r in ranges for i in r]
    for r in ranges:
        assert out[r.start:r.stop] == bytes(b ^ 0xFF for b in data[r.start:r.stop])
    got = dns.message.from_wire(out)
    assert got.answer[1][0].signature == bytes(b ^ 0xFF for b in SIG)
    assert got.answer[3][0].signature == bytes(b ^ 0xFF for b in SIG[::-1])


@pytest.mark.parametrize(("mode", "shift", "inception", "expiration"), [
    ("expired_signature", None, INCEPTION - int(DEFAULT_SHIFT) - 2_592_000,
     INCEPTION - int(DEFAULT_SHIFT)),
    ("not_yet_valid", None, EXPIRATION + int(DEFAULT_SHIFT),
     EXPIRATION + int(DEFAULT_SHIFT) + 2_592_000),
    ("expired_signature", "2d", INCEPTION - 172_800 - 2_592_000, INCEPTION - 172_800),
    ("not_yet_valid", 3600, EXPIRATION + 3600, EXPIRATION + 3600 + 2_592_000),
])
def test_validity_window_moves_and_nothing_else(mode: str, shift: Any, inception: int,
                                                expiration: int) -> None:
    q = query("www.example.com.")
    data = www_answer(q)
    spec = {"break": mode} | ({"shift": shift} if shift is not None else {})
    out = rewrite(spec, q, data)
    fields = [wire.rrsig_fields(data, s) for s in wire.layout(data)[1] if s.rtype == wire.RRSIG]
    assert changed_bytes(data, out) == [i for f in fields for i in range(f.expiration,
                                                                         f.expiration + 8)
                                        if data[i] != out[i]]
    for f in fields:
        assert struct.unpack_from("!II", out, f.expiration) == (expiration, inception)
        assert out[f.signature:f.end] == data[f.signature:f.end]


def test_validity_times_wrap_around_32_bits() -> None:
    q = query("www.example.com.")
    data = answer(q, {"answer": [
        ("www.example.com.", "A", "192.0.2.1"),
        ("www.example.com.", "RRSIG", f"A 13 3 3600 500 {2**32 - 100} 1 {ZONE} AAAA")]})
    (span,) = [s for s in wire.layout(data)[1] if s.rtype == wire.RRSIG]
    f = wire.rrsig_fields(data, span)
    out = rewrite({"break": "not_yet_valid", "shift": 1000}, q, data)
    assert struct.unpack_from("!II", out, f.expiration) == (2100, 1500)
    out = rewrite({"break": "expired_signature", "shift": 1000}, q, data)
    assert struct.unpack_from("!II", out, f.expiration) == (2**32 - 1100, 2**32 - 1700)


def test_strip_signatures_keeps_every_other_record() -> None:
    q = query("www.example.com.")
    data = www_answer(q)
    out = rewrite({"break": "strip_signatures"}, q, data)
    before, after = dns.message.from_wire(data), dns.message.from_wire(out)
    assert after.id == before.id and after.flags == before.flags
    assert out[wire.HEADER_LEN:q.qend] == data[wire.HEADER_LEN:q.qend]
    assert rows(after, "answer") == [r.to_text() for r in before.answer if r.rdtype != 46]
    assert rows(after, "authority") == [r.to_text() for r in before.authority if r.rdtype != 46]
    assert after.edns == 0 and after.ednsflags & dns.flags.DO


def test_strip_signatures_of_an_unsigned_answer_changes_nothing() -> None:
    q = query("www.example.com.")
    data = answer(q, {"answer": [("www.example.com.", "CNAME", "web.example.com."),
                                 ("web.example.com.", "A", "192.0.2.1")]})
    assert rewrite({"break": "strip_signatures"}, q, data) == data  # compression kept too


def test_without_records_writes_names_out_where_pointers_pointed_into_removed_ones() -> None:
    # Every name in the authority and additional sections below points
    # into the answer's RRSIG-owning names; removing records must not leave
    # a pointer dangling (the kept records are written uncompressed).
    q = query("a.example.com.", "MX")
    data = answer(q, {
        "answer": [("a.example.com.", "RRSIG", rrsig("MX", "a.example.com.")),
                   ("a.example.com.", "MX", "10 mx.b.example.com.")],
        "authority": [("b.example.com.", "RRSIG", rrsig("NS", "b.example.com.")),
                      ("b.example.com.", "NS", "ns.b.example.com."),
                      ("b.example.com.", "SOA", "ns.b.example.com. h.b.example.com. 1 2 3 4 5")],
        "additional": [("mx.b.example.com.", "A", "192.0.2.7")],
    })
    out = without_records(data, lambda span: span.rtype == wire.RRSIG)
    after = dns.message.from_wire(out)
    assert rows(after, "answer") == ["a.example.com. 300 IN MX 10 mx.b.example.com."]
    assert rows(after, "authority") == [
        "b.example.com. 300 IN NS ns.b.example.com.",
        "b.example.com. 300 IN SOA ns.b.example.com. h.b.example.com. 1 2 3 4 5"]
    assert rows(after, "additional") == ["mx.b.example.com. 300 IN A 192.0.2.7"]


def test_empty_dnskey_answers_nodata() -> None:
    q = query(ZONE, "DNSKEY")
    data = dnskey_answer(q)
    out = rewrite({"break": "empty_dnskey"}, q, data)
    after = dns.message.from_wire(out)
    assert after.rcode() == 0 and after.answer == [] and after.authority == []
    assert out[:4] == data[:4] and out[wire.HEADER_LEN:q.qend] == data[wire.HEADER_LEN:q.qend]
    assert after.ednsflags & dns.flags.DO
    # Other answers carry no DNSKEY: byte for byte the same.
    q = query("www.example.com.")
    assert rewrite({"break": "empty_dnskey"}, q, www_answer(q)) == www_answer(q)


@pytest.mark.parametrize(("ksk", "changed"), [(True, [257]), (False, [256, 256])])
def test_ds_mismatch_changes_the_key_signing_keys(ksk: bool, changed: list[int]) -> None:
    q = query(ZONE, "DNSKEY")
    data = dnskey_answer(q, ksk=ksk)
    out = rewrite({"break": "ds_mismatch"}, q, data)
    before, after = dns.message.from_wire(data), dns.message.from_wire(out)
    keys = list(zip(before.answer[0], after.answer[0], strict=True))
    assert sorted(b.flags for b, a in keys if b.key != a.key) == changed
    for b, a in keys:
        assert a.key in (b.key, bytes(x ^ 0xFF for x in b.key))
        assert (a.flags, a.protocol, a.algorithm) == (b.flags, b.protocol, b.algorithm)
    assert rows(after, "answer")[1] == rows(before, "answer")[1]  # the RRSIG untouched
    q = query("www.example.com.")
    assert rewrite({"break": "ds_mismatch"}, q, www_answer(q)) == www_answer(q)


def test_bad_denial_bogus_inverts_only_the_proofs_signatures() -> None:
    q = query("nosuch.example.com.")
    data = nxdomain_answer(q)
    out = rewrite({"break": "bad_denial"}, q, data)
    soa_sig, nsec_sig = signature_ranges(data)
    assert changed_bytes(data, out) == list(nsec_sig)
    after = dns.message.from_wire(out)
    assert after.rcode() == 3
    assert after.authority[3][0].signature == bytes(b ^ 0xFF for b in SIG)


def test_bad_denial_strip_removes_the_proofs() -> None:
    q = query("nosuch.example.com.")
    data = nxdomain_answer(q)
    out = rewrite({"break": "bad_denial", "denial": "strip"}, q, data)
    before, after = dns.message.from_wire(data), dns.message.from_wire(out)
    assert after.rcode() == 3
    assert rows(after, "authority") == rows(before, "authority")[:2]  # SOA and its RRSIG


def test_bad_denial_treats_nsec3_like_nsec() -> None:
    q = query("nosuch.example.com.")
    hashed = "2vptu5timamqttgl4luu9kg21e0aor3s.example.com."
    data = answer(q, {"authority": [
        (ZONE, "SOA", "ns.example.com. hostmaster.example.com. 1 3600 600 86400 300"),
        (ZONE, "RRSIG", rrsig("SOA", ZONE)),
        (hashed, "NSEC3", "1 0 0 - 2VPTU5TIMAMQTTGL4LUU9KG21E0AOR3T A RRSIG"),
        (hashed, "RRSIG", rrsig("NSEC3", hashed)),
    ]}, rcode=3)
    soa_sig, nsec3_sig = signature_ranges(data)
    assert changed_bytes(data, rewrite({"break": "bad_denial"}, q, data)) == list(nsec3_sig)
    out = rewrite({"break": "bad_denial", "denial": "strip"}, q, data)
    assert rows(dns.message.from_wire(out), "authority") == \
        rows(dns.message.from_wire(data), "authority")[:2]


# --- where it does not apply, bad input, the model ------------------------------------


def test_queries_without_do_pass_untouched() -> None:
    f = fault({"break": "bogus_signature"})
    assert f.apply(query("www.example.com.", do=False), 0.0, random.Random(1),
                   PhaseState()) is None
    no_edns = dns.message.make_query("www.example.com.", "A", use_edns=False).to_wire()
    assert f.apply(QueryView.parse(no_edns, "192.0.2.10", "udp"), 0.0, random.Random(1),
                   PhaseState()) is None


@pytest.mark.parametrize("mode", ["bogus_signature", "expired_signature", "not_yet_valid",
                                  "strip_signatures", "empty_dnskey", "ds_mismatch",
                                  "bad_denial"])
def test_damaged_answers_fail_open(mode: str) -> None:
    """Every cut of a signed answer, through the engine: never an exception;
    whatever the fault cannot read goes out unchanged and counts as an error."""
    engine = Engine()
    set_rules(engine, [Rule.model_validate({"match": {"suffix": "example.com"},
                                           "fault": {"type": "dnssec", "break": mode}})],
              0.0, None, 0.0)
    rng = random.Random(1)
    for q, data in ((query("www.example.com."), www_answer(query("www.example.com."))),
                    (query(ZONE, "DNSKEY"), dnskey_answer(query(ZONE, "DNSKEY"))),
                    (query("x.example.com."), nxdomain_answer(query("x.example.com.")))):
        verdict = engine.on_query(q, 1.0, rng)
        assert isinstance(verdict, Forward)
        for cut in range(len(data)):
            out = engine.on_response(q, verdict, data[:cut], 1.0, rng)
            assert out is not None
    (stats,) = engine.stats()
    assert stats["errors"] > 0


def test_rrsig_fields_of_a_short_rrsig() -> None:
    q = query("www.example.com.")
    data = bytearray(answer(q, {"answer": [("www.example.com.", "A", "192.0.2.1")]}))
    (span,) = wire.layout(bytes(data))[1][:1]
    struct.pack_into("!H", data, span.fixed, wire.RRSIG)  # an RRSIG of 4 bytes
    (span,) = wire.layout(bytes(data))[1][:1]
    with pytest.raises((ValueError, IndexError)):
        wire.rrsig_fields(bytes(data), span)
    out = rewrite({"break": "strip_signatures"}, q, bytes(data))
    assert dns.message.from_wire(out).answer == []  # removed without reading its fields


def test_read_name_follows_pointers_and_refuses_loops() -> None:
    data = b"\x03www\x07example\x03com\x00" + b"\x03abc\xc0\x04" + b"\xc0\x17"
    assert wire.read_name(data, 17) == (b"\x03abc\x07example\x03com\x00", 23)
    assert wire.read_name(data, 0) == (b"\x03www\x07example\x03com\x00", 17)
    with pytest.raises(ValueError):
        wire.read_name(data, 23)  # points at itself


@pytest.mark.parametrize(("spec", "message"), [
    ({"break": "bogus_signature", "shift": "1d"}, "shift goes with"),
    ({"break": "strip_signatures", "denial": "strip"}, "denial goes with"),
    ({"break": "expired_signature", "shift": 0}, "greater than 0"),
    ({"break": "nonsense"}, "Input should be"),
    ({}, "Field required"),
])
def test_bad_specs_are_refused(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        Rule.model_validate({"fault": {"type": "dnssec", **spec}})


def test_describe() -> None:
    assert fault({"break": "expired_signature"}).describe() == \
        "dnssec: expired signatures, by 168h"
    assert fault({"break": "bad_denial", "denial": "strip"}).describe() == \
        "dnssec: bad denial of existence (NSEC/NSEC3 strip)"
