"""Ports and addresses for tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(*hosts: str, attempts: int = 50) -> int:
    """A port free for both UDP and TCP on every host given (default
    127.0.0.1): found by binding port 0, then checking the other protocol
    (and other hosts) on the same number.  There is a small race between
    this check and the caller's bind; callers that start a process retry."""
    hosts = hosts or ("127.0.0.1",)
    for _ in range(attempts):
        with socket.socket(_family(hosts[0]), socket.SOCK_STREAM) as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        if all_free(hosts, port):
            return port
    raise RuntimeError(f"no port free for UDP and TCP on {hosts}")


def all_free(hosts: tuple[str, ...], port: int) -> bool:
    """Whether `port` binds for TCP and UDP on every host (TCP with
    SO_REUSEADDR, as the proxy binds it, so TIME_WAIT does not count)."""
    sockets = []
    try:
        for host in hosts:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                sock = socket.socket(_family(host), kind)
                sockets.append(sock)
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        for sock in sockets:
            sock.close()


def closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (UDP and TCP): a dead upstream.  Queries to
    it get ICMP port unreachable / connection refused."""
    return free_port(host)


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def hostport(host: str, port: int) -> str:
    """'127.0.0.1:53' / '[::1]:53', the form the proxy's flags take."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def poll(predicate: Callable[[], object], timeout: float = 5.0,
         interval: float = 0.02) -> object:
    """Call `predicate` until it returns something truthy; return that, or
    its last (falsy) value after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(interval)


def wait_until(predicate: Callable[[], object], timeout: float = 5.0,
               interval: float = 0.02, what: str = "condition") -> object:
    """`poll`, raising AssertionError when the predicate never came true."""
    value = poll(predicate, timeout, interval)
    if not value:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return value


class Endpoint:
    """Something listening on `host`:`port`, in the forms tests pass around."""

    host: str
    port: int

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def hostport(self) -> str:
        return hostport(self.host, self.port)
