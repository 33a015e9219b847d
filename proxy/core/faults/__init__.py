"""Faults: one module per fault (or small family), each holding the model
of its scenario keys, its behaviour and its registration.

How it works: a fault module defines a pydantic model (`DropFault`: the keys
a scenario file writes under `fault:`) and a behaviour class registered for
it (`@register(DropFault) class Drop(Fault)`).  The registry
(registry.py) is the only list of fault types: the scenario model's union of
fault models, `FAULT_TYPES`, the JSON Schema and the docs and test checks are
derived from it.  This file imports every fault module once, one line each,
like CoreDNS's plugin.cfg; the order here is the order of the union, the
schema and the loader's error messages.

`build_fault(spec, store)` turns a validated model into a behaviour, once,
when a scenario loads.  Per query the engine calls `apply(q, run_time, rng,
phase)`, which returns a verdict, or None when the query passes untouched (a
flap that is off, a truncate on TCP, a dnssec fault on a query without DO).
Response-side faults (ttl, partial, dnssec, corrupt wrong_id /
wrong_question / short) return `Forward(respond=self)`;
the engine later calls `respond(q, answer, run_time, rng, phase)` with the
upstream's answer and sends what it returns.  `phase` gives the phase's
start (run time, for `flap` and `partial` periods) and its stale snapshot.
Reply bytes are built by proxy/core/replies.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

from proxy.core.faults import registry
from proxy.core.faults.base import Fault, PhaseState, ResponseFault
from proxy.core.faults.registry import REGISTRY, FaultType, build_fault, describe_type, register

# The faults, one line each.  isort: the order is the schema's, keep it.
# isort: off
from proxy.core.faults import negative  # nxdomain, servfail, refused, rcode, nodata
from proxy.core.faults import drop
from proxy.core.faults import delay
from proxy.core.faults import stale
from proxy.core.faults import spoof
from proxy.core.faults import truncate
from proxy.core.faults import ttl
from proxy.core.faults import partial
from proxy.core.faults import corrupt
from proxy.core.faults import flap
from proxy.core.faults import dnssec
# isort: on

if TYPE_CHECKING:
    FaultSpec: TypeAlias = registry.Spec
    """Any fault's model (for the type checker: something with a `type`)."""
    OptionalFaultSpec: TypeAlias = registry.Spec | None
else:
    FaultSpec, OptionalFaultSpec = registry.spec_union()
    registry.resolve_nested(FaultSpec, OptionalFaultSpec)

FAULT_TYPES = tuple(REGISTRY)
"""Every fault type name, in registration order."""

__all__ = [
    "FAULT_TYPES",
    "REGISTRY",
    "Fault",
    "FaultSpec",
    "FaultType",
    "OptionalFaultSpec",
    "PhaseState",
    "ResponseFault",
    "build_fault",
    "describe_type",
    "register",
]
