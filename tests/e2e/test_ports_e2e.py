"""A listen or admin address another program holds is refused: one line
naming the address, exit status 1, no traceback, and the other program keeps
all its queries.  With `--workers N` the workers bind with SO_REUSEPORT,
which the kernel lets join another program's SO_REUSEPORT socket (unbound's
default, `so-reuseport: yes`): the proxy checks first with a plain bind."""

from __future__ import annotations

import socket
import subprocess
import sys

import dns.rcode
import pytest

from support import zone
from support.dnsutil import make_query, udp
from support.proxy_process import REPO
from support.unbound import Unbound

pytestmark = pytest.mark.e2e
START_TIMEOUT = 60  # seconds for the proxy to exit; it exits at once when it refuses


@pytest.fixture(scope="module")
def shared_unbound(tmp_path_factory):
    """An unbound with `so-reuseport: yes`, as in a default installation."""
    server = Unbound(tmp_path_factory.mktemp("unbound-reuseport"), reuseport=True).start()
    yield server
    server.stop()


def run_proxy(listen: str, upstream, *extra: str, admin: str = "127.0.0.1:0"):
    """`dnschaos run` in the foreground; (exit status, stderr).  A proxy that
    starts (the bug) is stopped after START_TIMEOUT and the test fails."""
    argv = [sys.executable, "-m", "proxy", "run", "--listen", listen,
            "--upstream", upstream.hostport, "--admin", admin, *extra]
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"dnschaos started on {listen} though another program holds it:\n{err}")
    return proc.returncode, err


def assert_refused(status: int, err: str, address: str, proto: str, flag: str) -> None:
    line = (f"dnschaos: {address} ({proto}) is already in use by another program: "
            f"pick another {flag} port or stop that program")
    assert "Traceback" not in err, err
    assert status == 1, err
    assert err.splitlines().count(line) == 1, err
    assert sum(address in text for text in err.splitlines()) == 1, err


def unbound_answers_all(server: Unbound, count: int = 30) -> list[int]:
    """Queries from fresh sockets (so fresh source ports, which SO_REUSEPORT
    would spread over every socket in the group)."""
    return [udp(make_query(zone.WWW, "A"), server.host, server.port, timeout=2).rcode()
            for _ in range(count)]


@pytest.mark.parametrize("workers", [["--workers", "2"], []], ids=["workers", "single"])
def test_a_port_unbound_holds_is_refused(shared_unbound, unbound, workers):
    status, err = run_proxy(shared_unbound.hostport, unbound, *workers)
    assert_refused(status, err, shared_unbound.hostport, "tcp", "--listen")
    assert unbound_answers_all(shared_unbound) == [dns.rcode.NOERROR] * 30


@pytest.mark.parametrize("workers", [["--workers", "2"], []], ids=["workers", "single"])
def test_a_port_held_for_udp_only_is_refused(unbound, workers):
    """Another program with a SO_REUSEPORT UDP socket and no TCP one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % held.getsockname()[1]
        status, err = run_proxy(address, unbound, *workers)
    assert_refused(status, err, address, "udp", "--listen")


@pytest.mark.parametrize("workers", [["--workers", "2"], []], ids=["workers", "single"])
def test_an_admin_port_in_use_is_refused(shared_unbound, unbound, workers):
    status, err = run_proxy("127.0.0.1:0", unbound, *workers, admin=shared_unbound.hostport)
    assert_refused(status, err, shared_unbound.hostport, "tcp", "--admin")
    assert "worker 0" not in err  # refused before any worker was started
    assert unbound_answers_all(shared_unbound) == [dns.rcode.NOERROR] * 30


@pytest.mark.parametrize("workers", [["--workers", "2"], []], ids=["workers", "single"])
def test_a_free_port_is_taken(start_proxy, workers):
    """The not-applied case: nobody holds the port, the proxy starts and answers."""
    proxy = start_proxy(*workers)
    assert udp(make_query(zone.WWW, "A"), proxy.host, proxy.port, timeout=2).rcode() == \
        dns.rcode.NOERROR
    assert proxy.alive() and "already in use" not in proxy.stderr_text()
