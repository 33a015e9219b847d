"""Hardening tests: bad input, hostile peers, fail-open, bounded memory.

Shared helpers live here (imported as `from tests.hardening import ...` or
`from . import ...`):

- an in-process harness: a real `Forwarder` whose upstream sockets and
  client transports are fakes that record what they are given, so the whole
  query path (parser -> ACL -> engine -> pending table -> upstream reply ->
  client) runs without the network, fast enough for hypothesis;
- an oracle for what the proxy must do with a packet, written independently
  of `proxy.core.wire` (dnspython reads the name);
- the committed fuzz corpus (fuzz/corpus/*.bin);
- /proc readers: resident size, open descriptors, a process's UDP sockets.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.name

from proxy.config import Settings
from proxy.core.engine import Engine
from proxy.forwarder import Forwarder
from proxy.upstreams import UpstreamSocket

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "fuzz" / "corpus"

CLIENT = ("127.0.0.1", 40000)
LISTENER = "127.0.0.1:1053"


# --- fakes ------------------------------------------------------------------------------


class FakeUpstreamTransport:
    """A connected UDP transport towards an upstream: records what is sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(bytes(data))

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


@dataclass
class FakeClient:
    """The `reply_to` of a query: a UDP transport or a TCP connection."""

    replies: list[tuple[bytes, Any]] = field(default_factory=list)
    no_replies: int = 0
    closed: int = 0

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.replies.append((bytes(data), addr))

    def no_reply(self) -> None:
        self.no_replies += 1

    def close(self) -> None:
        self.closed += 1


def make_forwarder(engine: Any = None, *, sockets: int = 2, max_pending: int = 100_000,
                   upstreams: tuple[str, ...] = ("127.0.0.1:53",), seed: int = 1,
                   loop: Any = None) -> Forwarder:
    """A Forwarder wired to fake upstream sockets (what `start()` does, minus
    the network and the sweep timer).  `loop` is needed only for faults that
    delay (call_later)."""
    settings = Settings(upstreams=list(upstreams), upstream_sockets=sockets,
                        max_pending=max_pending, admin=None)
    fwd = Forwarder(settings, engine if engine is not None else Engine(),
                    rng=random.Random(seed))
    fwd.loop = loop
    for upstream in fwd.upstreams:
        for _ in range(sockets):
            sock = UpstreamSocket(fwd, upstream)
            sock.connection_made(FakeUpstreamTransport())  # type: ignore[arg-type]
            upstream.sockets.append(sock)
            fwd.sockets.append(sock)
    fwd.pending_cap = max(1, max_pending // max(1, len(fwd.sockets)))
    fwd._recompute_orders()  # noqa: SLF001 - what start() does
    return fwd


def sent_upstream(fwd: Forwarder) -> list[tuple[UpstreamSocket, bytes]]:
    """Everything the forwarder sent to its upstream sockets, then forgets it."""
    out = []
    for sock in fwd.sockets:
        transport = sock.transport
        out += [(sock, data) for data in transport.sent]  # type: ignore[union-attr]
        transport.sent.clear()  # type: ignore[union-attr]
    return out


def answer_of(query: bytes, rcode: int = 0, records: bytes = b"", ancount: int = 0) -> bytes:
    """A well-formed upstream reply to `query`: its ID, QR and RA set, its
    question (whatever follows the question in the query is not echoed),
    then `records` (raw, `ancount` of them)."""
    qend = 12 + _question_length(query)
    return (query[:2] + bytes((0x80 | (query[2] & 0x79), 0x80 | rcode))
            + struct.pack("!HHHH", 1, ancount, 0, 0) + query[12:qend] + records)


def _question_length(query: bytes) -> int:
    pos = 12
    while query[pos]:
        pos += query[pos] + 1
    return pos + 1 - 12 + 4


# --- the oracle -------------------------------------------------------------------------

FORWARD, FORMERR, NOTIMP, DROP = "forward", "formerr", "notimp", "dropped"


def expected_reaction(data: bytes) -> str:
    """What the proxy must do with `data` as a client query, decided without
    proxy.core.wire: too short or a response -> dropped; an opcode other than
    QUERY -> NOTIMP; a question count other than 1, a name that is not
    plain labels (compression, label types 0x40/0x80), runs past the end or
    is longer than 255 bytes, or no room for QTYPE/QCLASS -> FORMERR; else
    forwarded."""
    if len(data) < 12:
        return DROP
    if data[2] & 0x80:
        return DROP
    if (data[2] >> 3) & 0x0F:
        return NOTIMP
    if struct.unpack_from("!H", data, 4)[0] != 1:
        return FORMERR
    if any(b > 63 for b in _label_lengths(data)):
        return FORMERR
    try:
        name, used = dns.name.from_wire(data, 12)
    except (dns.exception.DNSException, IndexError, ValueError, struct.error):
        return FORMERR
    if 12 + used + 4 > len(data):
        return FORMERR
    return FORWARD


def _label_lengths(data: bytes) -> list[int]:
    """Length bytes of the question name, up to the first one > 63 or the end."""
    out, pos = [], 12
    while pos < len(data):
        length = data[pos]
        out.append(length)
        if length == 0 or length > 63:
            break
        pos += length + 1
    return out


# --- the corpus -------------------------------------------------------------------------


def corpus() -> list[tuple[str, bytes]]:
    """(file name, bytes) of every packet in fuzz/corpus, sorted by name."""
    return [(p.name, p.read_bytes()) for p in sorted(CORPUS.glob("*.bin"))]


# --- /proc ------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of `pid`, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _ipv4_port(text: str) -> tuple[str, int]:
    """'0100007F:1F90' -> ('127.0.0.1', 8080) (the address is little-endian hex)."""
    host, port = text.split(":")
    octets = bytes.fromhex(host)[::-1]
    return ".".join(str(b) for b in octets), int(port, 16)


def udp_sockets_of(pid: int) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """(local, remote) IPv4 UDP sockets the process has open, from
    /proc/<pid>/net/udp and its descriptors."""
    inodes = socket_inodes(pid)
    out = []
    for line in Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) > 9 and int(parts[9]) in inodes:
            out.append((_ipv4_port(parts[1]), _ipv4_port(parts[2])))
    return out


def upstream_socket_ports(pid: int, upstream: tuple[str, int]) -> list[int]:
    """Local ports of the process's UDP sockets connected to `upstream`."""
    return sorted(local[1] for local, remote in udp_sockets_of(pid) if remote == upstream)
