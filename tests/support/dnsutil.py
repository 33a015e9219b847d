"""DNS clients for tests (dnspython and dig) and a comparator of replies.

    q = make_query("www.example.test.", "A", do=True)
    r = udp(q, proxy.host, proxy.port)            # or tcp(...)
    assert_same_reply(r, udp(q, unbound.host, unbound.port))
    d = dig("www.example.test.", "A", "+tcp", server=proxy.host, port=proxy.port)
    d.message  # the parsed reply, a dns.message.Message
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

# --- building queries ----------------------------------------------------------------


def make_query(name: str, rdtype: str | int = "A", *, edns: int | None = 0,
               payload: int = 1232, do: bool = False, options: Sequence[dns.edns.Option] = (),
               rd: bool = True, cd: bool = False,
               qid: int | None = None) -> dns.message.QueryMessage:
    """A query; `edns=None` for none (then `do`/`options` must be unset)."""
    if edns is None:
        q = dns.message.make_query(name, rdtype, use_edns=False)
    else:
        q = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload,
                                   want_dnssec=do, options=list(options))
    if not rd:
        q.flags &= ~dns.flags.RD
    if cd:
        q.flags |= dns.flags.CD
    if qid is not None:
        q.id = qid
    return q


def cookie_option(client: bytes = b"\x01\x02\x03\x04\x05\x06\x07\x08",
                  server: bytes = b"") -> dns.edns.Option:
    return dns.edns.CookieOption(client, server)


def ecs_option(address: str = "192.0.2.0", srclen: int = 24) -> dns.edns.Option:
    return dns.edns.ECSOption(address, srclen)


# --- sending them --------------------------------------------------------------------


def udp(query: dns.message.Message, host: str, port: int, *, timeout: float = 2.0,
        source: str | None = None) -> dns.message.Message:
    """One query over UDP; the reply even when truncated (TC set)."""
    return dns.query.udp(query, host, port=port, timeout=timeout, source=source,
                         ignore_trailing=False, raise_on_truncation=False)


def tcp(query: dns.message.Message, host: str, port: int, *, timeout: float = 2.0,
        source: str | None = None) -> dns.message.Message:
    return dns.query.tcp(query, host, port=port, timeout=timeout, source=source)


def udp_raw(data: bytes, host: str, port: int, *, timeout: float = 1.0,
            source: str | None = None) -> bytes | None:
    """Send raw bytes over UDP; the first datagram back, or None on timeout."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if source:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(data, (host, port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


class TcpClient:
    """A client TCP connection carrying any number of length-prefixed
    messages, for pipelining and idle-timeout tests."""

    def __init__(self, host: str, port: int, *, timeout: float = 2.0,
                 source: str | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))

    def send(self, *messages: bytes | dns.message.Message) -> None:
        """Send all messages in one write (pipelined)."""
        data = b""
        for message in messages:
            wire = message.to_wire() if isinstance(message, dns.message.Message) else message
            data += struct.pack("!H", len(wire)) + wire
        self.sock.sendall(data)

    def recv_wire(self, timeout: float | None = None) -> bytes | None:
        """The next message's bytes, or None when the server closed the connection."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        head = self._exactly(2)
        if head is None:
            return None
        body = self._exactly(struct.unpack("!H", head)[0])
        if body is None:
            raise AssertionError("connection closed in the middle of a message")
        return body

    def recv(self, timeout: float | None = None) -> dns.message.Message | None:
        wire = self.recv_wire(timeout)
        return None if wire is None else dns.message.from_wire(wire)

    def query(self, message: dns.message.Message) -> dns.message.Message:
        self.send(message)
        reply = self.recv()
        assert reply is not None, "server closed the connection instead of answering"
        return reply

    def is_closed_by_peer(self, timeout: float) -> bool:
        """True if the server closes the connection within `timeout` (EOF
        or reset), False if it is still open then."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return data == b""

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None if not data else data if len(data) == n else None
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TcpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- comparing replies ---------------------------------------------------------------


def _rrset_key(rrset: dns.rrset.RRset) -> tuple:
    return (rrset.name.canonicalize(), rrset.rdclass, rrset.rdtype, rrset.covers)


