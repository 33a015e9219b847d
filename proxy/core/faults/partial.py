"""partial: remove a share of the address records from the real answer."""

from __future__ import annotations

from random import Random
from typing import Annotated, Literal

from dnslib import DNSRecord
from pydantic import Field

from proxy.core.faults.base import PhaseState, ResponseFault
from proxy.core.faults.registry import register
from proxy.core.query import QueryView
from proxy.core.sampling import hash_share
from proxy.core.spec import Base, Duration, Probability, Ttl
from proxy.core.stale import StaleStore

TYPE_A, TYPE_AAAA = 1, 28


class PartialFault(Base):
    """Remove a share of the address records from the real answer (load
    balancer nodes vanishing), re-rolled every `period`."""

    type: Literal["partial"]
    share: Probability = 0.3
    """Share of A/AAAA records removed (at least one is kept unless `empty` fires)."""
    empty: Probability = 0.0
    """Chance, per period, that the answer is empty altogether."""
    period: Annotated[Duration, Field(gt=0)] = 30.0
    ttl: Ttl | None = None
    """When set, the TTL of the records kept."""


@register(PartialFault)
class Partial(ResponseFault):
    """Remove a share of the answer's A/AAAA records (at least one kept), re-rolled each period."""

    def __init__(self, spec: PartialFault, store: StaleStore) -> None:
        super().__init__(spec, store)
        self.share = spec.share
        self.empty = spec.empty
        self.period = spec.period
        self.ttl = spec.ttl

    def respond(self, q: QueryView, answer: bytes, run_time: float, rng: Random,
                phase: PhaseState) -> bytes | None:
        # The choice depends only on (name, period index, address), so it is
        # the same for every client within a period, whatever the record order.
        period = int((run_time - phase.start_run_time) // self.period)
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
