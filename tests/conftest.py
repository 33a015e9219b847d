"""Fixtures shared by all tests (helpers live in tests/support/).

Session:
  unbound                -> support.unbound.Unbound: a real resolver on
                            127.0.0.1:PORT (and [::1]:PORT) serving the test
                            zone (support.zone), DNSSEC-signed if ldns is there.
Module:
  start_module_proxy     -> factory, like start_proxy, stopped at module end.
Function:
  start_proxy            -> factory: start_proxy(*extra_args, upstreams=None,
                            config=None, listen_host="127.0.0.1", admin=True,
                            log_level="info", wait=True) -> ProxyProcess
  fake_upstream          -> factory: fake_upstream(handler=None, **kw) -> a
                            started support.fake_upstream.FakeUpstream,
                            stopped at teardown.
Plain helpers: support.net.free_port(*hosts), support.dnsutil (make_query,
udp, tcp, TcpClient, dig, assert_same_reply, ...).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import support` from anywhere

from support.fake_upstream import FakeUpstream  # noqa: E402
from support.proxy_process import ProxyLauncher  # noqa: E402
from support.unbound import Unbound  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: end-to-end tests with real processes (unbound, dig, the proxy)")


@pytest.fixture(scope="session")
def unbound(tmp_path_factory: pytest.TempPathFactory) -> Unbound:
    if not shutil.which("unbound"):
        pytest.skip("unbound is not installed (run `make test`)")
    server = Unbound(tmp_path_factory.mktemp("unbound")).start()
    yield server
    server.stop()


def _launcher(request: pytest.FixtureRequest, tmp: Path) -> ProxyLauncher:
    return ProxyLauncher(tmp, lambda: [request.getfixturevalue("unbound")])


@pytest.fixture
def start_proxy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Factory: start a proxy (see ProxyLauncher.start); all are stopped at
    the end of the test."""
    launcher = _launcher(request, tmp_path_factory.mktemp("proxy"))
    yield launcher.start
    launcher.stop_all()


@pytest.fixture(scope="module")
def start_module_proxy(request: pytest.FixtureRequest,
                       tmp_path_factory: pytest.TempPathFactory):
    """Factory like start_proxy, for proxies shared by a module's tests."""
    launcher = _launcher(request, tmp_path_factory.mktemp("proxy"))
    yield launcher.start
    launcher.stop_all()


@pytest.fixture
def fake_upstream():
    """Factory: fake_upstream(handler=None, host="127.0.0.1", tcp=True,
    name="fake") -> a started FakeUpstream, stopped after the test."""
    fakes: list[FakeUpstream] = []

    def make(handler=None, **kwargs) -> FakeUpstream:
        fake = FakeUpstream(handler, **kwargs).start()
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.stop()