def _section_diffs(label: str, got: Iterable[dns.rrset.RRset], want: Iterable[dns.rrset.RRset],
                   ttl_slack: float) -> list[str]:
    diffs = []
    got_map = {_rrset_key(r): r for r in got}
    want_map = {_rrset_key(r): r for r in want}
    for key in sorted(set(got_map) | set(want_map), key=str):
        g, w = got_map.get(key), want_map.get(key)
        if g is None:
            diffs.append(f"{label}: missing {w.to_text()}")
        elif w is None:
            diffs.append(f"{label}: unexpected {g.to_text()}")
        else:
            if set(g) != set(w):
                diffs.append(f"{label}: records differ:\n  got  {g.to_text()}\n"
                             f"  want {w.to_text()}")
            if abs(g.ttl - w.ttl) > ttl_slack:
                diffs.append(f"{label}: TTL of {g.name} {dns.rdatatype.to_text(g.rdtype)} "
                             f"is {g.ttl}, want {w.ttl} (+-{ttl_slack})")
    return diffs


def reply_differences(got: dns.message.Message, want: dns.message.Message, *,
                      ttl_slack: float = 1.0) -> list[str]:
    """What differs between two replies, ignoring only the ID (and the order
    of RRsets within a section and of records within an RRset): rcode,
    opcode and every header flag; question; answer/authority/additional
    RRsets with TTLs within `ttl_slack` seconds; EDNS version, payload,
    flags and options."""
    diffs = []
    if got.rcode() != want.rcode():
        diffs.append(f"rcode {dns.rcode.to_text(got.rcode())}, "
                     f"want {dns.rcode.to_text(want.rcode())}")
    if got.flags != want.flags:
        diffs.append(f"flags {dns.flags.to_text(got.flags)!r} (opcode "
                     f"{dns.opcode.to_text(dns.opcode.from_flags(got.flags))}), want "
                     f"{dns.flags.to_text(want.flags)!r} (opcode "
                     f"{dns.opcode.to_text(dns.opcode.from_flags(want.flags))})")
    if [_rrset_key(r) for r in got.question] != [_rrset_key(r) for r in want.question]:
        diffs.append(f"question {got.question}, want {want.question}")
    for label in ("answer", "authority", "additional"):
        diffs += _section_diffs(label, getattr(got, label), getattr(want, label), ttl_slack)
    if got.edns != want.edns:
        diffs.append(f"EDNS version {got.edns}, want {want.edns} (-1: no EDNS)")
    elif got.edns >= 0:
        if got.payload != want.payload:
            diffs.append(f"EDNS payload {got.payload}, want {want.payload}")
        if got.ednsflags != want.ednsflags:
            diffs.append(f"EDNS flags {dns.flags.edns_to_text(got.ednsflags)!r}, "
                         f"want {dns.flags.edns_to_text(want.ednsflags)!r}")
        got_options = [(o.otype, o.to_wire()) for o in got.options]
        want_options = [(o.otype, o.to_wire()) for o in want.options]
        if got_options != want_options:
            diffs.append(f"EDNS options {got.options}, want {want.options}")
    return diffs


def assert_same_reply(got: dns.message.Message, want: dns.message.Message, *,
                      ttl_slack: float = 1.0, context: str = "") -> None:
    """Assert two replies are the same (see reply_differences)."""
    diffs = reply_differences(got, want, ttl_slack=ttl_slack)
    if diffs:
        head = f"replies differ{' (' + context + ')' if context else ''}:\n  "
        raise AssertionError(head + "\n  ".join(diffs) + f"\n--- got:\n{got}\n--- want:\n{want}")


def rrset_texts(message: dns.message.Message, section: str = "answer") -> set[str]:
    """Records of a section as 'name TTL-less type rdata' strings, for assertions."""
    out = set()
    for rrset in getattr(message, section):
        for rdata in rrset:
            out.add(f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} {rdata.to_text()}")
    return out


def addresses(message: dns.message.Message) -> set[str]:
    """The A/AAAA addresses in a reply's answer section."""
    return {rd.address for rrset in message.answer
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rd in rrset}


# --- dig -----------------------------------------------------------------------------


