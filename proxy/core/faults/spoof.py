"""spoof: answer with made-up records, CNAME chains among them followed."""

from __future__ import annotations

import ipaddress
from random import Random
from typing import Annotated, Literal

from dnslib import AAAA, CNAME, QTYPE, RR, A, DNSLabel
from pydantic import Field, ValidationInfo, field_validator

from proxy.core import wire
from proxy.core.faults.base import Fault, PhaseState
from proxy.core.faults.registry import register
from proxy.core.query import QueryView
from proxy.core.records import ORIGIN, parse_records, relative, resolve
from proxy.core.replies import SoaRecord, empty_reply, question_labels, records_reply
from proxy.core.spec import Base, OneOrMany, Soa, Ttl
from proxy.core.stale import StaleStore
from proxy.core.verdict import Reply, Verdict

TYPE_CNAME, TYPE_ANY = 5, 255
SPOOF_A = "192.0.2.1"  # RFC 5737 documentation range
SPOOF_AAAA = "2001:db8::1"  # RFC 3849 documentation range


class SpoofFault(Base):
    """Answer with made-up records.  Without any record given, A queries get
    192.0.2.1 and AAAA queries 2001:db8::1 (documentation ranges)."""

    type: Literal["spoof"]
    a: Annotated[list[str], OneOrMany] = Field(default_factory=list)
    aaaa: Annotated[list[str], OneOrMany] = Field(default_factory=list)
    cname: str | None = None
    records: Annotated[list[str], OneOrMany] = Field(default_factory=list)
    """Zone-file lines; '@' or an empty owner stands for the query name, and
    relative owner names are relative to it.  Names inside record data should
    be absolute (end with a dot).  A TTL written in a line is kept."""
    ttl: Ttl = 60

    @field_validator("records")
    @classmethod
    def _zone_lines(cls, values: list[str]) -> list[str]:
        parse_records(values, 60)  # raises ValueError naming the bad line
        return values

    @field_validator("a", "aaaa")
    @classmethod
    def _addresses(cls, values: list[str], info: ValidationInfo) -> list[str]:
        kind = ipaddress.IPv4Address if info.field_name == "a" else ipaddress.IPv6Address
        for value in values:
            kind(value)
        return values


@register(SpoofFault)
class Spoof(Fault):
    """Answer with made-up records (default 192.0.2.1 / 2001:db8::1), CNAME chains followed."""

    def __init__(self, spec: SpoofFault, store: StaleStore) -> None:
        self.ttl = spec.ttl
        a, aaaa = spec.a, spec.aaaa
        if not (a or aaaa or spec.cname or spec.records):
            a, aaaa = [SPOOF_A], [SPOOF_AAAA]
        here = DNSLabel(ORIGIN)
        templates = []
        owner = here
        if spec.cname:
            target = DNSLabel(spec.cname if spec.cname.endswith(".") else spec.cname + ".")
            templates.append(RR(here, QTYPE.CNAME, ttl=spec.ttl, rdata=CNAME(target)))
            owner = target
        templates += [RR(owner, QTYPE.A, ttl=spec.ttl, rdata=A(ip)) for ip in a]
        templates += [RR(owner, QTYPE.AAAA, ttl=spec.ttl, rdata=AAAA(ip)) for ip in aaaa]
        templates += parse_records(spec.records, spec.ttl)
        self.templates = [(relative(rr.rname), rr) for rr in templates]
        self.soa = SoaRecord(Soa(negative_ttl=spec.ttl))
        self._text = _spoof_text(spec, a, aaaa)

    def apply(self, q: QueryView, run_time: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        answers = self.answers(question_labels(q), q.qtype)
        if not answers:
            return Reply(empty_reply(q, wire.NOERROR, self.soa))
        return Reply(records_reply(q, answers))

    def answers(self, qlabels: list[bytes], qtype: int) -> list[RR]:
        """The records for the query, following CNAMEs among the spoofed records."""
        records = []
        for before, rr in self.templates:
            labels = [*before, *qlabels] if before is not None else list(rr.rname.label)
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
            target = _key(resolve(cname[1].rdata.label, qlabels))
        return answers

    def describe(self) -> str:
        return self._text


def _key(labels: list[bytes]) -> tuple[bytes, ...]:
    return tuple(label.lower() for label in labels)


def _owned(labels: list[bytes], rr: RR) -> RR:
    return RR(DNSLabel(labels), rr.rtype, rr.rclass, rr.ttl, rr.rdata)


def _spoof_text(spec: SpoofFault, a: list[str], aaaa: list[str]) -> str:
    parts = [f"CNAME {spec.cname}"] if spec.cname else []
    parts += [f"A {', '.join(a)}"] if a else []
    parts += [f"AAAA {', '.join(aaaa)}"] if aaaa else []
    parts += [f"{len(spec.records)} zone record(s)"] if spec.records else []
    return f"spoof {'; '.join(parts)} (TTL {spec.ttl}s)"
