#!/usr/bin/env python3
"""The client behaviour matrix (issue 14): what real client stacks and
downstream resolvers show for each fault of the library.

A real upstream (unbound serving the signed test zone, tests/support), the
proxy on 127.0.0.X:53, and, between some clients and the proxy, real
caching resolvers on their own 127.0.0.Y:53 (glibc and musl speak only port
53).  Clients that read /etc/resolv.conf run in a private mount namespace
(`unshare -m`) with a resolv.conf bind-mounted over it:
`nameserver 127.0.0.X / options timeout:1 attempts:2`.

Per (row, fault), with a name of its own (hostN.example.test.):
  1. warm-up: one lookup without the fault (a resolver row caches it with a
     1 s TTL, given by a `ttl` rule, then waits until it has expired, so
     serve-stale has something to serve);
  2. the fault as an ad hoc rule (API); one lookup: what the application
     got (addresses, or the error as its stack names it), its time, and the
     queries the rule saw (dnschaos_rule_matches_total);
  3. the rule removed; a lookup every 0.5 s until the real address comes
     back (at most RECOVERY_BOUND s): the recovery time.
Each client is one process per cell reading names on stdin, so an
in-process cache (Java's) carries from the warm-up to the fault and after.

Rows run in parallel threads; the whole run has a deadline (--budget, at
most 20 min): cells not reached are marked skipped.

    python3 bench/matrix.py            # full run, writes docs/client-behaviour.*
    python3 bench/matrix.py --rows glibc,unbound-serve-expired --faults nxdomain,drop --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "matrix"
sys.path.insert(0, str(REPO / "tests"))

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402

from support import zone  # noqa: E402
from support.faults_support import ede_of, loopback_with_free_port  # noqa: E402
from support.net import all_free  # noqa: E402
from support.procs import stop_process  # noqa: E402
from support.proxy_process import ProxyLauncher  # noqa: E402
from support.unbound import Unbound  # noqa: E402

TOKEN = "matrix-token-0123456789"
RESOLV_OPTIONS = "timeout:1 attempts:2"
RECOVERY_BOUND = 15.0
POLL = 0.5
CACHE_WAIT = 5.5  # the warm-up's 1 s TTL expired
# Knot Resolver keeps at least 5 s (cache.min_ttl); at 5.5 s some cells were
# still answered from its cache (0 queries), so it gets more.
KRESD_WAIT = 7.5
LOOKUP_BOUND = 20.0  # a client that says nothing for this long counts as hung

# The faults, as ad hoc rules (defaults of the library, except where a
# default would need a warm-up the cell does not have).
FAULTS: dict[str, Any] = {
    "nxdomain": "nxdomain",
    "nodata": "nodata",
    "servfail": "servfail",
    "refused": "refused",
    "drop": "drop",
    "delay": {"type": "delay", "delay": "2s"},
    "truncate": "truncate",
    "spoof": {"type": "spoof", "a": "192.0.2.66"},
    "stale": {"type": "stale", "source": "last"},
    "partial": {"type": "partial", "share": 0.5, "empty": 1.0},
    "ttl": {"type": "ttl", "set": 0},
    "corrupt": {"type": "corrupt", "mode": "wrong_id"},
    # DNSSEC: they act on DO queries only (stubs do not set DO: no effect).
    "bogus_signature": {"type": "dnssec", "break": "bogus_signature"},
    "expired_signature": {"type": "dnssec", "break": "expired_signature"},
    "strip_signatures": {"type": "dnssec", "break": "strip_signatures"},
    "bad_denial": {"type": "dnssec", "break": "bad_denial"},
}
# Faults on a negative answer: the cell asks a name that does not exist
# (nosuchN.example.test.), so its real answer is NXDOMAIN, not an address.
NEGATIVE = {"bad_denial"}
FAULT_NOTES = {
    "spoof": "A 192.0.2.66 (no AAAA)",
    "stale": "source: last (the warm-up's answer, served again)",
    "partial": "empty: 1.0 (the AWS 2025 empty NOERROR answer)",
    "ttl": "set: 0",
    "corrupt": "mode: wrong_id",
    "delay": "2 s",
    "bogus_signature": "the A answer's RRSIG damaged",
    "expired_signature": "the RRSIG's validity window moved a week into the past",
    "strip_signatures": "the RRSIGs and the denial's NSEC records removed",
    "bad_denial": "on a name that does not exist: the real answer is NXDOMAIN; "
                  "the NSEC records' signatures damaged",
}


# --- outcome classes (the heat map's colours) ------------------------------------

NOT_FOUND = {"EAI_NONAME", "EAI_NODATA", "ENOTFOUND", "ENODATA", "NXDOMAIN", "NoAnswer",
             "CURLE_COULDNT_RESOLVE_HOST"}
CLASSES = {  # class: (colour, legend)
    "real": ("#2e7d32", "the real answer (the address; NXDOMAIN for bad_denial)"),
    "other": ("#6a1b9a", "another address (spoofed, stale or cached)"),
    "notfound": ("#c62828", "error: not found (permanent)"),
    "temporary": ("#ef6c00", "error: temporary failure / timeout"),
    "error": ("#795548", "error (stack does not say which)"),
    "skipped": ("#bdbdbd", "not measured"),
}


def outcome_class(result: dict[str, Any] | None, real: list[str]) -> str:
    if not result:
        return "skipped"
    if "addresses" in result:
        return "real" if sorted(result["addresses"]) == sorted(real) else "other"
    err = str(result.get("error", ""))
    if err in NOT_FOUND or "IsNotFound" in err:
        return "notfound"
    if err in {"UnknownHostException"}:
        return "error"
    return "temporary"


def outcome_text(result: dict[str, Any] | None) -> str:
    if not result:
        return "skipped"
    if "addresses" in result:
        return ", ".join(result["addresses"]) or "(no addresses)"
    return str(result["error"])


# --- the proxy and the upstream ---------------------------------------------------


class Proxy:
    def __init__(self, workdir: Path) -> None:
        (workdir / "upstream").mkdir()
        # The parent zone too, so a validating resolver checks the chain from
        # the parent's DS (its trust anchor) down.
        self.upstream = Unbound(workdir / "upstream", parent=True,
                                hosts=len(ROW_ORDER) * len(FAULTS)).start()
        self.launcher = ProxyLauncher(workdir, lambda: [self.upstream])
        self.host = loopback_with_free_port(53)
        self.proc = self.launcher.start("--listen", f"{self.host}:53", upstreams=[self.upstream],
                                        config={"admin_token": TOKEN}, log_level="warning")

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.proc.admin_url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def add_rule(self, name: str, qname: str, fault: Any) -> None:
        status, body = self.api("POST", "/api/rules", {"name": name, "match": {"name": qname},
                                                       "fault": fault, "duration": "5m"})
        if status != 201:
            raise RuntimeError(f"rule {name}: {status} {body}")
        self.wait_active(name)

    def wait_active(self, rule: str, timeout: float = 3.0) -> bool:
        """Until the engine counts the rule (a lookup sent before would miss it)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(n == "dnschaos_rule_matches_total" and ("rule", rule) in labels
                   for n, labels in self.proc.metrics()):
                return True
            time.sleep(0.05)
        return False

    def remove_rule(self, name: str) -> None:
        self.api("DELETE", f"/api/rules/{name}")

    def matched(self, rule: str) -> int:
        return int(self.proc.metric("dnschaos_rule_matches_total", rule=rule))

    def version(self) -> str:
        out = subprocess.run([sys.executable, "-m", "proxy", "--version"], cwd=REPO,
                             capture_output=True, text=True)
        return (out.stdout or out.stderr).strip()

    def stop(self) -> None:
        self.launcher.stop_all()
        self.upstream.stop()