@dataclass
class DigResult:
    """dig's output, parsed.  `message` is the reply rebuilt as a dnspython
    Message (None when dig got no reply); `edns_options` are the raw lines
    of the OPT pseudo-section after the "EDNS:" line (COOKIE, NSID, ...)."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    message: dns.message.Message | None = None
    status: str | None = None
    flags: set[str] = field(default_factory=set)
    edns_options: list[str] = field(default_factory=list)
    retried_over_tcp: bool = False

    @property
    def answered(self) -> bool:
        return self.message is not None


_HEADER_RE = re.compile(r"opcode: (\w+), status: (\w+), id: (\d+)")
_FLAGS_RE = re.compile(r";; flags:([^;]*);")
_EDNS_RE = re.compile(r"; EDNS: version: (\d+), flags:([^;]*);(?:.*?)udp: (\d+)")
_SECTIONS = {"QUESTION": "question", "ANSWER": "answer", "AUTHORITY": "authority",
             "ADDITIONAL": "additional"}


def dig(*args: str, server: str, port: int, timeout: float = 2.0,
        cookie: bool = False) -> DigResult:
    """Run `dig @server -p port ARGS` (with +tries=1, and +nocookie unless
    `cookie`) and parse its output."""
    exe = shutil.which("dig")
    if not exe:
        raise RuntimeError("dig is not installed (bind9-dnsutils; make test installs it)")
    argv = [exe, f"@{server}", "-p", str(port), f"+time={max(1, round(timeout))}", "+tries=1",
            "+nomultiline", "+noidnout", *([] if cookie else ["+nocookie"]), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout * 3 + 5)
    result = DigResult(argv, proc.returncode, proc.stdout, proc.stderr)
    parse_dig(result)
    return result


def parse_dig(result: DigResult) -> None:
    lines = result.stdout.splitlines()
    result.retried_over_tcp = any("retrying in TCP mode" in line for line in lines)
    message: dns.message.Message | None = None
    section: str | None = None
    in_opt = False
    for line in lines:
        if m := _HEADER_RE.search(line):
            message = dns.message.Message(id=int(m.group(3)))
            message.flags = dns.opcode.to_flags(dns.opcode.from_text(m.group(1)))
            result.status = m.group(2)
            section, in_opt = None, False
            continue
        if message is None:
            continue
        if line.startswith(";; flags:"):
            m = _FLAGS_RE.search(line)
            names = m.group(1).split() if m else []
            result.flags = set(names)
            if names:
                message.flags |= dns.flags.from_text(" ".join(names))
            continue
        if line.startswith(";; OPT PSEUDOSECTION"):
            in_opt, section = True, None
            continue
        if m := re.match(r";; (\w+) SECTION:", line):
            in_opt = False
            section = _SECTIONS.get(m.group(1))
            continue
        if in_opt:
            if m := _EDNS_RE.search(line):
                ednsflags = 0
                for name in m.group(2).split():
                    ednsflags |= dns.flags.edns_from_text(name)
                message.use_edns(int(m.group(1)), ednsflags, int(m.group(3)))
            elif line.startswith("; "):
                result.edns_options.append(line[2:])
            continue
        if not line.strip() or line.startswith(";;"):
            section = None if not line.strip() else section
            continue
        if section == "question" and line.startswith(";"):
            name, rdclass, rdtype = line[1:].split()[:3]
            message.question = [dns.rrset.RRset(dns.name.from_text(name),
                                                dns.rdataclass.from_text(rdclass),
                                                dns.rdatatype.from_text(rdtype))]
        elif section in ("answer", "authority", "additional") and not line.startswith(";"):
            name, ttl, rdclass, rdtype, *rest = line.split(None, 4)
            rrset = dns.rrset.from_text(name, int(ttl), rdclass, rdtype, rest[0] if rest else "")
            rdata = next(iter(rrset))
            target = message.find_rrset(getattr(message, section), rrset.name, rrset.rdclass,
                                        rrset.rdtype, rdata.covers(), create=True)
            target.add(rdata, rrset.ttl)
    if message is not None and result.status is not None:
        rcode = dns.rcode.from_text(result.status)
        if rcode < 16:
            message.set_rcode(rcode)
        result.message = message
