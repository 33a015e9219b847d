"""The client side: TCP with several queries per connection, pipelined and
answered out of order (RFC 7766), the idle timeout, the client ACL, EDNS
options, malformed packets, IPv6, the upstream policies, /health, /metrics
and a clean stop."""

from __future__ import annotations

import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import pytest

from support import zone
from support.dnsutil import (
    TcpClient,
    addresses,
    assert_same_reply,
    cookie_option,
    dig,
    ecs_option,
    make_query,
    tcp,
    udp,
    udp_raw,
)
from support.fake_upstream import answer_a, delay_when, echo_options
from support.net import ipv6_loopback_available

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def proxy(start_module_proxy, unbound):
    return start_module_proxy(upstreams=[unbound])


# --- TCP -----------------------------------------------------------------------------


def test_tcp_several_queries_on_one_connection(proxy, unbound):
    queries = [make_query(zone.WWW, "A"), make_query(zone.WWW, "AAAA"),
               make_query(zone.CNAME_HEAD, "A"), make_query(zone.HUGE_TXT, "TXT"),
               make_query(zone.NXDOMAIN_NAME, "A", do=True)]
    with TcpClient(proxy.host, proxy.port) as conn:
        for query in queries:
            reply = conn.query(query)
            assert reply.id == query.id
            assert_same_reply(reply, tcp(query, unbound.host, unbound.port))


def test_tcp_pipelined_queries_all_answered(proxy):
    queries = [make_query(zone.host_name(i), "A", qid=1000 + i) for i in range(30)]
    with TcpClient(proxy.host, proxy.port) as conn:
        conn.send(*queries)  # in one write
        replies = {}
        for _ in queries:
            reply = conn.recv()
            assert reply is not None, "connection closed before all answers came"
            replies[reply.id] = reply
    assert sorted(replies) == [q.id for q in queries]
    for i, query in enumerate(queries):
        assert addresses(replies[query.id]) == {zone.host_address(i)}


def test_tcp_answers_out_of_order(start_proxy, fake_upstream):
    """The first query's answer is slow: the second's is written first on
    the same connection, without waiting (RFC 7766 section 6.2.1.1)."""
    fake = fake_upstream(delay_when(lambda got: got.qname.startswith("slow."), 0.6,
                                    answer_a("192.0.2.1")))
    proxy = start_proxy(upstreams=[fake])
    slow, fast = make_query("slow.example.", "A", qid=1), make_query("fast.example.", "A", qid=2)
    with TcpClient(proxy.host, proxy.port) as conn:
        start = time.monotonic()
        conn.send(slow, fast)
        first = conn.recv()
        second = conn.recv()
        second_at = time.monotonic() - start
    # The order alone says the fast answer did not wait for the slow one.
    assert (first.id, second.id) == (2, 1)
    assert first.question == fast.question and second.question == slow.question
    assert addresses(first) == addresses(second) == {"192.0.2.1"}
    assert second_at >= 0.5


@pytest.fixture(scope="module")
def idle_proxy(start_module_proxy):
    from support.fake_upstream import FakeUpstream

    fake = FakeUpstream(delay_when(lambda got: got.qname.startswith("slow."), 1.0,
                                   answer_a("192.0.2.1"))).start()
    yield start_module_proxy(upstreams=[fake], config={"tcp_idle_timeout": 0.5})
    fake.stop()


def test_tcp_idle_connection_is_closed(idle_proxy):
    with TcpClient(idle_proxy.host, idle_proxy.port) as conn:
        assert addresses(conn.query(make_query("a.example.", "A"))) == {"192.0.2.1"}
        start = time.monotonic()
        # Closed by the idle timer (0.5 s), not at once; the upper bound is
        # the 2 s wait (4x), which a loaded machine cannot miss.
        assert conn.is_closed_by_peer(timeout=2.0), "idle connection still open after 2 s"
        assert time.monotonic() - start > 0.3


def test_tcp_active_connection_is_kept(idle_proxy):
    with TcpClient(idle_proxy.host, idle_proxy.port) as conn:
        for i in range(5):  # 1.25 s in all, longer than the idle timeout
            assert addresses(conn.query(make_query(f"q{i}.example.", "A"))) == {"192.0.2.1"}
            time.sleep(0.25)