# --- downstream resolvers ---------------------------------------------------------


def _wait_answers(host: str, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    query = dns.message.make_query(zone.host_name(199), "A")
    while time.monotonic() < end:
        try:
            reply = dns.query.udp(query, host, port=53, timeout=0.5)
            if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                return True
        except Exception:  # not listening yet
            pass
        time.sleep(0.2)
    return False


@dataclass
class Resolver:
    key: str
    title: str
    version_cmd: list[str]
    config: Callable[[Path, str, str, str], list[str]]  # (dir, host, proxy, anchor) -> argv
    host: str = ""
    proc: subprocess.Popen | None = None
    # named listens only on the addresses of interfaces (lo has 127.0.0.1
    # only), not on any 127.0.0.X: it needs 127.0.0.1:53 free.
    only_host: str = ""
    validating: bool = False  # trusts the upstream's parent zone (test.) DS
    cache_wait: float = CACHE_WAIT

    def start(self, workdir: Path, proxy_host: str, taken: list[str], anchor: str) -> None:
        directory = workdir / self.key
        directory.mkdir()
        if self.only_host:
            if self.only_host in taken or not all_free((self.only_host,), 53):
                raise RuntimeError(f"{self.only_host}:53 is taken")
            self.host = self.only_host
        else:
            self.host = loopback_with_free_port(53, first=120, skip=taken)
        argv = self.config(directory, self.host, proxy_host, anchor)
        log = open(directory / "log", "wb")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=directory)
        if not _wait_answers(self.host):
            self.stop()
            raise RuntimeError(f"{self.key} did not answer:\n"
                               + (directory / "log").read_text(errors="replace")[-2000:])

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def _ds(anchor: str) -> tuple[str, str]:
    """The owner and the rdata of a DS record's text."""
    fields = anchor.split()
    return fields[0], " ".join(fields[fields.index("DS") + 1:])


