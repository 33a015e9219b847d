"""The raw-bytes parser (proxy.core.wire) and reply builders (proxy.core.replies) of the
hot path."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core import replies, wire
from proxy.errors import MalformedQuery


def query(name: str = "www.Example.test", qtype: str = "A", **kwargs) -> bytes:
    return dns.message.make_query(name, qtype, **kwargs).to_wire()


def test_question_end_points_past_qtype_and_qclass():
    data = query("www.example.test")
    qend = wire.question_end(data)
    # header + 3 labels (1+3, 1+7, 1+4) + root + qtype + qclass
    assert qend == 12 + 4 + 8 + 5 + 1 + 4
    assert wire.qtype_of(data, qend) == 1


def test_qname_text_is_lower_case_without_trailing_dot():
    data = query("WWW.Example.TEST.")
    assert wire.qname_text(data, wire.question_end(data)) == "www.example.test"


def test_qname_text_of_the_root_is_empty():
    data = query(".", "NS")
    assert wire.qname_text(data, wire.question_end(data)) == ""


def test_qname_text_escapes_dots_and_binary_bytes_inside_labels():
    name = dns.name.Name([b"a.b", b"c\x00d", b"test", b""])
    data = dns.message.make_query(name, "A").to_wire()
    assert wire.qname_text(data, wire.question_end(data)) == "a\\.b.c\\000d.test"
    # and it is not confused with the three-label name a.b.test
    plain = query("a.b.test")
    assert wire.qname_text(plain, wire.question_end(plain)) == "a.b.test"


@pytest.mark.parametrize(
    "mutate, rcode, why",
    [
        (lambda d: d[:11], None, "shorter than a DNS header"),
        (lambda d: d[:2] + bytes([d[2] | 0x80]) + d[3:], None, "QR bit"),
        (lambda d: d[:2] + bytes([d[2] | (4 << 3)]) + d[3:], wire.NOTIMP, "opcode 4"),
        (lambda d: d[:2] + bytes([d[2] | (5 << 3)]) + d[3:], wire.NOTIMP, "opcode 5"),
        (lambda d: d[:4] + b"\x00\x00" + d[6:], wire.FORMERR, "question count 0"),
        (lambda d: d[:4] + b"\x00\x02" + d[6:], wire.FORMERR, "question count 2"),
        (lambda d: d[:20], wire.FORMERR, "runs past the end"),
        (lambda d: d[:-2], wire.FORMERR, "cut short"),
        (lambda d: d[:12] + b"\xc0\x0c" + d[-4:], wire.FORMERR, "compressed"),
    ],
)
def test_malformed_queries_are_refused_with_the_right_rcode(mutate, rcode, why):
    with pytest.raises(MalformedQuery) as caught:
        wire.question_end(mutate(query()))
    assert caught.value.rcode == rcode
    assert why in str(caught.value)


def test_a_name_longer_than_255_bytes_is_formerr():
    labels = [b"a" * 63] * 4 + [b""]
    data = dns.message.make_query(dns.name.Name(labels[:3] + [b""]), "A").to_wire()
    long_name = b"".join(bytes([len(x)]) + x for x in labels)
    data = data[:12] + long_name + data[-4:]
    with pytest.raises(MalformedQuery, match="longer than 255"):
        wire.question_end(data)


def test_a_valid_query_is_accepted():
    assert wire.question_end(query()) > 12  # the not-refused case beside the refused ones


def test_rcode_reply_keeps_id_question_rd_cd_and_echoes_edns():
    q = dns.message.make_query("x.example.test", "AAAA", use_edns=0, want_dnssec=True)
    q.flags |= dns.flags.CD
    data = q.to_wire()
    reply = dns.message.from_wire(replies.rcode_reply(data, wire.question_end(data), wire.SERVFAIL))
    assert reply.id == q.id
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.question == q.question
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RD
    assert reply.flags & dns.flags.RA and reply.flags & dns.flags.CD
    assert not reply.flags & dns.flags.AA
    assert reply.edns == 0 and reply.ednsflags & dns.flags.DO
    assert reply.payload == wire.EDNS_UDP_SIZE


def test_rcode_reply_without_edns_has_no_opt():
    data = query(use_edns=False)
    reply = dns.message.from_wire(replies.rcode_reply(data, wire.question_end(data), wire.REFUSED))
    assert reply.rcode() == dns.rcode.REFUSED
    assert reply.edns == -1
    assert not reply.flags & dns.flags.CD


def test_header_reply_echoes_id_and_opcode():
    data = bytearray(query())
    data[2] |= 4 << 3  # NOTIFY
    reply = replies.header_reply(bytes(data), wire.NOTIMP)
    assert reply[:2] == data[:2]
    assert reply[2] & 0x80 and (reply[2] >> 3) & 0xF == 4
    assert reply[3] & 0xF == wire.NOTIMP
    assert len(reply) == 12


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_parser(data):
    try:
        qend = wire.question_end(data)
    except MalformedQuery as exc:
        assert exc.rcode in (None, wire.FORMERR, wire.NOTIMP)
        return
    assert 12 < qend <= len(data)
    wire.qname_text(data, qend)
    replies.rcode_reply(data, qend, wire.SERVFAIL)


_labels = st.lists(st.binary(min_size=1, max_size=63), min_size=0, max_size=5).filter(
    lambda labels: sum(len(label) + 1 for label in labels) < 250)


@given(_labels)
@settings(max_examples=300, deadline=None)
def test_name_to_wire_inverts_qname_text(labels):
    # Any bytes in any case: the screen's wire names must be what the raw
    # name of a query for the same text looks like, lower-cased.
    raw = b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"
    data = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + raw + b"\x00\x01\x00\x01"
    qend = wire.question_end(data)
    assert wire.name_to_wire(wire.qname_text(data, qend)) == raw.lower()


@pytest.mark.parametrize("text", ["a..b", ".a", "x" * 64 + ".test", "bücher.de", "a\\"])
def test_name_to_wire_refuses_text_no_query_name_has(text):
    assert wire.name_to_wire(text) is None


def test_under_zones_is_on_label_boundaries():
    zones = frozenset({wire.name_to_wire("example.com")})
    assert wire.under_zones(wire.name_to_wire("example.com"), zones)
    assert wire.under_zones(wire.name_to_wire("a.b.example.com"), zones)
    assert not wire.under_zones(wire.name_to_wire("xexample.com"), zones)
    assert not wire.under_zones(wire.name_to_wire("com"), zones)
    assert not wire.under_zones(b"\x00", zones)  # the root


# --- EDNS fields and the UDP size of replies the proxy builds ---------------------------


def edns_query(edns: int | None = 0, payload: int = 1232, name: str = "www.Example.test",
               **kwargs) -> tuple[bytes, int]:
    if edns is None:
        q = dns.message.make_query(name, "TXT", use_edns=False)
    else:
        q = dns.message.make_query(name, "TXT", use_edns=edns, payload=payload, **kwargs)
    data = q.to_wire()
    return data, wire.question_end(data)


@pytest.mark.parametrize("edns, payload, limit, version", [
    (None, 0, 512, None),  # no EDNS: RFC 1035's 512 bytes
    (0, 1232, 1232, 0),
    (0, 4096, 4096, 0),
    (0, 512, 512, 0),
    (0, 100, 512, 0),  # below 512 counts as 512 (RFC 6891 6.2.5)
    (0, 0, 512, 0),
    (1, 1400, 1400, 1),
    (255, 65535, 65535, 255),
])
def test_udp_limit_and_edns_version(edns, payload, limit, version):
    data, qend = edns_query(edns, payload)
    assert wire.udp_limit(data, qend) == limit
    assert wire.edns_version(data, qend) == version


def sized_reply(data: bytes, size: int, *, rcode: int = 0, ede: str | None = None) -> bytes:
    """A reply to the query `data` of exactly `size` bytes: one TXT record
    padded to fit, the query's EDNS echoed (plus an EDE when asked)."""
    q = dns.message.from_wire(data)

    def build(strings: list[int]) -> bytes:
        reply = dns.message.make_response(q)
        if ede is not None:
            reply.use_edns(0, options=[dns.edns.EDEOption(22, ede)])
        reply.set_rcode(rcode)
        rdata = " ".join(f'"{"x" * n}"' for n in strings)
        reply.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "TXT", rdata))
        return reply.to_wire(max_size=65535)

    strings = [0]
    for _ in range(size - len(build(strings))):  # each byte: a character or a new string
        if strings[-1] < 255:
            strings[-1] += 1
        else:
            strings.append(0)
    out = build(strings)
    assert len(out) == size
    return out


