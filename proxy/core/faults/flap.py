"""flap: another fault switched on and off by a duty cycle."""

from __future__ import annotations

from random import Random
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from proxy.core.faults.base import Fault, PhaseState
from proxy.core.faults.registry import build_fault, register
from proxy.core.query import QueryView
from proxy.core.spec import Base, Duration, Probability
from proxy.core.stale import StaleStore
from proxy.core.verdict import Verdict

if TYPE_CHECKING:  # at run time resolved by registry.resolve_nested
    from proxy.core.faults.registry import FaultSpec


class FlapFault(Base):
    """`fault` switched on and off: on for `duty` of each `period`."""

    type: Literal["flap"]
    period: Annotated[Duration, Field(gt=0)]
    duty: Probability = 0.5
    fault: FaultSpec


@register(FlapFault)
class Flap(Fault):
    """`fault` on for `duty` of each `period` (counted from the phase start), off otherwise."""

    def __init__(self, spec: FlapFault, store: StaleStore) -> None:
        self.period = spec.period
        self.on_for = spec.duty * spec.period
        self.duty = spec.duty
        self.fault = build_fault(spec.fault, store)

    def is_on(self, run_time: float, phase: PhaseState) -> bool:
        return (run_time - phase.start_run_time) % self.period < self.on_for

    def apply(self, q: QueryView, run_time: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        if not self.is_on(run_time, phase):
            return None
        return self.fault.apply(q, run_time, rng, phase)

    def children(self) -> tuple[Fault, ...]:
        return (self.fault,)

    def describe(self) -> str:
        return f"flap {self.duty:.0%} of every {self.period:g}s: {self.fault.describe()}"