def _unbound(serve_expired: bool, validating: bool = False
             ) -> Callable[[Path, str, str, str], list[str]]:
    def config(d: Path, host: str, proxy: str, anchor: str) -> list[str]:
        validator = ('    module-config: "validator iterator"\n'
                     f'    trust-anchor: "{" ".join(anchor.split())}"\n'
                     "    ede: yes\n    val-log-level: 2\n    aggressive-nsec: no\n"
                     if validating else '    module-config: "iterator"\n')
        (d / "unbound.conf").write_text(f"""\
server:
    interface: {host}@53
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    num-threads: 1
{validator}    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    qname-minimisation: no
    serve-expired: {"yes" if serve_expired else "no"}
    local-zone: "test." nodefault
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: {proxy}@53
""")
        return ["unbound", "-d", "-c", str(d / "unbound.conf")]
    return config


def _bind(d: Path, host: str, proxy: str, anchor: str) -> list[str]:
    (d / "named.conf").write_text(f"""\
options {{
    directory "{d}";
    pid-file "{d}/named.pid";
    session-keyfile "{d}/session.key";
    listen-on port 53 {{ {host}; }};
    listen-on-v6 {{ none; }};
    recursion yes;
    allow-query {{ any; }};
    forwarders {{ {proxy} port 53; }};
    forward only;
    dnssec-validation no;
    stale-answer-enable yes;
    stale-cache-enable yes;
}};
controls {{ }};
""")
    return ["named", "-g", "-4", "-c", str(d / "named.conf")]


def _kresd(validating: bool) -> Callable[[Path, str, str, str], list[str]]:
    def config(d: Path, host: str, proxy: str, anchor: str) -> list[str]:
        # STUB does not validate, FORWARD does (from the anchor down).
        mode = "FORWARD" if validating else "STUB"
        ta = f"trust_anchors.add('{' '.join(anchor.split())}')\n" if validating else ""
        (d / "kresd.conf").write_text(f"""\
net.listen('{host}', 53, {{ kind = 'dns' }})
trust_anchors.remove('.')
{ta}policy.add(policy.all(policy.{mode}({{'{proxy}@53'}})))
cache.size = 10 * MB
""")
        return ["kresd", "-n", "-q", "-c", str(d / "kresd.conf"), str(d)]
    return config


def _pdns(validating: bool) -> Callable[[Path, str, str, str], list[str]]:
    def config(d: Path, host: str, proxy: str, anchor: str) -> list[str]:
        dnssec = ["--dnssec=off"]
        if validating:
            owner, rdata = _ds(anchor)
            (d / "ta.lua").write_text(f"clearTA('.')\naddTA('{owner}', '{rdata}')\n")
            dnssec = ["--dnssec=validate", f"--lua-config-file={d / 'ta.lua'}",
                      "--extended-resolution-errors=yes"]
        return _pdns_argv(d, host, proxy, dnssec)
    return config


def _pdns_argv(d: Path, host: str, proxy: str, dnssec: list[str]) -> list[str]:
    return ["pdns_recursor", "--daemon=no", f"--local-address={host}", "--local-port=53",
            f"--forward-zones-recurse=.={proxy}:53", "--dont-query=", *dnssec,
            f"--config-dir={d}", f"--socket-dir={d}", "--threads=1", "--disable-syslog",
            "--quiet=yes"]


def _dnsmasq(d: Path, host: str, proxy: str, anchor: str) -> list[str]:
    return ["dnsmasq", "-k", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--server={proxy}#53", f"--listen-address={host}", "--bind-interfaces",
            "--port=53", "--cache-size=1000", f"--pid-file={d}/dnsmasq.pid", "--user=root"]


RESOLVERS = {
    "unbound-serve-expired": Resolver("unbound-serve-expired", "unbound, serve-expired: yes",
                                      ["unbound", "-V"], _unbound(True)),
    "unbound": Resolver("unbound", "unbound, serve-expired: no", ["unbound", "-V"],
                        _unbound(False)),
    "bind9": Resolver("bind9", "BIND 9, stale-answer-enable yes", ["named", "-v"], _bind,
                      only_host="127.0.0.1"),
    "knot-resolver": Resolver("knot-resolver", "Knot Resolver (kresd), defaults",
                              ["kresd", "--version"], _kresd(False), cache_wait=KRESD_WAIT),
    "pdns-recursor": Resolver("pdns-recursor", "PowerDNS Recursor, defaults",
                              ["pdns_recursor", "--version"], _pdns(False)),
    "dnsmasq": Resolver("dnsmasq", "dnsmasq, defaults", ["dnsmasq", "--version"], _dnsmasq),
    # Validating, from the DS of the parent zone test. (the upstream serves it).
    "unbound-validating": Resolver("unbound-validating", "unbound, validating",
                                   ["unbound", "-V"], _unbound(False, validating=True),
                                   validating=True),
    "knot-resolver-validating": Resolver("knot-resolver-validating",
                                         "Knot Resolver (kresd), validating (FORWARD)",
                                         ["kresd", "--version"], _kresd(True), validating=True,
                                         cache_wait=KRESD_WAIT),
    "pdns-recursor-validating": Resolver("pdns-recursor-validating",
                                         "PowerDNS Recursor, --dnssec=validate",
                                         ["pdns_recursor", "--version"], _pdns(True),
                                         validating=True),
}


