"""Stop conditions: probes checked on an interval while a run is live.

`ProbeState` is the pure part (counts consecutive failures, keeps a bounded
history, says when to abort); `check()` does one check over the network or
as a subprocess; `ProbeMonitor` runs one asyncio task per probe and calls
`on_abort(reason)` once when a probe has failed `failures` times in a row.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.core.model import Probe
from proxy.core.schedule import format_time

log = logging.getLogger("dnschaos.probes")

HISTORY = 50

Checker = Callable[[Probe], Awaitable[tuple[bool, str]]]


@dataclass
class ProbeState:
    probe: Probe
    checks: int = 0
    failed: int = 0
    consecutive: int = 0
    last: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    """The latest results that changed something (failures, recoveries), bounded."""

    def observe(self, ok: bool, detail: str, now: float) -> bool:
        """Record one result; True when this failure reaches the limit."""
        self.checks += 1
        result = {"time": format_time(now), "ok": ok, "detail": detail}
        recovered = ok and self.consecutive > 0
        if ok:
            self.consecutive = 0
        else:
            self.failed += 1
            self.consecutive += 1
        if not ok or recovered or self.last is None:
            self.history.append(result)
            del self.history[:-HISTORY]
        self.last = result
        return not ok and self.consecutive == self.probe.failures

    def summary(self) -> dict[str, Any]:
        probe = self.probe
        target = (probe.http if probe.http else
                  f"{probe.prometheus.query} <= {probe.prometheus.max} at {probe.prometheus.url}"
                  if probe.prometheus else " ".join(probe.command or []))
        return {
            "name": probe.name, "kind": probe.kind, "target": target,
            "interval": probe.interval, "failures_allowed": probe.failures,
            "checks": self.checks, "failed": self.failed,
            "consecutive_failures": self.consecutive, "last": self.last,
            "history": list(self.history),
        }


async def check(probe: Probe) -> tuple[bool, str]:
    """One check: (passed, what was seen)."""
    try:
        return await asyncio.wait_for(_check(probe), probe.timeout)
    except TimeoutError:
        return False, f"no result within {probe.timeout:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure is a failed check
        return False, f"{type(exc).__name__}: {exc}"


async def _check(probe: Probe) -> tuple[bool, str]:
    if probe.http is not None:
        async with aiohttp.ClientSession() as session:
            async with session.get(probe.http, allow_redirects=False) as resp:
                return 200 <= resp.status < 300, f"HTTP {resp.status}"
    if probe.prometheus is not None:
        spec = probe.prometheus
        url = spec.url.rstrip("/") + "/api/v1/query"
        async with aiohttp.ClientSession() as session:
            async with session.get(url, params={"query": spec.query}) as resp:
                if resp.status != 200:
                    return False, f"Prometheus answered HTTP {resp.status}"
                body = await resp.json(content_type=None)
        values = _prometheus_values(body)
        if not values:
            return True, "no samples"
        worst = max(values)
        if math.isnan(worst):
            return False, "the query returned NaN"
        return worst <= spec.max, f"value {worst:g} (max {spec.max:g})"
    assert probe.command is not None
    proc = await asyncio.create_subprocess_exec(
        *probe.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await proc.communicate()
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
    return proc.returncode == 0, f"exit {proc.returncode}" + (f": {tail[0]}" if tail else "")


def _prometheus_values(body: Any) -> list[float]:
    data = body.get("data", {}) if isinstance(body, dict) else {}
    kind, result = data.get("resultType"), data.get("result") or []
    if kind == "scalar":
        return [float(result[1])]
    if kind == "vector":
        return [float(sample["value"][1]) for sample in result]
    if kind == "matrix":
        return [float(v[1]) for series in result for v in series["values"][-1:]]
    raise ValueError(f"unexpected Prometheus answer: {str(body)[:200]}")


class ProbeMonitor:
    """One task per probe of a run; `on_abort(reason)` is called at most once."""

    def __init__(self, probes: list[Probe], on_abort: Callable[[str], None],
                 checker: Checker = check, clock: Callable[[], float] = time.time) -> None:
        self.states = [ProbeState(p) for p in probes]
        self.on_abort = on_abort
        self.checker = checker
        self.clock = clock
        self.tasks: list[asyncio.Task] = []
        self.aborted: str | None = None

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._loop(state), name=f"probe {state.probe.name}")
                      for state in self.states]

    async def stop(self) -> None:
        tasks, self.tasks = self.tasks, []
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        for task in tasks:
            if task is not current:
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass

    async def _loop(self, state: ProbeState) -> None:
        probe = state.probe
        while self.aborted is None:
            await asyncio.sleep(probe.interval)
            ok, detail = await self.checker(probe)
            if self.aborted is not None:
                return
            if state.observe(ok, detail, self.clock()):
                self.aborted = (f"probe {probe.name} failed {probe.failures} time(s) in a row: "
                                f"{detail}")
                log.warning("%s", self.aborted)
                self.on_abort(self.aborted)
                return

    def summary(self) -> list[dict[str, Any]]:
        return [state.summary() for state in self.states]
