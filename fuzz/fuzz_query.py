#!/usr/bin/env python3
"""Fuzz the query path: the raw parser and the whole in-process forwarder.

Every input is handed to a real `Forwarder` (fake upstream sockets and a
fake client, see tests/hardening/__init__.py) as a UDP query and as a TCP
query, with the fault engine off and on (a rule that matches everything and
rewrites answers).  A forwarded query gets an upstream reply built from it.
Checked per input: no exception escapes; the reaction is the one the
oracle (`expected_reaction`, written with dnspython, independent of
proxy.core.wire) predicts; a malformed packet bumps exactly one malformed
counter and gets FORMERR/NOTIMP with its own ID, or nothing; a forwarded
one reaches the upstream with only its ID changed and its answer comes back
with the client's ID; no fault raised (the engine's fail-open would hide it).

Three ways to run it:

    .venv/bin/python fuzz/fuzz_query.py --write-corpus   # (re)write fuzz/corpus/ seeds
    .venv/bin/python fuzz/fuzz_query.py --replay         # every corpus file once
    .venv/bin/python fuzz/fuzz_query.py --mutate 200000 --seconds 60   # stdlib mutator
    .venv/bin/python fuzz/fuzz_query.py -atheris_runs=100000 fuzz/corpus  # atheris/libFuzzer

The bounded CI run is tests/hardening/test_fuzz.py (hypothesis, plus a
replay of this corpus against a real proxy process over UDP and TCP).
atheris 3.1.0 (the version in ../shared/reference/tooling.md) is not on
this machine's package index; with atheris 3.0.0 or later installed the
`-atheris...`/libFuzzer form works; without it --mutate does the same
checks with a simple stdlib mutator.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from hardening import (  # noqa: E402
    CLIENT,
    CORPUS,
    DROP,
    FORMERR,
    FORWARD,
    LISTENER,
    NOTIMP,
    FakeClient,
    answer_of,
    expected_reaction,
    make_forwarder,
    sent_upstream,
)

from proxy.core.engine import Engine  # noqa: E402
from proxy.core.model import Rule  # noqa: E402

# --- the seed corpus ------------------------------------------------------------------


def _name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def _header(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0,
            ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def _opt(payload: int = 1232, do: bool = False, options: bytes = b"",
         rdlen: int | None = None) -> bytes:
    return (b"\x00" + struct.pack("!HHBBH", 41, payload, 0, 0, 0x8000 if do else 0)
            + struct.pack("!H", len(options) if rdlen is None else rdlen) + options)


def _q(name: bytes = _name(b"www", b"example", b"test"), qtype: int = 1, qclass: int = 1,
       **header: int) -> bytes:
    return _header(**header) + name + struct.pack("!HH", qtype, qclass)


def seed_packets() -> dict[str, bytes]:
    """Named packets for fuzz/corpus: valid queries and the malformed kinds
    the issue lists.  Names say what each one is."""
    www = _name(b"www", b"example", b"test")
    qtail = struct.pack("!HH", 1, 1)
    long_labels = [b"a" * 63] * 3 + [b"b" * 61]  # 4*64 - 2 + 1 = 255 bytes on the wire
    seeds = {
        # valid queries
        "ok_a": _q(),
        "ok_aaaa_edns_do": _q(qtype=28, ar=1) + _opt(do=True),
        "ok_root_ns": _q(name=b"\x00", qtype=2),
        "ok_any_ch_class": _q(qtype=255, qclass=3),
        "ok_qtype_65535": _q(qtype=65535),
        "ok_qtype_0": _q(qtype=0),
        "ok_binary_label": _q(name=_name(b"a.b", b"c\x00\xff", b"test")),
        "ok_name_255_bytes": _q(name=_name(*long_labels)),
        "ok_cookie_option": _q(ar=1) + _opt(options=struct.pack("!HH", 10, 8) + b"\x01" * 8),
        "ok_trailing_garbage": _q() + b"\xde\xad\xbe\xef",
        "ok_cd_ad_bits": _q(flags=0x0130),
        "ok_no_rd": _q(flags=0x0000),
        "ok_upper_case": _q(name=_name(b"WwW", b"ExAmPlE", b"TEST")),
        "ok_host0_bench": _q(name=_name(b"h0", b"bench", b"test")),
        # EDNS oddities (forwarded: only the question is checked)
        "edns_huge_option_4000": _q(ar=1) + _opt(options=struct.pack("!HH", 65001, 4000)
                                                 + b"\xaa" * 4000),
        "edns_option_len_past_end": _q(ar=1) + _opt(options=struct.pack("!HH", 12, 60000)),
        "edns_rdlen_past_end": _q(ar=1) + _opt(rdlen=65535),
        "edns_two_opts": _q(ar=2) + _opt() + _opt(),
        "edns_opt_compression_loop": _q(ar=1) + b"\xc0" + bytes([12 + len(www) + 4])
        + struct.pack("!HHIH", 41, 1232, 0, 0),
        "arcount_65535_no_records": _q(ar=65535),
        "ancount_nscount_max": _q(an=65535, ns=65535, ar=65535),
        # truncated headers and bodies
        **{f"short_header_{n}": _q()[:n] for n in (0, 1, 2, 5, 11)},
        "header_only": _header(),
        "cut_in_name": _q()[:16],
        "cut_in_qtype": _q()[:-3],
        "cut_before_qclass": _q()[:-2],
        # question count
        "qdcount_0": _header(qd=0),
        "qdcount_0_with_question": _q(qd=0),
        "qdcount_2": _q(qd=2) + www + qtail,
        "qdcount_5": _q(qd=5) + (www + qtail) * 4,
        "qdcount_65535": _q(qd=65535),
        # compression and label types in the question
        "compression_self_loop": _header() + b"\xc0\x0c" + qtail,
        "compression_forward": _header() + b"\x03www\xc0\x12" + b"\x00" + qtail,
        "compression_two_step_loop": _header() + b"\xc0\x0e\xc0\x0c" + qtail,
        "label_type_0x40": _header() + b"\x41" + b"x" * 65 + b"\x00" + qtail,
        "label_type_0x80": _header() + b"\x80" + b"\x00" + qtail,
        # label and name overflow
        "label_64": _q(name=_name(b"a" * 64)),
        "label_length_past_end": _header() + b"\x3f" + b"a" * 10,
        "name_256_bytes": _q(name=_name(*long_labels[:3], b"b" * 62)),
        "name_300_bytes": _q(name=_name(*[b"c" * 50] * 6)),
        "no_root_label": _header() + b"\x03www" + qtail,
        # opcodes and QR
        "opcode_iquery": _q(flags=0x0900),
        "opcode_status": _q(flags=0x1100),
        "opcode_notify": _q(flags=0x2000 | 0x0400, qtype=6),
        "opcode_update": _q(flags=0x2800, qtype=6, an=0, ns=1) + b"\x00" + qtail + b"\x00" * 6,
        "opcode_15": _q(flags=0x7900),
        "qr_set_response": _q(flags=0x8180),
        "qr_set_notify_response": _q(flags=0xA400),
        # random-looking bytes
        "zeros_64": b"\x00" * 64,
        "ones_64": b"\xff" * 64,
        "random_512": random.Random(7).randbytes(512),
    }
    return seeds


def write_corpus(directory: Path = CORPUS) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seed_packets().items():
        (directory / f"{name}.bin").write_bytes(data)
    return len(seed_packets())


# --- the property ----------------------------------------------------------------------

# Faults that read and rewrite the answer (dnslib parsing) on every query.
_RULES = [Rule.model_validate({"name": "all", "match": {}, "fault": spec}) for spec in (
    {"type": "ttl", "set": 1},
    {"type": "spoof"},
    {"type": "partial", "share": 0.5},
    {"type": "nodata"},
    {"type": "truncate"},
)]


class Checker:
    """Runs inputs through forwarders and counts what happened."""

    def __init__(self, strict_faults: bool = False) -> None:
        self.strict_faults = strict_faults
        self.fault_examples: list[tuple[str, bytes]] = []
        self.plain = make_forwarder()
        self.engines: list[tuple[Engine, object]] = []
        for rule in _RULES:
            engine = Engine()
            engine.add_rule("rule:fuzz", rule, time.time() - 1)  # until removed
            self.engines.append((engine, make_forwarder(engine)))
        self.packets = 0
        self.reactions: dict[str, int] = {FORWARD: 0, FORMERR: 0, NOTIMP: 0, DROP: 0}
        self.fault_errors = 0

    def check(self, data: bytes) -> None:
        data = bytes(data)
        self.packets += 1
        want = expected_reaction(data)
        self.reactions[want] += 1
        for tcp in (False, True):
            check_one(self.plain, data, tcp, want)
            for engine, fwd in self.engines:
                before = sum(r.counters.errors for r in engine.rules()) + engine.errors
                check_one(fwd, data, tcp, want, faulted=True)
                after = sum(r.counters.errors for r in engine.rules()) + engine.errors
                if after != before:  # failed open: the client got the real answer
                    self.fault_errors += after - before
                    if len(self.fault_examples) < 20:
                        self.fault_examples.append((engine.rules()[0].fault.type, data))
                    if self.strict_faults:
                        raise AssertionError(
                            f"a fault raised on {data!r} ({engine.rules()[0].fault.type}); "
                            "fail-open hid it from the client")


def check_one(fwd, data: bytes, tcp: bool, want: str, faulted: bool = False) -> None:
    """One packet through `fwd`; AssertionError on anything wrong."""
    client = FakeClient()
    stats = fwd.stats
    malformed = (stats.malformed, stats.formerr, stats.notimp)
    fwd.handle(data, CLIENT, client, tcp, LISTENER)  # an exception here is a crash
    got = (stats.malformed - malformed[0], stats.formerr - malformed[1],
           stats.notimp - malformed[2])
    out = sent_upstream(fwd)
    if want == DROP:
        assert got == (1, 0, 0), (data, got)
        assert not client.replies and not out, data
        assert client.no_replies == (1 if tcp else 0), data
        return
    if want in (FORMERR, NOTIMP):
        assert got == ((1, 1, 0) if want == FORMERR else (1, 0, 1)), (data, want, got)
        assert not out, data
        assert len(client.replies) == 1, data
        reply = client.replies[0][0]
        assert reply[:2] == data[:2] and reply[2] & 0x80, (data, reply)
        assert reply[3] & 0x0F == (1 if want == FORMERR else 4), (data, reply)
        assert reply[4:12] == b"\x00" * 8, reply  # no sections: nothing to trust
        return
    assert got == (0, 0, 0), (data, got)
    if client.replies:  # a fault answered at once (spoof, nodata, truncate...)
        assert faulted and len(client.replies) == 1 and not out, data
        assert client.replies[0][0][:2] == data[:2], data
        return
    assert len(out) == 1, (data, out)
    sock, query = out[0]
    assert query[2:] == data[2:], "forwarded bytes changed beyond the ID"
    sock.datagram_received(answer_of(query), sock.upstream.addr)
    assert not sock.pending, "the answer did not clear the pending entry"
    assert len(client.replies) == 1, data
    reply = client.replies[0][0]
    assert reply[:2] == data[:2], "the client did not get its own ID back"
    assert reply[2] & 0x80, reply


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A stdlib mutator: bit flips, byte sets, cuts, inserts, splices, counts."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.choice(
                (0, 1, 63, 64, 0xC0, 0xFF, rng.randrange(256)))
        elif op == 2 and buf:
            del buf[rng.randrange(len(buf)):]
        elif op == 3:
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and len(buf) >= 12:
            struct.pack_into("!H", buf, rng.choice((4, 6, 8, 10)),
                             rng.choice((0, 1, 2, 5, 65535, rng.randrange(65536))))
        elif op == 5 and len(buf) >= 3:
            buf[2] = (buf[2] & 0x87) | (rng.randrange(16) << 3)
        elif op == 6 and len(buf) >= 3:
            buf[2] ^= 0x80
    return bytes(buf[:65535])


def main() -> int:
    if any(arg.startswith("-atheris") or arg.startswith("-runs") for arg in sys.argv[1:]):
        return run_atheris()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-corpus", action="store_true", help="(re)write fuzz/corpus/")
    ap.add_argument("--replay", action="store_true", help="check every corpus file once")
    ap.add_argument("--mutate", type=int, default=0, metavar="N", help="N mutated inputs")
    ap.add_argument("--seconds", type=float, default=60.0, help="time limit for --mutate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.write_corpus:
        print(f"wrote {write_corpus()} packets to {CORPUS}")
    checker = Checker()
    seeds = [p.read_bytes() for p in sorted(CORPUS.glob("*.bin"))]
    if args.replay:
        for data in seeds:
            checker.check(data)
    if args.mutate:
        rng = random.Random(args.seed)
        end = time.monotonic() + args.seconds
        for i in range(args.mutate):
            if i % 256 == 0 and time.monotonic() > end:
                break
            checker.check(mutate(rng.choice(seeds), rng))
    print(f"packets fuzzed: {checker.packets} (x2 transports x{1 + len(_RULES)} engines), "
          f"crashes: 0, reactions: {checker.reactions}, fault errors (failed open): "
          f"{checker.fault_errors}")
    for fault, data in checker.fault_examples[:5]:
        print(f"  {fault} raised on {data!r}")
    return 0


def run_atheris() -> int:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        print("atheris is not installed; use --mutate N instead", file=sys.stderr)
        return 2
    if hasattr(atheris, "instrument_all"):  # coverage feedback for everything imported
        atheris.instrument_all()
    checker = Checker()

    def one_input(data: bytes) -> None:
        checker.check(data[:65535])

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
