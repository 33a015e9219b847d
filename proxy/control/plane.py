"""The control plane on Redis: one ordered log of fault changes for a fleet.

How it works:
- `<prefix>log` is a Redis Stream.  A mutation on any instance's API is
  prepared there (ops.prepare) and appended (XADD).  Every instance, the
  one that appended included, tails the stream (XREAD BLOCK) and applies
  each entry in order at the entry's own time (ops.apply), into its game
  day, whose engine feeds its worker processes through their replicated
  log as before.  A reset trims the stream up to itself, so the log is
  the state since the last reset.
- `<prefix>instances` is a hash: per instance, the last entry it applied
  and when it was last heard from (a heartbeat every HEARTBEAT s).  The
  API call that appended an entry returns once every live instance (heard
  from within STALE s) has applied it, or after SETTLE_TIMEOUT with the
  names of those that had not.
- Joining: an instance starting (or coming back) replays the log from its
  beginning with the original times (ops.apply(catch_up=True)), so a run
  live in the fleet is live here in its current phase; ended runs end in
  the replay too (their reports are not written again).
- `<prefix>leader` is a lease (SET NX PX, renewed by its holder): only
  the holder appends scheduled starts, and a start is applied once per
  (scenario, start time) whoever appended it.
- Fail safe: without Redis for `control_grace` s an instance heals (every
  run stopped here, logged, dnschaos_control_connected 0) and follows the
  log again when Redis is back.  Hard time limits are in every instance's
  own engine: they end runs whatever Redis does.
- Counts: every COUNTS_EVERY s and when a run ends, each instance writes
  its rows of each run to `<prefix>counts:<run>` (field: its name); the
  report merges every instance's rows (counts.merge_instances)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.config import Settings
from proxy.control.counts import merge_instances
from proxy.control.ops import Op, apply, prepare
from proxy.control.url import redact
from proxy.core.deps import merge_rows
from proxy.core.model import Scenario
from proxy.errors import ControlUnavailable
from proxy.gameday.report import build_report, write_report
from proxy.gameday.runs import GameDay
from proxy.runtime import cancel_and_wait

log = logging.getLogger("dnschaos.control")

HEARTBEAT = 0.5
STALE = 2.0
"""An instance not heard from for this long is not waited for (dead or healed)."""
SETTLE_TIMEOUT = 3.0
LEASE = 3.0
COUNTS_EVERY = 2.0
DEPS_EVERY = 5.0
"""Seconds between writes of an instance's dependency map (larger than counts)."""
COUNTS_TTL = 7 * 86400
FINAL_WAIT = 1.5
"""Seconds after a run's end before its merged report is built: every
instance ends it at the same time and writes its final counts at once."""
KEEP_OUTCOMES = 1000
FAILURES = (RedisError, OSError, TimeoutError)


def _sid(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class ControlPlane:
    def __init__(self, settings: Settings, gameday: GameDay, *,
                 settle: Callable[[], Awaitable[None]] | None = None,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        """settle: awaited after applying entries, before saying so (worker
        processes apply them too); refresh: awaited before reading counts."""
        assert settings.control
        self.settings = settings
        self.gameday = gameday
        self.url = settings.control
        self.grace = settings.control_grace
        self.name = settings.instance_name or f"{socket.gethostname()}:{os.getpid()}"
        p = settings.control_prefix
        self.log_key, self.instances_key = p + "log", p + "instances"
        self.lease_key, self.counts_key = p + "leader", p + "counts:"
        self.deps_key = p + "deps"
        self.fired_key = p + "fired:"
        self._settle = settle
        self._refresh = refresh
        # One quick retry (a pooled connection Redis closed on restart), no
        # long backoff: a Redis that is gone must show within control_grace.
        self.redis: Any = aioredis.from_url(
            self.url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=1.0,
            retry=Retry(ConstantBackoff(0.05), 1), retry_on_error=[RedisConnectionError])
        self.applied = "0-0"
        self.joined = False
        self.connected = False
        self.healed = False
        self.leader = False
        self._last_ok = time.monotonic()
        self._replaying = False
        self._fired: set[tuple[str, float]] = set()
        self._outcomes: OrderedDict[str, tuple[bool, Any]] = OrderedDict()
        self._waiters: dict[str, asyncio.Future[tuple[bool, Any]]] = {}
        self._final: dict[str, dict[str, Any]] = {}
        self._written: set[str] = set()
        self._last_counts = self._last_deps = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[Any]] = set()

    # --- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        gd = self.gameday
        gd.on_due = self._on_due
        gd.on_abort = self._on_abort
        gd.on_counts = self._on_counts
        gd.on_expired = self._on_expired
        try:
            await asyncio.wait_for(self._join(), 5.0)
        except FAILURES as exc:
            log.error("control plane %s unreachable (%s): no fault is applied until it is "
                      "reached", redact(self.url), exc or type(exc).__name__)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._tail(), name="control tail"),
                       loop.create_task(self._beat(), name="control heartbeat")]

    async def close(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        for task in list(self._pending):
            await cancel_and_wait(task)
        try:
            if self.connected:
                await asyncio.wait_for(self.redis.hdel(self.instances_key, self.name), 1.0)
                if self.leader:
                    await asyncio.wait_for(self.redis.delete(self.lease_key), 1.0)
        except FAILURES:
            pass
        await self.redis.aclose()

    async def _join(self) -> None:
        entries = await self.redis.xrange(self.log_key, "-", "+")
        gd = self.gameday
        report_dir, gd.report_dir = gd.report_dir, None  # those reports exist already
        self._replaying = True
        try:
            for entry_id, fields in entries:
                self._apply(entry_id, fields, catch_up=True)
            gd.tick()
        finally:
            self._replaying = False
            gd.report_dir = report_dir
        self.joined = True
        self._connected()
        await self._publish()
        log.info("following the control plane %s as %s: %d entries replayed, %d runs and "
                 "%d ad hoc rules live", redact(self.url), self.name, len(entries),
                 len(gd.runs), len(gd.rules))

    # --- the log ------------------------------------------------------------------------

    def _apply(self, entry_id: str, fields: dict[str, str], *, catch_up: bool = False) -> None:
        try:
            op = Op.from_fields(fields)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("control log entry %s skipped: malformed (%s)", entry_id, exc)
            outcome: tuple[bool, Any] = (False, ValueError(f"malformed entry: {exc}"))
        else:
            try:
                outcome = (True, apply(self.gameday, op, self._fired, catch_up=catch_up))
            except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the log
                if not catch_up:
                    log.warning("control log entry %s (%s by %s) not applied: %s", entry_id,
                                op.op, op.by, exc)
                outcome = (False, exc)
        self.applied = entry_id
        self._outcomes[entry_id] = outcome
        while len(self._outcomes) > KEEP_OUTCOMES:
            self._outcomes.popitem(last=False)
        waiter = self._waiters.pop(entry_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    async def _tail(self) -> None:
        while True:
            try:
                if not self.joined:
                    await asyncio.wait_for(self._join(), 5.0)
                reply = await self.redis.xread({self.log_key: self.applied},
                                               block=int(HEARTBEAT * 1000), count=100)
                self._connected()
                applied = False
                for _stream, entries in reply or []:
                    for entry_id, fields in entries:
                        self._apply(entry_id, fields)
                        applied = True
                if applied:
                    if self._settle is not None:
                        await self._settle()
                    await self._publish()
            except asyncio.CancelledError:
                raise
            except FAILURES as exc:
                self._failed(exc)
                await asyncio.sleep(0.2)

    async def submit(self, op: str, args: dict[str, Any]) -> tuple[Any, list[str]]:
        """Append an operation and wait until it is applied here and on every
        live instance: (what it returned here, the instances that had not
        applied it within SETTLE_TIMEOUT)."""
        if not self.joined or self.healed:
            raise ControlUnavailable(
                f"the control plane {redact(self.url)} is not reachable from {self.name}: "
                "nothing was changed (faults change only through it)")
        entry = prepare(self.gameday, op, args, time.time(), self.name)
        try:
            entry_id = await asyncio.wait_for(self.redis.xadd(self.log_key, entry.fields()), 2.0)
            if op == "reset":  # the log is the state since the last reset
                await asyncio.wait_for(
                    self.redis.xtrim(self.log_key, minid=entry_id, approximate=False), 2.0)
        except FAILURES as exc:
            raise ControlUnavailable(f"the control plane {redact(self.url)} failed: "
                                     f"{exc or type(exc).__name__}") from None
        ok, result = await self._outcome(entry_id)
        behind = await self._wait_fleet(entry_id)
        if not ok:
            raise result
        return result, behind

    async def _outcome(self, entry_id: str) -> tuple[bool, Any]:
        if entry_id in self._outcomes:
            return self._outcomes[entry_id]
        waiter = self._waiters.setdefault(entry_id,
                                          asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), SETTLE_TIMEOUT)
        except TimeoutError:
            raise ControlUnavailable(f"entry {entry_id} was appended but not read back "
                                     f"within {SETTLE_TIMEOUT:.0f} s") from None

    async def _wait_fleet(self, entry_id: str) -> list[str]:
        end = time.monotonic() + SETTLE_TIMEOUT
        want = _sid(entry_id)
        behind: list[str] = []
        while True:
            try:
                rows = await asyncio.wait_for(self.redis.hgetall(self.instances_key), 2.0)
            except FAILURES:
                return behind or ["(the control plane: unreachable)"]
            now = time.time()
            behind = []
            for name, raw in rows.items():
                info = _info(raw)
                if info is None or now - info["seen"] > STALE or info.get("healed"):
                    continue
                if _sid(info["applied"]) < want:
                    behind.append(name)
            if not behind or time.monotonic() >= end:
                return sorted(behind)
            await asyncio.sleep(0.02)

    async def instances(self) -> dict[str, dict[str, Any]]:
        rows = await asyncio.wait_for(self.redis.hgetall(self.instances_key), 2.0)
        now = time.time()
        out = {}
        for name, raw in rows.items():
            info = _info(raw)
            if info is not None:
                info["live"] = now - info["seen"] <= STALE and not info.get("healed")
                out[name] = info
        return out

    # --- heartbeat, lease, counts -----------------------------------------------------------

    async def _publish(self) -> None:
        await self.redis.hset(self.instances_key, self.name, json.dumps(
            {"applied": self.applied, "seen": time.time(), "healed": self.healed,
             "leader": self.leader}))

    async def _beat(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._beat_once(), HEARTBEAT * 2)
            except asyncio.CancelledError:
                raise
            except FAILURES as exc:
                self._failed(exc)
            await asyncio.sleep(HEARTBEAT)

    async def _beat_once(self) -> None:
        if not self.joined:
            return
        await self._publish()
        self._connected()
        ms = int(LEASE * 1000)
        got = await self.redis.set(self.lease_key, self.name, nx=True, px=ms)
        if not got:
            holder = await self.redis.get(self.lease_key)
            got = holder == self.name
            if got:
                await self.redis.pexpire(self.lease_key, ms)
        if bool(got) != self.leader:
            self.leader = bool(got)
            log.info("%s %s the control plane's leader (scheduled starts)", self.name,
                     "is now" if self.leader else "is no longer")
        if time.monotonic() - self._last_counts >= COUNTS_EVERY:
            self._last_counts = time.monotonic()
            await self.write_counts()
        if time.monotonic() - self._last_deps >= DEPS_EVERY:
            self._last_deps = time.monotonic()
            await self.redis.hset(self.deps_key, self.name, json.dumps(self.gameday.deps()))
            await self.redis.expire(self.deps_key, COUNTS_TTL)

    async def fleet_deps(self) -> dict[str, Any]:
        """The dependency map of every instance merged: this one's as it is
        now, the others' as last written (up to DEPS_EVERY seconds old).  An
        instance's map lives in its own process, so one that restarted
        starts an empty one; without Redis, this instance's own."""
        own = self.gameday.deps()
        written = await self._each_instance(self.deps_key)
        if written is None:
            return own
        return merge_rows([own, *(rows for name, rows in written.items() if name != self.name)])

    async def _each_instance(self, key: str) -> dict[str, Any] | None:
        """What each instance wrote under `key` (a hash: instance -> JSON), or
        None when Redis does not answer within 2 s."""
        try:
            raw = await asyncio.wait_for(self.redis.hgetall(key), 2.0)
        except FAILURES:
            return None
        return {name: json.loads(text) for name, text in raw.items()}

    def _connected(self) -> None:
        self._last_ok = time.monotonic()
        if self.connected:
            return
        self.connected = True
        if self.healed:
            self.healed = False
            log.warning("control plane %s reachable again: following its log from %s",
                        redact(self.url), self.applied)

    def _failed(self, exc: BaseException) -> None:
        since = time.monotonic() - self._last_ok
        if self.connected:
            self.connected = False
            self.leader = False
            log.warning("control plane %s unreachable (%s): every run stops here in %.1f s "
                        "unless it is back", redact(self.url), exc or type(exc).__name__,
                        max(0.0, self.grace - since))
        if not self.healed and since >= self.grace:
            self.heal()

    def heal(self) -> None:
        """Without the control plane for control_grace: stop applying every run."""
        self.healed = True
        gd = self.gameday
        done = gd.reset(detail=f"the control plane was unreachable for {self.grace:.1f}s: "
                               "healed on this instance")
        log.error("control plane %s unreachable for %.1f s: healed here (%d runs stopped, %d "
                  "ad hoc rules removed); every query is forwarded unchanged until it is back",
                  redact(self.url), self.grace, len(done["runs"]), len(done["rules"]))

    def following(self) -> bool:
        """Applying the fleet's faults: joined, connected, not healed."""
        return self.joined and self.connected and not self.healed

    def ready(self) -> bool:
        """Fit to answer for the fleet: joined (its faults are the fleet's, a
        Redis blip shorter than control_grace included), or healed (it
        answers transparently).  Not ready: started and not joined yet."""
        return self.joined or self.healed

    async def write_counts(self) -> None:
        if self._refresh is not None:
            await self._refresh()
        engine = self.gameday.engine
        pipe = self.redis.pipeline(transaction=False)
        wrote = False
        for run_id in engine.run_ids():
            rows = {"stats": engine.stats(run_id), "clients": engine.client_stats(run_id)}
            self._rows(pipe, run_id, rows)
            wrote = True
        for run_id in [r for r in self._final if r not in self._written]:
            self._rows(pipe, run_id, self._final[run_id])
            self._written.add(run_id)
            wrote = True
        if wrote:
            await pipe.execute()

    def _rows(self, pipe: Any, run_id: str, rows: dict[str, Any]) -> None:
        key = self.counts_key + run_id
        data = {"stats": rows["stats"], "clients": rows["clients"]}
        pipe.hset(key, self.name, json.dumps(data, default=str))
        pipe.expire(key, COUNTS_TTL)

    def _on_counts(self, run_id: str, stats: list[dict[str, Any]],
                   clients: list[dict[str, Any]]) -> None:
        """A run's final counts, as it ends here: written at once, and its
        merged report built once every instance had time to write theirs."""
        self._final[run_id] = {"stats": stats, "clients": clients}
        while len(self._final) > 200:
            self._written.discard(next(iter(self._final)))
            del self._final[next(iter(self._final))]
        if not self._replaying and not run_id.startswith("rule:"):
            self._spawn(self._final_report(run_id))

    async def _final_report(self, run_id: str) -> None:
        try:
            await asyncio.wait_for(self.write_counts(), 2.0)
            await asyncio.sleep(FINAL_WAIT)
            report = await self.merged_report(run_id)
        except FAILURES as exc:
            log.warning("report of run %s: the other instances' counts are not in it (%s)",
                        run_id, exc or type(exc).__name__)
            return
        if report is None:
            return
        gd = self.gameday
        if run_id in gd.reports:
            gd.reports[run_id] = report
        if gd.report_dir:
            try:
                write_report(gd.report_dir, report)
            except OSError as exc:
                log.error("cannot write the merged report of run %s: %s", run_id, exc)

    async def fleet_stats(self, run_id: str) -> tuple[list[dict[str, Any]], list[str]]:
        """A live run's per-rule counts summed over every instance (the
        others' as last written, up to COUNTS_EVERY seconds old), and the
        instances counted; without Redis, this instance's own."""
        own = self.gameday.engine.stats(run_id)
        rows = await self._each_instance(self.counts_key + run_id)
        if rows is None:
            return own, [self.name]
        rows[self.name] = {"stats": own, "clients": []}
        return merge_instances(rows)[0], sorted(rows)

    async def merged_report(self, run_id: str) -> dict[str, Any] | None:
        """The report of a run with the counts of every instance, or None when
        this instance does not know the run."""
        gd = self.gameday
        record = gd.runs.get(run_id) or gd.finished.get(run_id)
        if record is None:
            return None
        rows = await self._each_instance(self.counts_key + run_id)
        if rows is None:
            return None  # this instance's own report, then
        if gd.engine.get_run(run_id) is not None:
            if self._refresh is not None:
                await self._refresh()
            rows[self.name] = {"stats": gd.engine.stats(run_id),
                               "clients": gd.engine.client_stats(run_id)}
        elif run_id in self._final:
            rows[self.name] = self._final[run_id]
        stats, clients = merge_instances(rows)
        report = build_report(record.as_run(), stats, clients,
                              record.probes.summary() if record.probes else [])
        report["instances"] = sorted(rows)
        return report

    # --- what the game day hands over -------------------------------------------------------

    def _on_due(self, scenario: Scenario, start: float) -> None:
        if self._replaying or not self.leader or not self.following():
            return
        self._spawn(self._fire(scenario, start))

    async def _fire(self, scenario: Scenario, start: float) -> None:
        """A scheduled start, appended once for the fleet: the key marks it
        fired even after a reset trimmed the log (or a new leader took over)."""
        key = f"{self.fired_key}{scenario.name}:{start!r}"
        length = self.gameday.run_length(scenario)
        try:
            first = await asyncio.wait_for(self.redis.set(
                key, self.name, nx=True, px=int((min(length, 86400.0) + 3600) * 1000)), 2.0)
        except FAILURES as exc:
            log.error("scheduled start of %s not appended: %s", scenario.name, exc)
            return
        if first:
            await self._quiet("start", {"scenario": scenario, "at": start,
                                        "trigger": "schedule"})

    def _on_abort(self, run_id: str, why: str) -> None:
        if self._replaying:
            return
        self._spawn(self._quiet("stop", {"ref": run_id, "reason": "aborted", "detail": why}))

    def _on_expired(self, name: str) -> None:
        if self._replaying or not self.leader or not self.following():
            return
        self._spawn(self._quiet("rule_expired", {"name": name}))

    async def _quiet(self, op: str, args: dict[str, Any]) -> None:
        try:
            _, behind = await self.submit(op, args)
        except Exception as exc:  # noqa: BLE001 - logged; the API is not waiting
            log.error("control plane: %s not appended: %s", op, exc)
            return
        if behind:
            log.warning("control plane: %s not applied by %s", op, ", ".join(behind))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def _info(raw: str) -> dict[str, Any] | None:
    try:
        info = json.loads(raw)
        float(info["seen"])
        _sid(info["applied"])
    except (ValueError, KeyError, TypeError):
        return None
    return info  # type: ignore[no-any-return]
