"""Hostile TCP clients: silent connections, a stalled 65535-byte length
prefix, a trickle of bytes, and thousands of connections.  Each is cut off
by `tcp_idle_timeout` or the `tcp_max_connections` cap (which evicts the
connection idle longest) while other clients, TCP and UDP, keep being
served."""

from __future__ import annotations

import socket
import struct
import time

import dns.rcode
import pytest

from support.dnsutil import TcpClient, make_query, tcp, udp
from support.fake_upstream import answer_a, delay_when

from . import fd_count

IDLE = 1.0  # tcp_idle_timeout for these tests


def _config(cap: int = 1000, idle: float = IDLE) -> dict:
    return {"tcp_idle_timeout": f"{idle}s", "tcp_max_connections": cap}


def _serves(proxy, name: str = "www.example.test.") -> bool:
    query = make_query(name, "A")
    return (udp(query, proxy.host, proxy.port).rcode() == dns.rcode.NOERROR
            and tcp(query, proxy.host, proxy.port).rcode() == dns.rcode.NOERROR)


@pytest.fixture(scope="module")
def proxy(start_module_proxy, unbound):
    return start_module_proxy(config=_config(), upstreams=[unbound])


def _closed_within(client: TcpClient, low: float, high: float) -> float:
    """Seconds until the proxy closes `client`; asserts it is in [low, high]."""
    start = time.monotonic()
    assert client.is_closed_by_peer(high), f"still open after {high} s"
    took = time.monotonic() - start
    assert took >= low, f"closed after {took:.2f} s, before the idle timeout"
    return took


def test_silent_connection_is_closed_after_the_idle_timeout(proxy):
    idle_before = proxy.metric("dnschaos_tcp_connections_closed_total", reason="idle")
    with TcpClient(proxy.host, proxy.port) as silent:
        with TcpClient(proxy.host, proxy.port) as busy:  # another client keeps working
            for _ in range(3):
                reply = busy.query(make_query("www.example.test.", "A"))
                assert reply.rcode() == dns.rcode.NOERROR
                time.sleep(0.3)
            _closed_within(silent, 0.0, IDLE + 1.5)
    assert proxy.metric("dnschaos_tcp_connections_closed_total", reason="idle") > idle_before


@pytest.mark.parametrize("sent", [b"\xff\xff", b"\xff\xff" + b"\x00" * 500],
                         ids=["prefix-only", "prefix-and-500-bytes"])
def test_stalled_65535_byte_prefix_is_closed_after_the_idle_timeout(proxy, sent):
    with TcpClient(proxy.host, proxy.port) as staller:
        staller.sock.sendall(sent)
        took = _closed_within(staller, IDLE - 0.2, IDLE + 1.5)
    assert _serves(proxy)
    print(f"\nstalled {len(sent)} bytes: closed after {took:.2f} s")


def test_trickling_client_is_closed_when_no_message_completes(proxy):
    with TcpClient(proxy.host, proxy.port) as trickler:
        trickler.sock.sendall(b"\xff\xff")
        end = time.monotonic() + 3 * IDLE
        closed = False
        while time.monotonic() < end and not closed:
            try:
                trickler.sock.sendall(b"\x00")
            except OSError:
                closed = True
                break
            closed = trickler.is_closed_by_peer(IDLE / 3)
        assert closed, f"a client sending one byte per {IDLE / 3:.2f} s stayed connected"


def test_thousands_of_connections_are_capped_and_other_clients_served(start_proxy,
                                                                      fake_upstream):
    """Cap 50; 1,500 connections opened as fast as possible.  The proxy
    holds at most ~50 of them (descriptors bounded), evicts the idle-longest,
    never the one with a query waiting, and new clients are served during
    and after the flood."""
    cap, flood = 50, 1500
    slow = fake_upstream(delay_when(lambda got: (got.qname or "").startswith("slow"), 2.0,
                                    answer_a("192.0.2.7")))
    proxy = start_proxy("--timeout", "3s", "--deadline", "3s",
                        config=_config(cap=cap, idle=30.0), upstreams=[slow])
    fds_before = fd_count(proxy.pid)
    waiting = TcpClient(proxy.host, proxy.port, timeout=5)
    waiting.send(make_query("slow.example.test.", "A"))  # outstanding for 2 s
    time.sleep(0.2)
    opened: list[socket.socket] = []
    peak_fds = 0
    served_during = 0
    try:
        end = time.monotonic() + 20
        for i in range(flood):
            if time.monotonic() > end:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(2)
            try:
                sock.connect(proxy.addr)
            except OSError:
                sock.close()
                continue
            opened.append(sock)
            if i % 300 == 150:
                peak_fds = max(peak_fds, fd_count(proxy.pid))
                reply = tcp(make_query("www.example.test.", "A"), proxy.host, proxy.port)
                served_during += reply.rcode() == dns.rcode.NOERROR
        time.sleep(0.3)
        peak_fds = max(peak_fds, fd_count(proxy.pid))
        # The client whose query was waiting was not evicted: it gets its answer.
        reply = waiting.recv(timeout=4)
        assert reply is not None, "the connection with a query in flight was evicted"
        assert reply.rcode() == dns.rcode.NOERROR
        assert served_during == len(range(150, len(opened), 300))
        assert _serves(proxy)
        evicted = proxy.metric("dnschaos_tcp_connections_closed_total", reason="evicted")
        accepted = proxy.metric("dnschaos_tcp_connections_total")
        assert len(opened) >= 1000
        assert evicted >= len(opened) - cap, (evicted, len(opened))
        assert accepted >= len(opened)
        assert peak_fds <= fds_before + cap + 10, (fds_before, peak_fds)
        # The oldest flood connections were closed by the proxy.
        assert all(_is_closed(s) for s in opened[:100])
        print(f"\n{len(opened)} connections: {evicted:.0f} evicted, fds {fds_before} -> "
              f"peak {peak_fds} (cap {cap})")
    finally:
        waiting.close()
        for sock in opened:
            sock.close()


