"""A scriptable fake upstream DNS server for tests (UDP and TCP on one port).

It runs its own asyncio loop in a background thread, so synchronous tests can
use it:

    with FakeUpstream(answer_a("192.0.2.7")) as fake:      # or .start() / .stop()
        start_proxy(upstreams=[fake])
        ...
        assert fake.count("udp") == 1

A handler gets a `Received` (transport, wire, parsed message, peer) and
returns what to send back:

- a dns.message.Message or a dnslib.DNSRecord: sent as is (same ID as given);
- bytes: sent raw (garbage, hand-made replies);
- None: silence (a black hole);
- Delayed(response, seconds): sent later, without blocking other queries;
- a list/tuple of the above: each sent in turn (e.g. a wrong reply, then the
  right one).

Handler factories below cover the usual cases: answer_a, echo_options,
silence, garbage, wrong_id, wrong_question, delay_when, nxdomain, servfail.
Replies are built with dnspython from the parsed query (`reply_to`).
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from support.net import Endpoint


@dataclass
class Received:
    """One message the fake upstream received."""

    transport: str  # "udp" or "tcp"
    wire: bytes
    message: dns.message.Message | None  # None when it does not parse
    peer: Any
    time: float  # time.monotonic()

    @property
    def qname(self) -> str | None:
        if self.message is None or not self.message.question:
            return None
        return self.message.question[0].name.to_text()

    @property
    def qtype(self) -> str | None:
        if self.message is None or not self.message.question:
            return None
        return dns.rdatatype.to_text(self.message.question[0].rdtype)


@dataclass
class Delayed:
    response: Any
    seconds: float


Handler = Callable[[Received], Any]

LOOP_PROBE_SUFFIX = ".dnschaos-loop."  # the proxy's loop probes (proxy/forwarder.py)


# --- building replies ----------------------------------------------------------------


def reply_to(query: dns.message.Message, *records: str, rcode: int = dns.rcode.NOERROR,
             aa: bool = True, echo_options: bool = False) -> dns.message.Message:
    """A reply to `query` with answer records given as text
    ('www.example.test. 300 IN A 192.0.2.1'); EDNS mirrored from the query
    (with its options too when `echo_options`)."""
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    if aa:
        reply.flags |= dns.flags.AA
    for text in records:
        rrset = dns.rrset.from_text(*_split_rr(text))
        existing = reply.find_rrset(reply.answer, rrset.name, rrset.rdclass, rrset.rdtype,
                                    create=True)
        existing.update(rrset)
        existing.ttl = rrset.ttl
    if echo_options and query.edns >= 0:
        reply.use_edns(query.edns, query.ednsflags, query.payload, options=list(query.options))
    return reply


def _split_rr(text: str) -> tuple:
    name, ttl, rdclass, rdtype, rdata = text.split(None, 4)
    return name, int(ttl), rdclass, rdtype, rdata


def answer_a(*addresses: str, ttl: int = 300) -> Handler:
    """Answer A queries with these addresses (AAAA and others: NODATA)."""

    def handler(got: Received) -> Any:
        q = got.message
        if q is None:
            return None
        name = q.question[0].name.to_text()
        if q.question[0].rdtype == dns.rdatatype.A:
            return reply_to(q, *(f"{name} {ttl} IN A {a}" for a in addresses))
        return reply_to(q)

    return handler


def echo_options(*addresses: str) -> Handler:
    """Answer like answer_a (default 192.0.2.53), echoing the query's EDNS
    options back (cookie, ECS...)."""
    inner = answer_a(*(addresses or ("192.0.2.53",)))

    def handler(got: Received) -> Any:
        reply = inner(got)
        if isinstance(reply, dns.message.Message) and got.message.edns >= 0:
            q = got.message
            reply.use_edns(q.edns, q.ednsflags, q.payload, options=list(q.options))
        return reply

    return handler


def rcode_handler(rcode: int) -> Handler:
    return lambda got: reply_to(got.message, rcode=rcode) if got.message else None


def nxdomain() -> Handler:
    return rcode_handler(dns.rcode.NXDOMAIN)


def servfail() -> Handler:
    return rcode_handler(dns.rcode.SERVFAIL)


def silence() -> Handler:
    """Never answer: a black hole."""
    return lambda got: None


def garbage(size: int = 40, keep_id: bool = False) -> Handler:
    """Random bytes; with keep_id, random bytes after the query's own ID and
    a header claiming to be a response with one question."""

    def handler(got: Received) -> Any:
        if keep_id and len(got.wire) >= 2:
            return got.wire[:2] + b"\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00" + os.urandom(size)
        return os.urandom(size)

    return handler


def _wire(response: Any) -> bytes:
    if isinstance(response, dns.message.Message):
        return response.to_wire()
    if hasattr(response, "pack"):  # dnslib.DNSRecord
        return response.pack()
    return bytes(response)


def wrong_id(inner: Handler | None = None, then_right: bool = False) -> Handler:
    """The inner handler's reply (default: answer_a) under another ID; with
    `then_right`, followed by the correct reply."""
    inner = inner or answer_a("192.0.2.53")

    def handler(got: Received) -> Any:
        reply = inner(got)
        if reply is None:
            return None
        wire = _wire(reply)
        bad_id = struct.pack("!H", struct.unpack("!H", wire[:2])[0] ^ 0x5A5A)
        return [bad_id + wire[2:], wire] if then_right else bad_id + wire[2:]

    return handler


def wrong_question(inner: Handler | None = None, name: str = "other.example.test.",
                   then_right: bool = False) -> Handler:
    """A reply with the query's ID but for another question."""
    inner = inner or answer_a("192.0.2.53")

    def handler(got: Received) -> Any:
        q = got.message
        if q is None:
            return None
        other = dns.message.make_query(name, q.question[0].rdtype)
        other.id = q.id
        if q.edns >= 0:
            other.use_edns(q.edns, q.ednsflags, q.payload)
        wrong = _wire(reply_to(other, f"{name} 300 IN A 192.0.2.66")
                      if q.question[0].rdtype == dns.rdatatype.A else reply_to(other))
        if then_right:
            right = inner(got)
            return [wrong, right] if right is not None else wrong
        return wrong

    return handler


