"""Load YAML files into pydantic models, reporting every problem with its line.

How it works: PyYAML composes the text into a node tree, which knows where
each key and item starts, and constructs plain data from that same tree.  One
walk over the tree maps every path such as ('phases', 1, 'rules', 0) to its
line and finds duplicate keys (which YAML would silently let the last one
win).  Pydantic then validates the data.  Each pydantic error location is
turned back into a YAML path: pydantic inserts the name of the union member it
tried ('constrained-float', 'Ramp', 'nxdomain'), so the location is walked
alongside the model's types to drop those tags, and errors from union members
that do not fit the input's shape (a number checked against a mapping type)
are left out.  Finally the message is reworded for people.

All of this runs when a file loads, never per query.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from proxy.config import DEFAULT_MAX_RUN_DURATION
from proxy.core.model import Scenario, cap_warning, wanted_length
from proxy.core.spec import format_duration
from proxy.errors import FieldProblem, InvalidFile

M = TypeVar("M", bound=BaseModel)
Loc = tuple[Any, ...]  # a path into the data: keys and list indexes

SCHEMA_URL = "https://json-schema.org/draft/2020-12/schema"
_MISSING = object()


# --- public API ------------------------------------------------------------


def load_model(text: str, file: str, model: type[M]) -> M:
    """Parse YAML `text` and validate it as `model`.  Raises InvalidFile
    listing every problem as `file:line: path: message`."""
    data, lines, problems, bools = _parse_yaml(text, file)
    try:
        result = model.model_validate(data)
    except ValidationError as exc:
        problems += _pydantic_problems(exc, data, lines, file, model, bools)
        result = None
    if problems:
        raise InvalidFile(_sorted(problems))
    assert result is not None
    return result


def load_scenario_text(text: str, file: str = "<api>") -> Scenario:
    return load_model(text, file, Scenario)


def load_scenario(path: str | Path) -> Scenario:
    return load_scenario_text(_read(path), str(path))


def validate_paths(paths: list[str]) -> list[FieldProblem]:
    """Every problem in the given files; directories stand for their
    *.yaml and *.yml files."""
    problems: list[FieldProblem] = []
    for name in paths:
        files, problems_here = _expand(name)
        problems += problems_here
        for file in files:
            problems += _check(file)[1]
    return problems


def main_validate(argv: list[str], max_run_duration: float = DEFAULT_MAX_RUN_DURATION) -> int:
    """`dnschaos validate FILE|DIR...`: problems to stderr, one a line; an
    OK line per good file to stdout, and its warnings (valid, but surprising:
    see scenario_warnings) to stderr.  Returns 0, or 2 when anything is wrong."""
    if not argv:
        print("usage: dnschaos validate FILE|DIR...", file=sys.stderr)
        return 2
    problems: list[FieldProblem] = []
    for name in argv:
        files, problems_here = _expand(name)
        problems += problems_here
        for file in files:
            scenario, found = _check(file)
            problems += found
            if scenario is not None:
                print(f"OK {file} ({_summary(scenario)})")
                for warning in scenario_warnings(_read(file), file, scenario, max_run_duration):
                    print(warning, file=sys.stderr)
    for problem in problems:
        print(problem.render(), file=sys.stderr)
    return 2 if problems else 0


def scenario_warnings(text: str, file: str, scenario: Scenario,
                      max_run_duration: float = DEFAULT_MAX_RUN_DURATION) -> list[str]:
    """What is valid but will surprise: a run longer than max_run_duration
    (it is cut), a rule without `match` (it faults every query)."""
    warnings = []
    cut = cap_warning(f"scenario {scenario.name}", wanted_length(scenario), max_run_duration)
    if cut:
        warnings.append(f"{file}: warning: {cut} (unless the proxy runs with a larger "
                        "max_run_duration)")
    data, lines, _, _ = _parse_yaml(text, file)
    for i, phase in enumerate(data.get("phases") or []):
        rules = phase.get("rules") if isinstance(phase, dict) else None
        for j, rule in enumerate(rules if isinstance(rules, list) else []):
            if isinstance(rule, dict) and rule.get("match") in (None, {}):
                path = ("phases", i, "rules", j)
                warnings.append(FieldProblem(
                    file, _line(lines, path), _render_path(path),
                    "warning: no match: this rule faults every query (write `match: all` "
                    "if that is meant)").render())
    return warnings


def scenario_schema() -> dict[str, Any]:
    """The JSON Schema of scenario files, as committed in docs/scenario.schema.json."""
    schema = Scenario.model_json_schema(by_alias=True)
    header = {
        "$schema": SCHEMA_URL,
        "title": "dnschaos scenario",
        "description": "A dnschaos scenario: timed phases of DNS fault-injection rules. "
        "Reference: docs/scenarios.md.",
    }
    schema.pop("title", None)
    return {**header, **schema}


def main_schema() -> int:
    """`dnschaos schema`: print the scenario JSON Schema."""
    print(json.dumps(scenario_schema(), indent=2))
    return 0


# --- files -----------------------------------------------------------------


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        message = "no such file"
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text: {exc.reason}"
    except OSError as exc:
        message = f"cannot read: {exc.strerror}"
    raise InvalidFile([FieldProblem(str(path), None, "", message)])


def _expand(name: str) -> tuple[list[str], list[FieldProblem]]:
    """A file stands for itself, a directory for its *.yaml and *.yml files."""
    path = Path(name)
    if not path.is_dir():
        return [name], []
    found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if not found:
        return [], [FieldProblem(name, None, "", "no *.yaml or *.yml files in directory")]
    return [str(p) for p in found], []


def _check(file: str) -> tuple[Scenario | None, list[FieldProblem]]:
    try:
        return load_scenario(file), []
    except InvalidFile as exc:
        return None, exc.problems


def _summary(scenario: Scenario) -> str:
    rules = sum(len(phase.rules) for phase in scenario.phases)
    text = (f"{_count(len(scenario.phases), 'phase')}, {_count(rules, 'rule')}, "
            f"{format_duration(scenario.total_duration)}")
    if scenario.time_scale != 1:
        text += f" at time_scale {scenario.time_scale:g}"
    return text




def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"



# --- YAML with lines -------------------------------------------------------


def _parse_yaml(text: str, file: str) -> tuple[Any, dict[Loc, int], list[FieldProblem],
                                               dict[Loc, str]]:
    """Returns (data, path -> line, problems found in the YAML itself, path ->
    source text of each value YAML read as a boolean: `on`, `no`...)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            message = "the file is empty: expected a YAML mapping (key: value)"
            raise InvalidFile([FieldProblem(file, None, "", message)])
        if not isinstance(node, yaml.MappingNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
            message = f"expected a YAML mapping (key: value) at the top, not {kind}"
            raise InvalidFile([FieldProblem(file, node.start_mark.line + 1, "", message)])
        lines: dict[Loc, int] = {(): node.start_mark.line + 1}
        problems: list[FieldProblem] = []
        bools: dict[Loc, str] = {}
        _map_lines(node, (), lines, problems, file, set(), bools)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise InvalidFile([_yaml_problem(exc, file)]) from None
    except yaml.YAMLError as exc:  # errors without a position
        raise InvalidFile([FieldProblem(file, None, "", f"YAML error: {exc}")]) from None
    finally:
        loader.dispose()
    return data, lines, problems, bools


def _map_lines(node: yaml.Node, path: Loc, lines: dict[Loc, int], problems: list[FieldProblem],
               file: str, active: set[int], bools: dict[Loc, str]) -> None:
    if id(node) in active:  # a recursive alias (&a [*a]): nothing more to map
        return
    active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        first_seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: merged keys get the parent's line
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            line = key_node.start_mark.line + 1
            if key in first_seen:
                message = (f"duplicate key {key!r} (first on line {first_seen[key]}); "
                           "YAML would keep only the last")
                problems.append(FieldProblem(file, line, _render_path(path + (key,)), message))
            else:
                first_seen[key] = line
            lines[path + (key,)] = line
            _map_lines(value_node, path + (key,), lines, problems, file, active, bools)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            _map_lines(item, path + (index,), lines, problems, file, active, bools)
    elif isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool":
        bools[path] = node.value  # YAML 1.1: on/off/yes/no are booleans too


def _yaml_problem(exc: yaml.MarkedYAMLError, file: str) -> FieldProblem:
    mark = exc.problem_mark or exc.context_mark
    message = exc.problem or exc.context or "invalid YAML"
    if exc.context and exc.problem:
        message = f"{exc.problem} ({exc.context}"
        if exc.context_mark and mark and exc.context_mark.line != mark.line:
            message += f" started on line {exc.context_mark.line + 1}"
        message += ")"
    if "'\\t'" in message:
        message += "; indent with spaces, not tabs"
    elif "expected <block end>" in message:
        message += "; check the indentation"
    return FieldProblem(file, mark.line + 1 if mark else None, "", f"YAML syntax error: {message}")


# --- pydantic errors -> problems ------------------------------------------


def _pydantic_problems(exc: ValidationError, data: Any, lines: dict[Loc, int], file: str,
                       model: type[BaseModel],
                       bools: dict[Loc, str]) -> list[FieldProblem]:
    found: list[tuple[Loc, str, list[tuple[Loc, bool]], bool]] = []
    for error in exc.errors(include_url=False):
        path, unions, owner, target = _resolve(model, error["loc"])
        message = _message(error, path, owner, target, data)
        if error["type"] == "missing":
            path = path[:-1]  # point at the mapping that lacks the key
        elif error["type"] == "union_tag_invalid" and isinstance(_get(data, path), dict):
            path = path + (_discriminator(error),)
        path = _existing(data, path)
        if error["type"] == "string_type" and isinstance(error["input"], bool):
            message = _bool_for_string(error["input"], path, bools.get(path))
        fits = all(isinstance(_get(data, where), dict) == is_model for where, is_model in unions)
        found.append((path, message, unions, fits))

    # A union reports one error list per member; keep the members that fit the
    # input's shape, or the first error when none does.
    problems: list[FieldProblem] = []
    seen: set[tuple[Loc, str]] = set()
    for path, message, unions, fits in found:
        if not fits:
            where = unions[-1][0]
            if any(f and u and u[-1][0] == where for _, _, u, f in found):
                continue
            message = next(m for p, m, u, _ in found if u and u[-1][0] == where)
        if (path, message) not in seen:
            seen.add((path, message))
            problems.append(FieldProblem(file, _line(lines, path), _render_path(path), message))
    return problems


def _resolve(model: type[BaseModel], loc: Loc) -> tuple[Loc, list[tuple[Loc, bool]], Any, Any]:
    """Walk pydantic's `loc` along the model's types.  Returns the data path
    (union tags removed), the unions passed as (path, member is a model), the
    model that owns the last key, and the type found at the end."""
    tp: Any = model
    path: list[Any] = []
    unions: list[tuple[Loc, bool]] = []
    owner: Any = None
    for part in loc:
        tp = _unwrap(tp)
        members = _union_members(tp)
        if members:  # `part` names the member pydantic tried, not a key
            tp = _pick_member(members, part)
            unions.append((tuple(path), _is_model(tp)))
            continue
        path.append(part)
        if _is_model(tp):
            owner = tp
            field = _field(tp, part)
            tp = field.annotation if field else None
        elif get_origin(tp) in (list, tuple, set, frozenset):
            tp = get_args(tp)[0] if get_args(tp) else None
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1] if get_args(tp) else None
        else:
            tp = None
    return tuple(path), unions, owner, _unwrap(tp)


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the type that matters."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif _is_union(tp) and type(None) in get_args(tp):
            rest = [arg for arg in get_args(tp) if arg is not type(None)]
            tp = rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007 - built at run time
        else:
            return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _union_members(tp: Any) -> list[Any]:
    return [_unwrap(arg) for arg in get_args(tp)] if _is_union(tp) else []