# --- client stacks ------------------------------------------------------------------

BUILD = Path(tempfile.gettempdir()) / "dnschaos-matrix-build"


def _fresh(target: Path, *sources: Path) -> bool:
    return target.exists() and all(target.stat().st_mtime >= s.stat().st_mtime for s in sources)


def build_clients(keys: set[str]) -> None:
    """Compile the clients the rows need into BUILD (cached by mtime)."""
    BUILD.mkdir(exist_ok=True)
    gai = HERE / "gai.c"
    jobs = []
    if "glibc" in keys and not _fresh(BUILD / "gai-glibc", gai):
        jobs.append(["gcc", "-O1", "-o", str(BUILD / "gai-glibc"), str(gai)])
    if "musl" in keys and not _fresh(BUILD / "gai-musl", gai):
        jobs.append(["musl-gcc", "-static", "-O1", "-o", str(BUILD / "gai-musl"), str(gai)])
    if keys & {"go-pure", "go-cgo"} and not _fresh(BUILD / "lookup-go", HERE / "lookup.go"):
        jobs.append(["go", "build", "-o", str(BUILD / "lookup-go"), str(HERE / "lookup.go")])
    if keys & {"java", "java-ttl0"} and not _fresh(BUILD / "Lookup.class", HERE / "Lookup.java"):
        jobs.append(["javac", "-d", str(BUILD), str(HERE / "Lookup.java")])
    env = dict(os.environ, GOCACHE=str(BUILD / "gocache"), GOPATH=str(BUILD / "gopath"),
               GOFLAGS="-mod=mod", GO111MODULE="off")
    for argv in jobs:
        subprocess.run(argv, check=True, env=env, cwd=BUILD, timeout=300)


def _resolv(workdir: Path, nameserver: str) -> Path:
    path = workdir / f"resolv-{nameserver}.conf"
    path.write_text(f"nameserver {nameserver}\noptions {RESOLV_OPTIONS}\n")
    return path


def in_namespace(resolv: Path, argv: list[str]) -> list[str]:
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
    return ["unshare", "-m", "sh", "-c", f"mount --bind {resolv} /etc/resolv.conf && exec {quoted}"]


CURL_CLIENT = r"""
import json, re, subprocess, sys, time
for line in sys.stdin:
    name = line.strip()
    t = time.monotonic()
    p = subprocess.run(["curl", "-sv", "-o", "/dev/null", "--connect-timeout", "0.05",
                        f"http://{name}:9/"], capture_output=True, text=True)
    out = {}
    found = re.findall(r"Trying (\S+?):9", p.stderr)
    if p.returncode == 6:
        out["error"] = "CURLE_COULDNT_RESOLVE_HOST"
    elif found:
        out["addresses"] = sorted(set(a.strip("[]") for a in found))
    else:
        out["error"] = f"curl exit {p.returncode}"
    out["elapsed_ms"] = round((time.monotonic() - t) * 1000, 1)
    print(json.dumps(out), flush=True)
"""


@dataclass(frozen=True)
class Stack:
    key: str
    title: str
    argv: Callable[[Path, str], list[str]]  # (workdir, nameserver) -> argv
    version: Callable[[], str]


def _out(argv: list[str], pattern: str = r".+") -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    found = re.search(pattern, p.stdout + p.stderr)
    return found.group(0).strip() if found else (p.stdout + p.stderr).strip()[:80]


def _dpkg(pkg: str) -> str:
    return f"{pkg} " + _out(["dpkg-query", "-W", "-f", "${Version}", pkg])


def _java(extra: list[str]) -> Callable[[Path, str], list[str]]:
    return lambda w, ns: in_namespace(_resolv(w, ns), ["java", *extra, "-cp", str(BUILD), "Lookup"])


