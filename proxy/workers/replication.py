"""The replicated log of engine calls: how every worker's engine is kept in
step with the one the game day drives.

Theory of operation:
- Every call that changes an engine (add_run, add_rule, stop_run, pause,
  resume, forget, reset, tick) is an `Entry` with a sequence number, its
  method name and its exact arguments (`now` included), appended to a
  `CallLog`.  A worker applies the entries in sequence order to its own
  engine (a `Replica`), so every engine sees the same calls with the same
  times and reaches the same state.  Nothing reads a clock on the way.
- A worker that starts (or restarts) is given a snapshot: the log's
  sequence number and the entries that rebuild the state as of it (per run
  still held, the call that made it and its pause/resume/stop calls; ticks
  and forgotten runs are compacted away).  It then applies the entries
  after that number, and skips any it already has: replaying from the start
  or from any snapshot reaches the same state.
- The source of the entries is whoever calls `CallLog.append`.  Today that
  is `LoggedEngine`, the main process's engine facade: it applies each call
  to the local engine first (the authority for run state, which the API
  reads; a call that fails there is not appended) and then appends it.
  Another source (a shared stream feeding several instances) appends
  entries it reads the same way; subscribers (the worker pool) forward
  every entry as it is appended.
- Workers acknowledge by sequence number ("applied up to N"), so the main
  process can wait, without blocking, until a call is applied everywhere
  (WorkerPool.settle)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from proxy.core.engine import Engine
from proxy.core.model import Limit, Match, Rule, Scenario
from proxy.core.plan import Run

MUTATIONS = ("add_run", "add_rule", "stop_run", "pause", "resume", "forget", "reset", "tick")
"""The engine calls the log carries."""


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


Snapshot = tuple[int, list[Entry]]
"""(sequence number, the entries that rebuild the state as of it, in order)."""


class EngineLog(Protocol):
    """What the worker pool needs of a log: entries as they come, and a
    snapshot for a worker that joins."""

    @property
    def seq(self) -> int: ...

    @property
    def last_change(self) -> int: ...

    def subscribe(self, listener: Callable[[Entry], None]) -> None: ...

    def snapshot(self) -> Snapshot: ...


class CallLog:
    """An append-only log of engine calls, kept compacted for snapshots."""

    def __init__(self) -> None:
        self._seq = 0
        self._last_change = 0
        self._runs: dict[str, list[Entry]] = {}
        """Per run id still held: the entries that made its state."""
        self._listeners: list[Callable[[Entry], None]] = []

    @property
    def seq(self) -> int:
        """The sequence number of the last entry (0: none yet)."""
        return self._seq

    @property
    def last_change(self) -> int:
        """The sequence number of the last entry that is not a tick (ticks
        are not acknowledged on their own: nothing waits for them)."""
        return self._last_change

    def subscribe(self, listener: Callable[[Entry], None]) -> None:
        self._listeners.append(listener)

    def append(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
               result: Any = None) -> Entry:
        """Add a call that succeeded with `result` (what the local engine
        returned: it tells which runs a stop or reset ended)."""
        if method not in MUTATIONS:
            raise ValueError(f"not an engine mutation: {method!r}")
        self._seq += 1
        if method != "tick":
            self._last_change = self._seq
        entry = Entry(self._seq, method, args, kwargs)
        self._compact(entry, result)
        for listener in self._listeners:
            listener(entry)
        return entry

    def _compact(self, entry: Entry, result: Any) -> None:
        method, args = entry.method, entry.args
        if method in ("add_run", "add_rule"):
            self._runs.pop(args[0], None)  # a run added again goes last, as in the engine
            self._runs[args[0]] = [entry]
        elif method in ("stop_run", "pause", "resume"):
            if result and args[0] in self._runs:
                self._runs[args[0]].append(entry)
        elif method == "forget":
            self._runs.pop(args[0], None)
        elif method == "reset":
            now, reason = args[0], (args[1] if len(args) > 1 else entry.kwargs.get("reason",
                                                                                   "reset"))
            for run_id in result or ():
                if run_id in self._runs:
                    self._runs[run_id].append(Entry(entry.seq, "stop_run",
                                                    (run_id, now, reason), {}))

    def snapshot(self) -> Snapshot:
        return self._seq, [entry for entries in self._runs.values() for entry in entries]


class LoggedEngine:
    """The engine the game day drives when workers serve DNS: each mutation
    is applied to the local engine, then appended to the log; run state is
    read from the local engine; traffic counts come from `counts` (the
    workers' counts merged; the local engine sees no queries)."""

    def __init__(self, local: Engine, log: CallLog, counts: Any = None) -> None:
        self.local = local
        self.log = log
        self.counts = counts if counts is not None else local
        """Where stats(run) and client_stats(run) come from: the workers'
        counts merged (WorkerCounts), else the local engine."""

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.local, method)(*args, **kwargs)
        self.log.append(method, args, kwargs, result)
        return result

    # --- mutations -------------------------------------------------------------------

    def add_run(self, run_id: str, scenario: Scenario, started_at: float, now: float,
                **kwargs: Any) -> Run:
        return self._call("add_run", run_id, scenario, started_at, now, **kwargs)

    def add_rule(self, run_id: str, rule: Rule, now: float, *args: Any, **kwargs: Any) -> Run:
        return self._call("add_rule", run_id, rule, now, *args, **kwargs)

    def stop_run(self, run_id: str, now: float, *args: Any) -> bool:
        return self._call("stop_run", run_id, now, *args)

    def pause(self, run_id: str, now: float) -> bool:
        return self._call("pause", run_id, now)

    def resume(self, run_id: str, now: float) -> bool:
        return self._call("resume", run_id, now)

    def forget(self, run_id: str) -> bool:
        return self._call("forget", run_id)

    def reset(self, now: float, reason: str = "reset") -> list[str]:
        return self._call("reset", now, reason)

    def tick(self, now: float) -> list[tuple[str, str]]:
        return self._call("tick", now)

    # --- reads -----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.local.active

    def get_run(self, run_id: str) -> Run | None:
        return self.local.get_run(run_id)

    def run_ids(self) -> list[str]:
        return self.local.run_ids()

    def runs_info(self, now: float) -> list[dict[str, Any]]:
        return self.local.runs_info(now)

    def stats(self, run: str | None = None) -> list[dict[str, Any]]:
        return self.counts.stats(run)

    def client_stats(self, run: str | None = None) -> list[dict[str, Any]]:
        return self.counts.client_stats(run)

    def ending_by(self, now: float) -> bool:
        """Whether a live run ends at or before `now` (its last phase or hard
        limit; a paused run only at its hard limit)."""
        for run_id in self.local.run_ids():
            run = self.local.get_run(run_id)
            if run is None or run.ended is not None:
                continue
            end = run.hard_end if run.paused_at is not None else min(run.end + run.shift,
                                                                     run.hard_end)
            if end <= now:
                return True
        return False