def test_tcp_connection_with_a_query_in_flight_is_not_idle(idle_proxy):
    with TcpClient(idle_proxy.host, idle_proxy.port) as conn:
        conn.send(make_query("slow.example.", "A"))  # answered after 1 s > idle timeout
        reply = conn.recv(timeout=3)
        assert reply is not None, "connection closed while the query was in flight"
        assert addresses(reply) == {"192.0.2.1"}


# --- ACL -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acl_proxy(start_module_proxy, unbound):
    return start_module_proxy("--allow", "127.0.0.2/32", upstreams=[unbound])


@pytest.mark.parametrize("send", [udp, tcp], ids=["udp", "tcp"])
def test_client_outside_allowed_networks_is_refused(acl_proxy, send):
    query = make_query(zone.WWW, "A")
    reply = send(query, acl_proxy.host, acl_proxy.port, source="127.0.0.1")
    assert reply.rcode() == dns.rcode.REFUSED
    assert reply.id == query.id and reply.question == query.question and not reply.answer
    assert acl_proxy.metric("dnschaos_refused_total") >= 1


@pytest.mark.parametrize("send", [udp, tcp], ids=["udp", "tcp"])
def test_client_inside_allowed_networks_is_answered(acl_proxy, unbound, send):
    query = make_query(zone.WWW, "A")
    reply = send(query, acl_proxy.host, acl_proxy.port, source="127.0.0.2")
    assert_same_reply(reply, send(query, unbound.host, unbound.port))


def test_default_acl_allows_loopback(proxy):
    reply = udp(make_query(zone.WWW, "A"), proxy.host, proxy.port, source="127.0.0.2")
    assert addresses(reply) == set(zone.WWW_A)


# --- EDNS options --------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo(start_module_proxy):
    """A proxy in front of a fake upstream that echoes EDNS options back."""
    from support.fake_upstream import FakeUpstream

    fake = FakeUpstream(echo_options("192.0.2.8")).start()
    yield start_module_proxy(upstreams=[fake]), fake
    fake.stop()


@pytest.mark.parametrize("send", [udp, tcp], ids=["udp", "tcp"])
def test_edns_options_pass_through_both_ways(echo, send):
    proxy, fake = echo
    fake.clear()
    options = [cookie_option(), ecs_option("198.51.100.0", 24),
               dns.edns.GenericOption(65001, b"opaque")]
    query = make_query("opts.example.", "A", do=True, payload=1400, options=options)
    reply = send(query, proxy.host, proxy.port)
    (seen,) = fake.received
    assert seen.message.options == query.options, "options changed on the way up"
    assert seen.message.payload == 1400 and seen.message.ednsflags & dns.flags.DO
    assert [o.to_wire() for o in reply.options] == [o.to_wire() for o in options]
    assert addresses(reply) == {"192.0.2.8"}


def test_dig_cookie_and_subnet_pass_through(echo):
    proxy, fake = echo
    fake.clear()
    result = dig("opts.example.", "A", "+cookie=0102030405060708", "+subnet=203.0.113.0/24",
                 server=proxy.host, port=proxy.port, cookie=True)
    assert result.status == "NOERROR"
    (seen,) = fake.received
    assert {type(o).__name__ for o in seen.message.options} >= {"CookieOption", "ECSOption"}
    joined = "\n".join(result.edns_options)
    assert "COOKIE: 0102030405060708" in joined and "CLIENT-SUBNET: 203.0.113.0/24" in joined


# --- malformed packets ---------------------------------------------------------------


