#!/usr/bin/env python3
"""Throughput / latency benchmark: dnschaos vs dnsdist vs dnsmasq.

All contestants forward to the same NSD authoritative server (zone
``bench.test.``, 1,000 A records) and are measured one after another with
dnsperf.  Everything runs on loopback, on free ports, from a temp dir; every
process this script starts is stopped (by its own process group) in a
``finally`` block.

Layout: dnsperf is pinned to CPU 0, NSD and the contestant share CPU 1.

Per contestant:
  * warm-up (closed loop, results discarded);
  * closed-loop max QPS: ``dnsperf -c C -q Q -l DURATION``;
  * latency at a fixed rate: ``dnsperf -Q RATE -l DURATION -v``; p50/p99 are
    computed from the per-query lines (this works with every dnsperf 2.x;
    lost queries count as +inf, so a p99 that lands on a lost query is
    reported as "lost").

A change of dnschaos against an older version: `--baseline REV` adds the
contestant ``dnschaos@REV``, that revision of this repository (``git
archive`` into the temp dir) run by the same Python, measured in the same
rounds.

Run from the repo root:  python3 bench/run.py [--duration 10] [--only dnsdist,dnschaos]
Stdlib only.  Writes bench/results/latest.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
ZONE = "bench.test."
N_NAMES = 1000
N_AAAA = 10  # a few AAAA queries -> NODATA answers
APT_PACKAGES = ["nsd", "dnsperf", "dnsdist", "dnsmasq-base"]
# binary -> Debian package providing it
NEEDED_BINARIES = {
    "nsd": "nsd",
    "dnsperf": "dnsperf",
    "dnsdist": "dnsdist",
    "dnsmasq": "dnsmasq-base",
    "taskset": "util-linux",
}
ALL_CONTESTANTS = ["nsd-direct", "dnsdist", "dnsmasq", "dnschaos"]
OPTIONAL_CONTESTANTS = ["dnschaos-nodeps", "dnschaos-control", "dnschaos-w2", "dnschaos-python"]
"""Only with --only: dnschaos without its dependency map (--no-deps), to show
the map's cost; dnschaos following a shared control plane (--control, a
redis-server started here), to show that it costs nothing per query;
dnschaos with two worker processes (--workers 2), beside one; dnschaos with
its compiled relay turned off (DNSCHAOS_ACCEL=0), the pure-Python path."""
SUITE = [
    {"label": "pinned, no rules", "pin": True, "rules": 0, "workers": None,
     "names": ["dnsdist", "dnschaos", "dnschaos-python"]},
    {"label": "pinned, 100 rules", "pin": True, "rules": 100, "workers": None,
     "names": ["dnsdist", "dnschaos", "dnschaos-python"]},
    {"label": "unpinned, no rules", "pin": False, "rules": 0, "workers": None,
     "names": ["dnsdist", "dnschaos", "dnschaos-w2"]},
]
"""`--suite`: the layouts of the README's table, measured in one run."""
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# tools


def which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def ensure_tools() -> dict[str, str]:
    missing = [b for b in NEEDED_BINARIES if which(b) is None]
    if missing:
        log(f"missing binaries: {', '.join(missing)}; installing via apt-get")
        if os.geteuid() != 0:
            sys.exit(f"missing {missing} and not root: install {' '.join(APT_PACKAGES)} first")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=True, env=env, timeout=600)
        pkgs = sorted(set(APT_PACKAGES) | {NEEDED_BINARIES[b] for b in missing})
        subprocess.run(["apt-get", "install", "-y", *pkgs], check=True, env=env, timeout=1200)
        # apt may have auto-started nsd/dnsdist services on port 53; we use our
        # own instances on other ports, so they do not matter.
        still = [b for b in NEEDED_BINARIES if which(b) is None]
        if still:
            sys.exit(f"still missing after apt-get install: {still}")
    return {b: which(b) for b in NEEDED_BINARIES}  # type: ignore[misc]


def run_capture(cmd: list[str], timeout: float = 20) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"error: {e}"


