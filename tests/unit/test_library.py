"""The incident library in scenarios/: every file loads and cites its source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from proxy.loader import load_scenario, validate_paths

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "scenarios"
FILES = sorted(LIBRARY.glob("*.y*ml"))

EXPECTED = {
    "aws-dynamodb-2025", "aws-dynamodb-2025-nxdomain", "facebook-2021", "dyn-2016",
    "azure-dns-2019", "azure-dns-2021", "akamai-2021", "cloudflare-1111-2023",
    "cloudflare-1111-2025", "slack-dnssec-2021", "route53-hijack-2018", "salesforce-2021",
    "ru-dnssec-2024", "k8s-conntrack-race", "zone-nxdomain", "latency-ramp", "servfail-brownout",
}


def test_library_validates() -> None:
    assert [p.render() for p in validate_paths([str(LIBRARY)])] == []


def test_library_is_complete() -> None:
    assert {f.stem for f in FILES} >= EXPECTED


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_file_cites_its_source(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert "http" in scenario.description or "Source" in scenario.description
    assert "time_scale" in scenario.description  # how to shorten or stretch the replay


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_file_points_editors_at_the_schema(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../docs/scenario.schema.json"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_file_matches_the_json_schema(path: Path) -> None:
    # Editors check files against the schema: it must accept what the loader accepts.
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs" / "scenario.schema.json").read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_aws_dynamodb_2025_follows_the_recipe() -> None:
    scenario = load_scenario(LIBRARY / "aws-dynamodb-2025.yaml")
    phases = {phase.name: phase for phase in scenario.phases}
    assert phases["stale-plan"].rules[0].fault.type == "stale"
    assert phases["stale-plan"].rules[0].fault.source == "snapshot"
    empty = phases["empty-record"]
    assert empty.duration == 157 * 60
    fault = empty.rules[0].fault
    assert fault.type == "nodata" and fault.soa is not None and fault.soa.negative_ttl == 60
    assert empty.rules[0].match.name == ["dynamodb.us-east-1.amazonaws.com"]
    assert empty.rules[0].match.qtype == ["A", "AAAA"]
    tail = phases["recovery-tail"]
    assert tail.duration == 15 * 60
    ramp = tail.rules[0].match.probability
    assert (ramp.start, ramp.end) == (1.0, 0.0)
    flap = phases["nlb-flap"].rules[0].fault
    assert (flap.type, flap.share, flap.empty, flap.ttl) == ("partial", 0.3, 0.05, 60)
    assert 10 <= flap.period <= 30
    variant = load_scenario(LIBRARY / "aws-dynamodb-2025-nxdomain.yaml")
    assert {r.fault.type for p in variant.phases for r in p.rules} == {"stale", "nxdomain"}
