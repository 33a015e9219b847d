"""The fault registry is the only list of fault types: the modules of
proxy/core/faults/ register them, and the model's union, the JSON Schema,
FAULT_TYPES, the loader's messages and the docs check all follow it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import random
from collections.abc import Iterator
from typing import Literal

import pytest
from pydantic import BaseModel, TypeAdapter

from proxy.core import faults
from proxy.core.faults import FAULT_TYPES, REGISTRY, Fault, PhaseState, build_fault, register
from proxy.core.faults.registry import spec_union, unregister
from proxy.core.query import QueryView
from proxy.core.spec import Base
from proxy.core.stale import StaleStore
from proxy.core.verdict import Drop, Verdict
from proxy.loader import scenario_schema
from support.docs import fault_sections

HELPERS = {"base", "registry"}  # the modules of the package that hold no fault


def fault_modules() -> Iterator[str]:
    for info in pkgutil.iter_modules(faults.__path__):
        if info.name not in HELPERS:
            yield f"{faults.__name__}.{info.name}"


def test_every_fault_module_is_imported_and_registers_what_it_defines() -> None:
    modules = list(fault_modules())
    assert len(modules) >= 10
    registered = {entry.behaviour for entry in REGISTRY.values()}
    specs = {entry.spec for entry in REGISTRY.values()}
    for name in modules:
        module = importlib.import_module(name)
        assert getattr(faults, name.rsplit(".", 1)[1]) is module, f"{name} not in __init__"
        own = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
               if obj.__module__ == name and not obj.__name__.startswith("_")]
        behaviours = [c for c in own if issubclass(c, Fault)]
        assert behaviours, f"{name} defines no fault"
        assert set(behaviours) <= registered, name
        assert {c for c in own if issubclass(c, BaseModel) and "type" in c.model_fields} <= specs


def test_fault_types_are_the_registry_keys() -> None:
    assert FAULT_TYPES == tuple(REGISTRY)
    for name, entry in REGISTRY.items():
        assert entry.name == name == entry.behaviour.type
        assert entry.spec.model_fields["type"].annotation == Literal[name]


def fault_schema_names(schema: dict) -> tuple[list[str], list[str]]:
    """(the short forms, the discriminator's keys) of a rule's `fault` in a schema."""
    fault = schema["$defs"]["Rule"]["properties"]["fault"]
    short = next(s for s in fault["anyOf"] if s.get("type") == "string")
    union = next(s for s in fault["anyOf"] if "discriminator" in s)
    return short["enum"], list(union["discriminator"]["mapping"])


def test_the_schema_lists_the_registered_faults_in_order() -> None:
    short, mapping = fault_schema_names(scenario_schema())
    assert short == list(FAULT_TYPES) and sorted(mapping) == sorted(FAULT_TYPES)
    delay_then = scenario_schema()["$defs"]["DelayFault"]["properties"]["then"]
    assert "discriminator" in str(delay_then) and "flap" in str(delay_then)


def test_the_docs_have_a_section_per_registered_fault() -> None:
    assert sorted(fault_sections()) == sorted(REGISTRY)


# --- a throwaway fault: registering it is all it takes -------------------------------


class EchoTestFault(Base):
    """A throwaway fault for this test."""

    type: Literal["echo-test"]
    close: bool = False


class EchoTest(Fault):
    """Drops the query (a throwaway for the registry test)."""

    def __init__(self, spec: EchoTestFault, store: StaleStore) -> None:
        self.close = spec.close

    def apply(self, q: QueryView, run_time: float, rng: random.Random,
              phase: PhaseState) -> Verdict | None:
        return Drop(close_tcp=self.close)

    def describe(self) -> str:
        return "echo test"


@pytest.fixture
def echo_registered() -> Iterator[None]:
    register(EchoTestFault)(EchoTest)
    try:
        yield
    finally:
        unregister("echo-test")


def test_a_registered_fault_joins_the_union_and_the_docs_check(echo_registered: None) -> None:
    required, optional = spec_union()
    adapter = TypeAdapter(required)
    spec = adapter.validate_python({"type": "echo-test", "close": True})
    assert isinstance(spec, EchoTestFault)
    assert isinstance(adapter.validate_python("echo-test"), EchoTestFault)  # the short form
    assert isinstance(adapter.validate_python("drop"), faults.drop.DropFault)
    assert TypeAdapter(optional).validate_python(None) is None
    schema = adapter.json_schema()
    assert "EchoTestFault" in schema["$defs"]
    assert schema["anyOf"][0]["enum"][-1] == "echo-test"
    fault = build_fault(spec, StaleStore())
    assert isinstance(fault, EchoTest) and fault.type == "echo-test"
    assert faults.describe_type("echo-test") == (
        "Drops the query (a throwaway for the registry test).")
    # Undocumented, so the docs check (test_docs) fails until it has its section.
    assert sorted(fault_sections()) != sorted(REGISTRY)


def test_unregistered_the_throwaway_is_unknown() -> None:
    assert "echo-test" not in REGISTRY
    with pytest.raises(ValueError):
        TypeAdapter(spec_union()[0]).validate_python({"type": "echo-test"})


def test_a_type_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register(faults.drop.DropFault)(EchoTest)
    assert REGISTRY["drop"].behaviour is faults.drop.Drop
