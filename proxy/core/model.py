"""The scenario file format, as validated models.

One definition serves three purposes: the loader validates YAML against it
(every error names the field path), the engine compiles it into matchers,
and `dnschaos schema` prints its JSON Schema for editors.

A scenario is a list of phases; a phase is a list of rules; a rule is a
selector (`match`) plus a `fault`.  Durations are written "150ms", "5m",
"2h" (or a number of seconds) and are float seconds in code.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
        WithJsonSchema,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """'150ms' -> 0.15, '5m' -> 300.0, 2 -> 2.0.  Negative values are refused."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '150ms', '5m'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT[match.group(2)]
        if value.strip().startswith("-"):
            raise ValueError(f"duration must not be negative, got {value!r}")
    raise ValueError(f"invalid duration {value!r}: write e.g. '150ms', '30s', '5m', '2h'")


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
            ],
            "description": "seconds, or a string such as '150ms', '30s', '5m', '2h'",
        }
    ),
]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Ttl = Annotated[int, Field(ge=0, le=2**31 - 1)]


def _as_list(value: Any) -> Any:
    """`qtype: A` is short for `qtype: [A]`; YAML numbers (`qtype: 65`) become strings."""
    if isinstance(value, (str, int)):
        value = [value]
    if isinstance(value, list):
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


# json_schema_input_type: the JSON Schema shows what files may contain (a single
# value or a list, numbers allowed), not the list the validator turns it into.
_OneOrMany = BeforeValidator(_as_list, json_schema_input_type=Union[str, int, list[str | int]])
StrList = Annotated[list[str], _OneOrMany]


def _network(value: Any) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise ValueError(f"invalid CIDR {value!r}") from None


Cidr = Annotated[str, BeforeValidator(_network)]


class Base(BaseModel):
    # use_attribute_docstrings: the docstring under a field becomes its JSON Schema
    # description, shown by editors.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              use_attribute_docstrings=True)


# --- selectors -------------------------------------------------------------


class Ramp(Base):
    """A value that moves linearly from `from` to `to` across the phase."""

    start: Probability = Field(alias="from")
    end: Probability = Field(alias="to")


class HashSample(Base):
    """Select a stable share of clients or names for the whole phase."""

    by: Literal["client", "name"] = "client"
    share: Probability
    seed: int = 0


class Match(Base):
    """Selects queries.  All keys given must match (AND); `all`, `any` and
    `not` nest.  An empty match selects every query.  The sampling keys are
    checked last, in this order: `hash`, `every`, `first`, `probability`."""

    name: StrList | None = None
    """Exact names, case-insensitive, trailing dot optional."""
    suffix: StrList | None = None
    """Zones: 'example.com' matches itself and 'x.example.com', never 'xexample.com'."""
    glob: StrList | None = None
    """Shell-style patterns: '*.s3.amazonaws.com', 'dynamodb.*.amazonaws.com'.
    Case-insensitive; '*' also matches dots ('*.example.com' matches 'a.b.example.com')."""
    regex: StrList | None = None
    """Python regular expressions, searched in the lower-case name without trailing dot."""
    qtype: StrList | None = None
    """Query types by name ('A', 'AAAA', 'ANY') or number ('65')."""
    transport: Literal["udp", "tcp"] | None = None
    clients: Annotated[list[Cidr], _OneOrMany] | None = None
    """Client networks to include (IPv4 and IPv6 CIDRs; a bare address is a /32 or /128)."""
    exclude_clients: Annotated[list[Cidr], _OneOrMany] | None = None
    """Client networks never selected, even when `clients` includes them."""
    listener: StrList | None = None
    """Local listen addresses ('127.0.0.2:53'): fail one of a client's nameservers."""
    probability: Probability | Ramp | None = None
    """Chance per query; 0 never, 1 always.  Seeded: runs are reproducible."""
    every: Annotated[int, Field(ge=1)] | None = None
    """Select every Nth query that the other keys select (1 = all)."""
    first: Annotated[int, Field(ge=0)] | None = None
    """Select only the first N queries that the other keys select, then pass."""
    hash: HashSample | None = None
    all: list[Match] | None = None
    any: list[Match] | None = None
    not_: Match | None = Field(default=None, alias="not")

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return patterns

    @field_validator("qtype")
    @classmethod
    def _known_qtypes(cls, qtypes: list[str] | None) -> list[str] | None:
        from proxy.core.rr import qtype_number

        for qtype in qtypes or []:
            try:
                qtype_number(qtype)
            except ValueError:
                raise
            except Exception:  # dnslib raises its own DNSError for unknown names
                raise ValueError(f"unknown query type {qtype!r}") from None
        return qtypes


