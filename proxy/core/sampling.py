"""Stable pseudo-random shares, for choices that must not depend on a
random generator's state: the same (seed, key) always gives the same
number, in every process and every run.  `match: hash` selects clients or
names with it, and `partial` picks the records to remove per period."""

from __future__ import annotations

import hashlib


def hash_share(seed: int, key: str) -> float:
    """A stable number in [0, 1) for (seed, key), independent of any rng."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64
