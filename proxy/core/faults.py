"""Faults: one small class per fault type, registered by type name.

How it works: `build_fault(spec, store)` turns a validated model (from
proxy.core.model) into a fault object, once, when a scenario loads.  Per
query the engine calls `apply(q, now, rng, phase)`, which returns a verdict,
or None when the query passes untouched (a flap that is off, a truncate on
TCP).  Response-side faults (ttl, partial, corrupt wrong_id / wrong_question
/ short) return `Forward(respond=self)`; the engine later calls
`respond(q, answer, now, rng, phase)` with the upstream's answer and sends
what it returns.  `phase` gives the phase's start time (for `flap` and
`partial` periods) and its stale snapshot.

Replies built here keep the query's ID, question, RD and CD bits, set RA,
never set AA, and carry an OPT record when the query had one (RFC 6891: no
OPT to a client that sent none, so an EDE is only sent to EDNS clients).
Negative answers (nxdomain, nodata) carry an SOA in the authority section
whose TTL and MINIMUM are `negative_ttl` (RFC 2308).  Its owner defaults to
the query name's parent zone, written as a compression pointer into the
question, so these replies are built from raw bytes without dnslib.
Replies are built whole; the engine truncates them for UDP clients that
cannot take that much (wire.fit_udp).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from random import Random
from typing import Any, ClassVar

from dnslib import (
    AAAA,
    CNAME,
    QTYPE,
    RCODE,
    RR,
    A,
    DNSBuffer,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

from proxy.core import model, wire
from proxy.core.query import QueryView
from proxy.core.rr import rcode_number
from proxy.core.selectors import hash_share
from proxy.core.stale import Key, StaleStore
from proxy.core.verdict import Drop, Forward, Reply, Verdict

CD = 0x10  # header byte 3: checking disabled
TYPE_A, TYPE_AAAA, TYPE_CNAME, TYPE_SOA, TYPE_ANY = 1, 28, 5, 6, 255
EDE_OPTION = 15  # RFC 8914
MAX_TTL = 2**31 - 1
SPOOF_A = "192.0.2.1"  # RFC 5737 documentation range
SPOOF_AAAA = "2001:db8::1"  # RFC 3849 documentation range


@dataclass
class PhaseState:
    """What faults need to know about the phase they run in."""

    start: float = 0.0
    """Wall-clock seconds when the phase began: flap and partial periods count from here."""
    snapshot: dict[Key, bytes] | None = None
    """The stale store as it was when the phase began (for `stale` with `source: snapshot`)."""


# --- raw reply building --------------------------------------------------------


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

    def __init__(self, soa: model.Soa) -> None:
        self.owner = encode_name(soa.zone) if soa.zone is not None else None
        self.negative_ttl = soa.negative_ttl
        rdata = (encode_name(soa.mname) + encode_name(soa.rname)
                 + struct.pack("!IIIII", soa.serial % 2**32, 3600, 600, 86400, soa.negative_ttl))
        self._tail = struct.pack("!HHIH", TYPE_SOA, 1, soa.negative_ttl, len(rdata)) + rdata

    def record(self, query: bytes) -> bytes:
        return (self.owner if self.owner is not None else parent_owner(query)) + self._tail


def ede_option(ede: model.Ede | None) -> bytes:
    """The EDNS option bytes of an Extended DNS Error, b'' for none."""
    if ede is None:
        return b""
    text = ede.text.encode()
    return struct.pack("!HHH", EDE_OPTION, 2 + len(text), ede.code) + text


def reply_opt(query: QueryView, rcode: int = 0, options: bytes = b"") -> bytes:
    """Our OPT record: only when the query had EDNS (or when the rcode needs
    the extended bits), with the query's DO bit."""
    query_opt = wire.find_opt(query.wire, query.qend)
    if query_opt is None and rcode <= 15:
        return b""
    do_bit = query_opt[7] & 0x80 if query_opt is not None and len(query_opt) >= 11 else 0
    return b"\x00" + struct.pack("!HHBBBBH", wire.OPT, wire.EDNS_UDP_SIZE, rcode >> 4, 0,
                                 do_bit, 0, len(options)) + options


def flags_for(query: bytes, rcode: int, *, tc: bool = False) -> bytes:
    """Header bytes 2-3 of a reply: QR, RD and CD from the query, RA, no AA."""
    return bytes((wire.QR | (wire.TC if tc else 0) | (query[2] & wire.RD),
                  wire.RA | (query[3] & CD) | (rcode & wire.RCODE_MASK)))


