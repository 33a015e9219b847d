"""docs/: every YAML example in scenarios.md loads (or fails, when marked
`# invalid`), the error output shown matches the loader's, and the committed
JSON Schema is the one the model generates."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from proxy.core.faults import FAULT_TYPES
from proxy.core.model import Match
from proxy.errors import InvalidFile
from proxy.loader import load_scenario_text, scenario_schema
from support.docs import ROOT, SCENARIOS_DOC, blocks, fault_example, fault_sections

DOC = SCENARIOS_DOC


YAML_BLOCKS = [(body, line) for lang, body, line in blocks() if lang == "yaml"]


def as_scenario(body: str) -> str:
    """A whole scenario stays as is; a rule (it has `fault`) or a bare match
    is wrapped into a one-phase scenario."""
    data = yaml.safe_load(body)
    if isinstance(data, dict) and "phases" in data:
        return body
    rule = data if isinstance(data, dict) and "fault" in data else {"match": data, "fault": "drop"}
    return yaml.safe_dump({"name": "doc-example", "phases": [
        {"name": "p", "duration": "1m", "rules": [rule]}]})


def test_doc_has_examples() -> None:
    assert len(YAML_BLOCKS) >= 30


@pytest.mark.parametrize("body", [b for b, _ in YAML_BLOCKS],
                         ids=[f"line{n}" for _, n in YAML_BLOCKS])
def test_yaml_example(body: str) -> None:
    if body.lstrip().startswith("# invalid"):
        with pytest.raises(InvalidFile):
            load_scenario_text(body, "example.yaml")
    else:
        load_scenario_text(as_scenario(body), "example.yaml")


def test_every_selector_and_fault_has_a_section() -> None:
    headings = set(re.findall(r"^### (.+)$", DOC.read_text(), re.M))
    # The Faults chapter has exactly one section per registered fault type,
    # each with an example of that very fault.
    assert sorted(fault_sections()) == sorted(FAULT_TYPES)
    for fault in FAULT_TYPES:
        example = fault_example(fault)
        assert (example if isinstance(example, str) else example["type"]) == fault
    # Every selector key of the model has a section (one heading may name
    # several: "clients, exclude_clients"); the model is the only list.
    keys = {field.alias or name for name, field in Match.model_fields.items()}
    covered = {key.strip() for heading in headings for key in heading.split(",")}
    assert keys <= covered, f"selector keys without a section: {sorted(keys - covered)}"


def test_shown_validate_output_is_real() -> None:
    """An invalid example followed by `$ dnschaos validate FILE` output must
    print exactly those lines."""
    found = blocks()
    checked = 0
    for (lang, body, _), (next_lang, output, _) in zip(found, found[1:], strict=False):
        if lang != "yaml" or not body.startswith("# invalid") or next_lang != "console":
            continue
        command, *expected = output.rstrip("\n").splitlines()
        file = command.removeprefix("$ dnschaos validate ")
        with pytest.raises(InvalidFile) as info:
            load_scenario_text(body, file)
        assert [p.render() for p in info.value.problems] == expected
        checked += 1
    assert checked >= 2


def test_schema_is_up_to_date() -> None:
    committed = json.loads((ROOT / "docs" / "scenario.schema.json").read_text())
    assert committed == scenario_schema(), (
        "docs/scenario.schema.json is stale: run "
        "`.venv/bin/python -m proxy.loader schema > docs/scenario.schema.json`"
    )


def test_schema_has_header() -> None:
    schema = scenario_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["title"] == "dnschaos scenario"
    assert "phases" in schema["required"]


@pytest.mark.parametrize("body", [b for b, _ in YAML_BLOCKS
                                  if not b.lstrip().startswith("# invalid")])
def test_yaml_example_matches_the_json_schema(body: str) -> None:
    # Editors check against the schema: it must accept every documented form.
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load(as_scenario(body)), scenario_schema())


def test_every_measured_fault_links_to_its_client_behaviour_row() -> None:
    """Each fault the matrix (bench/matrix.py) measures: its section in
    scenarios.md links to its table in docs/client-behaviour.md, which has it."""
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    import matrix  # noqa: PLC0415

    behaviour = (ROOT / "docs" / "client-behaviour.md").read_text()
    text = DOC.read_text()
    for fault, spec in matrix.FAULTS.items():
        kind = spec if isinstance(spec, str) else spec["type"]  # dnssec: one column per break
        assert kind in FAULT_TYPES, fault
        section = text.split(f"\n### {kind}\n", 1)[1].split("\n### ", 1)[0]
        assert f"(client-behaviour.md#{fault})" in section, fault
        assert f"\n### {fault}\n" in behaviour, fault
    # The run report's table comes from the same run.
    data = json.loads((ROOT / "proxy" / "data" / "client_behaviour.json").read_text())
    assert set(data["faults"]) == set(matrix.FAULTS)