# --- faults ----------------------------------------------------------------


class Soa(Base):
    """The SOA put in the authority section of negative answers, so that
    resolvers cache them as they cache real ones (RFC 2308)."""

    zone: str | None = None
    """Owner of the SOA; default: the query name's parent zone."""
    negative_ttl: Ttl = 60
    """The SOA's TTL and MINIMUM field: how long resolvers cache the negative answer."""
    mname: str = "ns.invalid."
    rname: str = "hostmaster.invalid."
    serial: int = 1


class Ede(Base):
    """An Extended DNS Error (RFC 8914) added to the reply's EDNS."""

    code: Annotated[int, Field(ge=0, le=65535)]
    text: str = ""


class _Negative(Base):
    soa: Soa | None = Field(default_factory=Soa)
    """Set to null for a reply without SOA."""
    ede: Ede | None = None


class NxdomainFault(_Negative):
    """The name does not exist."""

    type: Literal["nxdomain"]


class ServfailFault(_Negative):
    """The server failed (what resolvers answer when authoritative servers are unreachable)."""

    type: Literal["servfail"]
    soa: Soa | None = None
    """Real SERVFAILs carry no SOA; give one (`soa: {}`) to add it anyway."""


class RefusedFault(_Negative):
    """The server refuses to answer."""

    type: Literal["refused"]
    soa: Soa | None = None
    """Real REFUSED replies carry no SOA; give one (`soa: {}`) to add it anyway."""


class RcodeFault(_Negative):
    """Any response code, by name (FORMERR, NOTIMP, YXDOMAIN...) or number."""

    type: Literal["rcode"]
    rcode: str | int
    """Above 15 (BADVERS...) the upper bits travel in an OPT record, added even
    when the query had no EDNS."""
    soa: Soa | None = None
    """No SOA unless given (`soa: {}` for the defaults)."""

    @field_validator("rcode")
    @classmethod
    def _known_rcode(cls, value: str | int) -> str | int:
        from proxy.core.rr import rcode_number

        try:
            rcode_number(value)
        except ValueError:
            raise
        except Exception:  # dnslib raises its own DNSError for unknown names
            raise ValueError(f"unknown rcode {value!r}") from None
        return value


class NodataFault(_Negative):
    """NOERROR with an empty answer: the name exists but has no such record."""

    type: Literal["nodata"]


class DropFault(Base):
    """No reply at all: the client times out."""

    type: Literal["drop"]
    tcp: Literal["hold", "close"] = "hold"
    """For TCP clients: keep the connection open and silent, or close it."""


class DelayFault(Base):
    """Wait, then forward (or apply `then`).  Other queries are not held up."""

    type: Literal["delay"]
    delay: Duration
    jitter: Duration = 0.0
    """Uniform: +/- jitter around delay.  Normal: standard deviation."""
    distribution: Literal["uniform", "normal"] = "uniform"
    then: OptionalFault = None
    """A fault applied after the delay (a slow SERVFAIL); default: forward."""


class StaleFault(Base):
    """Answer with what the name resolved to before."""

    type: Literal["stale"]
    source: Literal["last", "snapshot"] = "last"
    """'last': the last answer seen before the rule became active.
    'snapshot': the answers held when the phase started (a frozen old plan)."""
    ttl: Ttl = 30
    fallback: Fault = Field(default_factory=lambda: ServfailFault(type="servfail"))
    """Applied when no earlier answer was ever seen for the name."""