class Replica:
    """A worker's engine, fed the log: entries applied once each, in order,
    with the numbers that bound a fault's reach split among the workers."""

    def __init__(self, engine: Engine, index: int, count: int) -> None:
        self.engine = engine
        self.index = index
        self.count = count
        self.applied = 0
        """The sequence number of the last entry applied."""

    def restore(self, snapshot: Snapshot) -> None:
        seq, entries = snapshot
        for entry in entries:
            self._apply(entry)
        self.applied = max(self.applied, seq)

    def apply(self, entry: Entry) -> bool:
        """Apply `entry` unless it is one already applied; whether it was."""
        if entry.seq <= self.applied:
            return False
        self.applied = entry.seq
        self._apply(entry)
        return True

    def _apply(self, entry: Entry) -> Any:
        args = tuple(worker_share(arg, self.index, self.count) for arg in entry.args)
        kwargs = {key: worker_share(arg, self.index, self.count)
                  for key, arg in entry.kwargs.items()}
        return getattr(self.engine, entry.method)(*args, **kwargs)


def worker_share(value: Any, index: int, count: int) -> Any:
    """`value` (a Scenario, a Rule, a list of rules, anything else unchanged)
    with the numbers that bound a fault's reach -- `first`, `limit.count` and
    `limit.per_second` -- split among `count` workers, so that together they
    never fault more than the scenario allows: worker `index` gets an equal
    share, the remainder going to the lowest indexes.  A worker that sees
    less of the traffic may use less than its share."""
    if isinstance(value, list):
        shared = [worker_share(item, index, count) for item in value]
        return value if all(a is b for a, b in zip(shared, value, strict=True)) else shared
    if not isinstance(value, BaseModel) or count <= 1:
        return value
    update = {}
    for name in type(value).model_fields:
        field = getattr(value, name)
        shared = worker_share(field, index, count)
        if shared is not field:
            update[name] = shared
    if isinstance(value, Match) and value.first is not None:
        update["first"] = _split(value.first, index, count)
    if isinstance(value, Limit):
        if value.count is not None:
            update["count"] = _split(value.count, index, count)
        if value.per_second is not None:
            update["per_second"] = value.per_second / count
    return value.model_copy(update=update) if update else value


def _split(total: int, index: int, count: int) -> int:
    return total // count + (1 if index < total % count else 0)
