"""A real resolver on loopback: unbound serving the test zone (support.zone)
from an auth-zone, DNSSEC-signed when ldns-keygen/ldns-signzone exist.

Why an auth-zone rather than local-data: unbound's local-data answers carry
no RRSIGs, while an auth-zone serves a signed zone file like an
authoritative server (RRSIGs and NSEC proofs to DO queries, none otherwise),
follows in-zone CNAME chains, and sets TC like any server.  module-config
is "iterator" and everything outside the zone is REFUSED, so nothing ever
leaves the machine.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from support import zone
from support.net import Endpoint, free_port, hostport, ipv6_loopback_available
from support.procs import stop_process

UNBOUND_CONF = """\
server:
    interface: 127.0.0.1@{port}
{ipv6_interface}
    do-ip6: {do_ip6}
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    log-queries: no
    num-threads: 1
    so-reuseport: {reuseport}
    module-config: "iterator"
    access-control: 127.0.0.0/8 allow
    access-control: ::1/128 allow
    do-not-query-localhost: no
    rrset-roundrobin: no
    minimal-responses: yes
    edns-buffer-size: 1232
    max-udp-size: 1232
    incoming-num-tcp: 256
    num-queries-per-thread: 4096
    ratelimit: 0
    ip-ratelimit: 0
    unwanted-reply-threshold: 0
    local-zone: "." refuse
    local-zone: "{origin}" transparent
{parent_local_zone}
remote-control:
    control-enable: no

{auth_zones}"""

AUTH_ZONE = """
auth-zone:
    name: "{name}"
    zonefile: "{zonefile}"
    for-downstream: yes
    for-upstream: no
    fallback-enabled: no
"""


def wait_for_reply(proc: subprocess.Popen | None, host: str, port: int,
                   timeout: float) -> dns.message.Message | None:
    """The first reply of a starting resolver to a SOA query for the test
    zone, or None when `proc` exits or `timeout` passes first."""
    end = time.monotonic() + timeout
    query = dns.message.make_query(zone.ORIGIN, "SOA")
    while time.monotonic() < end:
        if proc is None or proc.poll() is not None:
            return None
        try:
            return dns.query.udp(query, host, port=port, timeout=0.2)
        except (OSError, dns.exception.Timeout):
            time.sleep(0.05)
    return None


def signing_tools_available() -> bool:
    return bool(shutil.which("ldns-keygen") and shutil.which("ldns-signzone"))


def sign_zone(directory: Path, zonefile: Path, origin: str) -> tuple[Path, str, str]:
    """Sign with a fresh ECDSA P-256 KSK and ZSK, valid for 30 days: the
    signed zone file, and the KSK's DS and DNSKEY records (trust anchors for
    validators) as zone-file text."""
    keys = []
    for extra in (["-k"], []):
        out = subprocess.run(
            ["ldns-keygen", "-a", "ECDSAP256SHA256", *extra, origin],
            cwd=directory, check=True, capture_output=True, text=True,
        )
        keys.append(out.stdout.strip())
    expiration = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() + 30 * 86400))
    inception = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() - 86400))
    subprocess.run(
        ["ldns-signzone", "-e", expiration, "-i", inception, str(zonefile), *keys],
        cwd=directory, check=True, capture_output=True, text=True,
    )
    ds = (directory / (keys[0] + ".ds")).read_text().strip()
    dnskey = (directory / (keys[0] + ".key")).read_text().split(";")[0].strip()
    return directory / (zonefile.name + ".signed"), ds, dnskey


class Unbound(Endpoint):
    """unbound -d -c CONF on 127.0.0.1:PORT (and [::1]:PORT when IPv6 works).

    Attributes: host, port, hostport ('127.0.0.1:PORT', the form for
    --upstream), ipv6 (bool), ipv6_hostport, signed (bool), trust_anchor
    and trust_key (the KSK's DS and DNSKEY when signed), pid, directory,
    log_path.  `addr` is (host, port)."""

    host = "127.0.0.1"

    def __init__(self, directory: Path, reuseport: bool = False, parent: bool = False,
                 hosts: int = zone.HOST_COUNT) -> None:
        """reuseport: unbound's `so-reuseport: yes` (its default), which lets
        another program's SO_REUSEPORT socket join its port.
        parent: also serve the parent zone (support.zone.PARENT), signed,
        delegating to the test zone with its DS; trust_anchor and trust_key
        are then the parent's, so validators check the whole chain.
        hosts: how many hostN names the test zone has (more for the client matrix)."""
        self.directory = Path(directory)
        self.reuseport = reuseport
        self.parent = parent
        self.hosts = hosts
        self.parent_zonefile: Path | None = None
        self.ipv6 = ipv6_loopback_available()
        self.signed = False
        self.trust_anchor = self.trust_key = ""
        """The KSK's DS and DNSKEY records as zone-file text, once signed."""
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.directory / "unbound.log"

    @property
    def ipv6_hostport(self) -> str:
        return hostport("::1", self.port)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _write_zone(self) -> Path:
        zonefile = self.directory / "example.test.zone"
        zonefile.write_text(zone.zone_text(hosts=self.hosts))
        if signing_tools_available():
            zonefile, self.trust_anchor, self.trust_key = sign_zone(
                self.directory, zonefile, zone.ORIGIN)
            self.signed = True
        if self.parent:
            if not self.signed:
                raise RuntimeError("a parent zone needs ldns-signzone (make test installs it)")
            parent = self.directory / "parent.zone"
            parent.write_text(zone.parent_zone_text(self.trust_anchor))
            self.parent_zonefile, self.trust_anchor, self.trust_key = sign_zone(
                self.directory, parent, zone.PARENT)
        return zonefile

    def start(self, ready_timeout: float = 10.0) -> Unbound:
        if not shutil.which("unbound"):
            raise RuntimeError("unbound is not installed (make test installs it)")
        zonefile = self._write_zone()
        last_error = ""
        for _ in range(3):  # retry if the port was taken between check and bind
            hosts = ("127.0.0.1", "::1") if self.ipv6 else ("127.0.0.1",)
            self.port = free_port(*hosts)
            conf = self.directory / "unbound.conf"
            conf.write_text(UNBOUND_CONF.format(
                port=self.port, dir=self.directory, origin=zone.ORIGIN,
                ipv6_interface=f"    interface: ::1@{self.port}" if self.ipv6 else "",
                do_ip6="yes" if self.ipv6 else "no",
                reuseport="yes" if self.reuseport else "no",
                parent_local_zone=f'    local-zone: "{zone.PARENT}" transparent\n'
                if self.parent_zonefile else "",
                auth_zones=AUTH_ZONE.format(name=zone.ORIGIN, zonefile=zonefile)
                + (AUTH_ZONE.format(name=zone.PARENT, zonefile=self.parent_zonefile)
                   if self.parent_zonefile else ""),
            ))
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    ["unbound", "-d", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_ready(ready_timeout):
                return self
            last_error = self.log_text()
            self.stop()
        raise RuntimeError(f"unbound did not start:\n{last_error}")

    def _wait_ready(self, timeout: float) -> bool:
        reply = wait_for_reply(self.proc, self.host, self.port, timeout)
        return reply is not None and reply.rcode() == dns.rcode.NOERROR and bool(reply.answer)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc)
