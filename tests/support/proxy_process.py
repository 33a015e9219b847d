"""The proxy as a subprocess: `python -m proxy run` on free ports.

    proxy = launcher.start("--policy", "round_robin", upstreams=[unbound, fake])
    proxy.host, proxy.port, proxy.admin_url, proxy.pid, proxy.stderr_text()
    proxy.metric("dnschaos_upstream_requests_total", upstream=fake.hostport)
    proxy.health() -> (http status, json body)

Use the `start_proxy` / `start_module_proxy` fixtures of tests/conftest.py
rather than ProxyLauncher directly: they stop every proxy at teardown.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import dns.exception
import yaml
from prometheus_client.parser import text_string_to_metric_families

from support.dnsutil import udp_raw
from support.net import Endpoint, free_port, hostport
from support.procs import stop_process

REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count()
_NO_QUESTION = b"\x12\x34\x01\x00" + b"\x00" * 8


def upstream_text(upstream: Any) -> str:
    """'h:p' from a str, an (host, port) tuple, or anything with .hostport
    (Unbound, FakeUpstream, ProxyProcess)."""
    if isinstance(upstream, str):
        return upstream
    if isinstance(upstream, tuple):
        return hostport(*upstream)
    return upstream.hostport


class ProxyStartError(RuntimeError):
    pass


class ProxyProcess(Endpoint):
    """A running proxy.  host/port: its DNS listener (UDP and TCP);
    admin_url: 'http://127.0.0.1:PORT' or None when started with admin=False."""

    def __init__(self, proc: subprocess.Popen, argv: list[str], host: str, port: int,
                 admin: tuple[str, int] | None, stderr_path: Path) -> None:
        self.proc = proc
        self.argv = argv
        self.host = host
        self.port = port
        self.admin = admin
        self.stderr_path = stderr_path
        self.returncode: int | None = None

    # -- addresses
    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def admin_url(self) -> str | None:
        if self.admin is None:
            return None
        host, port = self.admin
        # A wildcard listener (0.0.0.0) is reached through loopback.
        return f"http://{hostport('127.0.0.1' if host == '0.0.0.0' else host, port)}"

    # -- process
    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM by PID, SIGKILL after `timeout`; the exit status."""
        if self.returncode is None:
            self.returncode = stop_process(self.proc, timeout)
        return self.returncode

    # -- admin endpoint
    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str, dict[str, str]]:
        """GET on the admin listener: (status, body, headers)."""
        assert self.admin_url, "proxy started without an admin listener"
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(), dict(err.headers)

    def health(self) -> tuple[int, dict]:
        status, body, _ = self.get("/health")
        return status, json.loads(body)

    def metrics_text(self) -> str:
        return self.get("/metrics")[1]

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample: {(name, frozenset(labels.items())): value}."""
        out = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """The sum of samples called `name` whose labels include `labels`
        (0.0 when none).  Counters take their '_total' name."""
        return sum(value for (n, lbls), value in self.metrics().items()
                   if n == name and set(labels.items()) <= lbls)

    def __repr__(self) -> str:
        return f"<ProxyProcess pid={self.pid} dns={self.hostport} admin={self.admin_url}>"


class ProxyLauncher:
    """Starts proxies and remembers them so stop_all() can stop them."""

    def __init__(self, workdir: Path, default_upstreams: Callable[[], list[Any]]) -> None:
        self.workdir = Path(workdir)
        self.default_upstreams = default_upstreams
        self.started: list[ProxyProcess] = []

    def start(self, *extra_args: str, upstreams: Iterable[Any] | None = None,
              config: dict | str | Path | None = None, listen_host: str = "127.0.0.1",
              admin: bool = True, admin_host: str = "127.0.0.1", log_level: str = "info",
              ready_timeout: float = 15.0,
              wait: bool = True) -> ProxyProcess:
        """Start `python -m proxy run` on free ports.

        extra_args: more flags ('--policy', 'random', '--timeout', '0.3', ...).
        upstreams: each a 'h:p' string, (host, port) or object with .hostport;
          None: the session's unbound (unless `config` names upstreams);
          []: none given (the proxy falls back to /etc/resolv.conf).
        config: a YAML --config file, as a dict, YAML text or a path.
        listen_host: '127.0.0.1' or '::1'.
        admin: False gives '--admin off' (readiness is then checked with a query).
        admin_host: the admin listener's address; '0.0.0.0' (every interface, so
          not loopback) is reached through 127.0.0.1.
        wait: False returns at once, without waiting until it answers.
        """
        n = next(_counter)
        args: list[str] = []
        config_has_upstreams = False
        if config is not None:
            if isinstance(config, Path):
                path = config
                config_has_upstreams = "upstreams" in (yaml.safe_load(path.read_text()) or {})
            else:
                path = self.workdir / f"proxy{n}.yaml"
                text = config if isinstance(config, str) else yaml.safe_dump(config)
                path.write_text(text)
                config_has_upstreams = "upstreams" in (yaml.safe_load(text) or {})
            args += ["--config", str(path)]
        if upstreams is None and not config_has_upstreams:
            upstreams = self.default_upstreams()
        for upstream in upstreams or ():
            args += ["--upstream", upstream_text(upstream)]
        args += ["--log-level", log_level, *extra_args]

        last = ""
        for attempt in range(3):  # a port can be taken between free_port() and the bind
            port = free_port(listen_host)
            admin_addr = (admin_host, free_port("127.0.0.1")) if admin else None
            argv = [sys.executable, "-m", "proxy", "run",
                    "--listen", hostport(listen_host, port),
                    "--admin", hostport(*admin_addr) if admin_addr else "off", *args]
            stderr_path = self.workdir / f"proxy{n}.{attempt}.stderr"
            with open(stderr_path, "wb") as err:
                proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL,
                                        stdout=err, stderr=subprocess.STDOUT)
            proxy = ProxyProcess(proc, argv, listen_host, port, admin_addr, stderr_path)
            self.started.append(proxy)
            if not wait:
                return proxy
            if self._wait_ready(proxy, ready_timeout):
                return proxy
            proxy.stop()
            last = proxy.stderr_text()
            if "already in use" not in last.lower():
                break
        raise ProxyStartError(f"proxy did not start ({' '.join(argv)}):\n{last}")

    @staticmethod
    def _wait_ready(proxy: ProxyProcess, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not proxy.alive():
                return False
            try:
                if proxy.admin_url:
                    proxy.get("/health", timeout=0.5)  # 200 or 503: listening
                elif udp_raw(_NO_QUESTION, proxy.host, proxy.port, timeout=0.2) is None:
                    continue  # a header without a question: FORMERR at once, no upstream
                return True
            except (OSError, urllib.error.URLError, dns.exception.DNSException):
                time.sleep(0.03)
        return False

    def stop_all(self) -> None:
        for proxy in self.started:
            proxy.stop()
        self.started.clear()