def delay_when(predicate: Callable[[Received], bool], seconds: float,
               inner: Handler | None = None) -> Handler:
    """Delay the inner handler's reply by `seconds` for queries matching
    `predicate` (e.g. lambda got: got.qname.startswith("slow"))."""
    inner = inner or answer_a("192.0.2.53")

    def handler(got: Received) -> Any:
        reply = inner(got)
        return Delayed(reply, seconds) if reply is not None and predicate(got) else reply

    return handler


def sequence(*handlers: Handler) -> Handler:
    """The i-th query gets handlers[i]'s reply; the last one repeats."""
    count = [0]
    lock = threading.Lock()

    def handler(got: Received) -> Any:
        with lock:
            i = min(count[0], len(handlers) - 1)
            count[0] += 1
        return handlers[i](got)

    return handler


# --- the server ----------------------------------------------------------------------


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: FakeUpstream) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner._dispatch("udp", data, addr, lambda wire: self._send(wire, addr))

    def _send(self, wire: bytes, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(wire, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class FakeUpstream(Endpoint):
    """UDP+TCP DNS server on host:port (port 0: a free one) running `handler`.

    Attributes: host, port, hostport ('127.0.0.1:PORT', for --upstream),
    addr; received (a copy of everything received), count(), clear(),
    wait_for_count(), handler (can be swapped at any time)."""

    def __init__(self, handler: Handler | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, tcp: bool = True, name: str = "fake") -> None:
        self.handler: Handler = handler or answer_a("192.0.2.53")
        self.host = host
        self.port = port
        self.tcp_enabled = tcp
        self.name = name
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._error: BaseException | None = None
        self.handler_errors: list[BaseException] = []

    # -- life cycle

    def start(self) -> FakeUpstream:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                        name=f"fake-upstream-{self.name}")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        if self._error:
            raise RuntimeError(f"fake upstream failed to start: {self._error}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        self._loop = self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            if self._udp:
                self._udp.close()
            if self._tcp:
                self._tcp.close()
            for writer in list(self._writers):
                writer.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(self.host, self.port))
            port = udp.get_extra_info("sockname")[1]
            if not self.tcp_enabled:
                self._udp, self.port = udp, port
                return
            try:
                self._tcp = await asyncio.start_server(self._tcp_client, self.host, port,
                                                       reuse_address=True)
            except OSError:
                udp.close()
                if self.port:
                    raise
                continue
            self._udp, self.port = udp, port
            return
        raise RuntimeError("no port free for both UDP and TCP")

    # -- receiving

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")

        def send(wire: bytes) -> None:
            if not writer.is_closing():
                writer.write(struct.pack("!H", len(wire)) + wire)

        try:
            while True:
                head = await reader.readexactly(2)
                data = await reader.readexactly(struct.unpack("!H", head)[0])
                self._dispatch("tcp", data, peer, send)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _dispatch(self, transport: str, data: bytes, peer: Any,
                  send: Callable[[bytes], None]) -> None:
        try:
            message = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError, struct.error):
            message = None
        got = Received(transport, data, message, peer, time.monotonic())
        if got.qname and got.qname.lower().endswith(LOOP_PROBE_SUFFIX):
            # The proxy's loop probes: answered like a real resolver would,
            # kept out of what the test sees (counts, handlers).
            self._respond(reply_to(message, rcode=dns.rcode.NXDOMAIN), send)
            return
        with self._lock:
            self._received.append(got)
        try:
            response = self.handler(got)
        except Exception as exc:  # a broken handler is a test bug: keep it visible
            self.handler_errors.append(exc)
            return
        self._respond(response, send)

    def _respond(self, response: Any, send: Callable[[bytes], None]) -> None:
        if response is None:
            return
        if isinstance(response, (list, tuple)):
            for item in response:
                self._respond(item, send)
            return
        if isinstance(response, Delayed):
            assert self._loop is not None
            self._loop.call_later(response.seconds, self._respond, response.response, send)
            return
        send(_wire(response))

    # -- what it saw

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def count(self, transport: str | None = None, qname: str | None = None) -> int:
        return sum(1 for r in self.received
                   if (transport is None or r.transport == transport)
                   and (qname is None or r.qname == qname))

    def clear(self) -> None:
        with self._lock:
            self._received.clear()

    def wait_for_count(self, n: int, timeout: float = 5.0, **filters: Any) -> int:
        end = time.monotonic() + timeout
        while (got := self.count(**filters)) < n:
            if time.monotonic() > end:
                raise AssertionError(f"fake upstream got {got} messages, expected {n}")
            time.sleep(0.01)
        return got


def start_fakes(*handlers: Handler, names: Sequence[str] = ()) -> list[FakeUpstream]:
    """Start one FakeUpstream per handler (stop them yourself, or use the
    `fake_upstream` fixture which stops them at teardown)."""
    return [FakeUpstream(h, name=(names[i] if i < len(names) else f"fake{i}")).start()
            for i, h in enumerate(handlers)]