class SpoofFault(Base):
    """Answer with made-up records.  Without any record given, A queries get
    192.0.2.1 and AAAA queries 2001:db8::1 (documentation ranges)."""

    type: Literal["spoof"]
    a: Annotated[list[str], _OneOrMany] = Field(default_factory=list)
    aaaa: Annotated[list[str], _OneOrMany] = Field(default_factory=list)
    cname: str | None = None
    records: Annotated[list[str], _OneOrMany] = Field(default_factory=list)
    """Zone-file lines; '@' or an empty owner stands for the query name, and
    relative owner names are relative to it.  Names inside record data should
    be absolute (end with a dot).  A TTL written in a line is kept."""
    ttl: Ttl = 60

    @field_validator("records")
    @classmethod
    def _zone_lines(cls, values: list[str]) -> list[str]:
        from proxy.core.faults import parse_records

        parse_records(values, 60)  # raises ValueError naming the bad line
        return values

    @field_validator("a")
    @classmethod
    def _ipv4(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.IPv4Address(value)
        return values

    @field_validator("aaaa")
    @classmethod
    def _ipv6(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.IPv6Address(value)
        return values


class TruncateFault(Base):
    """TC=1 over UDP with no records, so the client retries over TCP.  TCP
    queries are forwarded normally."""

    type: Literal["truncate"]


class TtlFault(Base):
    """Rewrite the TTLs in the upstream's answer: `set`, or clamp to
    `min`/`max`, or `scale` by a factor."""

    type: Literal["ttl"]
    set: Ttl | None = None
    min: Ttl | None = None
    max: Ttl | None = None
    scale: Annotated[float, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _one_mode(self) -> TtlFault:
        modes = [self.set is not None, self.min is not None or self.max is not None,
                 self.scale is not None]
        if sum(modes) != 1:
            raise ValueError("give exactly one of: set, min/max, scale")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class PartialFault(Base):
    """Remove a share of the address records from the real answer (load
    balancer nodes vanishing), re-rolled every `period`."""

    type: Literal["partial"]
    share: Probability = 0.3
    """Share of A/AAAA records removed (at least one is kept unless `empty` fires)."""
    empty: Probability = 0.0
    """Chance, per period, that the answer is empty altogether."""
    period: Annotated[Duration, Field(gt=0)] = 30.0
    ttl: Ttl | None = None
    """When set, the TTL of the records kept."""


class CorruptFault(Base):
    """A malformed reply, for testing clients' parsers."""

    type: Literal["corrupt"]
    mode: Literal["wrong_id", "wrong_question", "short", "random"] = "random"


class FlapFault(Base):
    """`fault` switched on and off: on for `duty` of each `period`."""

    type: Literal["flap"]
    period: Annotated[Duration, Field(gt=0)]
    duty: Probability = 0.5
    fault: Fault


_AnyFault = Annotated[
    Union[
        NxdomainFault, ServfailFault, RefusedFault, RcodeFault, NodataFault, DropFault,
        DelayFault, StaleFault, SpoofFault, TruncateFault, TtlFault, PartialFault,
        CorruptFault, FlapFault,
    ],
    Field(discriminator="type"),
]


def _short_form(value: Any) -> Any:
    """`fault: nxdomain` is short for `fault: {type: nxdomain}`."""
    return {"type": value} if isinstance(value, str) else value


FAULT_TYPES = ("nxdomain", "servfail", "refused", "rcode", "nodata", "drop", "delay", "stale",
               "spoof", "truncate", "ttl", "partial", "corrupt", "flap")

# The JSON Schema also accepts the short form, so editors do not flag `fault: nxdomain`.
_FaultInput = Union[Literal[FAULT_TYPES], _AnyFault]  # type: ignore[valid-type]
Fault = Annotated[_AnyFault, BeforeValidator(_short_form, json_schema_input_type=_FaultInput)]
OptionalFault = Annotated[
    _AnyFault | None,
    BeforeValidator(_short_form, json_schema_input_type=Union[_FaultInput, None]),
]


# --- rules, phases, scenarios ----------------------------------------------


class Limit(Base):
    """Stop injecting after `count` faults, or inject at most `per_second`."""

    count: Annotated[int, Field(ge=0)] | None = None
    per_second: Annotated[float, Field(gt=0)] | None = None


def _match_all(value: Any) -> Any:
    """`match: all` says outright what an empty match means: every query."""
    return {} if value == "all" else value


class Rule(Base):
    """A selector plus a fault.  The first rule whose match selects a query wins."""

    name: str | None = None
    """Shown in metrics, logs and the report; default: '<phase>/<index>'."""
    match: Annotated[Match, BeforeValidator(
        _match_all, json_schema_input_type=Union[Literal["all"], Match])] = Field(
        default_factory=Match)
    """Which queries; `all` (or no match) selects every query.  Ad hoc rules
    (the API, `dnschaos rule add`) must say `all` to mean that."""
    fault: Fault
    limit: Limit | None = None


class Phase(Base):
    name: str
    duration: Duration
    rules: list[Rule] = Field(default_factory=list)


# --- game days: probes -------------------------------------------------------


class PrometheusCheck(Base):
    """A Prometheus instant query whose value must stay at or under `max`."""

    url: str
    """The Prometheus server, e.g. 'http://prometheus:9090'."""
    query: str
    """PromQL; every sample of the result is compared (none: the check passes)."""
    max: float


class Probe(Base):
    """A stop condition: checked every `interval`; after `failures` failures
    in a row the run aborts.  Give exactly one of `http`, `prometheus`, `command`."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    http: str | None = None
    """A URL that must answer 2xx."""
    prometheus: PrometheusCheck | None = None
    command: Annotated[list[str], Field(min_length=1)] | None = None
    """A command (argv list, no shell) that must exit 0."""
    interval: Annotated[Duration, Field(gt=0)] = 10.0
    failures: Annotated[int, Field(ge=1)] = 3
    """Consecutive failures that abort the run."""
    timeout: Annotated[Duration, Field(gt=0)] = 5.0
    """A check that takes longer fails."""

    @field_validator("http")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_check(self) -> Probe:
        given = [k for k in ("http", "prometheus", "command") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of: http, prometheus, command")
        return self

    @property
    def kind(self) -> str:
        return "http" if self.http else "prometheus" if self.prometheus else "command"


class Scenario(Base):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    time_scale: Annotated[float, Field(gt=0)] = 1.0
    """Multiplies every phase duration: 0.1 replays a 3 h incident in 18 min."""
    seed: int = 0
    """Seed for the per-query random choices, for reproducible runs."""
    schedule: str | None = None
    """A cron expression ('0 14 * * TUE'): the scenario starts at each of its
    times, in `timezone`, and phases follow the wall clock from there."""
    timezone: str | None = None
    """IANA time zone of `schedule` ('Europe/Paris', 'UTC'); required with it."""
    max_duration: Annotated[Duration, Field(gt=0)] | None = None
    """Hard limit of a run (wall time, pauses included); default: the
    scenario's total length.  Always capped by the proxy's `max_run_duration`."""
    probes: list[Probe] = Field(default_factory=list)
    """Stop conditions checked during a run; one failing `failures` times aborts it."""
    phases: Annotated[list[Phase], Field(min_length=1)]

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            from proxy.core.schedule import check_cron

            check_cron(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            from proxy.core.schedule import check_timezone

            check_timezone(value)
        return value

    @model_validator(mode="after")
    def _zone_with_schedule(self) -> Scenario:
        if self.schedule is not None and self.timezone is None:
            raise ValueError("a schedule needs an explicit timezone (e.g. timezone: UTC)")
        if self.timezone is not None and self.schedule is None:
            raise ValueError("timezone is only meaningful with a schedule")
        names = [probe.name for probe in self.probes]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"probe name {name!r} used twice")
        return self

    @model_validator(mode="after")
    def _unique_rule_names(self) -> Scenario:
        seen: set[str] = set()
        for phase in self.phases:
            names = [rule.name for rule in phase.rules if rule.name]
            for name in names:
                if names.count(name) > 1 and name not in seen:
                    seen.add(name)
                    raise ValueError(f"rule name {name!r} used twice in phase {phase.name!r}")
        return self

    @property
    def total_duration(self) -> float:
        """Seconds from start to end, after time_scale."""
        return sum(phase.duration for phase in self.phases) * self.time_scale


for _model in (Match, DelayFault, StaleFault, FlapFault):
    _model.model_rebuild()
