"""The audit log: one JSON line per mutation (when, who, from where, what)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from proxy.core.schedule import format_time

log = logging.getLogger("dnschaos.audit")


class AuditLog:
    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, *, who: str, source: str, action: str, target: str | None = None,
              details: dict[str, Any] | None = None, result: str = "ok",
              now: float | None = None) -> dict[str, Any]:
        entry = {
            "time": format_time(time.time() if now is None else now),
            "who": who,
            "from": source,
            "action": action,
            "target": target,
            "details": details or {},
            "result": result,
        }
        line = json.dumps(entry, sort_keys=False, default=str)
        log.info("%s", line)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as out:  # one write per line: append-safe
                out.write(line + "\n")
        return entry
