"""Starts and stops everything that listens: the UDP and TCP frontends, the
upstream sockets and the admin HTTP listener, and the game-day machinery
(runs manager, scenario directory watcher).

Shutdown (SIGTERM, SIGINT): every run ends first (faults revert, queries held
in a delay are released, reports written), then the listeners stop taking
queries and the ones in flight are drained, then everything closes.  SIGHUP
re-reads the scenario directory."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from functools import partial
from typing import Any

from aiohttp import web

from proxy.admin import make_app
from proxy.config import ADMIN_PORT, Settings, format_hostport, split_hostport
from proxy.core.deps import merge_rows
from proxy.core.engine import Engine
from proxy.core.preview import UpstreamHealth
from proxy.errors import ListenError
from proxy.forwarder import Forwarder
from proxy.gameday.audit import AuditLog
from proxy.gameday.catalog import Catalog
from proxy.gameday.runs import GameDay
from proxy.gameday.watcher import watch
from proxy.listeners import Listeners, probe_free
from proxy.metrics import MetricsView, local_view, make_registry
from proxy.runtime import cancel_and_wait
from proxy.workers.pool import ACK_TIMEOUT, COUNT_PARTS, WorkerPool
from proxy.workers.replication import CallLog, LoggedEngine
from proxy.workers.view import PoolForwarder, WorkerCounts

log = logging.getLogger("dnschaos.server")


class Server:
    def __init__(self, settings: Settings, engine: Engine | None = None,
                 start: list[dict[str, Any]] | None = None) -> None:
        """start: runs to start once listening, each keyword arguments of
        GameDay.start plus `scenario` (a Scenario) and `file`; a scenario
        with a schedule is only registered (its schedule starts it)."""
        local = engine if engine is not None else Engine()
        self.settings = settings
        self.local_engine = local
        self.pool: WorkerPool | None = None
        """With `workers` > 1: the worker processes (proxy/workers/), which
        serve DNS; this process then runs only the admin API and the game day,
        and its engine and forwarder stand for the workers'."""
        self.engine: Engine | LoggedEngine
        self.forwarder: Forwarder | PoolForwarder
        read: Callable[[], MetricsView]
        if settings.workers > 1:
            calls = CallLog()
            pool = self.pool = WorkerPool(settings, settings.workers, calls)
            pool.known_run = lambda run: local.get_run(run) is not None
            counts = WorkerCounts(local, pool)
            self.engine = LoggedEngine(local, calls, counts)
            self.forwarder = forwarder = PoolForwarder(settings, pool, counts)
            read = forwarder.metrics_view
        else:
            self.engine = local
            self.forwarder = single = Forwarder(settings, local)
            read = lambda: local_view(single, local)  # noqa: E731
        self.audit = AuditLog(settings.audit_log)
        self.gameday = GameDay(self.engine, max_run_duration=settings.max_run_duration,  # type: ignore[arg-type]
                               catalog=Catalog(settings.scenario_dir),
                               report_dir=settings.report_dir,
                               release=self.forwarder.release_delayed,
                               ended_run_retention=settings.ended_run_retention,
                               before_tick=self._before_tick if self.pool else None,
                               deps=self._deps_rows, upstreams=self._upstream_health,
                               recovery_window=settings.recovery_window)
        self.control: Any = None
        """With `control`: the shared control plane (proxy/control/plane.py),
        through which every change of faults goes."""
        if settings.control:
            from proxy.control.plane import ControlPlane  # redis-py: only when asked for
            self.control = ControlPlane(settings, self.gameday, settle=self.settle,
                                        refresh=partial(self.refresh, ("stats", "clients")))
        self._initial = start or []
        self._watch_stop: asyncio.Event | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.registry = make_registry(read, settings, ended=self.gameday,
                                      control=lambda: self.control)
        self.listeners: Listeners | None = None
        self.listen_addresses: list[str] = []  # with the real ports, once bound
        self.admin_address: str | None = None
        self._admin: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        self._deps_gathered = 0.0

    # --- what the admin listener awaits (worker processes only) -------------------------

    async def refresh(self, parts: tuple[str, ...] = COUNT_PARTS,
                      timeout: float = ACK_TIMEOUT) -> None:
        """Gather the workers' counts before a read (nothing with one process)."""
        if self.pool is not None:
            await self.pool.refresh(parts, timeout)

    async def settle(self) -> None:
        """Wait until every worker applies the changes made so far."""
        if self.pool is not None:
            await self.pool.settle()

    async def _before_tick(self, now: float) -> None:
        """A run about to end gets its final counts into its report (and its
        recovery baseline); while a recovery window is open the workers'
        dependency maps are gathered once a second."""
        if isinstance(self.engine, LoggedEngine) and self.engine.ending_by(now):
            await self.refresh(("stats", "clients", "deps"))
        elif self.gameday.watching() and now >= self._deps_gathered + 1.0:
            self._deps_gathered = now
            await self.refresh(("deps",))

    def _deps_rows(self) -> dict[str, Any]:
        """The dependency map: this process's, or every worker's merged."""
        if isinstance(self.forwarder, PoolForwarder):
            return self.forwarder.counts.deps_rows()
        deps = self.forwarder.deps
        return deps.rows() if deps is not None else merge_rows([])

    def _upstream_health(self) -> list[UpstreamHealth]:
        return [UpstreamHealth(u.name, u.up, u.looped) for u in self.forwarder.upstreams]

    # --- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self.settings.check_admin_token()
        if self.control is not None:
            await self.control.start()  # a run live in the fleet is live before the first query
        if self.pool is not None:
            if self.settings.admin:  # before starting workers that would be killed again
                probe_free(self.settings.admin, ADMIN_PORT, ("tcp",), "--admin")
            await self.pool.start()
            self.listen_addresses = list(self.pool.listen)
        else:
            assert isinstance(self.forwarder, Forwarder)
            await self.forwarder.start()
            self.listeners = Listeners(self.forwarder)
            try:
                self.listen_addresses = list(await self.listeners.start(self.settings.listen))
            except ListenError:
                await self.forwarder.stop()
                raise
            self.forwarder.start_loop_probes()
        try:
            await self._start_admin()
        except BaseException:
            if self.pool is not None:
                self.pool.kill_all()
            raise
        self._start_gameday()
        # Everything built so far (modules, models, sockets) lives as long as
        # the process: keep it out of the garbage collector's full passes,
        # which would otherwise scan it all and stall queries.
        gc.freeze()
        log.info(
            "dnschaos listening on %s (UDP and TCP%s), forwarding to %s (%s), admin on %s",
            ", ".join(self.listen_addresses),
            f", {self.settings.workers} worker processes" if self.pool is not None else "",
            ", ".join(self.settings.upstreams),
            self.settings.policy, self.admin_address or "nothing (off)",
        )

    async def _start_admin(self) -> None:
        if self.settings.admin:
            host, port = split_hostport(self.settings.admin, ADMIN_PORT)
            self._admin = web.AppRunner(make_app(self), access_log=None)
            await self._admin.setup()
            site = web.TCPSite(self._admin, host, port)
            try:
                await site.start()
            except OSError as exc:
                await self._admin.cleanup()
                self._admin = None
                raise ListenError.from_os_error(self.settings.admin, "tcp", exc,
                                                "--admin") from None
            bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
            self.admin_address = format_hostport(host, bound[1])

    def _start_gameday(self) -> None:
        gameday = self.gameday
        if self.settings.scenario_dir:
            changes = gameday.reload()
            log.info("%d scenario(s) in %s%s", len(gameday.catalog.scenarios),
                     self.settings.scenario_dir,
                     f", {len(changes.errors)} file(s) refused" if changes.errors else "")
            self._watch_stop = asyncio.Event()
            self._watcher = asyncio.get_running_loop().create_task(
                watch(self.settings.scenario_dir, gameday.reload, self._watch_stop),
                name="scenario watcher")
        for spec in self._initial:
            spec = dict(spec)
            scenario = spec.pop("scenario")
            gameday.add_scenario(scenario, spec.pop("file", None))
            if scenario.schedule and spec.get("at") is None:
                continue  # the schedule starts it (and rejoins a run in progress)
            if self.control is not None:  # for the whole fleet, through its log
                if any(r.scenario.name == scenario.name for r in gameday.runs.values()):
                    log.info("scenario %s: a run of it is live in the fleet already (joined, "
                             "not started again)", scenario.name)
                    continue
                self.control._spawn(self.control._quiet("start", {**spec,
                                                                  "scenario": scenario.name}))
                continue
            gameday.start(scenario.name, **spec)
        gameday.tick()  # a schedule in progress rejoins before the first query
        gameday.start_background()

    async def stop(self) -> None:
        await self.stop_gameday()
        if self.pool is not None:
            await self.pool.shutdown(self.settings.deadline + 2.2)
        if self.listeners is not None:
            self.listeners.close()
        if self._admin:
            await self._admin.cleanup()
        if isinstance(self.forwarder, Forwarder):
            await self.forwarder.stop()
        self._stopped.set()

    async def stop_gameday(self) -> None:
        """End every run (reports written) and stop the watcher; idempotent."""
        if self._watch_stop is not None:
            self._watch_stop.set()
        await cancel_and_wait(self._watcher)
        self._watcher = None
        if self.gameday.runs or self.gameday.rules:
            await self.refresh(("stats", "clients", "deps"))  # the reports' final counts
        await self.gameday.close()
        if self.control is not None:
            await self.control.close()
            self.control = None

    def reload_scenarios(self) -> None:
        changes = self.gameday.reload()
        log.info("SIGHUP: scenario directory re-read: %d changed, %d removed, %d refused",
                 len(changes.changed), len(changes.removed), len(changes.errors))

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_scenarios)
        await self.start()
        await stop.wait()
        log.info("stopping: every fault reverts, then queries in flight are drained")
        await self.stop_gameday()
        await self.drain()
        await self.stop()
        log.info("stopped")

    async def drain(self, limit: float | None = None) -> None:
        """Stop listening for new queries and wait (up to the query deadline)
        for the ones in flight to be answered.  Worker processes do it
        themselves, then exit; they are waited for."""
        if self.pool is not None:
            limit = limit if limit is not None else self.settings.deadline + 0.2
            await self.pool.shutdown(limit + 2.0)
            return
        if self.listeners is not None:
            await self.listeners.drain(limit if limit is not None else self.settings.deadline + 0.2)