STACKS = {
    "glibc": Stack("glibc", "glibc getaddrinfo",
                   lambda w, ns: in_namespace(_resolv(w, ns), [str(BUILD / "gai-glibc")]),
                   lambda: _dpkg("libc6")),
    "musl": Stack("musl", "musl getaddrinfo",
                  lambda w, ns: in_namespace(_resolv(w, ns), [str(BUILD / "gai-musl")]),
                  lambda: _dpkg("musl")),
    "java": Stack("java", "Java 17 InetAddress, defaults", _java([]),
                  lambda: _out(["java", "-version"], r'version "[^"]+"')),
    "java-ttl0": Stack("java-ttl0", "Java 17 InetAddress, cache ttl 0 (negative 10 s)",
                       _java(["-Dsun.net.inetaddr.ttl=0"]),
                       lambda: _out(["java", "-version"], r'version "[^"]+"')),
    "node-lookup": Stack("node-lookup", "Node dns.lookup",
                         lambda w, ns: in_namespace(_resolv(w, ns),
                                                    ["node", str(HERE / "lookup.js"), "lookup"]),
                         lambda: "node " + _out(["node", "--version"])),
    "node-resolver": Stack("node-resolver", "Node dns.Resolver (c-ares)",
                           lambda w, ns: ["node", str(HERE / "lookup.js"), "resolver", ns],
                           lambda: "node " + _out(["node", "--version"])
                           + ", c-ares " + _out(["node", "-p", "process.versions.ares"])),
    "go-pure": Stack("go-pure", "Go net, pure resolver",
                     lambda w, ns: in_namespace(_resolv(w, ns), [
                         "env", "GODEBUG=netdns=go", str(BUILD / "lookup-go")]),
                     lambda: _out(["go", "version"], r"go\d\S*")),
    "go-cgo": Stack("go-cgo", "Go net, cgo resolver",
                    lambda w, ns: in_namespace(_resolv(w, ns), [
                        "env", "GODEBUG=netdns=cgo", str(BUILD / "lookup-go")]),
                    lambda: _out(["go", "version"], r"go\d\S*")),
    "dnspython": Stack("dnspython", "dnspython stub resolver",
                       lambda w, ns: [sys.executable, str(HERE / "lookup_dnspython.py"), ns, "53"],
                       lambda: "dnspython " + _out([
                           sys.executable, "-c", "import dns.version;print(dns.version.version)"])),
    "curl": Stack("curl", "curl (its threaded getaddrinfo)",
                  lambda w, ns: in_namespace(_resolv(w, ns), [sys.executable, "-c", CURL_CLIENT]),
                  lambda: _out(["curl", "--version"], r"curl \S+")),
}
# The order fixes each row's names: row i, fault j asks host(i * len(FAULTS) + j).
ROW_ORDER = [*STACKS, *RESOLVERS]


# --- one client process --------------------------------------------------------------


class Client:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def ask(self, name: str) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], LOOKUP_BOUND)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            return {"error": "client hung or exited", "elapsed_ms": LOOKUP_BOUND * 1000}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        stop_process(self.proc, timeout=3)


# --- cells ------------------------------------------------------------------------


@dataclass
class Cell:
    row: str
    fault: str
    name: str
    warm: dict[str, Any] | None = None
    warm_retries: int = 0
    result: dict[str, Any] | None = None
    queries: int | None = None
    recovery_s: float | None = None  # None: not back within RECOVERY_BOUND
    recovery_polls: list[str] = field(default_factory=list)
    outcome: str = "skipped"
    note: str = ""
    # A validating resolver row: what it answered a DO query under the fault
    # (the rcode and the Extended DNS Errors that glibc does not show).
    validator_reply: str | None = None


def name_for(row: str, fault: str) -> str:
    i = ROW_ORDER.index(row) * len(FAULTS) + list(FAULTS).index(fault)
    return f"nosuch{i}.{zone.ORIGIN}" if fault in NEGATIVE else zone.host_name(i)


def cell_outcome(result: dict[str, Any] | None, real: list[str], negative: bool) -> str:
    """The outcome class; for a negative cell "not found" is the real answer."""
    cls = outcome_class(result, real)
    return "real" if negative and cls == "notfound" else cls


def validator_reply(host: str, name: str) -> str:
    """The rcode and EDEs a resolver gives a DO query for NAME (A)."""
    try:
        reply = dns.query.udp(dns.message.make_query(name, "A", want_dnssec=True), host,
                              port=53, timeout=3)
    except Exception as exc:  # a timeout is a result too
        return f"no reply ({type(exc).__name__})"
    text = dns.rcode.to_text(reply.rcode())
    for code, extra in ede_of(reply):
        text += f", EDE {code}" + (f" ({extra})" if extra else "")
    return text


