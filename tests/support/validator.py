"""A validating unbound on loopback, downstream of the proxy: it resolves
the zone of its trust anchor (the test zone, or its parent with
Unbound(parent=True)) through a stub zone whose only server is the proxy,
validates from that DS down, and reports Extended DNS Errors (`ede: yes`,
unbound >= 1.16).

    validator = Validator(tmp, upstream=proxy, trust_anchor=unbound.trust_anchor).start()
    validator.flush()          # forget cached answers and keys of the zone

Everything outside the anchor's zone is refused locally, so nothing leaves
the machine.  remote-control listens on loopback without certificates so
`flush` can empty the caches between test cases.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from support import zone
from support.net import Endpoint, free_port
from support.procs import stop_process
from support.unbound import wait_for_reply

CONF = """\
server:
    interface: 127.0.0.1@{port}
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    val-log-level: 2
    num-threads: 1
    so-reuseport: no
    module-config: "validator iterator"
    trust-anchor: "{trust_anchor}"
    ede: yes
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    qname-minimisation: no
    prefetch: no
    aggressive-nsec: no
    local-zone: "." refuse
    local-zone: "{anchor_zone}" transparent

remote-control:
    control-enable: yes
    control-interface: 127.0.0.1
    control-port: {control_port}
    control-use-cert: no
{stubs}"""

# One stub per zone, so the delegation's glue (127.0.0.1 port 53) is never asked.
STUB = """
stub-zone:
    name: "{name}"
    stub-addr: {upstream}
"""


class Validator(Endpoint):
    """unbound validating the test zone, asking `upstream` (anything with
    host and port: a proxy, an Unbound) for it."""

    host = "127.0.0.1"

    def __init__(self, directory: Path, upstream: Any, trust_anchor: str) -> None:
        self.directory = Path(directory)
        self.upstream = upstream
        self.trust_anchor = " ".join(trust_anchor.split())  # one line, tabs gone
        self.anchor_zone = self.trust_anchor.split()[0]
        self.port = self.control_port = 0
        self.proc: subprocess.Popen | None = None
        self.conf = self.directory / "validator.conf"
        self.log_path = self.directory / "validator.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, ready_timeout: float = 10.0) -> Validator:
        if not shutil.which("unbound"):
            raise RuntimeError("unbound is not installed (make test installs it)")
        last = ""
        for _ in range(3):  # retry if a port was taken between check and bind
            self.port, self.control_port = free_port(), free_port()
            self.conf.write_text(CONF.format(
                port=self.port, control_port=self.control_port, dir=self.directory,
                trust_anchor=self.trust_anchor, anchor_zone=self.anchor_zone,
                stubs="".join(STUB.format(name=name,
                                          upstream=f"{self.upstream.host}@{self.upstream.port}")
                              for name in dict.fromkeys((self.anchor_zone, zone.ORIGIN)))))
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(["unbound", "-d", "-c", str(self.conf)],
                                             stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
            if self._wait_ready(ready_timeout):
                return self
            last = self.log_text()
            self.stop()
        raise RuntimeError(f"validating unbound did not start:\n{last}")

    def _wait_ready(self, timeout: float) -> bool:
        return wait_for_reply(self.proc, self.host, self.port, timeout) is not None

    def control(self, *args: str) -> str:
        """unbound-control ARGS against this unbound; its output."""
        out = subprocess.run(["unbound-control", "-c", str(self.conf), *args],
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout

    def flush(self) -> None:
        """Forget the cached answers, keys and bogus marks of the anchor's
        zone and everything below it, and the upstream's infrastructure state."""
        self.control("flush_zone", self.anchor_zone)
        self.control("flush_bogus")
        self.control("flush_negative")
        self.control("flush_infra", "all")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc)


def delv(target: Any, name: str, qtype: str, trust_key: str, directory: Path) -> str:
    """BIND's validating lookup (delv, from bind9-dnsutils) of NAME through
    `target`, trusting the zone's KSK (`trust_key`, a DNSKEY line): its
    trace and answer as one text.  BIND checks a signature's validity
    times before its crypto, unbound after, so the two name different
    reasons for the same damage."""
    owner, _ttl_or_class, *rest = trust_key.split()
    fields = rest[rest.index("DNSKEY") + 1:]
    anchor = directory / "delv-anchor.conf"
    anchor.write_text(f'trust-anchors {{ {owner} static-key {fields[0]} {fields[1]} '
                      f'{fields[2]} "{"".join(fields[3:])}"; }};\n')
    out = subprocess.run(["delv", "-a", str(anchor), f"+root={owner}", "+vtrace",
                          "@" + target.host, "-p", str(target.port), name, qtype],
                         capture_output=True, text=True, timeout=20)
    return out.stdout + out.stderr
