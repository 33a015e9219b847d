"""corrupt: a malformed reply, for testing clients' parsers."""

from __future__ import annotations

import struct
from random import Random
from typing import Literal

from proxy.core import wire
from proxy.core.faults.base import Fault, PhaseState
from proxy.core.faults.registry import register
from proxy.core.query import QueryView
from proxy.core.spec import Base
from proxy.core.stale import StaleStore
from proxy.core.verdict import Forward, Reply, Verdict


class CorruptFault(Base):
    """A malformed reply, for testing clients' parsers."""

    type: Literal["corrupt"]
    mode: Literal["wrong_id", "wrong_question", "short", "random"] = "random"


@register(CorruptFault)
class Corrupt(Fault):
    """A malformed reply: wrong ID, wrong question, the real answer cut short, or random bytes."""

    def __init__(self, spec: CorruptFault, store: StaleStore) -> None:
        self.mode = spec.mode
        # Three modes damage the upstream's real answer; `random` needs nothing from it.
        self.verdict = Forward(respond=self) if self.mode != "random" else None

    def apply(self, q: QueryView, run_time: float, rng: Random,
              phase: PhaseState) -> Verdict | None:
        if self.verdict is not None:
            return self.verdict
        # The client's ID, so the client parses the garbage instead of ignoring it.
        size = rng.randint(wire.HEADER_LEN, 512)
        return Reply(q.wire[:2] + rng.randbytes(size - 2))

    def respond(self, q: QueryView, answer: bytes, run_time: float, rng: Random,
                phase: PhaseState) -> bytes | None:
        if self.mode == "wrong_id":
            txid = (int.from_bytes(answer[:2], "big") + rng.randrange(1, 65536)) % 65536
            return txid.to_bytes(2, "big") + answer[2:]
        if self.mode == "short":
            if len(answer) <= wire.HEADER_LEN:
                return answer[:-1]
            return answer[: rng.randrange(wire.HEADER_LEN, len(answer))]
        return wrong_question(answer)

    def describe(self) -> str:
        return {
            "wrong_id": "corrupt: the answer with a wrong ID",
            "wrong_question": "corrupt: the answer for another name",
            "short": "corrupt: the answer cut short",
            "random": "corrupt: random bytes",
        }[self.mode]


def wrong_question(answer: bytes) -> bytes:
    """The answer with the question's first label replaced by one of the same
    length (so compression pointers stay valid); for the root, another qtype."""
    out = bytearray(answer)
    first = answer[wire.HEADER_LEN]
    if first == 0:
        qtype = struct.unpack_from("!H", answer, wire.HEADER_LEN + 1)[0]
        struct.pack_into("!H", out, wire.HEADER_LEN + 1, qtype ^ 1)
        return bytes(out)
    start = wire.HEADER_LEN + 1
    label = answer[start : start + first].lower()
    filler = b"x" if label != b"x" * first else b"y"
    out[start : start + first] = filler * first
    return bytes(out)
