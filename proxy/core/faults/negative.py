"""Negative answers: nxdomain, servfail, refused, rcode, nodata.

One family: a reply without answer records, its rcode, maybe an SOA in the
authority section (for negative caching, RFC 2308) and maybe an Extended
DNS Error (RFC 8914).  Only the rcode and the SOA default differ.
"""

from __future__ import annotations

from random import Random
from typing import Any, ClassVar, Literal

from dnslib import RCODE
from pydantic import Field, field_validator

from proxy.core import wire
from proxy.core.codes import rcode_number
from proxy.core.faults.base import Fault, PhaseState
from proxy.core.faults.registry import register
from proxy.core.query import QueryView
from proxy.core.replies import SoaRecord, ede_option, empty_reply
from proxy.core.spec import Base, Ede, Soa
from proxy.core.stale import StaleStore
from proxy.core.verdict import Reply, Verdict

# --- the scenario keys --------------------------------------------------------------


class _NegativeSpec(Base):
    soa: Soa | None = Field(default_factory=Soa)
    """Set to null for a reply without SOA."""
    ede: Ede | None = None


class NxdomainFault(_NegativeSpec):
    """The name does not exist."""

    type: Literal["nxdomain"]


class ServfailFault(_NegativeSpec):
    """The server failed (what resolvers answer when authoritative servers are unreachable)."""

    type: Literal["servfail"]
    soa: Soa | None = None
    """Real SERVFAILs carry no SOA; give one (`soa: {}`) to add it anyway."""


class RefusedFault(_NegativeSpec):
    """The server refuses to answer."""

    type: Literal["refused"]
    soa: Soa | None = None
    """Real REFUSED replies carry no SOA; give one (`soa: {}`) to add it anyway."""


class RcodeFault(_NegativeSpec):
    """Any response code, by name (FORMERR, NOTIMP, YXDOMAIN...) or number."""

    type: Literal["rcode"]
    rcode: str | int
    """Above 15 (BADVERS...) the upper bits travel in an OPT record, added even
    when the query had no EDNS."""
    soa: Soa | None = None
    """No SOA unless given (`soa: {}` for the defaults)."""

    @field_validator("rcode")
    @classmethod
    def _known_rcode(cls, value: str | int) -> str | int:
        rcode_number(value)  # ValueError naming the unknown rcode
        return value


class NodataFault(_NegativeSpec):
    """NOERROR with an empty answer: the name exists but has no such record."""

    type: Literal["nodata"]


# --- the behaviours -----------------------------------------------------------------


class _Negative(Fault):
    rcode: ClassVar[int] = 0
    """The family member's rcode (`code` may differ: rcode's is configured)."""

    def __init__(self, spec: Any, store: StaleStore) -> None:
        self.code = self.rcode
        self.soa = SoaRecord(spec.soa) if spec.soa is not None else None
        self.ede: Ede | None = spec.ede
        self._options = ede_option(spec.ede)

    def apply(self, q: QueryView, run_time: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        return Reply(empty_reply(q, self.code, self.soa, self._options))

    def title(self) -> str:
        return self.type.upper()

    def describe(self) -> str:
        text = self.title()
        if self.soa is not None:
            text += f" (negative TTL {self.soa.negative_ttl}s)"
        if self.ede is not None:
            text += f" with EDE {self.ede.code}" + (f" {self.ede.text!r}" if self.ede.text else "")
        return text


@register(NxdomainFault)
class Nxdomain(_Negative):
    """NXDOMAIN: the name does not exist; SOA in authority for negative caching."""

    rcode = wire.NXDOMAIN


@register(ServfailFault)
class Servfail(_Negative):
    """SERVFAIL, as resolvers answer when the authoritative servers fail."""

    rcode = wire.SERVFAIL


@register(RefusedFault)
class Refused(_Negative):
    """REFUSED: the server will not answer."""

    rcode = wire.REFUSED


@register(RcodeFault)
class Rcode(_Negative):
    """Any response code; above 15 the extended bits go in an OPT record."""

    def __init__(self, spec: RcodeFault, store: StaleStore) -> None:
        super().__init__(spec, store)
        self.code = rcode_number(spec.rcode)

    def title(self) -> str:
        return f"rcode {RCODE.get(self.code, self.code)}"


@register(NodataFault)
class Nodata(_Negative):
    """NOERROR with no answer records (NODATA), SOA in authority."""

    rcode = wire.NOERROR

    def title(self) -> str:
        return "NODATA (empty NOERROR)"
