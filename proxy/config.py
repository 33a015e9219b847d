"""The proxy's own settings: command-line flags and the YAML config file
share this one model, so both accept the same options."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from proxy.control.url import check_control_url
from proxy.core.query import client_address
from proxy.core.spec import Base, Cidr, Duration, parse_duration
from proxy.errors import ConfigError

DNS_PORT = 1053
"""The default DNS port: unprivileged, and by convention no well-known service's
(5353 would clash with mDNS: avahi, mDNSResponder)."""
ADMIN_PORT = 5380
DEFAULT_LISTEN = f"127.0.0.1:{DNS_PORT}"
DEFAULT_ADMIN = f"127.0.0.1:{ADMIN_PORT}"
LOOPBACK = ("127.0.0.0/8", "::1/128")
MIN_TOKEN_LENGTH = 16
DEFAULT_MAX_RUN_DURATION = 4 * 3600.0

PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


def split_hostport(text: str, default_port: int) -> tuple[str, int]:
    """'1.2.3.4' / '1.2.3.4:53' / '[::1]:53' / '::1' -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: expected an IP address, optionally with :port") from None
    if port and not (port.isdigit() and 0 <= int(port) <= 65535):
        raise ValueError(f"{text!r}: invalid port {port!r}")
    return host, int(port) if port else default_port


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _hostport(default_port: int):
    def check(value: str) -> str:
        return format_hostport(*split_hostport(str(value), default_port))

    return check


def is_local_address(host: str) -> bool:
    """Whether `host` is an address of this machine: loopback, unspecified
    (sending to it reaches this machine), or one a socket can bind to."""
    address = client_address(host)
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(address), 0))
    except OSError:
        return False
    return True


def listener_receives(listen: str, upstream: str) -> bool:
    """Whether queries sent to `upstream` arrive at the listener `listen`:
    the same port, and the same address, or a wildcard listener (0.0.0.0
    covers this machine's IPv4 addresses, [::] all of them, UDP on [::]
    taking IPv4 too) and an address of this machine.  A listener on port 0
    gets its port at bind time: only the run-time probe can tell."""
    listen_host, listen_port = split_hostport(listen, DNS_PORT)
    up_host, up_port = split_hostport(upstream, 53)
    if listen_port != up_port or listen_port == 0:
        return False
    here, there = client_address(listen_host), client_address(up_host)
    if there.is_unspecified:  # the kernel sends that to loopback
        there = ipaddress.ip_address("127.0.0.1" if there.version == 4 else "::1")
    if here.is_unspecified:
        return (here.version == 6 or there.version == 4) and is_local_address(str(there))
    return here == there