@pytest.mark.parametrize("edns, payload, size, truncated", [
    (None, 0, 512, False),  # exactly the limit fits
    (None, 0, 513, True),
    (0, 512, 512, False),
    (0, 512, 513, True),
    (0, 100, 512, False),  # 100 counts as 512
    (0, 100, 513, True),
    (0, 1232, 1232, False),
    (0, 1232, 1233, True),
    (0, 4096, 1500, False),
    (0, 4096, 4097, True),
])
def test_fit_udp_truncates_only_what_the_client_cannot_take(edns, payload, size, truncated):
    data, qend = edns_query(edns, payload)
    reply = sized_reply(data, size)
    fitted = replies.fit_udp(reply, data, qend)
    if not truncated:
        assert fitted is reply
        return
    message = dns.message.from_wire(fitted)
    assert message.flags & dns.flags.TC and message.flags & dns.flags.QR
    assert message.id == dns.message.from_wire(data).id
    assert not message.answer and not message.authority and not message.additional
    assert fitted[12:qend] == data[12:qend]  # the question as sent, case kept
    assert message.edns == (-1 if edns is None else 0)  # the OPT kept for EDNS clients only
    assert len(fitted) <= 512


def test_fit_udp_keeps_the_rcode_and_the_replys_own_opt():
    data, qend = edns_query(None, name="big.example.test")
    # An extended rcode needs the OPT even for a client without EDNS; an EDE rides along.
    reply = sized_reply(data, 600, rcode=dns.rcode.BADVERS, ede="cut")
    message = dns.message.from_wire(replies.fit_udp(reply, data, qend))
    assert message.flags & dns.flags.TC
    assert message.rcode() == dns.rcode.BADVERS and not message.answer
    assert [(o.code, o.text) for o in message.options] == [(22, "cut")]


def test_fit_udp_drops_options_that_do_not_fit_but_keeps_the_opt():
    data, qend = edns_query(0, 512, name="big.example.test", want_dnssec=True)
    reply = dns.message.from_wire(data)
    response = dns.message.make_response(reply)
    response.use_edns(0, dns.flags.DO, options=[dns.edns.EDEOption(22, "x" * 600)])
    response.set_rcode(dns.rcode.BADVERS)
    fitted = replies.fit_udp(response.to_wire(max_size=65535), data, qend)
    assert len(fitted) <= 512
    message = dns.message.from_wire(fitted)
    assert message.flags & dns.flags.TC and message.rcode() == dns.rcode.BADVERS
    assert message.edns == 0 and message.ednsflags & dns.flags.DO and not message.options