def empty_reply(q: QueryView, rcode: int, soa: SoaRecord | None = None, options: bytes = b"",
                *, tc: bool = False) -> bytes:
    """A reply with no answer records: the question, maybe an SOA, maybe an OPT."""
    data = q.wire
    authority = soa.record(data) if soa is not None else b""
    opt = reply_opt(q, rcode, options)
    header = data[:2] + flags_for(data, rcode, tc=tc) + struct.pack(
        "!HHHH", 1, 0, 1 if authority else 0, 1 if opt else 0)
    return header + data[wire.HEADER_LEN : q.qend] + authority + opt


def records_reply(q: QueryView, answers: list[RR]) -> bytes:
    """A NOERROR reply with these answer records (dnslib packs and compresses them)."""
    data = q.wire
    record = DNSRecord(DNSHeader(id=0, qr=1),
                       q=DNSQuestion(DNSLabel(question_labels(q)), q.qtype,
                                     data[q.qend - 2] << 8 | data[q.qend - 1]))
    for rr in answers:
        record.add_answer(rr)
    body = record.pack()  # the question packs to the very bytes of the query's
    opt = reply_opt(q)
    counts = struct.pack("!HHHH", 1, len(answers), 0, 1 if opt else 0)
    return data[:2] + flags_for(data, 0) + counts + bytes(body[wire.HEADER_LEN :]) + opt


def question_labels(q: QueryView) -> list[bytes]:
    """The question name's labels as sent (client's case kept)."""
    labels = []
    pos, data = wire.HEADER_LEN, q.wire
    while data[pos]:
        labels.append(data[pos + 1 : pos + 1 + data[pos]])
        pos += 1 + data[pos]
    return labels


# --- walking the records of a message (responses) --------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    """Where one resource record sits in a message."""

    section: int  # 0 answer, 1 authority, 2 additional
    start: int
    fixed: int  # offset of TYPE; TTL is at fixed + 4
    rtype: int
    end: int


def layout(data: bytes) -> tuple[int, list[Span]]:
    """The end of the question section and the span of every record.
    Raises ValueError (or IndexError / struct.error) on a malformed message."""
    qdcount, *counts = struct.unpack_from("!HHHH", data, 4)
    pos = wire.HEADER_LEN
    for _ in range(qdcount):
        pos = wire.skip_name(data, pos) + 4
    qend = pos
    spans = []
    for section, count in enumerate(counts):
        for _ in range(count):
            start = pos
            pos = wire.skip_name(data, pos)
            rtype, _rclass, _ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
            spans.append(Span(section, start, pos, rtype, pos + 10 + rdlen))
            pos += 10 + rdlen
    if pos > len(data):
        raise ValueError("message cut short")
    return qend, spans


def rewrite_ttls(data: bytes, change: Callable[[int], int]) -> bytes:
    """Every record's TTL through `change`, except OPT's (which holds flags)."""
    out = bytearray(data)
    for span in layout(data)[1]:
        if span.rtype != wire.OPT:
            ttl = struct.unpack_from("!I", data, span.fixed + 4)[0]
            struct.pack_into("!I", out, span.fixed + 4, min(MAX_TTL, max(0, change(ttl))))
    return bytes(out)


def stale_reply(q: QueryView, answer: bytes, ttl: int) -> bytes:
    """A recorded answer served again: the client's ID, flags and question,
    every TTL set to `ttl`, the recorded OPT replaced by one for this client."""
    qend, spans = layout(answer)
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
    opt = reply_opt(q)
    header = q.wire[:2] + flags_for(q.wire, 0) + struct.pack(
        "!HHHH", 1, counts[0], counts[1], counts[2] + (1 if opt else 0))
    return header + question + bytes(body) + opt


# --- the faults ---------------------------------------------------------------------


class Fault:
    """Base class: a compiled fault."""

    type: ClassVar[str] = ""

    def apply(self, q: QueryView, now: float, rng: Random, phase: PhaseState) -> Verdict | None:
        raise NotImplementedError

    def respond(self, q: QueryView, answer: bytes, now: float, rng: Random,
                phase: PhaseState) -> bytes | None:
        """For response-side faults: the bytes to send instead of `answer` (None: drop)."""
        return answer

    def describe(self) -> str:
        raise NotImplementedError

    def children(self) -> tuple[Fault, ...]:
        """Faults nested in this one (delay's `then`, flap's `fault`, stale's fallback)."""
        return ()

    def walk(self) -> Iterator[Fault]:
        """This fault and every fault nested in it."""
        yield self
        for child in self.children():
            yield from child.walk()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"


