"""stale: answer with what the name resolved to before (the engine records
the answers: see proxy/core/stale.py)."""

from __future__ import annotations

from random import Random
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from proxy.core.faults.base import Fault, PhaseState
from proxy.core.faults.negative import ServfailFault
from proxy.core.faults.registry import build_fault, register
from proxy.core.query import QueryView
from proxy.core.replies import stale_reply
from proxy.core.spec import Base, Ttl
from proxy.core.stale import StaleStore
from proxy.core.verdict import Reply, Verdict

if TYPE_CHECKING:  # at run time resolved by registry.resolve_nested
    from proxy.core.faults.registry import FaultSpec


class StaleFault(Base):
    """Answer with what the name resolved to before."""

    type: Literal["stale"]
    source: Literal["last", "snapshot"] = "last"
    """'last': the last answer seen before the rule became active.
    'snapshot': the answers held when the phase started (a frozen old plan)."""
    ttl: Ttl = 30
    fallback: FaultSpec = Field(default_factory=lambda: ServfailFault(type="servfail"))
    """Applied when no earlier answer was ever seen for the name."""


@register(StaleFault)
class Stale(Fault):
    """Answer with what the name resolved to before, TTLs set to `ttl`; else the fallback."""

    def __init__(self, spec: StaleFault, store: StaleStore) -> None:
        self.store = store
        self.snapshot = spec.source == "snapshot"
        self.ttl = spec.ttl
        self.fallback = build_fault(spec.fallback, store)

    def apply(self, q: QueryView, run_time: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        key = (q.qname, q.qtype)
        if self.snapshot:
            answer = phase.snapshot.get(key) if phase.snapshot is not None else None
        else:
            answer = self.store.get(key)
        if answer is None:
            return self.fallback.apply(q, run_time, rng, phase)
        return Reply(stale_reply(q, answer, self.ttl))

    def children(self) -> tuple[Fault, ...]:
        return (self.fallback,)

    def describe(self) -> str:
        source = "phase-start snapshot" if self.snapshot else "last answer"
        return f"stale ({source}, TTL {self.ttl}s), else {self.fallback.describe()}"
