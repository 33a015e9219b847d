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
import socket
import time
from typing import Any
from aiohttp import web

from proxy.admin import make_app
from proxy.config import ADMIN_PORT, DNS_PORT, Settings, format_hostport, split_hostport
from proxy.errors import ListenError
from proxy.forwarder import Forwarder
from proxy.frontends import TcpConnection, UdpFrontend
from proxy.metrics import make_registry

log = logging.getLogger("dnschaos.server")


class Server:
    def __init__(self, settings: Settings, engine: Any = None,
                 start: list[dict[str, Any]] | None = None) -> None:
        """start: runs to start once listening, each keyword arguments of
        GameDay.start plus `scenario` (a Scenario) and `file`; a scenario
        with a schedule is only registered (its schedule starts it)."""
        if engine is None:
            from proxy.core.engine import Engine

            engine = Engine()
        from proxy.gameday.audit import AuditLog
        from proxy.gameday.catalog import Catalog
        from proxy.gameday.runs import GameDay

        self.settings = settings
        self.pool: Any = None
        """With `workers` > 1: the worker processes (proxy/workers.py), which
        serve DNS; this process then runs only the admin API and the game day,
        and its engine and forwarder stand for the workers'."""
        if settings.workers > 1:
            from proxy.workers import FanoutEngine, PoolForwarder, WorkerPool

            self.pool = WorkerPool(settings, settings.workers)
            engine = FanoutEngine(engine, self.pool)
            self.forwarder: Any = PoolForwarder(settings, self.pool, engine)
        else:
            self.forwarder = Forwarder(settings, engine)
        self.engine = engine
        self.audit = AuditLog(settings.audit_log)
        self.gameday = GameDay(engine, max_run_duration=settings.max_run_duration,
                               catalog=Catalog(settings.scenario_dir),
                               report_dir=settings.report_dir,
                               release=self.forwarder.release_delayed,
                               ended_run_retention=settings.ended_run_retention)
        self._initial = start or []
        self._watch_stop: asyncio.Event | None = None
        self._watcher: asyncio.Task | None = None
        self.registry = make_registry(self.forwarder, ended=self.gameday.ended_runs)
        self.tcp_connections: set[TcpConnection] = set()
        self.listen_addresses: list[str] = []  # with the real ports, once bound
        self.admin_address: str | None = None
        self._udp: list[asyncio.DatagramTransport] = []
        self._udp_frontends: list[UdpFrontend] = []
        self._tcp: list[asyncio.AbstractServer] = []
        self._admin: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        self._phase_watch: asyncio.TimerHandle | None = None
        self._phase_seen: tuple | None = None

    async def start(self) -> None:
        self.settings.check_admin_token()
        if self.pool is not None:
            if self.settings.admin:  # before starting workers that would be killed again
                from proxy.workers import probe_free

                probe_free(self.settings.admin, ADMIN_PORT, ("tcp",), "--admin")
            await self.pool.start()
            self.listen_addresses = list(self.pool.listen)
        else:
            await self._start_listeners()
        try:
            await self._start_admin()
        except BaseException:
            if self.pool is not None:
                self.pool.kill_all()
            raise
        self._watch_phases()
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

    async def _start_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        await self.forwarder.start()
        for text in self.settings.listen:
            host, port = split_hostport(text, DNS_PORT)
            # TCP first, so that port 0 picks a free port that UDP then shares.
            # The listener's text is known only once bound: the factory reads it from a cell.
            # Neither sets SO_REUSEPORT, so a port another program holds is refused.
            cell: list[str] = []
            proto = "tcp"
            try:
                tcp = await loop.create_server(
                    lambda cell=cell: TcpConnection(self.forwarder, cell[0], self.tcp_connections),
                    host, port, reuse_address=True, family=_family(host),
                )
                self._tcp.append(tcp)
                port = tcp.sockets[0].getsockname()[1]
                listener = format_hostport(host, port)
                cell.append(listener)
                proto = "udp"
                udp, frontend = await loop.create_datagram_endpoint(
                    lambda listener=listener: UdpFrontend(self.forwarder, listener),
                    local_addr=(host, port), family=_family(host),
                )
            except OSError as exc:
                for server in self._tcp:
                    server.close()
                for transport in self._udp:
                    transport.close()
                await self.forwarder.stop()
                raise ListenError.from_os_error(text, proto, exc, "--listen") from None
            self._udp.append(udp)
            self._udp_frontends.append(frontend)
            self.listen_addresses.append(listener)
        self.forwarder.start_loop_probes()

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
            from proxy.gameday.watcher import watch

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
            gameday.start(scenario.name, **spec)
        gameday.tick()  # a schedule in progress rejoins before the first query
        gameday.start_background()

    def _watch_phases(self) -> None:
        """Log phase changes of runs the game-day manager does not own (it logs
        its own): one line per event."""
        if self.gameday.runs:
            self._phase_watch = asyncio.get_running_loop().call_later(0.1, self._watch_phases)
            return
        phase = self.engine.current_phase(time.time())
        seen = (self.engine.scenario, phase[0], phase[1]) if phase else None
        if seen != self._phase_seen:
            if seen is not None:
                log.info("scenario %s: phase %d %r begins (%.1f s)", seen[0], seen[1] + 1,
                         seen[2], phase[2])  # type: ignore[index]
            elif self._phase_seen is not None:
                log.info("scenario %s ended: every fault reverted", self._phase_seen[0])
            self._phase_seen = seen
        self._phase_watch = asyncio.get_running_loop().call_later(0.1, self._watch_phases)

    async def stop(self) -> None:
        if self._phase_watch is not None:
            self._phase_watch.cancel()
        await self.stop_gameday()
        if self.pool is not None:
            await self.pool.shutdown(self.settings.deadline + 2.2)
        for udp in self._udp:
            udp.close()
        for tcp in self._tcp:
            tcp.close()
        for connection in list(self.tcp_connections):
            connection.close()
        if self._admin:
            await self._admin.cleanup()
        if self.pool is None:
            await self.forwarder.stop()
        self._stopped.set()

    async def stop_gameday(self) -> None:
        """End every run (reports written) and stop the watcher; idempotent."""
        if self._watch_stop is not None:
            self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._watcher = None
        await self.gameday.close()

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
        for frontend in self._udp_frontends:
            frontend.handle = _ignore  # keep the socket: answers in flight still go out
        for tcp in self._tcp:
            tcp.close()
        loop = asyncio.get_running_loop()
        end = loop.time() + (limit if limit is not None else self.settings.deadline + 0.2)
        while self.forwarder.inflight > 0 and loop.time() < end:
            await asyncio.sleep(0.02)


def _ignore(*args: object) -> None:
    pass


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET

