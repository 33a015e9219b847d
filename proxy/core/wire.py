"""DNS wire format on raw bytes: reading, just enough for the hot path.

The forwarder never decodes a whole message on the hot path.  It reads the
12-byte header, walks the single question's labels to find where the
question ends, and copies bytes.  This module only reads messages (header,
question, EDNS, where each record sits); the replies the proxy builds
itself are in replies.py.  A full dnslib decode happens only where a fault
needs one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.errors import MalformedQuery

HEADER_LEN = 12

# Header flag bits (byte 2 and byte 3 of the header).
QR = 0x80  # byte 2
OPCODE_MASK = 0x78  # byte 2
AA = 0x04  # byte 2
TC = 0x02  # byte 2
RD = 0x01  # byte 2
RA = 0x80  # byte 3
CD = 0x10  # byte 3: checking disabled
RCODE_MASK = 0x0F  # byte 3

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16  # extended: the upper 8 bits go in the OPT record

OPT = 41
# DNSSEC record types (RFC 4034, RFC 5155).
DS, RRSIG, NSEC, DNSKEY, NSEC3 = 43, 46, 47, 48, 50
EDNS_UDP_SIZE = 1232  # the DNS flag day 2020 default
# What every UDP client takes (RFC 1035 4.2.1); smaller EDNS sizes count as this (RFC 6891 6.2.5).
UDP_MIN = 512

_QDCOUNT_ONE = b"\x00\x01"


def question_end(data: bytes) -> int:
    """Validate a query's header and return the offset just past its question.

    Raises MalformedQuery (with the rcode to answer, or None to drop) for
    anything a forwarder should not pass on: short packets, responses,
    opcodes other than QUERY, a question count other than one, labels that
    run past the end, and compression pointers inside the question.
    """
    if len(data) < HEADER_LEN:
        raise MalformedQuery("shorter than a DNS header", rcode=None)
    flags = data[2]
    if flags & QR:
        raise MalformedQuery("QR bit set on a query", rcode=None)
    if flags & OPCODE_MASK:
        raise MalformedQuery(f"opcode {(flags & OPCODE_MASK) >> 3} not supported", rcode=NOTIMP)
    if data[4:6] != _QDCOUNT_ONE:
        raise MalformedQuery(f"question count {data[4] << 8 | data[5]}", rcode=FORMERR)
    pos = HEADER_LEN
    try:
        length = data[pos]
        while length:
            if length > 63:
                raise MalformedQuery("compressed or invalid label in the question", rcode=FORMERR)
            pos += length + 1
            length = data[pos]
    except IndexError:
        raise MalformedQuery("question name runs past the end", rcode=FORMERR) from None
    if pos - HEADER_LEN >= 255:
        raise MalformedQuery("question name longer than 255 bytes", rcode=FORMERR)
    pos += 5  # the root label, QTYPE and QCLASS
    if pos > len(data):
        raise MalformedQuery("question cut short", rcode=FORMERR)
    return pos


def qname_text(data: bytes, qend: int) -> str:
    """The question's name in lower case, without the trailing dot ("" for the root).

    Bytes outside printable ASCII, dots and backslashes inside a label are
    escaped as in zone files (\\DDD, \\.), so two different names never map
    to the same text.
    """
    stop = qend - 5
    if stop <= HEADER_LEN:
        return ""
    # Fast path: overwrite the length bytes after the first with dots and
    # decode once.  It holds when every byte is plain and the only dots are
    # the ones put there (no dot inside a label).
    name = bytearray(data[HEADER_LEN + 1:stop])
    pos = HEADER_LEN + 1 + data[HEADER_LEN]
    dots = 0
    while pos < stop:
        name[pos - HEADER_LEN - 1] = 46  # "."
        dots += 1
        pos += data[pos] + 1
    if not name.translate(None, _PLAIN_OR_DOT) and name.count(46) == dots:
        return name.decode("ascii").lower()
    labels = []
    pos = HEADER_LEN
    while pos < stop:
        length = data[pos]
        labels.append(_escape(data[pos + 1 : pos + 1 + length]))
        pos += length + 1
    return ".".join(labels).lower()


# Bytes that stand for themselves in a name's text form.
_PLAIN = bytes(b for b in range(33, 127) if b not in b".\\")
_PLAIN_OR_DOT = _PLAIN + b"."


def _escape(raw: bytes) -> str:
    out = []
    for b in raw:
        if b in _PLAIN:
            out.append(chr(b))
        elif b in b".\\":
            out.append("\\" + chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def name_to_wire(name: str) -> bytes | None:
    """The wire form (length-prefixed labels and the root's zero byte) of a
    name in `qname_text`'s form; None for text that no query
    name turns into (an empty or too long label, a non-ASCII character).
    For every wire name w: name_to_wire(qname_text(w)) == w.lower()."""
    labels: list[bytes] = []
    label = bytearray()
    pos = 0
    try:
        while pos < len(name):
            char = name[pos]
            if char == "\\":
                digits = name[pos + 1:pos + 4]
                if digits.isdigit() and len(digits) == 3:
                    label.append(int(digits))
                    pos += 4
                    continue
                char = name[pos + 1]
                pos += 1
            elif char == ".":
                labels.append(bytes(label))
                label = bytearray()
                pos += 1
                continue
            label += char.encode("ascii")
            pos += 1
    except (IndexError, UnicodeEncodeError, ValueError):
        return None
    if name:
        labels.append(bytes(label))
    if any(not 0 < len(lab) < 64 for lab in labels):
        return None
    wire = b"".join(bytes((len(lab),)) + lab for lab in labels) + b"\x00"
    return wire if len(wire) <= 255 else None


def under_zones(wire_name: bytes, zones: frozenset[bytes]) -> bool:
    """Whether a wire-form name is one of `zones` (wire form, not the root) or
    below one, on label boundaries."""
    pos = 0
    length = wire_name[0]
    while length:
        if wire_name[pos:] in zones:
            return True
        pos += length + 1
        length = wire_name[pos]
    return False


def qtype_of(data: bytes, qend: int) -> int:
    return data[qend - 4] << 8 | data[qend - 3]


def rcode_of(data: bytes) -> int:
    return data[3] & RCODE_MASK


def find_opt(data: bytes, qend: int) -> bytes | None:
    """The query's OPT record (EDNS) as raw bytes, or None when it has none.

    Queries carry no answer or authority records in practice; if they do,
    they are skipped over.  Returns None on anything malformed, since a
    missing OPT only means the reply goes out without EDNS.
    """
    counts = struct.unpack_from("!HHH", data, 6)
    if counts[2] == 0:
        return None
    pos = qend
    try:
        for index in range(sum(counts)):
            start = pos
            pos = skip_name(data, pos)
            rtype, _rclass, _ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
            pos += 10 + rdlen
            if pos > len(data):
                return None
            if rtype == OPT and index >= counts[0] + counts[1]:
                return data[start:pos]
    except (IndexError, ValueError, struct.error):
        return None
    return None


def opt_fields(opt: bytes) -> tuple[int, int, int]:
    """(UDP payload size, extended rcode bits, version) of an OPT record as
    `find_opt` returns it (whole, so the fixed fields are there)."""
    size, ext_rcode, version = struct.unpack_from("!2xHBB", opt, skip_name(opt, 0))
    return size, ext_rcode, version


def edns_version(data: bytes, qend: int) -> int | None:
    """The EDNS version of a query's OPT record; None without one."""
    opt = find_opt(data, qend)
    return opt_fields(opt)[2] if opt is not None else None


def udp_limit(data: bytes, qend: int) -> int:
    """The largest UDP reply a query's sender takes: 512 bytes without EDNS,
    else its EDNS UDP payload size, but never below 512 (RFC 6891 6.2.5)."""
    opt = find_opt(data, qend)
    return UDP_MIN if opt is None else max(UDP_MIN, opt_fields(opt)[0])


def dnssec_ok(data: bytes, qend: int) -> bool:
    """Whether a query sets the DO bit (RFC 3225): only then do answers carry RRSIGs."""
    opt = find_opt(data, qend)
    return opt is not None and bool(opt[skip_name(opt, 0) + 6] & 0x80)


def skip_name(data: bytes, pos: int) -> int:
    """The offset just past the (possibly compressed) name at `pos`.
    IndexError when it runs past the end, ValueError on reserved label types."""
    while True:
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length & 0xC0:
            raise ValueError("invalid label type")
        pos += length + 1


_MAX_POINTERS = 127  # more jumps than a 255-byte name can need: a loop


def read_name(data: bytes, pos: int) -> tuple[bytes, int]:
    """The name at `pos` in wire form with every compression pointer
    followed, and the offset just past it where it sits.
    IndexError when it runs past the end, ValueError on a loop, a reserved
    label type or a name longer than 255 bytes."""
    name = bytearray()
    end = -1
    jumps = 0
    while True:
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if end < 0:
                end = pos + 2
            jumps += 1
            if jumps > _MAX_POINTERS:
                raise ValueError("compression loop")
            pos = (length & 0x3F) << 8 | data[pos + 1]
            continue
        if length & 0xC0:
            raise ValueError("invalid label type")
        if pos + 1 + length > len(data):
            raise IndexError("label runs past the end")
        name += data[pos : pos + 1 + length]
        if len(name) > 255:
            raise ValueError("name longer than 255 bytes")
        if length == 0:
            return bytes(name), end if end >= 0 else pos + 1
        pos += length + 1


@dataclass(frozen=True, slots=True)
class Span:
    """Where one resource record sits in a message."""

    section: int  # 0 answer, 1 authority, 2 additional
    start: int
    fixed: int  # offset of TYPE; TTL is at fixed + 4
    rtype: int
    end: int

    @property
    def rdata(self) -> int:
        """Offset of the record's RDATA (past TYPE, CLASS, TTL, RDLENGTH)."""
        return self.fixed + 10


@dataclass(frozen=True, slots=True)
class Rrsig:
    """Where the fields of one RRSIG's RDATA sit (RFC 4034 3.1)."""

    covered: int
    """The type the signature covers."""
    expiration: int
    """Offset of the 32-bit expiration time; the inception follows at +4."""
    signature: int
    """Offset of the signature bytes, which run to `end`."""
    end: int


def rrsig_fields(data: bytes, span: Span) -> Rrsig:
    """The field offsets of the RRSIG record at `span`.  ValueError (or
    IndexError) when its RDATA is too short for them."""
    if span.rtype != RRSIG:
        raise ValueError("not an RRSIG")
    start = span.rdata
    signature = skip_name(data, start + 18)  # past type..key tag: the signer's name
    if signature > span.end:
        raise ValueError("RRSIG cut short")
    return Rrsig(data[start] << 8 | data[start + 1], start + 8, signature, span.end)


def layout(data: bytes) -> tuple[int, list[Span]]:
    """The end of the question section and the span of every record.
    Raises ValueError (or IndexError / struct.error) on a malformed message."""
    qdcount, *counts = struct.unpack_from("!HHHH", data, 4)
    pos = HEADER_LEN
    for _ in range(qdcount):
        pos = skip_name(data, pos) + 4
    qend = pos
    spans = []
    for section, count in enumerate(counts):
        for _ in range(count):
            start = pos
            pos = skip_name(data, pos)
            rtype, _rclass, _ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
            spans.append(Span(section, start, pos, rtype, pos + 10 + rdlen))
            pos += 10 + rdlen
    if pos > len(data):
        raise ValueError("message cut short")
    return qend, spans
