"""The operations of the control plane's log: prepared by the instance whose
API was called, applied by every instance.

How it works: `prepare` checks an operation against this instance's game day
(the same checks, and errors, as without a control plane) and fixes every
value an applier needs to reach the same state: the entry's time `t`, the
whole scenario (seed and time scale in it), the start time and hard length,
the rule.  `apply` runs it on a game day with the clock read as `t`, so a
pause, a resume or a stop happens at the same instant on every instance,
and an instance replaying the log later (joining mid-run) reaches the state
the others are in.  Run ids are given at apply time, from the state every
instance shares; a scheduled start is applied once per (scenario, start)
however many instances appended it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from proxy.core.model import Rule, Scenario
from proxy.gameday.records import Conflict, NotFound
from proxy.gameday.runs import GameDay
from proxy.loader import load_model

OPS = ("start", "stop", "pause", "resume", "reset", "rule_add", "rule_remove", "rule_expired")


@dataclass(frozen=True, slots=True)
class Op:
    op: str
    """One of OPS."""
    t: float
    """Wall time the operation happens at, on every instance."""
    args: dict[str, Any]
    """Its arguments, plain JSON."""
    by: str = ""
    """The instance that appended it."""

    def fields(self) -> dict[str, str]:
        """As a Redis Stream entry's fields."""
        return {"op": self.op, "t": repr(self.t), "by": self.by,
                "args": json.dumps(self.args, sort_keys=True)}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Op:
        op = fields.get("op", "")
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}")
        args = json.loads(fields.get("args", "{}"))
        if not isinstance(args, dict):
            raise ValueError("args must be a JSON object")
        return cls(op, float(fields["t"]), args, fields.get("by", ""))


def prepare(gd: GameDay, op: str, args: dict[str, Any], now: float, by: str = "") -> Op:
    """The operation ready to append, or the error the API answers with."""
    with gd.at(now):
        if op == "start":
            scenario, start, length, warnings = gd.prepare_start(
                args["scenario"], at=args.get("at"), time_scale=args.get("time_scale"),
                max_duration=args.get("max_duration"))
            return Op(op, now, {
                "scenario": scenario.model_dump(mode="json", by_alias=True, exclude_none=True),
                "start": start, "length": length, "warnings": warnings,
                "dry_run": bool(args.get("dry_run", False)),
                "trigger": args.get("trigger", "api"), "who": args.get("who")}, by)
        if op in ("stop", "pause", "resume"):
            gd.resolve(args["ref"])  # NotFound, as without a control plane
            return Op(op, now, dict(args), by)
        if op == "reset":
            return Op(op, now, {"detail": args.get("detail", "reset: every fault healed")}, by)
        if op == "rule_add":
            name, rule = args["name"], args["rule"]
            if not name or "/" in name:
                raise ValueError("a rule needs a name without '/'")
            if name in gd.rules:
                raise Conflict(f"a rule called {name!r} exists: remove it first")
            duration = args.get("duration")
            if duration is not None and not duration > 0:
                raise ValueError("duration must be greater than 0")
            return Op(op, now, {
                "name": name, "duration": duration, "dry_run": bool(args.get("dry_run")),
                "who": args.get("who"),
                "rule": rule.model_dump(mode="json", by_alias=True, exclude_none=True)}, by)
        if op == "rule_remove":
            if args["name"] not in gd.rules:
                raise NotFound(f"no rule called {args['name']!r}")
            return Op(op, now, {"name": args["name"]}, by)
        if op == "rule_expired":
            return Op(op, now, {"name": args["name"]}, by)
    raise ValueError(f"unknown operation {op!r}")


def apply(gd: GameDay, op: Op, fired: set[tuple[str, float]], *, catch_up: bool = False) -> Any:
    """Run `op` on `gd` at its time; what the game-day call returned (a start:
    the run id, or None for a scheduled start already applied).  catch_up:
    replaying the log, so runs that ended before `op.t` end first."""
    a = op.args
    with gd.at(op.t):
        if catch_up:
            gd.tick()
        if op.op == "start":
            scenario = load_model(json.dumps(a["scenario"]), "<control log>", Scenario)
            if a["trigger"] == "schedule":
                key = (scenario.name, float(a["start"]))
                if key in fired:
                    return None
                fired.add(key)
            record = gd._add(scenario, float(a["start"]), _length(a["length"]),
                             dry_run=bool(a["dry_run"]), trigger=a["trigger"], who=a.get("who"),
                             warnings=list(a.get("warnings") or []))
            return record.id
        if op.op == "stop":
            return gd.stop(a["ref"], reason=a.get("reason", "stopped"),
                           detail=a.get("detail", ""))
        if op.op == "pause":
            return gd.pause(a["ref"])
        if op.op == "resume":
            return gd.resume(a["ref"])
        if op.op == "reset":
            return gd.reset(detail=a["detail"])
        if op.op == "rule_add":
            rule = load_model(json.dumps(a["rule"]), "<control log>", Rule)
            return gd.add_rule(a["name"], rule, duration=a.get("duration"),
                               dry_run=bool(a["dry_run"]), who=a.get("who")).name
        if op.op == "rule_remove":
            return gd.remove_rule(a["name"]) if a["name"] in gd.rules else False
        if op.op == "rule_expired":  # each instance ended it at its deadline already
            gd.tick()
            return a["name"] not in gd.rules
    raise ValueError(f"unknown operation {op.op!r}")


def _length(value: Any) -> float:
    return math.inf if value is None else float(value)