def _pick_member(members: list[Any], tag: Any) -> Any:
    """pydantic's tag is the class name (smart unions), the discriminator
    value (tagged unions) or a schema name such as 'constrained-float'."""
    for member in members:
        if _is_model(member) and (tag == member.__name__ or tag in _literal_values(member)):
            return member
    others = [m for m in members if not _is_model(m)]
    return others[0] if len(others) == 1 else None


def _literal_values(model: type[BaseModel], key: str | None = None) -> set[Any]:
    """The Literal values of `model`'s `key` field (of any field without `key`)."""
    values: set[Any] = set()
    for name, field in model.model_fields.items():
        if key in (None, name, field.alias) and get_origin(field.annotation) is Literal:
            values.update(get_args(field.annotation))
    return values


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _field(model: type[BaseModel], key: Any) -> Any:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _keys(model: type[BaseModel]) -> list[str]:
    """The keys a file may use: aliases where set ('from', 'not')."""
    return [field.alias or name for name, field in model.model_fields.items()]


def _message(error: Any, path: Loc, owner: Any, target: Any, data: Any) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error["input"]
    if kind == "extra_forbidden":
        key = path[-1]
        valid = _keys(owner) if owner else []
        return f"unknown key {key!r}" + _suggest(str(key), valid, "valid keys")
    if kind == "missing":
        return f"missing required key {path[-1]!r}"
    if kind == "union_tag_invalid":
        tag, expected = ctx.get("tag"), re.findall(r"'([^']*)'", ctx.get("expected_tags", ""))
        what = _kind(target) or next((p for p in reversed(path) if isinstance(p, str)), "value")
        return f"unknown {what} {tag!r}" + _suggest(str(tag), expected, f"valid {what}s")
    if kind == "union_tag_not_found":
        key = _discriminator(error)
        members = [m for m in _union_members(target) if _is_model(m)]
        tags = sorted({tag for m in members for tag in _literal_values(m, key)})
        choices = f" (one of: {', '.join(tags)})" if tags else ""
        if not isinstance(_get(data, path), dict):
            return f"must be a mapping with a {key!r} key{choices}"
        return f"missing required key {key!r}{choices}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        text = str(ctx["error"])
        return text[:1].lower() + text[1:]  # library messages ("Expected 4 octets...") mid-line
    bounds = {"less_than_equal": ("le", "at most"), "greater_than_equal": ("ge", "at least"),
              "greater_than": ("gt", "greater than"), "less_than": ("lt", "less than")}
    if kind in bounds:
        key, words = bounds[kind]
        return f"must be {words} {_show(ctx[key])}, got {_show(value)}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {_show(value)}"
    if kind == "string_pattern_mismatch":
        return f"{_show(value)} does not match the pattern {ctx['pattern']}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping (key: value), got {_show(value)}"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item{'s' if ctx['min_length'] != 1 else ''}"
    message = re.sub(r"^(Value error|Assertion failed), ", "", error["msg"])
    message = re.sub(r"^Input should be", "must be", message).split(", unable to parse")[0]
    message = message[:1].lower() + message[1:]
    if isinstance(value, (str, int, float, bool)) or value is None:
        message += f", got {_show(value)}"
    return message