def tool_versions(bins: dict[str, str], dnschaos_cmd: list[str] | None) -> dict[str, str]:
    def first_match(text: str, pat: str) -> str:
        m = re.search(pat, text)
        return m.group(1) if m else text.splitlines()[0] if text else "?"

    v = {
        "dnsperf": first_match(run_capture([bins["dnsperf"], "-h"]), r"Version (\S+)"),
        "nsd": first_match(run_capture([bins["nsd"], "-v"]), r"NSD version (\S+)"),
        "dnsdist": first_match(run_capture([bins["dnsdist"], "--version"]), r"dnsdist (\S+)"),
        "dnsmasq": first_match(run_capture([bins["dnsmasq"], "--version"]), r"Dnsmasq version (\S+)"),
        "python": platform.python_version(),
    }
    if dnschaos_cmd:
        py = REPO / ".venv" / "bin" / "python"
        out = run_capture([str(py) if py.exists() else sys.executable, "-c",
                           "import importlib.metadata as m, sys; print(m.version('dnschaos'), "
                           "sys.version.split()[0])"])
        v["dnschaos"] = out
        v["dnschaos_cli"] = run_capture([*dnschaos_cmd, "--version"], timeout=30)
        rev = run_capture(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        dirty = run_capture(["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
        v["dnschaos_git"] = rev + ("+dirty" if dirty and not dirty.startswith("error") else "")
    return v


def machine_info() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------------
# ports, DNS probe

_used_ports: set[int] = set()


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (racy, but good enough)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            if port in _used_ports:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                    t.bind(("127.0.0.1", port))
            except OSError:
                continue
        _used_ports.add(port)
        return port
    raise RuntimeError("no free port found")


def dns_query(port: int, name: str = f"h0.{ZONE}", qtype: int = 1, timeout: float = 0.5) -> int | None:
    """Send one UDP query; return the rcode, or None on timeout/error."""
    qid = random.randrange(65536)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(q, ("127.0.0.1", port))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                data = s.recv(4096)
                if len(data) >= 12 and struct.unpack(">H", data[:2])[0] == qid:
                    ancount = struct.unpack(">H", data[6:8])[0]
                    rcode = data[3] & 0x0F
                    if rcode == 0 and qtype == 1 and ancount == 0:
                        return -1  # NOERROR but no answer: not the zone we expect
                    return rcode
        except OSError:
            return None
    return None


# ---------------------------------------------------------------------------
# process management


class Procs:
    """Processes we started.  Each gets its own session, so stopping the
    process group stops exactly that process and its own children."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], logfile: Path, cpu: int | None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        log(f"start {name}: {shlex.join(cmd)}")
        fh = open(logfile, "wb")
        try:
            p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        finally:
            fh.close()
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, name: str = "") -> None:
        if p.poll() is None:
            log(f"stop {name} (pid {p.pid})")
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)  # pgid == pid: our own group only
            except ProcessLookupError:
                break
            except PermissionError:
                p.send_signal(sig)
            try:
                p.wait(timeout=wait)
                # the leader is gone; give forked children (nsd) a moment too
                time.sleep(0.1)
                try:
                    os.killpg(p.pid, 0)
                except ProcessLookupError:
                    break
            except subprocess.TimeoutExpired:
                continue
        self.procs = [(n, q) for n, q in self.procs if q is not p]

    def stop_all(self) -> None:
        for name, p in list(reversed(self.procs)):
            self.stop(p, name)


def wait_ready(port: int, proc: subprocess.Popen, name: str, logfile: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {proc.returncode} before becoming ready:\n{tail}")
        rc = dns_query(port)
        if rc == 0:
            return
        time.sleep(0.2)
    tail = logfile.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{name} not answering h0.{ZONE} on port {port} after {timeout}s:\n{tail}")


# ---------------------------------------------------------------------------
# NSD upstream


def write_zone(d: Path) -> tuple[Path, Path]:
    lines = [
        "$TTL 300",
        f"{ZONE} IN SOA ns.{ZONE} hostmaster.{ZONE} 1 3600 600 86400 300",
        f"{ZONE} IN NS ns.{ZONE}",
        f"ns.{ZONE} IN A 127.0.0.1",
    ]
    for i in range(N_NAMES):
        lines.append(f"h{i}.{ZONE} IN A 10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}")
    zone = d / "bench.test.zone"
    zone.write_text("\n".join(lines) + "\n")
    queries = [f"h{i}.{ZONE} A" for i in range(N_NAMES)]
    queries += [f"h{i}.{ZONE} AAAA" for i in range(N_AAAA)]
    random.Random(42).shuffle(queries)
    qfile = d / "queries.txt"
    qfile.write_text("\n".join(queries) + "\n")
    return zone, qfile


def rule_names(count: int, faulted_every: int) -> tuple[list[str], list[str]]:
    """Names for `count` one-name NXDOMAIN rules: every `faulted_every`-th zone
    name (those queries get NXDOMAIN), then names nobody asks for (rules that
    only cost matching time).  Returns (faulted, unused)."""
    faulted = [f"h{i}.{ZONE}" for i in range(5, N_NAMES, faulted_every)][:count] \
        if faulted_every else []
    unused = [f"unused{i}.{ZONE}" for i in range(count - len(faulted))]
    return faulted, unused


def write_rules(cd: Path, name: str, args: argparse.Namespace) -> list[str]:
    """Contestant config for the same rules: a scenario for dnschaos, Lua
    rules for dnsdist, address= lines for dnsmasq.  Returns extra arguments."""
    faulted, unused = rule_names(args.rules, args.faulted_every)
    names = faulted + unused
    if name.startswith("dnschaos"):
        lines = ["name: bench-rules", "phases:", "  - name: faulted", "    duration: 24h",
                 "    rules:"]
        for i, qname in enumerate(names):
            lines.append(f"      - {{name: r{i}, match: {{name: '{qname}'}}, fault: nxdomain}}")
        path = cd / "rules.yaml"
        path.write_text("\n".join(lines) + "\n")
        return ["--scenario", str(path)]
    if name == "dnsdist":
        # NegativeAndSOAAction answers NXDOMAIN with an SOA, as dnschaos does.
        return [f"addAction(QNameRule('{qname}'), NegativeAndSOAAction(true, '{ZONE}', 60, "
                f"'ns.{ZONE}', 'hostmaster.{ZONE}', 1, 3600, 600, 86400, 60))" for qname in names]
    if name == "dnsmasq":
        path = cd / "rules.conf"
        path.write_text("".join(f"address=/{qname.rstrip('.')}/\n" for qname in names))
        return [f"--conf-file={path}"]
    return []


def start_redis(procs: Procs, d: Path) -> int:
    """A redis-server for dnschaos-control (unpinned: it is off the query path)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("dnschaos-control needs redis-server (Debian package redis-server)")
    port = free_port()
    (d / "redis").mkdir(exist_ok=True)
    p = procs.start("redis", [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                              "--appendonly", "no", "--dir", str(d / "redis")],
                    d / "redis" / "output.log", None)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                log(f"redis ready on 127.0.0.1:{port}")
                return port
        if p.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError("redis-server did not start: " + (d / "redis" / "output.log").read_text())


def start_nsd(procs: Procs, bins: dict, d: Path, zone: Path, port: int,
              cpu: int | None) -> subprocess.Popen:
    # rrl-ratelimit 0: Debian's NSD enables response rate limiting (200 per
    # second per source /24 and response class).  Every contestant sends from
    # 127.0.0.1, so RRL would drop or truncate its queries and measure NSD's
    # limiter instead of the forwarder.
    nd = d / "nsd"
    nd.mkdir()
    conf = nd / "nsd.conf"
    conf.write_text(f"""server:
  ip-address: 127.0.0.1@{port}
  do-ip6: no
  username: ""
  chroot: ""
  zonesdir: "{nd}"
  database: ""
  pidfile: "{nd}/nsd.pid"
  xfrdfile: "{nd}/xfrd.state"
  zonelistfile: "{nd}/zone.list"
  logfile: "{nd}/nsd.log"
  server-count: 1
  verbosity: 0
  hide-version: yes
  rrl-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: {ZONE}
  zonefile: "{zone}"
""")
    checkconf = which("nsd-checkconf")
    if checkconf:
        out = subprocess.run([checkconf, str(conf)], capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            raise RuntimeError(f"nsd-checkconf failed: {out.stdout}{out.stderr}")
    lf = nd / "stdout.log"
    p = procs.start("nsd", [bins["nsd"], "-d", "-c", str(conf)], lf, cpu)
    wait_ready(port, p, "nsd", lf, 20)
    return p


# ---------------------------------------------------------------------------
# contestants


def dnschaos_command() -> list[str] | None:
    if not (REPO / "proxy" / "cli.py").exists():
        return None
    exe = REPO / ".venv" / "bin" / "dnschaos"
    if exe.exists():
        return [str(exe)]
    py = REPO / ".venv" / "bin" / "python"
    return [str(py) if py.exists() else sys.executable, "-m", "proxy"]


def baseline_command(rev: str, d: Path) -> list[str]:
    """`python -m proxy` from revision `rev` of this repository, unpacked into `d`."""
    d.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "proxy"],
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(d)], input=archive.stdout, check=True, timeout=60)
    py = REPO / ".venv" / "bin" / "python"
    # -P keeps the checkout's own proxy/ off sys.path; PYTHONPATH puts the
    # baseline's first (see start_contestant).
    return [str(py) if py.exists() else sys.executable, "-P", "-m", "proxy"]


def start_contestant(name: str, procs: Procs, bins: dict, d: Path, upstream: int,
                     cpu: int | None, args: argparse.Namespace) -> tuple[int, subprocess.Popen | None]:
    if name == "nsd-direct":
        return upstream, None
    port = free_port()
    cd = d / name
    cd.mkdir(exist_ok=True)  # again in every round
    lf = cd / "output.log"
    ready_timeout = 20.0
    extra = write_rules(cd, name, args) if args.rules else []
    if name == "dnsdist":
        conf = cd / "dnsdist.conf"
        # no newPacketCache -> no caching; no controlSocket -> no console;
        # security polling off (it would send a query to the system resolver).
        conf.write_text(f"""setLocal('127.0.0.1:{port}')
addACL('127.0.0.0/8')
setSecurityPollSuffix('')
newServer{{address='127.0.0.1:{upstream}', name='nsd', checkName='h0.{ZONE}', checkType='A', checkInterval=1}}
""" + "".join(line + "\n" for line in extra))
        chk = subprocess.run([bins["dnsdist"], "--check-config", "-C", str(conf)],
                             capture_output=True, text=True, timeout=30)
        if chk.returncode != 0:
            raise RuntimeError(f"dnsdist --check-config failed: {chk.stdout}{chk.stderr}")
        cmd = [bins["dnsdist"], "--supervised", "--disable-syslog", "-C", str(conf)]
    elif name == "dnsmasq":
        cmd = [bins["dnsmasq"], "--conf-file=/dev/null", "--no-daemon", "--keep-in-foreground",
               "--cache-size=0", "--no-resolv", "--no-hosts", "--no-poll",
               f"--server=127.0.0.1#{upstream}", f"--port={port}",
               "--listen-address=127.0.0.1", "--bind-interfaces", "--pid-file=",
               f"--dns-forward-max={args.dnsmasq_forward_max}", "--log-facility=-", *extra]
    elif name in ("dnschaos", "dnschaos-nodeps", "dnschaos-control", "dnschaos-w2",
                  "dnschaos-python") \
            or name.startswith("dnschaos@"):
        base = dnschaos_command() if "@" not in name else args.baseline_cmd
        if base is None:
            raise RuntimeError("dnschaos CLI (proxy/cli.py) does not exist yet")
        admin = free_port()
        cmd = [*base, "run", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream}",
               "--admin", f"127.0.0.1:{admin}", "--log-level", "warning"]
        if args.workers is not None:
            helptext = run_capture([*base, "run", "--help"], timeout=30)
            if "--workers" not in helptext:
                raise RuntimeError("--workers given but 'dnschaos run --help' has no --workers flag")
            cmd += ["--workers", str(args.workers)]
        if name == "dnschaos-nodeps":
            cmd.append("--no-deps")
        if name == "dnschaos-w2":
            cmd += ["--workers", "2"]
        if name == "dnschaos-control":
            cmd += ["--control", f"redis://127.0.0.1:{args.redis_port}/0"]
        cmd += extra + shlex.split(args.proxy_args or "")
        ready_timeout = 40.0
    else:
        raise ValueError(name)
    env = None
    if "@" in name:
        env = {**os.environ, "PYTHONPATH": str(d.parent / "baseline")}
    elif name.startswith("dnschaos"):
        # This checkout's code (and its built C relay), whichever checkout
        # the venv's editable install points at.
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if name == "dnschaos-python":
            env["DNSCHAOS_ACCEL"] = "0"
    p = procs.start(name, cmd, lf, cpu, env)
    wait_ready(port, p, name, lf, ready_timeout)
    return port, p


# ---------------------------------------------------------------------------
# dnsperf


def dnsperf(bins: dict, port: int, qfile: Path, duration: float, cpu: int | None,
            extra: list[str], stdout_file: Path | None = None) -> tuple[dict, Path | None]:
    cmd = [bins["dnsperf"], "-s", "127.0.0.1", "-p", str(port), "-d", str(qfile),
           "-l", str(duration), "-T", "1", "-b", "4096", *extra]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    timeout = duration + 60
    if stdout_file is not None:
        with open(stdout_file, "w") as fh:
            p = subprocess.run(cmd, stdout=fh, stderr=subprocess.PIPE, text=True, timeout=timeout)
        # the summary is at the end of the file; read just the tail
        with open(stdout_file, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            text = fh.read().decode(errors="replace")
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text = p.stdout
    if p.returncode != 0:
        raise RuntimeError(f"dnsperf failed ({p.returncode}): {shlex.join(cmd)}\n{text[-2000:]}{p.stderr[-2000:]}")
    return parse_dnsperf_summary(text), stdout_file


def group_stats(leader: int) -> dict[int, list[str]]:
    """pid -> the /proc/PID/stat fields after the name, of every process in
    the process group `leader` leads (each contestant has one, see Procs)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == leader:  # pgrp
            out[int(stat.parent.name)] = fields
    return out


def cpu_seconds(proc: subprocess.Popen | None) -> float | None:
    """User + system CPU seconds of a process and every process in its group
    (its threads, and its children: `--workers N` answers in child processes)."""
    if proc is None:
        return None
    stats = group_stats(proc.pid)
    ticks = sum(int(fields[11]) + int(fields[12]) for fields in stats.values())  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK") if stats else None


def udp_drops(procs: list[subprocess.Popen | None]) -> int | None:
    """Datagrams the kernel dropped for a full receive buffer on the UDP
    sockets these processes (and their groups: workers, NSD's children) hold:
    the `drops` column of /proc/net/udp and udp6, per socket, so another
    program's losses on the machine do not count.  Read before and after a run."""
    inodes = set()
    for proc in procs:
        if proc is None:
            continue
        for pid in group_stats(proc.pid):
            try:
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            except OSError:
                continue
    if not inodes:
        return None
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                total += int(fields[-1])
    return total


def parse_dnsperf_summary(text: str) -> dict:
    def num(pat: str, cast=float):
        m = re.search(pat, text)
        return cast(m.group(1)) if m else None

    r = {
        "sent": num(r"Queries sent:\s+(\d+)", int),
        "completed": num(r"Queries completed:\s+(\d+)", int),
        "lost": num(r"Queries lost:\s+(\d+)", int),
        "qps": num(r"Queries per second:\s+([\d.]+)"),
        "runtime_s": num(r"Run time \(s\):\s+([\d.]+)"),
        "avg_latency_ms": None,
        "rcodes": {},
    }
    avg = num(r"Average Latency \(s\):\s+([\d.]+)")
    r["avg_latency_ms"] = avg * 1000 if avg is not None else None
    m = re.search(r"Response codes:\s+(.*)", text)
    if m:
        for code, cnt in re.findall(r"([A-Z]+) (\d+) \(", m.group(1)):
            r["rcodes"][code] = int(cnt)
    if r["sent"] is None or r["qps"] is None:
        raise RuntimeError(f"could not parse dnsperf output:\n{text[-2000:]}")
    r["lost_pct"] = 100.0 * (r["lost"] or 0) / r["sent"] if r["sent"] else 0.0
    return r


_VLINE = re.compile(r"^> (\S+) \S+ \S+(?: ([\d.]+))?\s*$")


def percentiles_from_verbose(path: Path, pcts: list[float]) -> dict:
    """Per-query lines: '> NOERROR name type 0.000239' or '> T name type' (timeout)."""
    lat: list[float] = []
    lost = 0
    with open(path, errors="replace") as fh:
        for line in fh:
            if not line.startswith("> "):
                continue
            m = _VLINE.match(line)
            if not m:
                continue
            if m.group(2) is None:
                lost += 1
            else:
                lat.append(float(m.group(2)))
    lat.sort()
    total = len(lat) + lost
    out: dict = {"samples": len(lat), "lost_samples": lost,
                 # cross-check against dnsperf's own "Average Latency"
                 "verbose_mean_ms": 1000 * sum(lat) / len(lat) if lat else None}
    for p in pcts:
        key = f"p{p:g}_ms"
        if total == 0:
            out[key] = None
            continue
        idx = max(0, math.ceil(p / 100 * total) - 1)  # nearest-rank
        out[key] = lat[idx] * 1000 if idx < len(lat) else math.inf
    return out


# ---------------------------------------------------------------------------
# main


def fmt(v, nd=0, suffix=""):
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "lost"
    return f"{v:,.{nd}f}{suffix}"


def jsonable(v):
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10, help="seconds per measurement (default 10)")
    ap.add_argument("--warmup", type=float, default=3, help="warm-up seconds per contestant (default 3)")
    ap.add_argument("--rate", type=int, default=10000, help="QPS for the latency run (default 10000)")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated subset of {','.join(ALL_CONTESTANTS + OPTIONAL_CONTESTANTS)} "
                         "(dnschaos,dnschaos-nodeps: the dependency map's cost)")
    ap.add_argument("--proxy-args", default="", help="extra args for 'dnschaos run' (one string)")
    ap.add_argument("--workers", type=int, default=None, help="pass --workers N to dnschaos")
    ap.add_argument("--clients", type=int, default=8, help="dnsperf -c for the closed-loop run (default 8)")
    ap.add_argument("--outstanding", type=int, default=200,
                    help="dnsperf -q for the closed-loop run (default 200)")
    ap.add_argument("--dnsmasq-forward-max", type=int, default=1000,
                    help="dnsmasq --dns-forward-max (its default 150 would cap in-flight queries)")
    ap.add_argument("--no-pin", action="store_true", help="don't pin with taskset")
    ap.add_argument("--rules", type=int, default=0,
                    help="load N one-name NXDOMAIN rules into every contestant (default 0)")
    ap.add_argument("--faulted-every", type=int, default=10,
                    help="with --rules: every Kth zone name is faulted (default 10: a tenth; "
                         "0: rules on names nobody asks for, to measure matching cost)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measure every contestant this many times, interleaved, and report "
                         "medians (default 3: this machine's figures vary from run to run)")
    ap.add_argument("--baseline", metavar="REV", default=None,
                    help="also measure dnschaos at git revision REV (contestant dnschaos@REV), "
                         "to compare a change with what it changes")
    ap.add_argument("--suite", action="store_true",
                    help="the README's table in one run: " + "; ".join(s["label"] for s in SUITE)
                    + " (--only, --rules, --workers and --no-pin are then ignored)")
    ap.add_argument("--output", default=str(RESULTS_DIR / "latest.json"))
    args = ap.parse_args()

    names = list(ALL_CONTESTANTS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    if args.baseline:
        names.append(f"dnschaos@{args.baseline}")
    bad = [n for n in names if n not in ALL_CONTESTANTS + OPTIONAL_CONTESTANTS
           and not n.startswith("dnschaos@")]
    if bad:
        ap.error(f"unknown contestant(s) {bad}; choose from {ALL_CONTESTANTS}")
    if "dnschaos" in names and dnschaos_command() is None:
        if args.only:
            sys.exit("dnschaos requested but proxy/cli.py does not exist")
        log("proxy/cli.py does not exist yet: skipping dnschaos")
        names = [n for n in names if n != "dnschaos"]

    bins = ensure_tools()
    ncpu = os.cpu_count() or 1
    if ncpu < 2 and not args.no_pin:
        log("fewer than 2 CPUs: running unpinned")
    sets = SUITE if args.suite else [
        {"label": "", "pin": not args.no_pin, "rules": args.rules, "names": names,
         "workers": args.workers}]
    machine = machine_info()
    versions = tool_versions(bins, dnschaos_command() if any(
        n.startswith("dnschaos") for st in sets for n in st["names"]) else None)
    tables: list[tuple[dict, list[dict]]] = []
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="dnschaos-bench-"))
    interrupted = False

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        args.baseline_cmd = baseline_command(args.baseline, tmp / "baseline") \
            if args.baseline else None
        zone, qfile = write_zone(tmp)
        for number, spec in enumerate(sets):
            spec = {**spec, "pin": spec["pin"] and ncpu >= 2}
            results: list[dict] = []
            tables.append((spec, results))
            measure_set(spec, args, bins, procs, tmp / f"set{number}", zone, qfile, results)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log(f"ERROR (setup): {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        interrupted = True
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        finish(tables, args, machine, versions, interrupted)
    return 1 if any("error" in r for _, results in tables for r in results) else 0


def measure_set(spec: dict, args: argparse.Namespace, bins: dict, procs: Procs, d: Path,
                zone: Path, qfile: Path, results: list[dict]) -> None:
    """One layout (pinned or not, with or without rules): NSD started for it,
    every contestant measured `args.rounds` times, interleaved."""
    d.mkdir()
    gen_cpu, srv_cpu = (0, 1) if spec["pin"] else (None, None)
    run_args = argparse.Namespace(**{**vars(args), "rules": spec["rules"],
                                     "workers": spec["workers"]})
    upstream = free_port()
    nsd = start_nsd(procs, bins, d, zone, upstream, srv_cpu)
    log(f"nsd ready on 127.0.0.1:{upstream}" + (f" ({spec['label']})" if spec["label"] else ""))
    if "dnschaos-control" in spec["names"]:
        run_args.redis_port = start_redis(procs, d)
    closed_extra = ["-c", str(args.clients), "-q", str(args.outstanding), "-t", "2"]
    # enough outstanding for the rate even at ~50 ms latency
    lat_q = max(100, args.rate // 20)
    lat_extra = ["-Q", str(args.rate), "-c", str(args.clients), "-q", str(lat_q), "-t", "2", "-v"]
    for name, round_no in [(n, r + 1) for r in range(args.rounds) for n in spec["names"]]:
        res: dict = {"contestant": name, "round": round_no}
        results.append(res)
        proc = None
        try:
            port, proc = start_contestant(name, procs, bins, d, upstream, srv_cpu, run_args)
            log(f"{name}: ready on 127.0.0.1:{port}; warm-up {args.warmup}s")
            res["loadavg_before"] = os.getloadavg()
            if args.warmup > 0:
                dnsperf(bins, port, qfile, args.warmup, gen_cpu, closed_extra)
            log(f"{name}: closed loop {args.duration}s")
            cpu_before = cpu_seconds(proc)
            closed, _ = dnsperf(bins, port, qfile, args.duration, gen_cpu, closed_extra)
            cpu_after = cpu_seconds(proc)
            if cpu_before is not None and cpu_after is not None and closed.get("completed"):
                # At full load, where reading in batches makes each query cheaper.
                closed["cpu_us_per_query"] = (cpu_after - cpu_before) / closed["completed"] * 1e6
            res["closed_loop"] = closed
            log(f"{name}: {closed['qps']:.0f} q/s, lost {closed['lost_pct']:.2f}%; "
                f"latency run at {args.rate} q/s")
            time.sleep(0.5)
            vfile = d / f"{name}.verbose.txt"
            cpu_before = cpu_seconds(proc)
            overflows_before = udp_drops([proc, nsd])
            fixed, _ = dnsperf(bins, port, qfile, args.duration, gen_cpu, lat_extra, vfile)
            cpu_after = cpu_seconds(proc)
            overflows_after = udp_drops([proc, nsd])
            if overflows_before is not None and overflows_after is not None:
                fixed["udp_overflows"] = overflows_after - overflows_before
            if cpu_before is not None and cpu_after is not None and fixed.get("completed"):
                # CPU the contestant used per answered query, at the fixed rate.
                fixed["cpu_us_per_query"] = (cpu_after - cpu_before) / fixed["completed"] * 1e6
            fixed.update(percentiles_from_verbose(vfile, [50, 99, 99.9]))
            vfile.unlink()
            res["fixed_rate"] = fixed
            log(f"{name}: p50 {fmt(fixed['p50_ms'], 3)}, p99 {fmt(fixed['p99_ms'], 3)} (ms), "
                f"achieved {fixed['qps']:.0f} q/s, lost {fixed['lost_pct']:.2f}%, "
                f"UDP drops (full receive buffers, its and NSD's sockets) "
                f"{fixed.get('udp_overflows', '?')}")
            if proc is not None and proc.poll() is not None:
                res["error"] = f"{name} exited during the run (rc {proc.returncode})"
            res["loadavg_after"] = os.getloadavg()
            expected = {"NOERROR", "NXDOMAIN"} if spec["rules"] and args.faulted_every \
                else {"NOERROR"}
            bad_rc = {k: v for r in (closed, fixed) for k, v in r["rcodes"].items()
                      if k not in expected}
            if bad_rc:
                res["warning"] = f"non-NOERROR responses: {bad_rc}"
                log(f"{name}: WARNING {res['warning']}")
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            res["error"] = str(e)
            log(f"{name}: ERROR {e}")
        finally:
            if proc is not None:
                procs.stop(proc, name)
        time.sleep(1)
    procs.stop(nsd, "nsd")


def median_summary(summaries: list[dict]) -> dict:
    """Per field: the median over rounds (None values left out) and the range."""
    out: dict = {"median": {}, "range": {}}
    for key in (summaries[0] if summaries else {}):
        values = sorted(v for s in summaries if (v := s.get(key)) is not None)
        out["median"][key] = statistics.median(values) if values else None
        out["range"][key] = (values[0], values[-1]) if values else (None, None)
    return out


def summarize(results: list[dict]) -> None:
    """Each result's summary; ratios are to dnsdist in the same round and
    layout, measured minutes apart at most."""
    for r in results:
        base = next((b for b in results if b["contestant"] == "dnsdist" and "closed_loop" in b
                     and b.get("round") == r.get("round")), None)
        base_qps = base["closed_loop"]["qps"] if base else None
        base_p99 = base["fixed_rate"]["p99_ms"] if base and "fixed_rate" in base else None
        if base_p99 is not None and (math.isinf(base_p99) or base_p99 <= 0):
            base_p99 = None  # dnsdist's own p99 was a lost query: no meaningful ratio
        c, f = r.get("closed_loop"), r.get("fixed_rate")
        r["summary"] = {
            "qps": c["qps"] if c else None,
            "qps_ratio_to_dnsdist": (c["qps"] / base_qps) if c and base_qps else None,
            "lost_pct": c["lost_pct"] if c else None,
            "p50_ms": f["p50_ms"] if f else None,
            "p99_ms": f["p99_ms"] if f else None,
            "p99_ratio_to_dnsdist": (f["p99_ms"] / base_p99)
            if f and base_p99 and f["p99_ms"] is not None and not math.isinf(f["p99_ms"]) else None,
            "rate_achieved_qps": f["qps"] if f else None,
            "rate_lost_pct": f["lost_pct"] if f else None,
            "cpu_us_per_query": f.get("cpu_us_per_query") if f else None,
            "cpu_us_per_query_closed": c.get("cpu_us_per_query") if c else None,
            "udp_overflows": f.get("udp_overflows") if f else None,
        }


def finish(tables: list[tuple[dict, list[dict]]], args, machine, versions,
           interrupted=False) -> None:
    if not any(results for _, results in tables):
        return
    sets = []
    for spec, results in tables:
        summarize(results)
        medians = {name: median_summary([r["summary"] for r in results
                                         if r["contestant"] == name])
                   for name in spec["names"]}
        sets.append({"layout": spec["label"] or None,
                     "pinning": "dnsperf on CPU 0; contestant + nsd on CPU 1" if spec["pin"]
                     else "none",
                     "rules": spec["rules"], "workers": spec["workers"],
                     "contestants": spec["names"], "medians": medians, "results": results})
    machine["loadavg_end"] = os.getloadavg()
    doc = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "interrupted": interrupted,
        "machine": machine,
        "versions": versions,
        "command": shlex.join([sys.executable, *sys.argv]),
        "params": {
            "duration_s": args.duration, "warmup_s": args.warmup, "rate_qps": args.rate,
            "clients": args.clients, "outstanding": args.outstanding, "rounds": args.rounds,
            "proxy_args": args.proxy_args, "dnsmasq_forward_max": args.dnsmasq_forward_max,
            "names_in_zone": N_NAMES, "aaaa_queries": N_AAAA, "faulted_every": args.faulted_every,
        },
        "sets": sets,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(doc), indent=2) + "\n")

    print(f"\n## dnschaos benchmark — {machine['nproc']} CPU(s), {machine['cpu_model']}\n")
    print(f"closed loop: dnsperf -c {args.clients} -q {args.outstanding}, {args.duration:g}s; "
          f"latency: -Q {args.rate}, {args.duration:g}s; medians of {args.rounds} interleaved "
          f"round(s), ratios to dnsdist in the same round and layout (their range in "
          f"brackets); pinned: dnsperf on CPU 0, server+nsd on CPU 1\n")
    print("| layout | contestant | QPS | × dnsdist | CPU µs/query | lost % | p50 ms | p99 ms "
          f"| p99 × dnsdist | QPS @{args.rate} | CPU µs/query @{args.rate} "
          f"| UDP drops @{args.rate} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec, one in zip((spec for spec, _ in tables), sets):
        layout = spec["label"] or (("pinned" if spec["pin"] else "unpinned")
                                   + (f", {spec['rules']} rules" if spec["rules"] else ""))
        for name in spec["names"]:
            s, spread = one["medians"][name]["median"], one["medians"][name]["range"]
            if s.get("qps") is None:
                print(f"| {layout} | {name} | error |" + " — |" * 9)
                continue

            def ratio(key: str, s=s, spread=spread) -> str:
                low, high = spread[key]
                return fmt(s[key], 2) + (f" ({fmt(low, 2)}–{fmt(high, 2)})"
                                         if low is not None and low != high else "")

            print(f"| {layout} | {name} | {fmt(s['qps'])} | {ratio('qps_ratio_to_dnsdist')} "
                  f"| {fmt(s['cpu_us_per_query_closed'], 1)} | {fmt(s['lost_pct'], 2)} | {fmt(s['p50_ms'], 3)} | {fmt(s['p99_ms'], 3)} "
                  f"| {ratio('p99_ratio_to_dnsdist')} | {fmt(s['rate_achieved_qps'])} "
                  f"| {fmt(s['cpu_us_per_query'], 1)} | {fmt(s['udp_overflows'])} |")
    for spec, results in tables:
        for r in results:
            if "error" in r:
                print(f"\n**{r['contestant']} error:**\n```\n{r['error'][-1500:]}\n```")
            if "warning" in r:
                print(f"\n**{r['contestant']} warning:** {r['warning']}")
    if any(spec["rules"] for spec, _ in tables):
        faulted, _ = rule_names(100, args.faulted_every)
        print(f"\nrules: one-name NXDOMAIN rules; with 100, {len(faulted)} of the {N_NAMES} "
              f"queried names are faulted")
    print("\nversions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"load average start/end: {machine['loadavg_start']} / {machine['loadavg_end']}")
    print(f"command: {doc['command']}")
    print(f"JSON: {out}")


if __name__ == "__main__":
    sys.exit(main())