def _header(qid=0x4242, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


QUESTION = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"
MALFORMED = {
    # name: (packet, expected rcode or None for "dropped")
    "short": (b"\x42\x42\x01\x00\x00", None),
    "qr-set": (_header(flags=0x8100) + QUESTION, None),
    "qdcount-2": (_header(qd=2) + QUESTION + QUESTION, dns.rcode.FORMERR),
    "qdcount-0": (_header(qd=0), dns.rcode.FORMERR),
    "opcode-notify": (_header(flags=dns.opcode.to_flags(dns.opcode.NOTIFY)) + QUESTION,
                      dns.rcode.NOTIMP),
    "opcode-update": (_header(flags=dns.opcode.to_flags(dns.opcode.UPDATE)) + QUESTION,
                      dns.rcode.NOTIMP),
    "label-past-end": (_header() + b"\x3fwww", dns.rcode.FORMERR),
    "question-cut": (_header() + QUESTION[:-2], dns.rcode.FORMERR),
    "compressed-qname": (_header() + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),
}


def _check_malformed_reply(wire: bytes | None, packet: bytes, rcode: int | None) -> None:
    if rcode is None:
        assert wire is None, f"expected no reply, got {wire!r}"
        return
    assert wire is not None, "no reply"
    assert wire[:2] == packet[:2], "ID not echoed"
    assert wire[2] & 0x80, "QR not set"
    assert wire[3] & 0x0F == rcode, f"rcode {wire[3] & 0x0F}, want {rcode}"
    assert (wire[2] & 0x78) == (packet[2] & 0x78), "opcode not echoed"


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_udp_packet(proxy, unbound, kind):
    packet, rcode = MALFORMED[kind]
    wire = udp_raw(packet, proxy.host, proxy.port, timeout=0.3)
    _check_malformed_reply(wire, packet, rcode)
    query = make_query(zone.WWW, "A")  # and the proxy still answers
    assert_same_reply(udp(query, proxy.host, proxy.port), udp(query, unbound.host, unbound.port))


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_tcp_message_then_good_query_on_same_connection(proxy, kind):
    packet, rcode = MALFORMED[kind]
    with TcpClient(proxy.host, proxy.port) as conn:
        conn.send(packet)
        if rcode is not None:
            _check_malformed_reply(conn.recv_wire(timeout=1), packet, rcode)
        query = make_query(zone.WWW, "A", qid=7)
        reply = conn.query(query)  # dropped ones leave no reply in between
        assert reply.id == 7 and addresses(reply) == set(zone.WWW_A)


def test_malformed_packets_are_counted(start_proxy, unbound):
    proxy = start_proxy(upstreams=[unbound])
    for kind, (packet, _) in MALFORMED.items():
        udp_raw(packet, proxy.host, proxy.port, timeout=0.3 if MALFORMED[kind][1] else 0.05)
    expected = {"formerr": 5, "notimp": 2, "dropped": 2}
    for reaction, count in expected.items():
        assert proxy.metric("dnschaos_malformed_queries_total", reaction=reaction) == count
    assert udp(make_query(zone.WWW, "A"), proxy.host, proxy.port).rcode() == dns.rcode.NOERROR


def test_truncated_tcp_length_prefix_does_not_hang_others(proxy):
    """A client that sends half a message does not block other clients."""
    with TcpClient(proxy.host, proxy.port) as stuck:
        stuck.sock.sendall(b"\x00\x40\x12")  # promises 64 bytes, sends 1
        reply = tcp(make_query(zone.WWW, "A"), proxy.host, proxy.port, timeout=1)
        assert addresses(reply) == set(zone.WWW_A)


# --- IPv6 ----------------------------------------------------------------------------


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")


@needs_ipv6
def test_ipv6_listener_and_upstream(start_proxy, unbound):
    if not unbound.ipv6:
        pytest.skip("unbound has no IPv6 listener")
    proxy = start_proxy(listen_host="::1", upstreams=[unbound.ipv6_hostport])
    assert proxy.host == "::1"
    for send in (udp, tcp):
        query = make_query(zone.CNAME_HEAD, "A", do=True)
        assert_same_reply(send(query, "::1", proxy.port),
                          send(query, unbound.host, unbound.port))
    result = dig(zone.WWW, "AAAA", "+tcp", server="::1", port=proxy.port)
    assert result.status == "NOERROR" and addresses(result.message) == set(zone.WWW_AAAA)
    status, health = proxy.health()
    assert status == 200 and health["upstreams"] == {unbound.ipv6_hostport: "up"}


@needs_ipv6
def test_ipv6_listener_with_ipv4_upstream(start_proxy, unbound):
    proxy = start_proxy(listen_host="::1", upstreams=[unbound])
    query = make_query(zone.WWW, "A")
    assert_same_reply(udp(query, "::1", proxy.port), udp(query, unbound.host, unbound.port))


# --- upstream policies ---------------------------------------------------------------


@pytest.mark.parametrize("policy", ["sequential", "round_robin", "random"])
def test_upstream_policy(start_proxy, fake_upstream, policy):
    fakes = [fake_upstream(answer_a(f"192.0.2.{i + 1}"), name=f"u{i}") for i in range(3)]
    proxy = start_proxy("--policy", policy, upstreams=fakes)
    n = 60
    seen = []
    for i in range(n):
        reply = udp(make_query(f"q{i}.example.", "A"), proxy.host, proxy.port)
        seen.append(addresses(reply).pop())
    requests = [proxy.metric("dnschaos_upstream_requests_total", upstream=f.hostport)
                for f in fakes]
    assert requests == [f.count() for f in fakes], "metrics disagree with what upstreams got"
    assert sum(requests) == n
    answered_by = [seen.count(f"192.0.2.{i + 1}") for i in range(3)]
    assert answered_by == requests
    if policy == "sequential":
        assert requests == [n, 0, 0]
    elif policy == "round_robin":
        assert requests == [n // 3] * 3
        assert seen[:6] in (["192.0.2.2", "192.0.2.3", "192.0.2.1"] * 2,
                            ["192.0.2.1", "192.0.2.2", "192.0.2.3"] * 2,
                            ["192.0.2.3", "192.0.2.1", "192.0.2.2"] * 2), "not in turn"
    else:  # random: each gets some, none gets all (P(failure) ~ 1e-4)
        assert all(5 <= r <= n - 10 for r in requests), requests


# --- admin: /health and /metrics ----------------------------------------------------


def test_health(proxy, unbound):
    status, health = proxy.health()
    assert status == 200
    assert health["status"] == "ok" and health["upstreams"] == {unbound.hostport: "up"}


def test_metrics_count_queries_and_answers(proxy, unbound):
    status, body, headers = proxy.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "dnschaos_build_info" in body
    before = proxy.metrics()

    def delta(name, **labels):
        now = proxy.metric(name, **labels)
        was = sum(v for (n, lbls), v in before.items()
                  if n == name and set(labels.items()) <= lbls)
        return now - was

    udp(make_query(zone.WWW, "A"), proxy.host, proxy.port)
    udp(make_query(zone.WWW, "AAAA"), proxy.host, proxy.port)
    tcp(make_query(zone.NXDOMAIN_NAME, "A"), proxy.host, proxy.port)
    assert delta("dnschaos_queries_total", transport="udp") == 2
    assert delta("dnschaos_queries_total", transport="tcp") == 1
    assert delta("dnschaos_answers_total") == 3
    assert delta("dnschaos_upstream_requests_total", upstream=unbound.hostport) == 3
    assert delta("dnschaos_upstream_replies_total", upstream=unbound.hostport) == 3
    assert delta("dnschaos_tcp_connections_total") == 1
    assert proxy.metric("dnschaos_upstream_up", upstream=unbound.hostport) == 1
    assert proxy.metric("dnschaos_inflight_queries") == 0


def test_unknown_admin_path_is_404(proxy):
    assert proxy.get("/nope")[0] == 404


def test_sigterm_stops_cleanly(start_proxy, unbound):
    proxy = start_proxy(upstreams=[unbound])
    assert udp(make_query(zone.WWW, "A"), proxy.host, proxy.port).rcode() == dns.rcode.NOERROR
    # stop() sends SIGKILL after 5 s: status 0 (not -9) says the proxy
    # exited on its own, on the SIGTERM, before that.
    assert proxy.stop() == 0, proxy.stderr_text()
    assert "Traceback" not in proxy.stderr_text()


def test_concurrent_clients_with_the_same_id(proxy):
    """Clients choose IDs independently: 40 clients using the same ID at the
    same time each get the answer to their own question."""
    import concurrent.futures

    def ask(i):
        return i, udp(make_query(zone.host_name(i), "A", qid=4242), proxy.host, proxy.port)

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(ask, range(40)))
    for i, reply in results:
        assert reply.id == 4242 and addresses(reply) == {zone.host_address(i)}