def _bool_for_string(value: bool, path: Loc, source: str | None) -> str:
    """A string field given `on`, `yes`, `false`...: YAML read a boolean."""
    word = source or str(value).lower()
    key = next((p for p in reversed(path) if isinstance(p, str)), "")
    what = "name" if key == "name" else "text"
    return (f"got the YAML boolean {str(value).lower()} (write '{word}' in quotes to mean "
            f"the {what})")


def _kind(union: Any) -> str | None:
    """What a tagged union's members are: NxdomainFault, DropFault... -> 'fault'."""
    names = [m.__name__ for m in _union_members(union) if _is_model(m)]
    common = os.path.commonprefix([name[::-1] for name in names])[::-1]
    word = re.search(r"[A-Z][a-z]+$", common) if len(names) > 1 else None
    return word.group(0).lower() if word else None


def _suggest(word: str, choices: list[str], label: str) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" ({label}: {', '.join(choices)})" if choices else ""


def _discriminator(error: Any) -> str:
    return str((error.get("ctx") or {}).get("discriminator", "type")).strip("'")


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(data: Any, path: Loc) -> Any:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return _MISSING
    return data


def _existing(data: Any, path: Loc) -> Loc:
    """The longest prefix of `path` present in the file.  Validators turn
    `suffix: x` into a list and `fault: drop` into a mapping, so pydantic may
    name `suffix[0]` or `fault.type` where the file has a single value."""
    while path and _get(data, path) is _MISSING:
        path = path[:-1]
    return path


def _line(lines: dict[Loc, int], path: Loc) -> int | None:
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)


def _render_path(path: Loc) -> str:
    """('phases', 1, 'rules', 0, 'fault') -> 'phases[1].rules[0].fault'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _sorted(problems: list[FieldProblem]) -> list[FieldProblem]:
    return sorted(problems, key=lambda p: p.line or 0)


if __name__ == "__main__":  # python -m proxy.loader schema > docs/scenario.schema.json
    if sys.argv[1:2] == ["schema"]:
        sys.exit(main_schema())
    sys.exit(main_validate(sys.argv[2:] if sys.argv[1:2] == ["validate"] else sys.argv[1:]))
