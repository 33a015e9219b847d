"""The C relay's question check (proxy/_relay.c) against wire.question_end:
the same verdict for any bytes, so the fast path takes exactly the queries
the Python path would forward, and hands everything else to it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core import wire
from proxy.errors import MalformedQuery

_relay = pytest.importorskip(
    "proxy._relay", reason="the C relay is not built (python setup.py build_ext --inplace)")

CODES = {None: -1, wire.FORMERR: -2, wire.NOTIMP: -3}


def python_verdict(data: bytes) -> int:
    try:
        return wire.question_end(data)
    except MalformedQuery as exc:
        return CODES[exc.rcode]


def query(labels: list[bytes], flags: int = 0x0100, qdcount: int = 1, tail: bytes = b"") -> bytes:
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    return (struct.pack("!HHHHHH", 0x1234, flags, qdcount, 0, 0, 0) + name
            + struct.pack("!HH", 1, 1) + tail)


def test_known_cases():
    good = query([b"www", b"example", b"test"])
    assert _relay.question_end(good) == wire.question_end(good) == len(good)
    cases = [
        b"", b"\x12\x34", good[:12], good[:-1], good[:-4],
        query([b"www"], flags=0x8100),             # a response: dropped
        query([b"www"], flags=0x2100),             # opcode 4: NOTIMP
        query([b"www"], qdcount=2),                # FORMERR
        query([b"www"], qdcount=0),
        good[:12] + b"\xc0\x0c" + good[14:],       # a compression pointer
        query([b"a" * 63] * 4),                    # 255 bytes of name: too long
        query([b"a" * 63] * 3 + [b"a" * 61]),      # 253: fine
        query([b"x"], tail=b"\x00" * 11),          # trailing bytes (EDNS): fine
    ]
    for data in cases:
        assert _relay.question_end(data) == python_verdict(data), data


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes(data):
    assert _relay.question_end(data) == python_verdict(data)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=70), max_size=6),
       st.integers(0, 0xFFFF), st.integers(0, 3), st.binary(max_size=12),
       st.integers(0, 40))
def test_near_queries(labels, flags, qdcount, tail, cut):
    """Queries built right and then bent: odd labels, flags, counts, cut short."""
    data = query(labels, flags=flags, qdcount=qdcount, tail=tail)
    data = data[:max(0, len(data) - cut)] if cut < 20 else data
    assert _relay.question_end(data) == python_verdict(data)
