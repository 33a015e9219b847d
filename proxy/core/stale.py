"""A bounded store of past answers, for the `stale` fault.

How it works: the engine records the upstream's answers (raw bytes) for the
names that some loaded `stale` rule selects, keyed by (qname, qtype).  The
store is an LRU: reading or writing an entry makes it the most recent, and
past `capacity` entries the least recently used one goes.

`source: last` reads the store itself; the engine stops recording a name
while a `last` rule that selects it is active, so the rule keeps serving the
answer from before the incident.  `source: snapshot` reads `snapshot()`, a
copy taken when the phase started.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from proxy.core import wire

Key = tuple[str, int]
"""(qname in lower case without trailing dot, numeric qtype)."""


def worth_recording(answer: bytes) -> bool:
    """A NOERROR response with one question, at least one answer record and no TC."""
    if len(answer) < wire.HEADER_LEN or not answer[2] & wire.QR or answer[2] & wire.TC:
        return False
    qdcount, ancount = struct.unpack_from("!HH", answer, 4)
    return wire.rcode_of(answer) == wire.NOERROR and qdcount == 1 and ancount > 0


class StaleStore:
    """Past answers, at most `capacity` of them, least recently used dropped first."""

    __slots__ = ("_answers", "capacity")

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"stale store capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._answers: OrderedDict[Key, bytes] = OrderedDict()

    def record(self, key: Key, answer: bytes) -> bool:
        """Keep `answer` if it is worth serving later; True when it was kept."""
        if not worth_recording(answer):
            return False
        self._answers[key] = answer
        self._answers.move_to_end(key)
        if len(self._answers) > self.capacity:
            self._answers.popitem(last=False)
        return True

    def get(self, key: Key) -> bytes | None:
        answer = self._answers.get(key)
        if answer is not None:
            self._answers.move_to_end(key)
        return answer

    def snapshot(self) -> dict[Key, bytes]:
        """A frozen copy, for `source: snapshot`."""
        return dict(self._answers)

    def clear(self) -> None:
        self._answers.clear()

    def __len__(self) -> int:
        return len(self._answers)

    def __contains__(self, key: object) -> bool:
        return key in self._answers