FAULTS: dict[str, type[Fault]] = {}
"""Fault type name -> class."""


def register(cls: type[Fault]) -> type[Fault]:
    FAULTS[cls.type] = cls
    return cls


def build_fault(spec: Any, store: StaleStore) -> Fault:
    """Compile a fault model (NxdomainFault, DelayFault...) into a fault object."""
    return FAULTS[spec.type](spec, store)  # type: ignore[call-arg]


class _Negative(Fault):
    rcode: ClassVar[int] = 0

    def __init__(self, spec: Any, store: StaleStore) -> None:
        self.soa = SoaRecord(spec.soa) if spec.soa is not None else None
        self.ede = spec.ede
        self._options = ede_option(spec.ede)

    def apply(self, q: QueryView, now: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        return Reply(empty_reply(q, self.rcode, self.soa, self._options))

    def title(self) -> str:
        return self.type.upper()

    def describe(self) -> str:
        text = self.title()
        if self.soa is not None:
            text += f" (negative TTL {self.soa.negative_ttl}s)"
        if self.ede is not None:
            text += f" with EDE {self.ede.code}" + (f" {self.ede.text!r}" if self.ede.text else "")
        return text


@register
class Nxdomain(_Negative):
    """NXDOMAIN: the name does not exist; SOA in authority for negative caching."""

    type = "nxdomain"
    rcode = wire.NXDOMAIN


@register
class Servfail(_Negative):
    """SERVFAIL, as resolvers answer when the authoritative servers fail."""

    type = "servfail"
    rcode = wire.SERVFAIL


@register
class Refused(_Negative):
    """REFUSED: the server will not answer."""

    type = "refused"
    rcode = wire.REFUSED


@register
class Nodata(_Negative):
    """NOERROR with no answer records (NODATA), SOA in authority."""

    type = "nodata"
    rcode = wire.NOERROR

    def title(self) -> str:
        return "NODATA (empty NOERROR)"


@register
class Rcode(_Negative):
    """Any response code; above 15 the extended bits go in an OPT record."""

    type = "rcode"

    def __init__(self, spec: Any, store: StaleStore) -> None:
        super().__init__(spec, store)
        self.rcode = rcode_number(spec.rcode)  # type: ignore[misc]

    def title(self) -> str:
        return f"rcode {RCODE.get(self.rcode, self.rcode)}"


@register
class DropFault(Fault):
    """No reply: the client times out (TCP: hold the connection open, or close it)."""

    type = "drop"

    def __init__(self, spec: model.DropFault, store: StaleStore) -> None:
        self.verdict = Drop(close_tcp=spec.tcp == "close")

    def apply(self, q: QueryView, now: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        return self.verdict

    def describe(self) -> str:
        return "drop (TCP: " + ("close)" if self.verdict.close_tcp else "hold open)")


@register
class Delay(Fault):
    """Wait `delay` +/- jitter (never below 0), then forward or apply `then`."""

    type = "delay"

    def __init__(self, spec: model.DelayFault, store: StaleStore) -> None:
        self.delay = spec.delay
        self.jitter = spec.jitter
        self.normal = spec.distribution == "normal"
        self.then = build_fault(spec.then, store) if spec.then is not None else None

    def draw(self, rng: Random) -> float:
        if not self.jitter:
            return self.delay
        if self.normal:
            return max(0.0, rng.gauss(self.delay, self.jitter))
        return max(0.0, self.delay + rng.uniform(-self.jitter, self.jitter))

    def apply(self, q: QueryView, now: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        delay = self.draw(rng)
        verdict = self.then.apply(q, now, rng, phase) if self.then is not None else None
        if verdict is None:
            return Forward(delay=delay)
        return dataclasses.replace(verdict, delay=verdict.delay + delay)

    def children(self) -> tuple[Fault, ...]:
        return (self.then,) if self.then is not None else ()

    def describe(self) -> str:
        text = f"delay {self.delay * 1000:g}ms"
        if self.jitter:
            sign = "+/-" if not self.normal else "sd"
            text += f" {sign} {self.jitter * 1000:g}ms"
        return text + (f", then {self.then.describe()}" if self.then is not None else "")


@register
class Stale(Fault):
    """Answer with what the name resolved to before, TTLs set to `ttl`; else the fallback."""

    type = "stale"

    def __init__(self, spec: model.StaleFault, store: StaleStore) -> None:
        self.store = store
        self.snapshot = spec.source == "snapshot"
        self.ttl = spec.ttl
        self.fallback = build_fault(spec.fallback, store)

    def apply(self, q: QueryView, now: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        key = (q.qname, q.qtype)
        if self.snapshot:
            answer = phase.snapshot.get(key) if phase.snapshot is not None else None
        else:
            answer = self.store.get(key)
        if answer is None:
            return self.fallback.apply(q, now, rng, phase)
        return Reply(stale_reply(q, answer, self.ttl))

    def children(self) -> tuple[Fault, ...]:
        return (self.fallback,)

    def describe(self) -> str:
        source = "phase-start snapshot" if self.snapshot else "last answer"
        return f"stale ({source}, TTL {self.ttl}s), else {self.fallback.describe()}"


@register
class Spoof(Fault):
    """Answer with made-up records (default 192.0.2.1 / 2001:db8::1), CNAME chains followed."""

    type = "spoof"

    def __init__(self, spec: model.SpoofFault, store: StaleStore) -> None:
        self.ttl = spec.ttl
        a, aaaa = spec.a, spec.aaaa
        if not (a or aaaa or spec.cname or spec.records):
            a, aaaa = [SPOOF_A], [SPOOF_AAAA]
        here = DNSLabel(_ORIGIN)
        templates = []
        owner = here
        if spec.cname:
            target = DNSLabel(spec.cname if spec.cname.endswith(".") else spec.cname + ".")
            templates.append(RR(here, QTYPE.CNAME, ttl=spec.ttl, rdata=CNAME(target)))
            owner = target
        templates += [RR(owner, QTYPE.A, ttl=spec.ttl, rdata=A(ip)) for ip in a]
        templates += [RR(owner, QTYPE.AAAA, ttl=spec.ttl, rdata=AAAA(ip)) for ip in aaaa]
        templates += parse_records(spec.records, spec.ttl)
        self.templates = [(_relative(rr.rname), rr) for rr in templates]
        self.soa = SoaRecord(model.Soa(negative_ttl=spec.ttl))
        self._text = _spoof_text(spec, a, aaaa)

    def apply(self, q: QueryView, now: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        answers = self.answers(question_labels(q), q.qtype)
        if not answers:
            return Reply(empty_reply(q, wire.NOERROR, self.soa))
        return Reply(records_reply(q, answers))

    def answers(self, qlabels: list[bytes], qtype: int) -> list[RR]:
        """The records for the query, following CNAMEs among the spoofed records."""
        records = []
        for relative, rr in self.templates:
            labels = [*relative, *qlabels] if relative is not None else list(rr.rname.label)
            records.append((_key(labels), labels, rr))
        answers: list[RR] = []
        target = _key(qlabels)
        for _ in range(8):  # a CNAME loop among made-up records must end
            here = [(labels, rr) for key, labels, rr in records if key == target]
            found = [x for x in here if qtype in (TYPE_ANY, x[1].rtype)]
            cname = next((x for x in here if x[1].rtype == TYPE_CNAME), None)
            if found or cname is None:
                answers += [_owned(labels, rr) for labels, rr in found]
                break
            answers.append(_owned(*cname))
            target = _key(_resolve(cname[1].rdata.label, qlabels))
        return answers

    def describe(self) -> str:
        return self._text


_ORIGIN = "dnschaos-query-name.invalid."
_ORIGIN_LABELS = tuple(DNSLabel(_ORIGIN).label)


def _relative(name: DNSLabel) -> tuple[bytes, ...] | None:
    """The labels before the query name when `name` was written relative to it, else None."""
    labels = tuple(name.label)
    if labels[-len(_ORIGIN_LABELS) :] == _ORIGIN_LABELS:
        return labels[: -len(_ORIGIN_LABELS)]
    return None


def _resolve(name: DNSLabel, qlabels: list[bytes]) -> list[bytes]:
    relative = _relative(name)
    return [*relative, *qlabels] if relative is not None else list(name.label)


def _key(labels: list[bytes]) -> tuple[bytes, ...]:
    return tuple(label.lower() for label in labels)


def _owned(labels: list[bytes], rr: RR) -> RR:
    return RR(DNSLabel(labels), rr.rtype, rr.rclass, rr.ttl, rr.rdata)


def parse_records(lines: list[str], ttl: int) -> list[RR]:
    """Zone-file lines to records; '@', an empty owner or a line starting with
    the type ('A 10.0.0.1') stand for the query name.  ValueError on bad lines."""
    records: list[RR] = []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        first = text.split()[0]
        if line[:1].isspace() or first.isdigit() or first in ("IN", "CH", "HS") or (
            first.isupper() and hasattr(QTYPE, first)
        ):
            text = "@ " + text
        try:
            parsed = RR.fromZone(text, origin=_ORIGIN, ttl=ttl)
        except Exception as exc:  # noqa: BLE001 - dnslib raises several kinds
            raise ValueError(f"invalid record {line!r}: {exc}") from None
        if not parsed:
            raise ValueError(f"invalid record {line!r}")
        if any(_ORIGIN in str(rr.rdata) for rr in parsed):
            # Only owners may be relative to the query name; a relative name in
            # the data would go out as the internal placeholder.
            raise ValueError(f"invalid record {line!r}: names in record data must be "
                             "absolute (end with a dot)")
        records += parsed
    return records


def _spoof_text(spec: model.SpoofFault, a: list[str], aaaa: list[str]) -> str:
    parts = [f"CNAME {spec.cname}"] if spec.cname else []
    parts += [f"A {', '.join(a)}"] if a else []
    parts += [f"AAAA {', '.join(aaaa)}"] if aaaa else []
    parts += [f"{len(spec.records)} zone record(s)"] if spec.records else []
    return f"spoof {'; '.join(parts)} (TTL {spec.ttl}s)"


@register
class Truncate(Fault):
    """UDP: an empty reply with TC=1, so the client retries over TCP; TCP passes."""

    type = "truncate"

    def __init__(self, spec: model.TruncateFault, store: StaleStore) -> None:
        pass

    def apply(self, q: QueryView, now: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        if q.transport == "tcp":
            return None
        return Reply(empty_reply(q, wire.NOERROR, tc=True))

    def describe(self) -> str:
        return "truncate (TC=1 over UDP)"


class _ResponseFault(Fault):
    """A fault that changes the upstream's answer."""

    def __init__(self) -> None:
        self.verdict = Forward(respond=self)

    def apply(self, q: QueryView, now: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        return self.verdict


@register
class Ttl(_ResponseFault):
    """Rewrite the TTLs of the upstream's answer: set, clamp to min/max, or scale."""

    type = "ttl"

    def __init__(self, spec: model.TtlFault, store: StaleStore) -> None:
        super().__init__()
        self.spec = spec
        if spec.set is not None:
            value = spec.set
            self.change: Callable[[int], int] = lambda ttl: value
        elif spec.scale is not None:
            scale = spec.scale
            self.change = lambda ttl: round(ttl * scale)
        else:
            low, high = spec.min or 0, spec.max if spec.max is not None else MAX_TTL
            self.change = lambda ttl: min(high, max(low, ttl))

    def respond(self, q: QueryView, answer: bytes, now: float, rng: Random,
                phase: PhaseState) -> bytes | None:
        return rewrite_ttls(answer, self.change)

    def describe(self) -> str:
        spec = self.spec
        if spec.set is not None:
            return f"TTL set to {spec.set}s"
        if spec.scale is not None:
            return f"TTL x {spec.scale:g}"
        return f"TTL clamped to [{spec.min or 0}, {spec.max if spec.max is not None else 'inf'}]s"


@register
class Partial(_ResponseFault):
    """Remove a share of the answer's A/AAAA records (at least one kept), re-rolled each period."""

    type = "partial"

    def __init__(self, spec: model.PartialFault, store: StaleStore) -> None:
        super().__init__()
        self.share = spec.share
        self.empty = spec.empty
        self.period = spec.period
        self.ttl = spec.ttl

    def respond(self, q: QueryView, answer: bytes, now: float, rng: Random,
                phase: PhaseState) -> bytes | None:
        # The choice depends only on (name, period index, address), so it is
        # the same for every client within a period, whatever the record order.
        period = int((now - phase.start) // self.period)
        message = DNSRecord.parse(answer)
        addresses = [rr for rr in message.rr if rr.rtype in (TYPE_A, TYPE_AAAA)]
        if not addresses:
            return answer
        if hash_share(period, f"{q.qname}/empty") < self.empty:
            removed = addresses
        else:
            count = min(len(addresses) - 1, int(self.share * len(addresses) + 0.5))
            ranked = sorted(addresses, key=lambda rr: hash_share(period, f"{q.qname}/{rr.rdata}"))
            removed = ranked[:count]
        if not removed and self.ttl is None:
            return answer
        gone = {id(rr) for rr in removed}
        message.rr = [rr for rr in message.rr if id(rr) not in gone]
        message.header.a = len(message.rr)
        if self.ttl is not None:
            for rr in message.rr:
                rr.ttl = self.ttl
        return bytes(message.pack())

    def describe(self) -> str:
        text = f"partial: remove {self.share:.0%} of addresses"
        if self.empty:
            text += f", empty {self.empty:.0%} of the time"
        text += f", every {self.period:g}s"
        return text + (f", TTL {self.ttl}s" if self.ttl is not None else "")


@register
class Corrupt(Fault):
    """A malformed reply: wrong ID, wrong question, the real answer cut short, or random bytes."""

    type = "corrupt"

    def __init__(self, spec: model.CorruptFault, store: StaleStore) -> None:
        self.mode = spec.mode
        # Three modes damage the upstream's real answer; `random` needs nothing from it.
        self.verdict = Forward(respond=self) if self.mode != "random" else None

    def apply(self, q: QueryView, now: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        if self.verdict is not None:
            return self.verdict
        # The client's ID, so the client parses the garbage instead of ignoring it.
        size = rng.randint(wire.HEADER_LEN, 512)
        return Reply(q.wire[:2] + rng.randbytes(size - 2))

    def respond(self, q: QueryView, answer: bytes, now: float, rng: Random,
                phase: PhaseState) -> bytes | None:
        if self.mode == "wrong_id":
            txid = (int.from_bytes(answer[:2], "big") + rng.randrange(1, 65536)) % 65536
            return txid.to_bytes(2, "big") + answer[2:]
        if self.mode == "short":
            if len(answer) <= wire.HEADER_LEN:
                return answer[:-1]
            return answer[: rng.randrange(wire.HEADER_LEN, len(answer))]
        return wrong_question(answer)

    def describe(self) -> str:
        return {
            "wrong_id": "corrupt: the answer with a wrong ID",
            "wrong_question": "corrupt: the answer for another name",
            "short": "corrupt: the answer cut short",
            "random": "corrupt: random bytes",
        }[self.mode]


def wrong_question(answer: bytes) -> bytes:
    """The answer with the question's first label replaced by one of the same
    length (so compression pointers stay valid); for the root, another qtype."""
    out = bytearray(answer)
    first = answer[wire.HEADER_LEN]
    if first == 0:
        qtype = struct.unpack_from("!H", answer, wire.HEADER_LEN + 1)[0]
        struct.pack_into("!H", out, wire.HEADER_LEN + 1, qtype ^ 1)
        return bytes(out)
    start = wire.HEADER_LEN + 1
    label = answer[start : start + first].lower()
    filler = b"x" if label != b"x" * first else b"y"
    out[start : start + first] = filler * first
    return bytes(out)


@register
class Flap(Fault):
    """`fault` on for `duty` of each `period` (counted from the phase start), off otherwise."""

    type = "flap"

    def __init__(self, spec: model.FlapFault, store: StaleStore) -> None:
        self.period = spec.period
        self.on_for = spec.duty * spec.period
        self.duty = spec.duty
        self.fault = build_fault(spec.fault, store)

    def is_on(self, now: float, phase: PhaseState) -> bool:
        return (now - phase.start) % self.period < self.on_for

    def apply(self, q: QueryView, now: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        if not self.is_on(now, phase):
            return None
        return self.fault.apply(q, now, rng, phase)

    def children(self) -> tuple[Fault, ...]:
        return (self.fault,)

    def describe(self) -> str:
        return f"flap {self.duty:.0%} of every {self.period:g}s: {self.fault.describe()}"


def describe_type(name: str) -> str:
    """The one-line documentation of a fault type."""
    return (FAULTS[name].__doc__ or "").strip()

