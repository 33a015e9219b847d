"""The scenarios the proxy knows: files in the watched directory, plus the
file given with `run --scenario`.

`reload()` re-reads the directory: a new or changed valid file replaces its
scenario, an invalid one is refused (its error is kept and shown, and the
scenario it held before stays), a removed file removes its scenario.
A scenario whose file was refused is `stale`: starting it (by hand or by
its schedule) is refused too, so the old version never runs unnoticed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from proxy.core.model import Scenario
from proxy.errors import FieldProblem, InvalidFile
from proxy.loader import load_scenario_text

log = logging.getLogger("dnschaos.gameday")

SUFFIXES = (".yaml", ".yml")


@dataclass
class Entry:
    scenario: Scenario
    file: str | None
    digest: str = ""


@dataclass
class Changes:
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


class Catalog:
    def __init__(self, directory: str | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self.scenarios: dict[str, Entry] = {}
        self.errors: dict[str, str] = {}
        """Files refused at the last reload: file -> the loader's error text."""
        self.problems: dict[str, list[FieldProblem]] = {}
        """The same files: file -> each problem (file, line, field, message)."""
        self._digests: dict[str, str] = {}

    def add(self, scenario: Scenario, file: str | None = None) -> None:
        self.scenarios[scenario.name] = Entry(scenario, file)

    def get(self, name: str) -> Scenario | None:
        entry = self.scenarios.get(name)
        return entry.scenario if entry else None

    def stale(self, name: str) -> str | None:
        """The file of scenario `name` when its newest version was refused
        (the catalog still holds the version before), else None."""
        entry = self.scenarios.get(name)
        if entry is not None and entry.file is not None and entry.file in self.errors:
            return entry.file
        return None

    def reload(self) -> Changes:
        changes = Changes()
        if self.directory is None:
            return changes
        try:
            files = sorted(p for p in self.directory.iterdir()
                           if p.suffix in SUFFIXES and p.is_file())
        except OSError as exc:
            changes.errors[str(self.directory)] = f"cannot read scenario directory: {exc}"
            self.errors = dict(changes.errors)
            self.problems = {}
            return changes
        seen = {str(p) for p in files}
        for file, _digest in list(self._digests.items()):
            if file not in seen:
                del self._digests[file]
                for name, entry in list(self.scenarios.items()):
                    if entry.file == file:
                        del self.scenarios[name]
                        changes.removed.append(name)
                        log.info("scenario %s removed (%s deleted)", name, file)
        errors: dict[str, str] = {}
        problems: dict[str, list[FieldProblem]] = {}
        for path in files:
            file = str(path)
            try:
                text = path.read_text()
            except OSError as exc:
                errors[file] = f"{file}: cannot read: {exc}"
                problems[file] = [FieldProblem(file, None, "", f"cannot read: {exc}")]
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if self._digests.get(file) == digest:
                if file in self.errors:
                    errors[file] = self.errors[file]
                    problems[file] = self.problems.get(file, [])
                continue
            try:
                scenario = load_scenario_text(text, file)
            except InvalidFile as exc:
                errors[file] = str(exc)
                problems[file] = exc.problems
                self._digests[file] = digest
                log.error("scenario file refused, the running set is kept:\n%s", exc)
                continue
            other = self.scenarios.get(scenario.name)
            if other is not None and other.file not in (file, None) and other.file in seen:
                message = f"scenario name {scenario.name!r} is already used by {other.file}"
                errors[file] = f"{file}: {message}"
                problems[file] = [FieldProblem(file, None, "name", message)]
                self._digests[file] = digest
                continue
            for name, entry in list(self.scenarios.items()):  # a file renamed its scenario
                if entry.file == file and name != scenario.name:
                    del self.scenarios[name]
                    changes.removed.append(name)
            self._digests[file] = digest
            self.scenarios[scenario.name] = Entry(scenario, file, digest)
            changes.changed.append(scenario.name)
            log.info("scenario %s loaded from %s", scenario.name, file)
        self.errors = errors
        self.problems = problems
        changes.errors = dict(errors)
        return changes
