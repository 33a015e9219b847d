"""Helpers for the end-to-end fault tests (tests/e2e/test_faults_e2e.py,
test_selectors_e2e.py, test_clients_e2e.py, test_incident_replay.py).

    path = write_scenario(tmp, {"name": "x", "phases": [...]})
    proxy = start_proxy("--scenario", str(path), "--allow", "127.0.0.0/8")
    reply = ask(proxy, "host1.example.test.", "A", source="127.0.0.2")
    assert_unaffected(proxy, unbound, "host1.example.test.", "AAAA")
    start = scenario_start(proxy)                  # epoch seconds, from its log
    bounds = phase_bounds(path, start)             # [(name, start, end), ...]
    injected(proxy, "rule-name")                   # dnschaos_faults_injected_total
    results = getaddrinfo_in_namespace("127.0.0.53", names, tmp)   # glibc, via unshare
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.rdatatype
import yaml

from support.dnsutil import assert_same_reply, make_query, tcp, udp
from support.net import all_free

# --- scenarios ----------------------------------------------------------------------


def write_scenario(directory: Path, scenario: dict | str, filename: str | None = None) -> Path:
    """Write a scenario (a dict or YAML text) into `directory`; its path."""
    text = scenario if isinstance(scenario, str) else yaml.safe_dump(scenario, sort_keys=False)
    name = filename or (yaml.safe_load(text)["name"] + ".yaml")
    path = Path(directory) / name
    path.write_text(text)
    return path


def rule(name: str, match: dict, fault: Any, **extra: Any) -> dict:
    return {"name": name, "match": match, "fault": fault, **extra}


# "... INFO dnschaos: scenario NAME started: ..." (older) or
# "... INFO dnschaos.gameday: run ID of scenario NAME started: ..." (runs manager).
_STARTED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO [\w.]+: "
                      r"(?:run \S+ of )?scenario (\S+) started", re.M)


def scenario_start(proxy: Any, timeout: float = 10.0) -> float:
    """When the proxy's scenario run started (epoch seconds): the timestamp of
    its '... scenario NAME started' log line (the run's clock starts right
    before that line is logged).  Needs --log-level info."""
    end = time.monotonic() + timeout
    while True:
        found = _STARTED.search(proxy.stderr_text())
        if found:
            return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if time.monotonic() > end or not proxy.alive():
            raise AssertionError("no 'scenario ... started' line in the proxy's log:\n"
                                 + proxy.stderr_text())
        time.sleep(0.005)


@dataclass(frozen=True)
class PhaseSpan:
    index: int
    name: str
    start: float
    end: float

    def contains(self, t: float, guard: float = 0.0) -> bool:
        return self.start + guard <= t < self.end - guard


def phase_bounds(path: Path | str, started: float,
                 time_scale: float | None = None) -> list[PhaseSpan]:
    """The wall-clock span of every phase of the scenario file at `path`,
    computed from the file (as the proxy's loader reads it) and `time_scale`
    (default: the file's own)."""
    from proxy.loader import load_scenario

    scenario = load_scenario(path)
    scale = scenario.time_scale if time_scale is None else time_scale
    spans = []
    offset = 0.0
    for index, phase in enumerate(scenario.phases):
        spans.append(PhaseSpan(index, phase.name, started + offset * scale,
                               started + (offset + phase.duration) * scale))
        offset += phase.duration
    return spans


def phase_at(spans: list[PhaseSpan], t: float, guard: float = 0.0) -> PhaseSpan | None:
    """The phase running at `t`, None before, after or within `guard` seconds of a boundary."""
    for span in spans:
        if span.contains(t, guard):
            return span
    return None


def sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


# --- queries ------------------------------------------------------------------------


def _addr(target: Any) -> tuple[str, int]:
    if isinstance(target, tuple):
        return target
    return target.host, target.port


def ask(target: Any, name: str, qtype: str | int = "A", *, transport: str = "udp",
        source: str | None = None, timeout: float = 2.0, **query_kw: Any) -> dns.message.Message:
    """One dnspython query to `target` (a proxy, unbound, fake upstream or (host, port))."""
    host, port = _addr(target)
    send = udp if transport == "udp" else tcp
    return send(make_query(name, qtype, **query_kw), host, port, timeout=timeout, source=source)


def timed_ask(target: Any, name: str, qtype: str | int = "A", **kw: Any
              ) -> tuple[dns.message.Message, float]:
    t = time.monotonic()
    reply = ask(target, name, qtype, **kw)
    return reply, time.monotonic() - t


def assert_unaffected(proxy: Any, upstream: Any, name: str, qtype: str | int = "A", *,
                      transport: str = "udp", source: str | None = None,
                      proxy_addr: tuple[str, int] | None = None,
                      **query_kw: Any) -> dns.message.Message:
    """The same query asked of the upstream directly and through the proxy
    gets the same reply (assert_same_reply: everything but the ID); the reply."""
    query = make_query(name, qtype, **query_kw)
    send = udp if transport == "udp" else tcp
    uhost, uport = _addr(upstream)
    phost, pport = proxy_addr or _addr(proxy)
    direct = send(query, uhost, uport, source=source)
    through = send(query, phost, pport, source=source)
    assert through.id == query.id
    assert_same_reply(through, direct, context=f"{name} {qtype} over {transport}"
                      + (f" from {source}" if source else ""))
    return through


def soa_of(message: dns.message.Message):
    """The SOA RRset of the authority section, or None."""
    for rrset in message.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return rrset
    return None


def ede_of(message: dns.message.Message) -> list[tuple[int, str]]:
    """Extended DNS Errors (RFC 8914) of a reply: [(code, text)]."""
    out = []
    for option in message.options:
        if option.otype == dns.edns.OptionType.EDE:
            out.append((int(option.code), option.text or ""))
    return out


def ttls(message: dns.message.Message, section: str = "answer") -> set[int]:
    return {rrset.ttl for rrset in getattr(message, section)}


# --- metrics ------------------------------------------------------------------------


def injected(proxy: Any, rule_name: str) -> float:
    """dnschaos_faults_injected_total for one rule."""
    return proxy.metric("dnschaos_faults_injected_total", rule=rule_name)


def matched(proxy: Any, rule_name: str) -> float:
    """dnschaos_rule_matches_total for one rule."""
    return proxy.metric("dnschaos_rule_matches_total", rule=rule_name)


# --- addresses ----------------------------------------------------------------------


def loopback_with_free_port(port: int = 53, first: int = 53, last: int = 250,
                            skip: Iterable[str] = ()) -> str:
    """A 127.0.0.X address on which `port` is free for UDP and TCP (port 53
    needs root).  Scans from 127.0.0.<first>, so concurrent test runs each find one."""
    skipped = set(skip)
    for x in range(first, last + 1):
        host = f"127.0.0.{x}"
        if host not in skipped and all_free((host,), port):
            return host
    raise RuntimeError(f"no 127.0.0.X address with port {port} free")


# --- the system resolver (glibc), in a private mount namespace ---------------------

_GAI_SCRIPT = r"""
import json, socket, sys, time
from concurrent.futures import ThreadPoolExecutor

def look(name):
    t = time.monotonic()
    try:
        found = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        out = {"ok": True, "addresses": sorted({x[4][0] for x in found})}
    except socket.gaierror as exc:
        out = {"ok": False, "errno": exc.errno, "error": exc.strerror}
    out["elapsed"] = time.monotonic() - t
    return name, out

names = json.loads(sys.argv[1])
with ThreadPoolExecutor(max(1, len(names))) as pool:
    print(json.dumps(dict(pool.map(look, names))))
"""


@dataclass
class Lookup:
    """One getaddrinfo() result: ok and addresses, or errno (socket.EAI_*) and error."""

    ok: bool
    elapsed: float
    addresses: list[str] | None = None
    errno: int | None = None
    error: str | None = None


def unshare_problem() -> str | None:
    """None when `unshare -m` with a bind mount works here, else why not."""
    if not shutil.which("unshare") or not shutil.which("mount"):
        return "unshare/mount not installed"
    try:
        proc = subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount --bind /etc/hostname /etc/hostname && true"],
            capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if proc.returncode != 0:
        return f"unshare -m not permitted: {proc.stderr.strip()}"
    return None


def resolv_conf(directory: Path, nameserver: str, options: str = "timeout:1 attempts:1") -> Path:
    path = Path(directory) / f"resolv-{nameserver}.conf"
    path.write_text(f"nameserver {nameserver}\noptions {options}\n")
    return path


def in_namespace(resolv: Path, command: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run a shell `command` in a private mount namespace whose
    /etc/resolv.conf is the file `resolv`."""
    script = f"mount --bind {resolv} /etc/resolv.conf && {command}"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          text=True, timeout=timeout)


def getaddrinfo_in_namespace(resolv: Path, names: list[str]) -> dict[str, Lookup]:
    """glibc getaddrinfo(name, AF_UNSPEC) for every name, in parallel, with
    `resolv` as /etc/resolv.conf."""
    quoted = json.dumps(names).replace("'", "'\\''")
    script = resolv.parent / "gai_lookup.py"
    script.write_text(_GAI_SCRIPT)
    proc = in_namespace(resolv, f"{sys.executable} {script} '{quoted}'")
    assert proc.returncode == 0, proc.stderr
    return {name: Lookup(**data) for name, data in json.loads(proc.stdout).items()}


def getent_in_namespace(resolv: Path, name: str) -> subprocess.CompletedProcess:
    """`getent ahosts NAME` with `resolv` as /etc/resolv.conf."""
    return in_namespace(resolv, f"getent ahosts {name}")
