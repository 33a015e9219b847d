"""drop: no reply at all, so the client times out."""

from __future__ import annotations

from random import Random
from typing import Literal

from proxy.core import verdict
from proxy.core.faults.base import Fault, PhaseState
from proxy.core.faults.registry import register
from proxy.core.query import QueryView
from proxy.core.spec import Base
from proxy.core.stale import StaleStore


class DropFault(Base):
    """No reply at all: the client times out."""

    type: Literal["drop"]
    tcp: Literal["hold", "close"] = "hold"
    """For TCP clients: keep the connection open and silent, or close it."""


@register(DropFault)
class Drop(Fault):
    """No reply: the client times out (TCP: hold the connection open, or close it)."""

    def __init__(self, spec: DropFault, store: StaleStore) -> None:
        self.verdict = verdict.Drop(close_tcp=spec.tcp == "close")

    def apply(self, q: QueryView, run_time: float, rng: Random,
              phase: PhaseState) -> verdict.Verdict | None:
        return self.verdict

    def describe(self) -> str:
        return "drop (TCP: " + ("close)" if self.verdict.close_tcp else "hold open)")
