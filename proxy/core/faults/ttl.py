"""ttl: rewrite the TTLs in the upstream's answer."""

from __future__ import annotations

from collections.abc import Callable
from random import Random
from typing import Annotated, Literal

from pydantic import Field, model_validator

from proxy.core.faults.base import PhaseState, ResponseFault
from proxy.core.faults.registry import register
from proxy.core.query import QueryView
from proxy.core.replies import MAX_TTL, rewrite_ttls
from proxy.core.spec import Base, Ttl
from proxy.core.stale import StaleStore


class TtlFault(Base):
    """Rewrite the TTLs in the upstream's answer: `set`, or clamp to
    `min`/`max`, or `scale` by a factor."""

    type: Literal["ttl"]
    set: Ttl | None = None
    min: Ttl | None = None
    max: Ttl | None = None
    scale: Annotated[float, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _one_mode(self) -> TtlFault:
        modes = [self.set is not None, self.min is not None or self.max is not None,
                 self.scale is not None]
        if sum(modes) != 1:
            raise ValueError("give exactly one of: set, min/max, scale")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


@register(TtlFault)
class TtlRewrite(ResponseFault):
    """Rewrite the TTLs of the upstream's answer: set, clamp to min/max, or scale."""

    def __init__(self, spec: TtlFault, store: StaleStore) -> None:
        super().__init__(spec, store)
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

    def respond(self, q: QueryView, answer: bytes, run_time: float, rng: Random,
                phase: PhaseState) -> bytes | None:
        return rewrite_ttls(answer, self.change)

    def describe(self) -> str:
        spec = self.spec
        if spec.set is not None:
            return f"TTL set to {spec.set}s"
        if spec.scale is not None:
            return f"TTL x {spec.scale:g}"
        return f"TTL clamped to [{spec.min or 0}, {spec.max if spec.max is not None else 'inf'}]s"
