"""Every reply the proxy builds itself, as raw bytes.

Two kinds come from here: the forwarder's own answers (REFUSED to clients
outside the ACL, SERVFAIL when no upstream answers, FORMERR/NOTIMP for
queries it cannot read: `rcode_reply`, `header_reply`) and the answers
faults make (`empty_reply`, `records_reply`, `stale_reply`,
`rewrite_ttls`).  wire.py reads messages; this module writes them.

Replies keep the query's ID, question, RD and CD bits, set RA, never set
AA, and carry an OPT record when the query had one (RFC 6891: no OPT to a
client that sent none, so an EDE is only sent to EDNS clients), or when the
rcode needs the extended bits.  Negative answers may carry an SOA in the
authority section whose TTL and MINIMUM are `negative_ttl` (RFC 2308).  Its
owner defaults to the query name's parent zone, written as a compression
pointer into the question, so these replies are built without dnslib.
Replies are built whole; `fit_udp` truncates them for UDP clients that
cannot take that much.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from dnslib import RR, DNSBuffer, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from proxy.core import wire
from proxy.core.query import QueryView
from proxy.core.spec import Ede, Soa

TYPE_SOA = 6
EDE_OPTION = 15  # RFC 8914
MAX_TTL = 2**31 - 1


# --- header and OPT -----------------------------------------------------------------


def flags_for(query: bytes, rcode: int, *, tc: bool = False) -> bytes:
    """Header bytes 2-3 of a reply: QR, RD and CD from the query, RA, no AA."""
    return bytes((wire.QR | (wire.TC if tc else 0) | (query[2] & wire.RD),
                  wire.RA | (query[3] & wire.CD) | (rcode & wire.RCODE_MASK)))


def reply_opt(query_opt: bytes | None, rcode: int = 0, options: bytes = b"") -> bytes:
    """Our OPT record, given the query's (`wire.find_opt`): only when the
    query had EDNS, or when the rcode needs the extended bits; our buffer
    size, the query's DO bit, these option bytes."""
    if query_opt is None and rcode <= 15:
        return b""
    do_bit = query_opt[7] & 0x80 if query_opt is not None and len(query_opt) >= 11 else 0
    return b"\x00" + struct.pack("!HHBBBBH", wire.OPT, wire.EDNS_UDP_SIZE, rcode >> 4, 0,
                                 do_bit, 0, len(options)) + options


def ede_option(ede: Ede | None) -> bytes:
    """The EDNS option bytes of an Extended DNS Error, b'' for none."""
    if ede is None:
        return b""
    text = ede.text.encode()
    return struct.pack("!HHH", EDE_OPTION, 2 + len(text), ede.code) + text


# --- the forwarder's own replies ------------------------------------------------------


def rcode_reply(query: bytes, qend: int, rcode: int, *, with_question: bool = True) -> bytes:
    """A reply with no records, built from the query: same ID, question, RD
    and CD bits, RA set, AA not set, the query's EDNS echoed."""
    opt = reply_opt(wire.find_opt(query, qend)) if qend else b""
    qd = 1 if with_question else 0
    header = query[:2] + flags_for(query, rcode) + struct.pack(
        "!HHHH", qd, 0, 0, 1 if opt else 0)
    question = query[wire.HEADER_LEN:qend] if with_question else b""
    return header + question + opt


def header_reply(query: bytes, rcode: int) -> bytes:
    """A bare header reply for a query whose question cannot be trusted
    (FORMERR, NOTIMP): the ID and opcode echoed, no sections."""
    flags2 = wire.QR | (query[2] & (wire.OPCODE_MASK | wire.RD))
    return query[:2] + bytes((flags2, wire.RA | (rcode & wire.RCODE_MASK))) + b"\x00" * 8


