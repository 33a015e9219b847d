"""The DNS listeners of one process (UDP and TCP on every --listen address):
started and drained here, for the single process (proxy/server.py) and for
each worker process (proxy/workers/child.py) alike.

Also the check that an address is free (`probe_free`) and the sockets the
main process binds for its workers (`reuse_socket`)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import struct
from functools import partial

from proxy.config import DNS_PORT, format_hostport, split_hostport
from proxy.errors import ListenError
from proxy.forwarder import Forwarder
from proxy.frontends import TcpConnection, UdpFrontend, udp_listener_socket


class Listeners:
    """UDP and TCP listeners feeding one forwarder."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.addresses: list[str] = []
        """The listen addresses with their real ports, once bound."""
        self.connections: set[TcpConnection] = set()
        self._udp: list[asyncio.DatagramTransport] = []
        self._frontends: list[UdpFrontend] = []
        self._tcp: list[asyncio.AbstractServer] = []

    async def start(self, listen: list[str], *, bound: list[socket.socket] | None = None,
                    reuse_port: bool = False) -> list[str]:
        """Bind every address, TCP first so that a port 0 picks a free port that
        UDP then shares.  Without `reuse_port` (one process) a port another
        program holds is refused; with it (a restarted worker) the ports are
        concrete and shared with the other workers.  `bound` (a worker at
        start): the sockets its main process bound for it, a TCP and a UDP one
        per address, in order.  Raises ListenError (AddressInUse) after closing
        what it had bound."""
        loop = asyncio.get_running_loop()
        for number, text in enumerate(listen):
            host, port = split_hostport(text, DNS_PORT)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            given = bound[2 * number:2 * number + 2] if bound is not None else None
            # The listener's text is known only once bound: the factory reads it from a cell.
            cell: list[str] = []
            proto = "tcp"
            try:
                factory = partial(self._tcp_connection, cell)
                tcp = await (loop.create_server(factory, sock=given[0]) if given else
                             loop.create_server(factory, host, port, family=family,
                                                reuse_address=True, reuse_port=reuse_port or None))
                self._tcp.append(tcp)
                port = tcp.sockets[0].getsockname()[1]
                address = format_hostport(host, port)
                cell.append(address)
                proto = "udp"
                accel = self.forwarder.accel
                if accel is not None:  # the C relay reads it (proxy/accel.py)
                    if given:
                        given[1].setblocking(False)
                    accel.listen(given[1] if given else
                                 udp_listener_socket(host, port, family, reuse_port), address)
                else:
                    udp_factory = partial(UdpFrontend, self.forwarder, address)
                    udp, frontend = await (
                        loop.create_datagram_endpoint(udp_factory, sock=given[1]) if given
                        else loop.create_datagram_endpoint(udp_factory, local_addr=(host, port),
                                                           family=family,
                                                           reuse_port=reuse_port or None))
                    self._udp.append(udp)
                    self._frontends.append(frontend)
            except OSError as exc:
                self.close()
                raise ListenError.from_os_error(text, proto, exc, "--listen") from None
            self.addresses.append(address)
        return self.addresses

    def _tcp_connection(self, cell: list[str]) -> TcpConnection:
        return TcpConnection(self.forwarder, cell[0], self.connections)

    async def drain(self, limit: float) -> None:
        """Stop taking queries and wait up to `limit` seconds for the ones in
        flight to be answered (the UDP sockets stay open for their answers)."""
        for frontend in self._frontends:
            frontend.handle = _ignore  # type: ignore[method-assign,assignment]
        if self.forwarder.accel is not None:
            self.forwarder.accel.stop_listening()
        for tcp in self._tcp:
            tcp.close()
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while self.forwarder.inflight > 0 and loop.time() < end:
            await asyncio.sleep(0.02)

    def close(self) -> None:
        if self.forwarder.accel is not None:
            self.forwarder.accel.close_listeners()
        for udp in self._udp:
            udp.close()
        for tcp in self._tcp:
            tcp.close()
        for connection in list(self.connections):
            connection.close()
        self._udp.clear()
        self._tcp.clear()


def _ignore(*args: object) -> None:
    pass


def probe_free(text: str, default_port: int, protocols: tuple[str, ...],
               flag: str) -> tuple[str, int]:
    """(host, port) of the address `text` after checking that nobody holds it
    for any of `protocols` ("tcp", "udp"): each is bound without SO_REUSEPORT
    (TCP with SO_REUSEADDR, so connections in TIME_WAIT do not count), then
    closed.  A port 0 becomes a number free for all of them.  Raises
    AddressInUse (or ListenError) naming the address, the protocol and `flag`."""
    host, port = split_hostport(text, default_port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    proto = protocols[0]
    for _ in range(50 if port == 0 else 1):
        number, held = port, []
        try:
            for proto in protocols:
                sock = socket.socket(family, socket.SOCK_STREAM if proto == "tcp"
                                     else socket.SOCK_DGRAM)
                held.append(sock)
                if proto == "tcp":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, number))
                number = sock.getsockname()[1]
            return host, number
        except OSError as exc:
            if port == 0 and exc.errno == errno.EADDRINUSE:
                continue  # the number picked for TCP is taken for UDP: another one
            raise ListenError.from_os_error(text, proto, exc, flag) from None
        finally:
            for sock in held:
                sock.close()
    raise ListenError(f"cannot listen on {text}: no port free for {' and '.join(protocols)}")


SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)  # Linux


def spread_queries(sock: socket.socket, count: int) -> bool:
    """Have the kernel give each datagram for this socket's port to one of the
    `count` sockets of its SO_REUSEPORT group picked at random, rather than
    by a hash of the client's address and port: a few clients (a downstream
    resolver with a handful of ports, a load generator) then still spread
    evenly over the workers.  A classic BPF program, attached to the group:
    `A = random; A %= count; return A` (an index past the group's sockets, as
    while a worker restarts, falls back to the hash).  False where the
    kernel refuses it (not Linux): the hash stays."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in (
        (0x20, 0, 0, 0xFFFFF000 + 56),  # BPF_LD|BPF_W|BPF_ABS, SKF_AD_OFF + SKF_AD_RANDOM
        (0x94, 0, 0, count),             # BPF_ALU|BPF_MOD|BPF_K
        (0x16, 0, 0, 0),                 # BPF_RET|BPF_A
    ))
    program = ctypes.create_string_buffer(code)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                        struct.pack("@HP", 3, ctypes.addressof(program)))
    except OSError:
        return False
    return True


def reuse_socket(family: int, kind: int) -> socket.socket:
    """A socket with SO_REUSEPORT (IPv6 only for AF_INET6), not yet bound."""
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock
