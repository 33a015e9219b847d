#!/usr/bin/env python3
"""Bounded soak: dnsperf through dnschaos in front of NSD while a scenario
cycles phases every few seconds; optionally an upstream outage mid-run.

Layout and helpers are bench/run.py's (NSD zone ``bench.test.`` with 1,000
A records, dnsperf pinned to CPU 0, NSD and the proxy on CPU 1).  The
scenario is bench/soak-scenario.yaml (four 5 s phases: clean, NXDOMAIN for
a share of names, drop every 20th query, delay + TTL rewrite), repeated to
cover the run.

Checked at the end (exit status 1 if any fails):
  * counters add up: queries in = replies out + intended drops
    (dnschaos_queries_total = sum of dnschaos_responses_total
    + dnschaos_faults_injected_total{fault="drop"}
    + dnschaos_malformed_queries_total{reaction="dropped"}
    + dnschaos_fault_dropped_answers_total);
  * dnsperf agrees: sent = queries in, completed = replies out, and no query
    lost beyond the intended drops;
  * memory and descriptors: VmRSS and /proc/<pid>/fd sampled every second;
    after the first quarter of the run, VmRSS grows by less than
    --rss-tolerance MiB and the descriptor count by at most 2;
  * with --outage S: NSD is stopped (by its PID) a third into the run and
    restarted S seconds later on the same port.  A probe query every 0.5 s
    during the outage must get SERVFAIL within the deadline (+0.5 s), and
    NOERROR again within --recover seconds of NSD's restart, by itself.

    .venv/bin/python bench/soak.py --duration 120
    .venv/bin/python bench/soak.py --duration 90 --outage 30

Every process it starts is stopped (by its own process group) on exit.
Stdlib only (plus bench/run.py).  Prints a summary table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCENARIO = HERE / "soak-scenario.yaml"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


bench = _bench()
log = bench.log


# --- the scenario --------------------------------------------------------------------


def expand_scenario(duration: float, out: Path) -> tuple[Path, float]:
    """bench/soak-scenario.yaml with its phases repeated to cover `duration`
    (+ one cycle); returns (path, cycle length in seconds).  Plain text
    handling, so no YAML library is needed: the file's phases are the lines
    after `phases:`."""
    text = SCENARIO.read_text()
    head, _, body = text.partition("phases:\n")
    seconds = sum(float(m) for m in re.findall(r"duration:\s*([\d.]+)s", body))
    cycles = int(duration // seconds) + 2
    phases = []
    for n in range(cycles):
        phases.append(re.sub(r"(?m)^(  - name: )([\w-]+)", rf"\g<1>\g<2>-{n}",
                             body.rstrip("\n")) if n else body.rstrip("\n"))
    # rule names stay the same across cycles: their counters add up per rule.
    out.write_text(head + "phases:\n" + "\n".join(phases) + "\n")
    return out, seconds


# --- the proxy's metrics -------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([-+\w.]+)$')


def scrape(admin: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def total(metrics: dict, name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for (n, lbl), v in metrics.items()
               if n == name and all(w in lbl for w in want))


def counters(admin: int) -> dict[str, float]:
    m = scrape(admin)
    return {
        "queries": total(m, "dnschaos_queries_total"),
        "responses": total(m, "dnschaos_responses_total"),
        "servfail_rcode": total(m, "dnschaos_responses_total", rcode="SERVFAIL"),
        "nxdomain_rcode": total(m, "dnschaos_responses_total", rcode="NXDOMAIN"),
        "answers": total(m, "dnschaos_answers_total"),
        "faulted": total(m, "dnschaos_faulted_queries_total"),
        "drops": total(m, "dnschaos_faults_injected_total", fault="drop"),
        "injected": total(m, "dnschaos_faults_injected_total"),
        "rule_matches": total(m, "dnschaos_rule_matches_total"),
        "malformed_dropped": total(m, "dnschaos_malformed_queries_total", reaction="dropped"),
        "fault_dropped": total(m, "dnschaos_fault_dropped_answers_total"),
        "servfail_deadline": total(m, "dnschaos_servfail_sent_total", reason="deadline"),
        "servfail_overload": total(m, "dnschaos_servfail_sent_total", reason="overload"),
        "engine_errors": total(m, "dnschaos_engine_errors_total"),
        "inflight": total(m, "dnschaos_inflight_queries"),
    }


# --- sampling ------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def listener_drops(pid: int, port: int) -> int:
    """Datagrams the kernel dropped at the proxy's UDP listener (its receive
    buffer was full): the `drops` column of /proc/<pid>/net/udp."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    drops = 0
    for line in Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]:
        parts = line.split()
        if (len(parts) > 12 and parts[9] in inodes
                and int(parts[1].split(":")[1], 16) == port):
            drops += int(parts[12])
    return drops


class Sampler(threading.Thread):
    """VmRSS and descriptor count of `pid` every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, int]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop_event.is_set():
            try:
                self.samples.append((time.monotonic() - start, rss_kib(self.pid),
                                     len(os.listdir(f"/proc/{self.pid}/fd"))))
            except OSError:
                return
            self.stop_event.wait(self.interval)


PROBES = {"sent": 0, "answered": 0}
"""Probe queries are not dnsperf's: the checks subtract them."""


def probe(port: int, name: str, timeout: float) -> tuple[int | None, float]:
    """(rcode or None, seconds) of one UDP query."""
    PROBES["sent"] += 1
    start = time.monotonic()
    rcode = bench.dns_query(port, name, timeout=timeout)
    PROBES["answered"] += rcode is not None
    return rcode, time.monotonic() - start


# --- main ----------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=120, help="dnsperf seconds (default 120)")
    ap.add_argument("--rate", type=int, default=3000, help="dnsperf -Q (default 3000 q/s)")
    ap.add_argument("--outage", type=float, default=0,
                    help="stop NSD for this many seconds a third into the run (default: none)")
    ap.add_argument("--deadline", type=float, default=3.0, help="the proxy's --deadline")
    ap.add_argument("--recover", type=float, default=6.0,
                    help="seconds after NSD's restart by which answers must be NOERROR again")
    ap.add_argument("--rss-tolerance", type=float, default=16.0,
                    help="MiB of VmRSS growth allowed after the first quarter (default 16)")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.duration > 1800:
        ap.error("--duration is capped at 1800 s: this is a bounded soak")
    if args.outage and args.outage > args.duration / 2:
        ap.error("--outage must be at most half of --duration")

    bins = {b: bench.which(b) for b in ("nsd", "dnsperf", "taskset")}
    missing = [b for b, path in bins.items() if not path]
    if missing:
        sys.exit(f"missing {missing}: install nsd dnsperf (make bench-debs)")
    dnschaos = bench.dnschaos_command()
    if dnschaos is None:
        sys.exit("dnschaos CLI not found")
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    gen_cpu, srv_cpu = (0, 1) if pin else (None, None)

    procs = bench.Procs()
    tmp = Path(tempfile.mkdtemp(prefix="dnschaos-soak-"))
    checks: list[tuple[str, bool, str]] = []
    results: dict = {"params": vars(args)}

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        zone, qfile = bench.write_zone(tmp)
        upstream = bench.free_port()
        (tmp / "nsd-0").mkdir()
        bench.start_nsd(procs, bins, tmp / "nsd-0", zone, upstream, srv_cpu)
        nsd = procs.procs[-1][1]
        scenario, cycle = expand_scenario(args.duration + 30, tmp / "soak-scenario.yaml")
        port, admin = bench.free_port(), bench.free_port()
        cmd = [*dnschaos, "run", "--listen", f"127.0.0.1:{port}",
               "--upstream", f"127.0.0.1:{upstream}", "--admin", f"127.0.0.1:{admin}",
               "--deadline", f"{args.deadline}s", "--timeout", f"{args.deadline}s",
               "--log-level", "warning", "--scenario", str(scenario)]
        plog = tmp / "dnschaos.log"
        proxy = procs.start("dnschaos", cmd, plog, srv_cpu)
        bench.wait_ready(port, proxy, "dnschaos", plog, 40)
        log(f"dnschaos on 127.0.0.1:{port} (admin {admin}), NSD on {upstream}; "
            f"scenario cycle {cycle:g} s")
        time.sleep(0.5)
        before = counters(admin)
        drops_before = listener_drops(proxy.pid, port)
        sampler = Sampler(proxy.pid)
        sampler.start()

        outage: dict = {}
        outage_thread = None
        if args.outage:
            def do_outage() -> None:
                nonlocal nsd
                time.sleep(args.duration / 3)
                outage["stopped_at"] = time.monotonic()
                log(f"outage: stopping NSD (pid {nsd.pid}) for {args.outage:g} s")
                procs.stop(nsd, "nsd")
                probes = []
                end = outage["stopped_at"] + args.outage - args.deadline - 1
                while time.monotonic() < end:
                    probes.append(probe(port, "h1.bench.test.", args.deadline + 2))
                    time.sleep(0.5)
                outage["probes"] = probes
                wait = outage["stopped_at"] + args.outage - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                (tmp / "nsd-1").mkdir()
                bench.start_nsd(procs, bins, tmp / "nsd-1", zone, upstream, srv_cpu)
                nsd = procs.procs[-1][1]
                outage["restarted_at"] = time.monotonic()
                log("outage: NSD restarted on the same port")
                end = outage["restarted_at"] + args.recover + 5
                while time.monotonic() < end:
                    rcode, _ = probe(port, "h2.bench.test.", args.deadline + 1)
                    if rcode == 0:
                        outage["recovered_after"] = time.monotonic() - outage["restarted_at"]
                        break
                    time.sleep(0.1)

            outage_thread = threading.Thread(target=do_outage, daemon=True)
            outage_thread.start()

        extra = ["-Q", str(args.rate), "-c", "4", "-q", str(max(200, args.rate // 5)),
                 "-t", str(args.deadline + 2)]
        log(f"dnsperf {args.duration:g} s at {args.rate} q/s")
        perf, _ = bench.dnsperf(bins, port, qfile, args.duration, gen_cpu, extra)
        if outage_thread is not None:
            outage_thread.join(args.outage + args.recover + 30)
        # Let held and in-flight queries finish, then read the counters.
        end = time.monotonic() + args.deadline + 2
        while time.monotonic() < end and counters(admin)["inflight"] > 0:
            time.sleep(0.2)
        time.sleep(0.3)
        after = counters(admin)
        sampler.stop_event.set()
        sampler.join(5)
        delta = {k: after[k] - before[k] for k in after if k != "inflight"}
        delta["probes"] = PROBES["sent"]
        delta["kernel_drops"] = listener_drops(proxy.pid, port) - drops_before
        if PROBES["answered"] != PROBES["sent"]:
            checks.append(("every probe answered", False, f"{PROBES}"))
        results.update({"dnsperf": perf, "counters": delta, "samples": sampler.samples})

        # --- checks
        intended = delta["drops"] + delta["malformed_dropped"] + delta["fault_dropped"]
        add_up = delta["queries"] == delta["responses"] + intended
        checks.append(("queries in = replies out + intended drops", add_up,
                       f"{delta['queries']:.0f} = {delta['responses']:.0f} + {intended:.0f}"))
        probes = delta["probes"]
        checks.append(("dnsperf sent = queries in - probes",
                       perf["sent"] == delta["queries"] - probes,
                       f"{perf['sent']} vs {delta['queries']:.0f} - {probes}"))
        checks.append(("dnsperf completed = replies out - probes",
                       perf["completed"] == delta["responses"] - probes,
                       f"{perf['completed']} vs {delta['responses']:.0f} - {probes}"))
        unintended = (perf["lost"] or 0) - intended
        checks.append(("lost queries other than intended drops = 0", unintended == 0,
                       f"lost {perf['lost']}, intended drops {intended:.0f}, dropped by the "
                       f"kernel at the listener (receive buffer full) {delta['kernel_drops']}"))
        checks.append(("engine errors = 0", delta["engine_errors"] == 0,
                       f"{delta['engine_errors']:.0f}"))
        samples = sampler.samples
        if len(samples) >= 8:
            quarter = samples[len(samples) // 4]
            peak_rss = max(s[1] for s in samples[len(samples) // 4:])
            growth = (peak_rss - quarter[1]) / 1024
            fd_base = quarter[2]
            fd_peak = max(s[2] for s in samples[len(samples) // 4:])
            checks.append((f"VmRSS growth after the first quarter < {args.rss_tolerance:g} MiB",
                           growth < args.rss_tolerance,
                           f"{quarter[1] / 1024:.1f} -> peak {peak_rss / 1024:.1f} MiB "
                           f"(+{growth:.1f})"))
            checks.append(("descriptors: no growth (<= +2)", fd_peak <= fd_base + 2,
                           f"{fd_base} -> peak {fd_peak}"))
        if args.outage:
            probes = outage.get("probes", [])
            servfails = [t for rcode, t in probes if rcode == 2]
            late = [t for t in servfails if t > args.deadline + 0.5]
            checks.append(("outage: every probe got SERVFAIL", bool(probes)
                           and len(servfails) == len(probes),
                           f"{len(servfails)}/{len(probes)} SERVFAIL"))
            checks.append((f"outage: SERVFAIL within the deadline ({args.deadline:g} s + 0.5)",
                           bool(servfails) and not late,
                           f"max {max(servfails, default=0):.2f} s"))
            recovered = outage.get("recovered_after")
            checks.append((f"outage: NOERROR again within {args.recover:g} s of restart",
                           recovered is not None and recovered <= args.recover,
                           "never" if recovered is None else f"after {recovered:.2f} s"))
            checks.append(("outage: SERVFAIL (deadline) counted",
                           delta["servfail_deadline"] > 0,
                           f"{delta['servfail_deadline']:.0f}"))
            results["outage"] = {k: v for k, v in outage.items() if k != "probes"}
        if proxy.poll() is not None:
            checks.append(("proxy still running", False, f"exited {proxy.returncode}"))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log(f"ERROR: {exc}")
        return 1
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    perf = results["dnsperf"]
    delta = results["counters"]
    print(f"\n## dnschaos soak: {args.duration:g} s at {args.rate} q/s, scenario cycle "
          f"{cycle:g} s{f', outage {args.outage:g} s' if args.outage else ''}\n")
    print("| figure | value |\n|---|---:|")
    rows = [
        ("dnsperf sent / completed / lost", f"{perf['sent']} / {perf['completed']} / "
                                            f"{perf['lost']}"),
        ("dnsperf rcodes", ", ".join(f"{k} {v}" for k, v in perf["rcodes"].items())),
        ("achieved q/s", f"{perf['qps']:.0f}"),
        ("queries in (proxy)", f"{delta['queries']:.0f}"),
        ("replies out (proxy)", f"{delta['responses']:.0f}"),
        ("intended drops (drop fault)", f"{delta['drops']:.0f}"),
        ("kernel drops at the listener (rcvbuf full)", f"{delta['kernel_drops']}"),
        ("faulted queries / rule matches", f"{delta['faulted']:.0f} / "
                                           f"{delta['rule_matches']:.0f}"),
        ("SERVFAIL deadline / overload", f"{delta['servfail_deadline']:.0f} / "
                                         f"{delta['servfail_overload']:.0f}"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in checks:
        print(f"| {name} | {'ok' if ok else 'FAIL'} | {detail} |")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "checks": checks}, indent=2,
                                              default=str) + "\n")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
