"""The pieces every part of the scenario format is made of: the strict
base model, durations, probabilities, TTLs, one-or-many lists, CIDRs, and
the SOA and EDE blocks that several faults share.

Nothing here knows a fault, a selector or a rule, so the fault modules
(proxy/core/faults/) and the scenario model (model.py) both build on it.
Durations are written "150ms", "5m", "2h" (or a number of seconds) and
are float seconds in code.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

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


def format_duration(seconds: float) -> str:
    """3720 -> '1h 2m', 0.15 -> '150ms': the way durations are written in files."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    whole = round(seconds)
    parts = [(whole // 3600, "h"), (whole % 3600 // 60, "m"), (whole % 60, "s")]
    return " ".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


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
OneOrMany = BeforeValidator(_as_list, json_schema_input_type=str | int | list[str | int])
StrList = Annotated[list[str], OneOrMany]


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
