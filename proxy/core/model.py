"""The scenario file format, as validated models.

One definition serves three purposes: the loader validates YAML against it
(every error names the field path), the engine compiles it into matchers,
and `dnschaos schema` prints its JSON Schema for editors.

A scenario is a list of phases; a phase is a list of rules; a rule is a
selector (`match`) plus a `fault`.  The fault models live with their
behaviour in proxy/core/faults/ (one module each); `FaultSpec` is their
union, built by the fault registry.  The shared pieces (durations, the
strict base model...) are in spec.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from proxy.core.codes import qtype_number
from proxy.core.faults import FaultSpec
from proxy.core.schedule import check_cron, check_timezone
from proxy.core.spec import (
    Base,
    Cidr,
    Duration,
    OneOrMany,
    Probability,
    StrList,
    format_duration,
)
from proxy.core.spec import parse_duration as parse_duration  # re-exported for the CLI

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
    clients: Annotated[list[Cidr], OneOrMany] | None = None
    """Client networks to include (IPv4 and IPv6 CIDRs; a bare address is a /32 or /128)."""
    exclude_clients: Annotated[list[Cidr], OneOrMany] | None = None
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
        for qtype in qtypes or []:
            qtype_number(qtype)  # ValueError naming the unknown type
        return qtypes


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
        _match_all, json_schema_input_type=Literal["all"] | Match)] = Field(
        default_factory=Match)
    """Which queries; `all` (or no match) selects every query.  Ad hoc rules
    (the API, `dnschaos rule add`) must say `all` to mean that."""
    fault: FaultSpec
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
            check_cron(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
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


Match.model_rebuild()  # `all`, `any`, `not` nest matches

def wanted_length(scenario: Scenario, max_duration: float | None = None) -> float:
    """How long a run would last without max_run_duration: the request's
    max_duration, else the scenario's, else its total length."""
    if max_duration is not None:
        return max_duration
    return scenario.max_duration if scenario.max_duration is not None else scenario.total_duration


def cap_warning(what: str, wanted: float | None, cap: float) -> str | None:
    """The warning when `what`, asked to last `wanted` seconds, is cut to `cap`."""
    if wanted is None or wanted <= cap:
        return None
    return (f"{what} asks for {format_duration(wanted)} but max_run_duration is "
            f"{format_duration(cap)}: it stops after {format_duration(cap)}")