def measure(proxy: Proxy, workdir: Path, row: str, fault: str, nameserver: str,
            cache_fill: bool) -> Cell:
    name = name_for(row, fault)
    bare = name.rstrip(".")
    negative = fault in NEGATIVE
    real = [] if negative else [zone.host_address(int(re.search(r"host(\d+)", name).group(1)))]
    cell = Cell(row, fault, name)
    stack = STACKS["glibc"] if row in RESOLVERS else STACKS[row]
    client = Client(stack.argv(workdir, nameserver))
    rule = f"m-{row}-{fault}"
    try:
        if cache_fill:  # a resolver caches the warm-up for 1 s only
            proxy.add_rule(rule + "-warm", name, {"type": "ttl", "set": 1})
        # The warm-up is a precondition, not a measurement: a lookup lost to a
        # load spike (the stacks' 1 s timeouts) is asked again, at most twice.
        for attempt in range(3):
            cell.warm = client.ask(bare)
            if sorted(cell.warm.get("addresses", [])) == real:
                break
            cell.warm_retries = attempt + 1
            time.sleep(POLL)
        if cache_fill:
            proxy.remove_rule(rule + "-warm")
            time.sleep(RESOLVERS[row].cache_wait)
        proxy.add_rule(rule, name, FAULTS[fault])
        cell.result = client.ask(bare)
        time.sleep(0.2)  # late retries still count
        cell.queries = proxy.matched(rule)
        if row in RESOLVERS and RESOLVERS[row].validating:
            cell.validator_reply = validator_reply(nameserver, name)
        proxy.remove_rule(rule)
        ended = time.monotonic()
        while True:
            got = client.ask(bare)
            cell.recovery_polls.append(outcome_text(got))
            if cell_outcome(got, real, negative) == "real":
                cell.recovery_s = round(time.monotonic() - ended, 1)
                break
            if time.monotonic() - ended > RECOVERY_BOUND:
                break
            time.sleep(POLL)
        cell.outcome = cell_outcome(cell.result, real, negative)
    finally:
        client.close()
        proxy.remove_rule(rule)
    return cell


# --- the run -------------------------------------------------------------------------