def resolv_conf_nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    """The nameservers listed in resolv.conf, in order."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    servers = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            servers.append(format_hostport(parts[1].split("%")[0], 53))
    return servers


class Settings(Base):
    """Every option of `dnschaos run`; the YAML config file has the same keys."""

    listen: list[str] = Field(default_factory=lambda: [DEFAULT_LISTEN])
    """Addresses to answer on, UDP and TCP: '127.0.0.1:1053', '[::1]:1053'."""
    upstreams: list[str] = Field(default_factory=list)
    """Resolvers to forward to; default: the nameservers in /etc/resolv.conf."""
    admin: str | None = DEFAULT_ADMIN
    """The HTTP listener for /metrics and the API; null turns it off."""
    allow: list[Cidr] = Field(default_factory=lambda: list(LOOPBACK))
    """Client networks that may query; others get REFUSED."""
    policy: Literal["sequential", "round_robin", "random"] = "sequential"
    """Which upstream is tried first: the first healthy one, each in turn, or any."""
    timeout: PositiveDuration = 1.0
    """Seconds to wait for one upstream before trying the next."""
    deadline: PositiveDuration = 3.0
    """Seconds after which a query that no upstream answered gets SERVFAIL."""
    max_fails: Annotated[int, Field(ge=1)] = 3
    """Consecutive timeouts after which an upstream is marked down."""
    down_time: Duration = 5.0
    """Seconds a down upstream is tried last, before it gets another chance."""
    upstream_sockets: Annotated[int, Field(ge=1, le=1024)] = 16
    """UDP sockets per upstream, each on its own random source port."""
    max_pending: Annotated[int, Field(ge=1)] = 100_000
    """Queries waiting for an upstream at most; beyond it, new ones get SERVFAIL."""
    tcp_idle_timeout: PositiveDuration = 10.0
    """Seconds a client TCP connection may stay idle before it is closed."""
    tcp_max_connections: Annotated[int, Field(ge=1)] = 1000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    uvloop: bool = True
    accelerate: bool = True
    """Relay plain UDP queries through the C fast path (proxy/accel.py) when it
    is built; off (or DNSCHAOS_ACCEL=0): everything takes the Python path."""
    scenario_dir: str | None = None
    """Directory of scenario files, watched: added or changed files take effect
    without a restart (SIGHUP re-reads it too); invalid edits are refused."""
    max_run_duration: PositiveDuration = DEFAULT_MAX_RUN_DURATION
    """Hard cap on any run or ad hoc rule, whatever the scenario asks."""
    admin_token: str | None = None
    """Bearer token of the admin API (also from the DNSCHAOS_ADMIN_TOKEN
    environment variable), at least 16 characters.  Mandatory when `admin` is
    not a loopback address; there every endpoint but /health and /metrics
    needs it, reads too.  On loopback only mutations need it."""
    metrics_auth: bool = False
    """/metrics needs the admin token too (needs admin_token)."""
    audit_log: str | None = None
    """File the admin API appends one JSON line per mutation to (always logged too)."""
    report_dir: str | None = None
    """Directory run reports are written to (<run>.json, <run>.md); they are
    served by the API either way."""
    client_groups: dict[Cidr, Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=dict)
    """Client networks named in metrics, CIDR -> name ('10.1.2.0/24: payments'); the
    most specific CIDR containing a client wins; clients in none keep their address."""
    client_label_cap: Annotated[int, Field(ge=0, le=10_000)] = 50
    """Distinct `client` label values at most; later clients are counted under 'other'."""
    affected_window: PositiveDuration = 60.0
    """Seconds a client counts in dnschaos_affected_clients_recent after a rule last hit it."""
    ended_run_retention: PositiveDuration = 600.0
    """Seconds /metrics keeps showing an ended run's per-rule and per-client series
    (its final counts), so a scrape after the run ended still sees them; keep it
    longer than the scrape interval."""
    deps: bool = True
    """Keep the dependency map (which client asked for which names; GET
    /api/dependencies, preview, preflight, recovery).  Off only to measure its cost."""
    deps_max_clients: Annotated[int, Field(ge=0, le=1_000_000)] = 10_000
    """Client addresses the dependency map keeps per process; later ones are only counted."""
    deps_max_names: Annotated[int, Field(ge=0, le=100_000)] = 1_000
    """Questions (name and type) the map keeps per client; later ones are only counted."""
    deps_max_entries: Annotated[int, Field(ge=0, le=10_000_000)] = 100_000
    """Questions the map keeps over all clients (about 250 bytes each: ~25 MB)."""
    recovery_window: PositiveDuration = 600.0
    """Seconds after a run ends that each affected client is watched for recovery."""
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    """Processes answering DNS on the same addresses (SO_REUSEPORT); with more than
    one, the main process only runs the admin API and the game day and sends every
    change of faults to each worker (proxy/workers/)."""

    control: str | None = None
    """The shared control plane: redis://[USER:PASSWORD@]HOST:PORT/DB (rediss:// for
    TLS); every instance given the same one (and the same control_prefix) runs one
    game day (proxy/control/).  Anyone who can write to that Redis can inject faults."""
    control_grace: PositiveDuration = 30.0
    """Seconds without the control plane after which an instance heals: it stops
    applying every run until the control plane is back."""
    control_prefix: Annotated[str, Field(min_length=1, max_length=64,
                                         pattern=r"^[A-Za-z0-9_.:-]+$")] = "dnschaos:"
    """The prefix of every Redis key, so several environments can share one Redis."""
    instance_name: Annotated[str, Field(min_length=1, max_length=128,
                                        pattern=r"^[A-Za-z0-9_.:@-]+$")] | None = None
    """This instance's name on the control plane (default HOSTNAME:PID)."""

    @field_validator("control")
    @classmethod
    def _control(cls, value: str | None) -> str | None:
        return None if value in (None, "") else check_control_url(value)

    @field_validator("listen")
    @classmethod
    def _listen(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("at least one listen address is needed")
        return [_hostport(DNS_PORT)(v) for v in values]

    @field_validator("upstreams")
    @classmethod
    def _upstreams(cls, values: list[str]) -> list[str]:
        return [_hostport(53)(v) for v in values]

    @field_validator("admin")
    @classmethod
    def _admin(cls, value: str | None) -> str | None:
        return None if value in (None, "", "off") else _hostport(ADMIN_PORT)(value)

    @model_validator(mode="after")
    def _no_upstream_is_a_listener(self) -> Settings:
        for upstream in self.upstreams:
            listen = self.own_listener(upstream)
            if listen is not None:
                raise ValueError(
                    f"upstream {upstream} reaches this proxy's own listener {listen}: "
                    "forwarding to it would loop")
        return self

    def with_resolv_conf(self, path: str = "/etc/resolv.conf") -> Settings:
        """Fill in upstreams from resolv.conf when none were given."""
        if self.upstreams:
            return self
        found = [u for u in resolv_conf_nameservers(path) if self.own_listener(u) is None]
        if not found:
            raise ConfigError(
                f"no upstream resolver: {path} lists none (besides this proxy); "
                "give one with --upstream HOST[:PORT] or 'upstreams:' in the config file"
            )
        return self.model_copy(update={"upstreams": found})

    def own_listener(self, upstream: str) -> str | None:
        """The listen address that `upstream` would reach, if any: forwarding there loops."""
        return next((listen for listen in self.listen if listener_receives(listen, upstream)),
                    None)

    def admin_on_loopback(self) -> bool:
        """Whether only this machine can reach the admin listener.  A wildcard
        address (0.0.0.0, ::) listens on every interface: not loopback."""
        if self.admin is None:
            return True
        host, _ = split_hostport(self.admin, ADMIN_PORT)
        return ipaddress.ip_address(host).is_loopback

    def check_admin_token(self) -> None:
        """Refuse an admin listener off loopback without a token, a token too
        short to resist guessing, and metrics_auth without a token."""
        if self.admin is None:
            return
        if self.admin_token is not None and len(self.admin_token) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"admin_token is {len(self.admin_token)} characters long: use at least "
                f"{MIN_TOKEN_LENGTH} (e.g. the output of `openssl rand -hex 16`)")
        if self.admin_token:
            return
        if self.metrics_auth:
            raise ConfigError("metrics_auth needs admin_token (or DNSCHAOS_ADMIN_TOKEN)")
        if not self.admin_on_loopback():
            raise ConfigError(
                f"the admin listener {self.admin} is not on loopback: set admin_token "
                "(or DNSCHAOS_ADMIN_TOKEN) so that nobody else can start or stop faults"
            )
