"""delay: wait, then forward the query (or apply `then`)."""

from __future__ import annotations

import dataclasses
from random import Random
from typing import TYPE_CHECKING, Literal

from proxy.core.faults.base import Fault, PhaseState
from proxy.core.faults.registry import build_fault, register
from proxy.core.query import QueryView
from proxy.core.spec import Base, Duration
from proxy.core.stale import StaleStore
from proxy.core.verdict import Forward, Verdict

if TYPE_CHECKING:  # at run time resolved by registry.resolve_nested
    from proxy.core.faults.registry import OptionalFaultSpec


class DelayFault(Base):
    """Wait, then forward (or apply `then`).  Other queries are not held up."""

    type: Literal["delay"]
    delay: Duration
    jitter: Duration = 0.0
    """Uniform: +/- jitter around delay.  Normal: standard deviation."""
    distribution: Literal["uniform", "normal"] = "uniform"
    then: OptionalFaultSpec = None
    """A fault applied after the delay (a slow SERVFAIL); default: forward."""


@register(DelayFault)
class Delay(Fault):
    """Wait `delay` +/- jitter (never below 0), then forward or apply `then`."""

    def __init__(self, spec: DelayFault, store: StaleStore) -> None:
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

    def apply(self, q: QueryView, run_time: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        delay = self.draw(rng)
        verdict = self.then.apply(q, run_time, rng, phase) if self.then is not None else None
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
