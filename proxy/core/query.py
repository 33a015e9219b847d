"""What the engine sees of one query."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from proxy.core import wire

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(text: str) -> Address:
    """A client's address as the socket gives it ("10.1.2.3", "fe80::1%eth0",
    "::ffff:10.1.2.3"), without its zone and with an IPv4-mapped address as
    the IPv4 address it is (a dual-stack socket shows IPv4 clients so).
    ValueError when it is no address."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class QueryView(NamedTuple):
    """One client query, read from its bytes.  Built per query only when
    rules are loaded, so it is a cheap NamedTuple rather than a dataclass."""

    wire: bytes
    """The query exactly as the client sent it (client's own ID)."""
    qend: int
    """Offset just past the question section."""
    qname: str
    """Lower case, no trailing dot; "" for the root."""
    qtype: int
    """Numeric query type (1 = A, 28 = AAAA, ...)."""
    client: str
    """The client's IP address as text ("127.0.0.1", "::1")."""
    transport: str
    """"udp" or "tcp"."""
    listener: str
    """The local address the query arrived on, "host:port" ("[::1]:1053" for IPv6)."""

    @classmethod
    def parse(cls, data: bytes, client: str, transport: str, listener: str = "") -> QueryView:
        """Parse a query; raises proxy.errors.MalformedQuery."""
        qend = wire.question_end(data)
        return cls(data, qend, wire.qname_text(data, qend), wire.qtype_of(data, qend),
                   client, transport, listener)