def fit_udp(reply: bytes, query: bytes, qend: int) -> bytes:
    """A reply the proxy built, as it may go to the query's UDP sender:
    unchanged when it fits `wire.udp_limit`, else truncated (RFC 1035
    4.2.1): TC=1, the header and the query's question, the reply's OPT
    record if it has one (without its options if they do not fit), and no
    other records (RFC 2181 9: a truncated reply should not carry part of an
    RRset, so it carries none).  The client retries over TCP and gets the
    whole reply."""
    if len(reply) <= wire.UDP_MIN:
        return reply
    limit = wire.udp_limit(query, qend)
    if len(reply) <= limit:
        return reply
    opt = b""
    try:
        opt = wire.find_opt(reply, wire.skip_name(reply, wire.HEADER_LEN) + 4) or b""
    except (IndexError, ValueError):
        pass  # not ours to mend: it goes out without the OPT
    header = reply[:2] + bytes((reply[2] | wire.TC, reply[3])) + struct.pack(
        "!HHHH", 1, 0, 0, 1 if opt else 0)
    out = header + query[wire.HEADER_LEN:qend] + opt
    if opt and len(out) > limit:  # options too long (a long EDE): only the OPT's fixed fields
        out = out[: len(out) - len(opt)] + opt[: wire.skip_name(opt, 0) + 8] + b"\x00\x00"
    return out


# --- the faults' replies --------------------------------------------------------------


def encode_name(text: str) -> bytes:
    """'ns.invalid.' -> b'\\x02ns\\x07invalid\\x00' (no compression)."""
    buffer = DNSBuffer()
    buffer.encode_name_nocompress(DNSLabel(text))
    return bytes(buffer.data)


def parent_owner(query: bytes) -> bytes:
    """The owner name of the default SOA, as a pointer into the question:
    the query name's parent, the name itself for one label, the root for the root."""
    first = query[wire.HEADER_LEN]
    if first == 0:
        return b"\x00"
    if query[wire.HEADER_LEN + 1 + first] == 0:
        return b"\xc0\x0c"
    return struct.pack("!H", 0xC000 | (wire.HEADER_LEN + 1 + first))


class SoaRecord:
    """An SOA record compiled once per fault; only its owner depends on the query."""

    __slots__ = ("_tail", "negative_ttl", "owner")

    def __init__(self, soa: Soa) -> None:
        self.owner = encode_name(soa.zone) if soa.zone is not None else None
        self.negative_ttl = soa.negative_ttl
        rdata = (encode_name(soa.mname) + encode_name(soa.rname)
                 + struct.pack("!IIIII", soa.serial % 2**32, 3600, 600, 86400, soa.negative_ttl))
        self._tail = struct.pack("!HHIH", TYPE_SOA, 1, soa.negative_ttl, len(rdata)) + rdata

    def record(self, query: bytes) -> bytes:
        return (self.owner if self.owner is not None else parent_owner(query)) + self._tail


def empty_reply(q: QueryView, rcode: int, soa: SoaRecord | None = None, options: bytes = b"",
                *, tc: bool = False) -> bytes:
    """A reply with no answer records: the question, maybe an SOA, maybe an OPT."""
    data = q.wire
    authority = soa.record(data) if soa is not None else b""
    opt = reply_opt(wire.find_opt(data, q.qend), rcode, options)
    header = data[:2] + flags_for(data, rcode, tc=tc) + struct.pack(
        "!HHHH", 1, 0, 1 if authority else 0, 1 if opt else 0)
    return header + data[wire.HEADER_LEN : q.qend] + authority + opt


def question_labels(q: QueryView) -> list[bytes]:
    """The question name's labels as sent (client's case kept)."""
    labels = []
    pos, data = wire.HEADER_LEN, q.wire
    while data[pos]:
        labels.append(data[pos + 1 : pos + 1 + data[pos]])
        pos += 1 + data[pos]
    return labels


