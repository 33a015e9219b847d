"""docs/scenarios.md read as data: its fenced blocks and, per fault type,
the section under `## Faults` (`### NAME`) with its YAML examples.

    blocks()                  -> [(language, text, line of the fence), ...]
    fault_sections()          -> {"nxdomain": "...section text...", ...}
    fault_example("flap")     -> the `fault` of the section's first YAML example
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS_DOC = ROOT / "docs" / "scenarios.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def blocks(text: str | None = None) -> list[tuple[str, str, int]]:
    """(language, text, line of the fence) of every fenced block."""
    text = SCENARIOS_DOC.read_text() if text is None else text
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def fault_sections() -> dict[str, str]:
    """The `### NAME` sections of the `## Faults` chapter, by heading."""
    text = SCENARIOS_DOC.read_text()
    chapter = text.split("\n## Faults\n", 1)[1].split("\n## ", 1)[0]
    parts = re.split(r"^### (.+)$", chapter, flags=re.M)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


def fault_example(name: str) -> Any:
    """The `fault` of the first YAML example in the fault's section."""
    for lang, body, _ in blocks(fault_sections()[name]):
        if lang == "yaml":
            return yaml.safe_load(body)["fault"]
    raise AssertionError(f"docs/scenarios.md: section '### {name}' has no YAML example")