def test_connections_all_busy_at_the_cap_refuse_the_next_one(start_proxy, fake_upstream):
    """At the cap with every connection waiting for an answer, a new
    connection is closed at once (counted as rejected); the busy ones all
    get their answers, and a connection after that is served."""
    cap = 5
    slow = fake_upstream(delay_when(lambda got: True, 1.0, answer_a("192.0.2.8")))
    proxy = start_proxy("--timeout", "3s", "--deadline", "3s",
                        config=_config(cap=cap, idle=30.0), upstreams=[slow])
    busy = [TcpClient(proxy.host, proxy.port, timeout=4) for _ in range(cap)]
    try:
        for i, client in enumerate(busy):
            client.send(make_query(f"busy{i}.example.test.", "A"))
        time.sleep(0.3)
        with TcpClient(proxy.host, proxy.port, timeout=2) as extra:
            assert extra.is_closed_by_peer(1.0), "a connection past the cap was kept"
        assert proxy.metric("dnschaos_tcp_connections_rejected_total") >= 1
        for client in busy:
            reply = client.recv(timeout=4)
            assert reply is not None and reply.rcode() == dns.rcode.NOERROR
    finally:
        for client in busy:
            client.close()
    reply = tcp(make_query("after.example.test.", "A"), proxy.host, proxy.port, timeout=4)
    assert reply.rcode() == dns.rcode.NOERROR


def _is_closed(sock: socket.socket) -> bool:
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False



def _send_until_refused(sock: socket.socket, chunk: bytes, max_bytes: int,
                        refused_for: float, limit: float) -> tuple[int, bool]:
    """Send `chunk` over and over without reading.  Returns (bytes sent,
    whether the proxy stopped reading: sends refused for `refused_for` s in
    a row) after at most `max_bytes` or `limit` seconds."""
    sock.setblocking(False)
    sent, blocked_since, deadline = 0, None, time.monotonic() + limit
    while sent < max_bytes and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
            blocked_since = None
        except BlockingIOError:
            now = time.monotonic()
            blocked_since = blocked_since or now
            if now - blocked_since >= refused_for:
                return sent, True
            time.sleep(0.05)
    return sent, False


def test_a_client_that_never_reads_its_answers_is_not_read_either(start_proxy, unbound, tmp_path):
    """Pipelined queries from a client that reads nothing: once 64 KiB of
    answers wait (beyond what the kernel buffers hold), the proxy stops
    reading that connection -- without flow control it would read on and
    buffer every answer -- other clients are served, and the idle timeout
    closes it.  The flood's name gets NXDOMAIN from the proxy itself, so
    answers are ready as fast as queries are read."""
    scenario = tmp_path / "flood.yaml"
    scenario.write_text("name: flood\nphases:\n  - name: p\n    duration: 1h\n    rules:\n"
                        "      - {match: {name: flood.example.test}, fault: nxdomain}\n")
    proxy = start_proxy("--scenario", str(scenario), config=_config(idle=3.0),
                        upstreams=[unbound])
    query = make_query("flood.example.test.", "A").to_wire()
    chunk = (struct.pack("!H", len(query)) + query) * 200
    # Kernel buffers on loopback can hold tens of MB (tcp_rmem up to 32 MiB
    # here); a proxy that keeps reading takes 1-2 MB/s on top of that.
    max_bytes = 10 * (1 << 20) * 40
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # answers pile up at the proxy
    sock.connect((proxy.host, proxy.port))
    try:
        sent, stopped = _send_until_refused(sock, chunk, max_bytes, refused_for=1.0, limit=60)
        assert stopped, f"the proxy kept reading: {sent} bytes of queries taken"
        assert proxy.metric("dnschaos_tcp_reads_paused_total") >= 1
        taken = proxy.metric("dnschaos_queries_total", transport="tcp")
        time.sleep(1.0)
        assert proxy.metric("dnschaos_queries_total", transport="tcp") == taken  # not reading
        assert _serves(proxy)  # everyone else is unaffected
        closed_before = proxy.metric("dnschaos_tcp_connections_closed_total", reason="idle")
        deadline = time.monotonic() + 3.0 + 3.0
        while time.monotonic() < deadline and proxy.metric(
                "dnschaos_tcp_connections_closed_total", reason="idle") == closed_before:
            time.sleep(0.2)
        assert proxy.metric("dnschaos_tcp_connections_closed_total", reason="idle") > closed_before
    finally:
        sock.close()
