"""The registry of fault types: the only list of them.

Each fault module registers its behaviour with the model of its scenario
keys, `@register(DropFault)` on `class Drop(Fault)`; the type name is the
model's `type` literal.  Everything that lists faults is derived from here:
the scenario model's union of fault models (and so the JSON Schema and the
loader's errors), `FAULT_TYPES`, the docs check and the tests' tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Literal,
    Protocol,
    TypeAlias,
    TypeVar,
    Union,
    get_args,
)

from pydantic import BaseModel, BeforeValidator, Field

from proxy.core.faults.base import Fault
from proxy.core.stale import StaleStore


class Spec(Protocol):
    """What the rest of the proxy sees of a fault's model: its type name, and
    its keys as data (the API and the report show them)."""

    @property
    def type(self) -> str: ...

    def model_dump(self, *, by_alias: bool | None = ...,
                   exclude_none: bool = ...) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class FaultType:
    name: str
    """What scenario files write: `fault: {type: NAME}`."""
    spec: type[BaseModel]
    """The model of the fault's keys (validation, JSON Schema)."""
    behaviour: type[Fault]
    """Compiled once per rule from a validated spec."""

    @property
    def doc(self) -> str:
        """The behaviour's one-line documentation."""
        return (self.behaviour.__doc__ or "").strip()


REGISTRY: dict[str, FaultType] = {}
"""Fault type name -> its model and behaviour, in registration order."""

F = TypeVar("F", bound=type[Fault])


def type_name(spec: type[BaseModel]) -> str:
    """The fault type a model stands for: its `type: Literal["name"]` field."""
    field = spec.model_fields.get("type")
    names = get_args(field.annotation) if field is not None else ()
    if len(names) != 1 or not isinstance(names[0], str):
        raise TypeError(f"{spec.__name__} needs a field `type: Literal['name']`")
    return names[0]


def register(spec: type[BaseModel]) -> Callable[[F], F]:
    """Class decorator: the decorated behaviour compiles `spec`."""
    name = type_name(spec)

    def decorate(behaviour: F) -> F:
        if name in REGISTRY:
            raise ValueError(f"fault type {name!r} registered twice")
        behaviour.type = name
        REGISTRY[name] = FaultType(name, spec, behaviour)
        return behaviour

    return decorate


def unregister(name: str) -> None:
    """Forget a fault type (for tests that register a throwaway one)."""
    del REGISTRY[name]


def build_fault(spec: Spec, store: StaleStore) -> Fault:
    """Compile a validated fault model (NxdomainFault, DelayFault...) into its behaviour."""
    return REGISTRY[spec.type].behaviour(spec, store)


def describe_type(name: str) -> str:
    """The one-line documentation of a fault type."""
    return REGISTRY[name].doc


def _short_form(value: Any) -> Any:
    """`fault: nxdomain` is short for `fault: {type: nxdomain}`."""
    return {"type": value} if isinstance(value, str) else value


def spec_union() -> tuple[Any, Any]:
    """(required, optional) annotated types for a field holding any
    registered fault's model, discriminated by `type`, short form allowed."""
    specs = tuple(entry.spec for entry in REGISTRY.values())
    names = tuple(REGISTRY)
    # Union[...] of a tuple built at run time: the `X | Y` form cannot spell it.
    union = Union[specs]  # type: ignore[valid-type]  # noqa: UP007
    any_fault = Annotated[union, Field(discriminator="type")]
    # The JSON Schema also accepts the short form, so editors do not flag `fault: nxdomain`.
    short = Literal[names] | any_fault  # type: ignore[valid-type]
    required = Annotated[any_fault, BeforeValidator(_short_form, json_schema_input_type=short)]
    optional = Annotated[any_fault | None,
                         BeforeValidator(_short_form, json_schema_input_type=short | None)]
    return required, optional


def resolve_nested(required: Any, optional: Any) -> None:
    """Complete the models that nest a fault (`then`, `fallback`, `fault`):
    they name the union as "FaultSpec" / "OptionalFaultSpec", which exists
    only once every fault is registered."""
    for entry in REGISTRY.values():
        if not entry.spec.__pydantic_complete__:
            entry.spec.model_rebuild(
                _types_namespace={"FaultSpec": required, "OptionalFaultSpec": optional})


if TYPE_CHECKING:
    # For the type checker a nested fault is any fault model; at run time
    # these names are the union, put in by `resolve_nested`.
    FaultSpec: TypeAlias = Spec
    OptionalFaultSpec: TypeAlias = Spec | None
