"""What every fault is: a compiled behaviour with `apply` (and, for faults
on the upstream's answer, `respond`), and the phase state it may read."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from random import Random
from typing import Any, ClassVar

from proxy.core.query import QueryView
from proxy.core.stale import Key, StaleStore
from proxy.core.verdict import Forward, Verdict


@dataclass
class PhaseState:
    """What faults need to know about the phase they run in."""

    start_run_time: float = 0.0
    """Run time (seconds) at which the phase began: flap and partial periods count from here."""
    snapshot: dict[Key, bytes] | None = None
    """The stale store as it was when the phase began (for `stale` with `source: snapshot`)."""


class Fault:
    """Base class: a compiled fault.  `type` is set by `register`."""

    type: ClassVar[str] = ""

    def __init__(self, spec: Any, store: StaleStore) -> None:
        """Compile `spec` (the fault's model) once, when a scenario loads."""

    def apply(self, q: QueryView, run_time: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        """The verdict for a query the rule selected; None: pass it untouched."""
        raise NotImplementedError

    def respond(self, q: QueryView, answer: bytes, run_time: float, rng: Random,
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


class ResponseFault(Fault):
    """A fault that changes the upstream's answer: `apply` forwards the query
    and asks for the answer back; `respond` rewrites it."""

    def __init__(self, spec: Any, store: StaleStore) -> None:
        self.verdict = Forward(respond=self)

    def apply(self, q: QueryView, run_time: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        return self.verdict