def run(rows: list[str], faults: list[str], budget: float, workdir: Path,
        progress: Callable[[str], None] = print,
        only: set[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Measure rows x faults (or only the (row, fault) cells in `only`)."""
    wanted = [(r, f) for r in rows for f in faults if only is None or (r, f) in only]
    started = time.monotonic()
    deadline = started + budget
    build_clients(set(rows) | ({"glibc"} if set(rows) & set(RESOLVERS) else set()))
    proxy = Proxy(workdir)
    resolvers: list[Resolver] = []
    cells: list[Cell] = []
    problems: dict[str, str] = {}
    lock = threading.Lock()
    try:
        taken: list[str] = [proxy.host]
        for key in rows:
            if key in RESOLVERS:
                res = RESOLVERS[key]
                try:
                    res.start(workdir, proxy.host, taken, proxy.upstream.trust_anchor)
                    taken.append(res.host)
                    resolvers.append(res)
                except (RuntimeError, OSError) as exc:
                    problems[key] = str(exc)[:300]
                    progress(f"[matrix] {key}: not started: {exc}")
        total = len(wanted)

        def work(row: str) -> None:
            if row in problems:
                return
            target = RESOLVERS[row].host if row in RESOLVERS else proxy.host
            for fault in faults:
                if (row, fault) not in wanted:
                    continue
                if time.monotonic() > deadline - 25:
                    with lock:
                        cells.append(Cell(row, fault, name_for(row, fault), note="deadline"))
                    continue
                try:
                    cell = measure(proxy, workdir, row, fault, target, row in RESOLVERS)
                except Exception as exc:  # one broken cell must not end the run
                    cell = Cell(row, fault, name_for(row, fault), note=f"error: {exc}")
                with lock:
                    cells.append(cell)
                    progress(f"[matrix {len(cells)}/{total} {time.monotonic() - started:5.0f}s] "
                             f"{row:22} {fault:9} -> {outcome_text(cell.result):32} "
                             f"q={cell.queries} rec={cell.recovery_s}")

        threads = [threading.Thread(target=work, args=(row,)) for row in rows]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        versions = {"dnschaos": proxy.version(),
                    "upstream": "unbound " + _out(["unbound", "-V"], r"Version \S+"),
                    "kernel": platform.release()}
        for key in rows:
            if key in STACKS:
                versions[key] = STACKS[key].version()
            else:
                versions[key] = _out(RESOLVERS[key].version_cmd,
                                     r"(\d+\.\d+[\w.~+-]*)")
    finally:
        for res in resolvers:
            res.stop()
        proxy.stop()
    order = {cell: i for i, cell in enumerate(wanted)}
    cells.sort(key=lambda c: order[(c.row, c.fault)])
    return {"rows": rows, "faults": faults, "cells": [asdict(c) for c in cells],
            "problems": problems, "versions": versions,
            "duration_s": round(time.monotonic() - started, 1),
            "resolv_options": RESOLV_OPTIONS, "recovery_bound_s": RECOVERY_BOUND,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# --- output ----------------------------------------------------------------------------


def row_title(key: str) -> str:
    return STACKS[key].title if key in STACKS else RESOLVERS[key].title + " (glibc client)"


def _cells(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["row"], c["fault"]): c for c in results["cells"]}


def _recovery(c: dict[str, Any] | None) -> str:
    if not c or c["result"] is None:
        return "-"
    return f"{c['recovery_s']} s" if c["recovery_s"] is not None else f"> {RECOVERY_BOUND:g} s"


def svg(results: dict[str, Any]) -> str:
    rows, faults, cells = results["rows"], results["faults"], _cells(results)
    left, top, w, h = 330, 70, 78, 34
    width = left + w * len(faults) + 20
    height = top + h * len(rows) + 40 + 22 * len(CLASSES)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           '<text x="10" y="22" font-size="16">dnschaos client behaviour: what the application '
           'got, and seconds until the real answer came back</text>']
    for j, fault in enumerate(faults):
        # The DNSSEC breaks are wider than a column: one word a line.
        words = fault.split("_")
        for k, word in enumerate(words):
            y = top - 10 - 14 * (len(words) - 1 - k)
            out.append(f'<text x="{left + j * w + w / 2}" y="{y}" text-anchor="middle">'
                       f'{word}</text>')
    for i, row in enumerate(rows):
        y = top + i * h
        out.append(f'<text x="{left - 8}" y="{y + h / 2 + 4}" text-anchor="end">'
                   f'{_esc(row_title(row))}</text>')
        for j, fault in enumerate(faults):
            c = cells.get((row, fault))
            cls = c["outcome"] if c else "skipped"
            x = left + j * w
            label = _short(c)
            out.append(f'<rect x="{x}" y="{y}" width="{w - 2}" height="{h - 2}" '
                       f'fill="{CLASSES[cls][0]}"><title>{_esc(row)} / {fault}: '
                       f'{_esc(outcome_text(c["result"]) if c else "skipped")}</title></rect>')
            out.append(f'<text x="{x + w / 2 - 1}" y="{y + 13}" text-anchor="middle" '
                       f'fill="white" font-size="10">{_esc(label)}</text>')
            out.append(f'<text x="{x + w / 2 - 1}" y="{y + 26}" text-anchor="middle" '
                       f'fill="white" font-size="10">{_esc(_recovery(c))}</text>')
    y = top + h * len(rows) + 20
    for k, (colour, legend) in enumerate(CLASSES.values()):
        out.append(f'<rect x="{left}" y="{y + 22 * k}" width="16" height="16" fill="{colour}"/>')
        out.append(f'<text x="{left + 24}" y="{y + 22 * k + 13}">{_esc(legend)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _short(c: dict[str, Any] | None) -> str:
    if not c or c["result"] is None:
        return "skipped"
    text = outcome_text(c["result"])
    text = text.replace("DNSError{", "").replace("}", "")
    return text[:13]


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def markdown(results: dict[str, Any], command: str) -> str:
    rows, faults, cells = results["rows"], results["faults"], _cells(results)
    lines = [
        "# Client behaviour: what each stack sees for each fault",
        "",
        "Generated by `bench/matrix.py` from a run on one machine; do not edit by hand.",
        f"Run: {results['date']}, {results['duration_s']} s. Command:",
        "",
        f"    {command}",
        "",
        "Every client asks the proxy (or a downstream resolver that forwards to it) "
        "for a name of its own; the upstream is unbound serving the signed test zone. "
        f"resolv.conf: `options {results['resolv_options']}`. Per cell: one lookup without "
        "the fault (a resolver row caches it with a 1 s TTL and waits for it to expire), "
        "then the fault as an ad hoc rule and one lookup (**result**, its **time**, and the "
        "**queries** the rule saw for it: retries and A/AAAA), then the rule removed and a "
        "lookup every 0.5 s until the real address comes back (**recovery**, bounded at "
        f"{results['recovery_bound_s']:g} s). The resolver rows are read through glibc.",
        "",
        "![heat map](client-behaviour.svg)",
        "",
        "Reading it: **queries 0** means the fault never reached the proxy: the client "
        "(Java's 30 s positive cache) or the resolver answered from its cache. A recovery "
        f"of `> {results['recovery_bound_s']:g} s` is usually a cached negative answer or a "
        "cached spoof (the fault's default TTLs: negative 60 s, spoof 300 s). `stale` "
        "with `source: last` answers A from the warm-up but AAAA, never seen, with its "
        "fallback SERVFAIL, and glibc turns that pair into EAI_AGAIN. `delay` is 2 s, "
        "longer than the 1 s timeout in resolv.conf.",
        "",
        "DNSSEC: the upstream serves the signed test zone and its signed parent `test.`; "
        "the validating rows trust the parent's DS, so they check the chain down to each "
        "answer. The dnssec faults act on DO queries only: the stubs and the non-validating "
        "resolvers do not ask with DO, or do not check, so for them the fault changes "
        "nothing (the real answer, usually). A validator turns damaged signatures into "
        "SERVFAIL (glibc: EAI_AGAIN), and so also every unsigned answer the proxy makes up "
        "(nxdomain, nodata, spoof, partial, ...) under the signed zone. A validator keeps "
        "a bogus answer for a while (unbound's val-bogus-ttl is 60 s), hence recoveries "
        f"beyond {results['recovery_bound_s']:g} s. `bad_denial` asks a name that does not "
        "exist: its real answer is NXDOMAIN (EAI_NONAME). `empty_dnskey` and `ds_mismatch` "
        "are not in the matrix: they act on the zone's DNSKEY / DS query, which a validator "
        "makes once and then caches (the e2e tests flush its key cache to see them).",
        "",
        "## Versions",
        "",
        "| part | version |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in results["versions"].items()),
        "",
        "## Faults",
        "",
        "| fault | rule |",
        "|---|---|",
        *(f"| <a id=\"fault-{f}\"></a>{f} | `{json.dumps(FAULTS[f])}`"
          f"{' - ' + FAULT_NOTES[f] if f in FAULT_NOTES else ''} |" for f in faults),
        "",
    ]
    if results["problems"]:
        lines += ["## Not measured", ""]
        lines += [f"- {k}: {v.splitlines()[0] if v else ''}"
                  for k, v in results["problems"].items()]
        lines.append("")
    replies = [c for c in results["cells"] if c.get("validator_reply")]
    if replies:
        lines += ["## What the validating resolvers answered",
                  "",
                  "A DO query for the cell's name, asked of the resolver under the fault "
                  "(right after the lookup above): its rcode and Extended DNS Errors "
                  "(RFC 8914), which glibc does not pass on.",
                  "", "| resolver | fault | reply |", "|---|---|---|"]
        lines += [f"| {row_title(c['row'])} | {c['fault']} | {c['validator_reply']} |"
                  for c in replies]
        lines.append("")
    lines += ["## By fault", ""]
    for fault in faults:
        lines += [f"### {fault}", "", "| stack | result | time | queries | recovery |",
                  "|---|---|---|---|---|"]
        for row in rows:
            c = cells.get((row, fault))
            lines.append(_table_row(row_title(row), c))
        lines.append("")
    lines += ["## By stack", ""]
    for row in rows:
        lines += [f"### {row_title(row)}", "", f"Version: {results['versions'].get(row, '?')}",
                  "", "| fault | result | time | queries | recovery |", "|---|---|---|---|---|"]
        for fault in faults:
            lines.append(_table_row(fault, cells.get((row, fault))))
        lines.append("")
    return "\n".join(lines)


def described(c: dict[str, Any]) -> str:
    """The result, saying whether an address is the real one."""
    text = outcome_text(c["result"])
    if c["outcome"] == "real":
        return f"real address ({text})"
    if c["outcome"] == "other":
        return f"other address: {text}"
    return text


def _table_row(label: str, c: dict[str, Any] | None) -> str:
    if not c or c["result"] is None:
        return f"| {label} | skipped {c['note'] if c else ''} | | | |"
    r = c["result"]
    return (f"| {label} | {described(c)} | {r.get('elapsed_ms', 0):.0f} ms | "
            f"{c['queries']} | {_recovery(c)} |")


COMMON = ["glibc", "java", "node-lookup", "unbound-serve-expired"]


def product_data(results: dict[str, Any]) -> dict[str, Any]:
    """The small table the run report reads (proxy/data/client_behaviour.json)."""
    cells = _cells(results)
    out: dict[str, Any] = {"generated": results["date"], "faults": {}}
    for fault in results["faults"]:
        row = {}
        for stack in COMMON:
            c = cells.get((stack, fault))
            if c and c["result"] is not None:
                row[row_title(stack)] = {"result": described(c),
                                         "recovery": _recovery(c)}
        out["faults"][fault] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROW_ORDER))
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--budget", type=float, default=1200.0, help="seconds, at most 1200")
    ap.add_argument("--no-write", action="store_true", help="print, do not write docs/")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    faults = [f for f in args.faults.split(",") if f]
    unknown = [r for r in rows if r not in ROW_ORDER] + [f for f in faults if f not in FAULTS]
    if unknown:
        ap.error(f"unknown rows/faults: {unknown}")
    with tempfile.TemporaryDirectory(prefix="dnschaos-matrix-") as tmp:
        results = run(rows, faults, min(args.budget, 1200.0), Path(tmp))
    command = "python3 bench/matrix.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    if args.no_write:
        print(json.dumps(results, indent=1))
        return 0
    docs = REPO / "docs"
    (docs / "client-behaviour.json").write_text(json.dumps(results, indent=1) + "\n")
    (docs / "client-behaviour.svg").write_text(svg(results))
    (docs / "client-behaviour.md").write_text(markdown(results, command) + "\n")
    data = REPO / "proxy" / "data"
    data.mkdir(exist_ok=True)
    (data / "client_behaviour.json").write_text(json.dumps(product_data(results), indent=1) + "\n")
    print(f"[matrix] done in {results['duration_s']} s: docs/client-behaviour.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