def records_reply(q: QueryView, answers: list[RR]) -> bytes:
    """A NOERROR reply with these answer records (dnslib packs and compresses them)."""
    data = q.wire
    record = DNSRecord(DNSHeader(id=0, qr=1),
                       q=DNSQuestion(DNSLabel(question_labels(q)), q.qtype,
                                     data[q.qend - 2] << 8 | data[q.qend - 1]))
    for rr in answers:
        record.add_answer(rr)
    body = record.pack()  # the question packs to the very bytes of the query's
    opt = reply_opt(wire.find_opt(data, q.qend))
    counts = struct.pack("!HHHH", 1, len(answers), 0, 1 if opt else 0)
    return data[:2] + flags_for(data, 0) + counts + bytes(body[wire.HEADER_LEN :]) + opt


def stale_reply(q: QueryView, answer: bytes, ttl: int) -> bytes:
    """A recorded answer served again: the client's ID, flags and question,
    every TTL set to `ttl`, the recorded OPT replaced by one for this client."""
    qend, spans = wire.layout(answer)
    body = bytearray()
    counts = [0, 0, 0]
    for span in spans:
        if span.rtype == wire.OPT:
            continue
        record = bytearray(answer[span.start : span.end])
        struct.pack_into("!I", record, span.fixed - span.start + 4, ttl)
        body += record
        counts[span.section] += 1
    # Same name, so the same length and compression pointers stay valid;
    # only the letter case may differ, and the client's is the one to echo.
    if qend == q.qend:
        question = q.wire[wire.HEADER_LEN : q.qend]
    else:
        question = answer[wire.HEADER_LEN : qend]
    opt = reply_opt(wire.find_opt(q.wire, q.qend))
    header = q.wire[:2] + flags_for(q.wire, 0) + struct.pack(
        "!HHHH", 1, counts[0], counts[1], counts[2] + (1 if opt else 0))
    return header + question + bytes(body) + opt


def rewrite_ttls(data: bytes, change: Callable[[int], int]) -> bytes:
    """Every record's TTL through `change`, except OPT's (which holds flags)."""
    out = bytearray(data)
    for span in wire.layout(data)[1]:
        if span.rtype != wire.OPT:
            ttl = struct.unpack_from("!I", data, span.fixed + 4)[0]
            struct.pack_into("!I", out, span.fixed + 4, min(MAX_TTL, max(0, change(ttl))))
    return bytes(out)


# Types whose RDATA names may be compressed (RFC 3597 4: the RFC 1035 ones).
_ONE_NAME = frozenset({2, 3, 4, 5, 7, 8, 9, 12})  # NS MD MF CNAME MB MG MR PTR
_MX, _MINFO = 15, 14


def _plain_rdata(data: bytes, span: wire.Span) -> bytes:
    """A record's RDATA with its compressed names written out in full."""
    start, end, rtype = span.rdata, span.end, span.rtype
    if rtype in _ONE_NAME:
        return wire.read_name(data, start)[0]
    if rtype == _MX:
        return data[start : start + 2] + wire.read_name(data, start + 2)[0]
    if rtype in (TYPE_SOA, _MINFO):
        first, pos = wire.read_name(data, start)
        second, pos = wire.read_name(data, pos)
        return first + second + data[pos:end]
    return data[start:end]


def without_records(data: bytes, remove: Callable[[wire.Span], bool]) -> bytes:
    """The message without the records `remove` picks, counts mended.  The
    records kept are written without compression: a pointer may have
    pointed into a record that is gone.  The header and question are kept;
    with nothing to remove, the message is returned as it is."""
    qend, spans = wire.layout(data)
    if not any(remove(span) for span in spans):
        return data
    counts = [0, 0, 0]
    body = bytearray()
    for span in spans:
        if remove(span):
            continue
        rdata = _plain_rdata(data, span)
        body += wire.read_name(data, span.start)[0] + data[span.fixed : span.fixed + 8]
        body += struct.pack("!H", len(rdata)) + rdata
        counts[span.section] += 1
    return data[:6] + struct.pack("!HHH", *counts) + data[wire.HEADER_LEN : qend] + bytes(body)
