"""truncate: TC=1 over UDP, so the client retries over TCP."""

from __future__ import annotations

from random import Random
from typing import Literal

from proxy.core import wire
from proxy.core.faults.base import Fault, PhaseState
from proxy.core.faults.registry import register
from proxy.core.query import QueryView
from proxy.core.replies import empty_reply
from proxy.core.spec import Base
from proxy.core.verdict import Reply, Verdict


class TruncateFault(Base):
    """TC=1 over UDP with no records, so the client retries over TCP.  TCP
    queries are forwarded normally."""

    type: Literal["truncate"]


@register(TruncateFault)
class Truncate(Fault):
    """UDP: an empty reply with TC=1, so the client retries over TCP; TCP passes."""

    def apply(self, q: QueryView, run_time: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        if q.transport == "tcp":
            return None
        return Reply(empty_reply(q, wire.NOERROR, tc=True))

    def describe(self) -> str:
        return "truncate (TC=1 over UDP)"
