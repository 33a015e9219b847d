"""The main process's worker pool: starts the workers, feeds them the
replicated log, asks them for counts, restarts the ones that die, and
drains them at shutdown.

Nothing here blocks the event loop: the control channels are read by the
loop (ipc.Channel), a request is a set of futures awaited with a bound, and
the counts workers sent last are kept (`last`) for the synchronous readers
(the game day's reports, /metrics) to merge."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from proxy.config import DNS_PORT, Settings, format_hostport, split_hostport
from proxy.core.deps import merge_rows
from proxy.errors import DnschaosError, ListenError
from proxy.frontends import grow_receive_buffer
from proxy.listeners import probe_free, reuse_socket, spread_queries
from proxy.runtime import cancel_and_wait
from proxy.workers.ipc import Channel
from proxy.workers.merge import combine_forwarder
from proxy.workers.replication import EngineLog, Entry

log = logging.getLogger("dnschaos.workers")

ACK_TIMEOUT = 2.0
"""Seconds to wait for every worker to confirm a state change or answer a read."""
START_TIMEOUT = 20.0
"""Seconds a worker has to start listening."""
MONITOR_INTERVAL = 0.1
MAX_BACKLOG = 64 << 20
"""Bytes of control messages a worker may leave unread before it is killed as stuck."""
COUNT_PARTS = ("forwarder", "stats", "clients")
TCP_BACKLOG = 100  # asyncio's default for create_server


@dataclass
class WorkerHandle:
    index: int
    proc: subprocess.Popen[bytes]
    chan: Channel
    started: float
    ready: bool = False
    failed: str | None = None
    restarts: int = 0
    applied: int = 0
    """The sequence number of the last log entry it said it applied."""
    lagging: bool = False
    """It missed a reply or acknowledgement: not waited for until it answers
    again (its last counts stand in), so one stuck worker delays one request,
    not every one."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def serving(self) -> bool:
        return self.ready and not self.chan.closed and self.proc.poll() is None


@dataclass
class Retired:
    """Counts of workers that died, as of the last gather before they did."""

    forwarder: list[dict[str, Any]] = field(default_factory=list)
    stats: list[list[dict[str, Any]]] = field(default_factory=list)
    clients: list[list[dict[str, Any]]] = field(default_factory=list)
    deps: list[dict[str, Any]] = field(default_factory=list)
    """Dependency map rows (at most one: the dead workers' merged)."""
    queries: dict[int, int] = field(default_factory=dict)


class WorkerPool:
    def __init__(self, settings: Settings, count: int, calls: EngineLog) -> None:
        self.settings = settings
        self.count = count
        self.calls = calls
        self.handles: list[WorkerHandle | None] = [None] * count
        self.listen: list[str] = []
        self.worker_settings: Settings | None = None
        self.known_run: Callable[[str], bool] = lambda run: True
        self.stopping = False
        self.last: dict[int, dict[str, Any]] = {}
        """Per worker index: its last gathered 'forwarder', 'stats', 'clients', 'deps'."""
        self.retired = Retired()
        self.loop_token = os.urandom(4).hex()
        """Names this proxy in loop probes: every worker knows the others' probes."""
        self._monitor: asyncio.Task[None] | None = None
        self._restarts = [0] * count
        self._quick_deaths = [0] * count
        self._restart_at: dict[int, float] = {}
        self._progress = asyncio.Event()
        """Set (and replaced) whenever a worker reports progress."""
        calls.subscribe(self._send_entry)

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.listen = self._concrete_ports()
        self.worker_settings = self.settings.model_copy(update={"listen": self.listen,
                                                               "workers": 1})
        sockets: list[list[socket.socket]] = []
        try:
            # Every worker's sockets are bound before any worker starts: each
            # socket in the port's SO_REUSEPORT group belongs to one worker from
            # the first query on, and what reaches it before that worker reads
            # waits in it instead of being lost.
            sockets = [self._bind_for_worker() for _ in range(self.count)]
            for udp in [sock for sock in sockets[0] if sock.type == socket.SOCK_DGRAM]:
                spread_queries(udp, self.count)  # one program per port's group
            for index in range(self.count):
                self._spawn(index, sockets[index])
            await self._wait_ready(list(range(self.count)), START_TIMEOUT)
        except BaseException:
            for held in sockets:  # those of workers not spawned
                for sock in held:
                    sock.close()
            self.kill_all()
            raise
        # Probe for loops again now that every worker listens.
        for handle in self._live():
            handle.chan.send(("probe_loops", 0))
        self._monitor = asyncio.get_running_loop().create_task(self._watch(),
                                                               name="worker monitor")

    def _concrete_ports(self) -> list[str]:
        """The listen addresses with concrete ports (a port 0 becomes a free
        port), each checked free for TCP and UDP.

        The check binds without SO_REUSEPORT: a SO_REUSEPORT bind succeeds next
        to another program's socket that has it set too (unbound, CoreDNS,
        another dnschaos), and the kernel would then share that program's
        queries with the workers."""
        out = []
        for text in self.settings.listen:
            host, port = probe_free(text, DNS_PORT, ("tcp", "udp"), "--listen")
            out.append(format_hostport(host, port))
        return out

    def _bind_for_worker(self) -> list[socket.socket]:
        """One worker's listening sockets, bound here and handed to it: per
        listen address a TCP socket (listening) and a UDP socket, both with
        SO_REUSEPORT.  Raises ListenError naming the address."""
        held: list[socket.socket] = []
        text, kind = "", socket.SOCK_STREAM
        try:
            for text in self.listen:
                host, port = split_hostport(text, DNS_PORT)
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    sock = reuse_socket(family, kind)
                    held.append(sock)
                    sock.bind((host, port))
                    if kind == socket.SOCK_STREAM:
                        sock.listen(TCP_BACKLOG)
                    else:
                        grow_receive_buffer(sock)  # it queues until the worker reads
        except OSError as exc:
            for sock in held:
                sock.close()
            proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
            raise ListenError.from_os_error(text, proto, exc, "--listen") from None
        return held

    def _spawn(self, index: int, listening: list[socket.socket] | None) -> WorkerHandle:
        """Start worker `index` with its listening sockets (closed here once it
        has them: each is then the worker's alone); None: it binds its own."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        listening = listening or []
        fds = [sock.fileno() for sock in listening]
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.workers", "--control-fd", str(child.fileno())],
                pass_fds=[child.fileno(), *fds], stdin=subprocess.DEVNULL, env=env,
                start_new_session=False)
        finally:
            child.close()
            for sock in listening:
                sock.close()
        handle = WorkerHandle(index, proc, Channel(parent), time.monotonic(),
                              restarts=self._restarts[index])
        handle.chan.on_event = lambda event, handle=handle: self._on_event(handle, event)
        handle.chan.attach(asyncio.get_running_loop())
        handle.chan.send(("init", {"settings": self.worker_settings, "index": index,
                                   "count": self.count, "parent": os.getpid(),
                                   "loop_token": self.loop_token, "listen_fds": fds,
                                   "snapshot": self.calls.snapshot()}))
        self.handles[index] = handle
        return handle

    def _on_event(self, handle: WorkerHandle, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "applied":
            handle.applied = max(handle.applied, event[1])
            self._caught_up(handle)
        elif kind == "ready" and not handle.ready:
            handle.ready = True
            what = "restarted" if handle.restarts else "started"
            log.info("worker %d %s (pid %d), listening on %s", handle.index, what,
                     handle.pid, ", ".join(event[1]["listen"]))
        elif kind == "failed":
            handle.failed = event[1]
        self._progress.set()
        self._progress = asyncio.Event()

    async def _wait_ready(self, indexes: list[int], timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            waiting = []
            for index in indexes:
                handle = self.handles[index]
                assert handle is not None
                if handle.failed:
                    raise DnschaosError(f"worker {index}: {handle.failed}")
                if handle.proc.poll() is not None:
                    raise DnschaosError(f"worker {index} (pid {handle.pid}) exited with status "
                                        f"{handle.proc.returncode} while starting")
                if not handle.ready:
                    waiting.append(index)
            if not waiting:
                return
            if time.monotonic() > end:
                raise DnschaosError(f"worker(s) {waiting} did not start within {timeout:.0f} s")
            await asyncio.sleep(0.02)

    async def _watch(self) -> None:
        while not self.stopping:
            try:
                self._watch_once()
            except Exception:  # noqa: BLE001 - the monitor must go on
                log.exception("worker monitor failed")
            await asyncio.sleep(MONITOR_INTERVAL)

    def _watch_once(self) -> None:
        now = time.monotonic()
        for index, handle in enumerate(self.handles):
            if self.stopping:
                return
            if handle is None:
                if now >= self._restart_at.get(index, 0.0):
                    self._restart(index)
                continue
            if handle.failed and handle.proc.poll() is None:
                handle.proc.kill()
            if len(handle.chan.out) > MAX_BACKLOG and handle.proc.poll() is None:
                log.warning("worker %d (pid %d) reads no control messages: killing it",
                            index, handle.pid)
                handle.proc.kill()
            status = handle.proc.poll()
            if status is None:
                continue
            handle.chan.close()
            self._retire(index)
            self.handles[index] = None
            lived = now - handle.started
            self._quick_deaths[index] = self._quick_deaths[index] + 1 if lived < 2.0 else 0
            quick = self._quick_deaths[index]
            delay = min(5.0, 0.1 * 2 ** quick) if quick else 0.0
            self._restart_at[index] = now + delay
            log.warning("worker %d (pid %d) exited with status %s%s; restarting it%s", index,
                        handle.pid, status, f" ({handle.failed})" if handle.failed else "",
                        f" in {delay:.1f} s" if delay else "")
            if not delay:
                self._restart(index)

    def _restart(self, index: int) -> None:
        self._restarts[index] += 1
        self._restart_at.pop(index, None)
        try:
            # It binds its own sockets (SO_REUSEPORT) once it can read them:
            # until then the other workers take the port's queries.
            self._spawn(index, None)
        except OSError as exc:
            log.error("cannot restart worker %d: %s", index, exc)
            self._restart_at[index] = time.monotonic() + 1.0

    def _retire(self, index: int) -> None:
        """Keep what a dead worker had counted (as of the last gather)."""
        last = self.last.pop(index, None)
        if not last:
            return
        retired = self.retired
        if "forwarder" in last:
            retired.forwarder = [combine_forwarder(retired.forwarder + [last["forwarder"]])]
            queries = last["forwarder"]["stats"]
            retired.queries[index] = (retired.queries.get(index, 0)
                                      + queries["queries_udp"] + queries["queries_tcp"])
        # Only runs the main process still holds are worth keeping (bounded memory).
        if "stats" in last:
            retired.stats.append(last["stats"])
        if "clients" in last:
            retired.clients.append(last["clients"])
        if last.get("deps"):
            retired.deps = [merge_rows(retired.deps + [last["deps"]])]
        retired.stats = [rows for rows in ([r for r in rows if self.known_run(r["run"])]
                                           for rows in retired.stats) if rows]
        retired.clients = [rows for rows in ([r for r in rows if self.known_run(r["run"])]
                                             for rows in retired.clients) if rows]

    async def shutdown(self, grace: float) -> None:
        """Every worker drains and exits; whatever is left after `grace`
        seconds more than the drain is killed."""
        self.stopping = True
        await cancel_and_wait(self._monitor)
        self._monitor = None
        live = [h for h in self.handles if h is not None]
        for handle in live:
            handle.chan.send(("drain",))
        end = time.monotonic() + grace
        while time.monotonic() < end and any(h.proc.poll() is None for h in live):
            await asyncio.sleep(0.02)
        for handle in live:
            if handle.proc.poll() is None:
                log.warning("worker %d (pid %d) did not stop in time: killing it",
                            handle.index, handle.pid)
                handle.proc.kill()
                handle.proc.wait(5)
            log.info("worker %d (pid %d) stopped (status %s)", handle.index, handle.pid,
                     handle.proc.returncode)
            handle.chan.close()
        self.handles = [None] * self.count

    def kill_all(self) -> None:
        self.stopping = True
        for handle in self.handles:
            if handle is not None:
                if handle.proc.poll() is None:
                    handle.proc.kill()
                    handle.proc.wait(5)
                handle.chan.close()
        self.handles = [None] * self.count

    # --- the log and requests -----------------------------------------------------------

    def _lagging(self, handle: WorkerHandle, what: str, timeout: float) -> None:
        if not handle.lagging and handle.proc.poll() is None and not handle.chan.closed:
            log.warning("worker %d (pid %d) did not %s within %.1f s; not waited for until "
                        "it answers", handle.index, handle.pid, what, timeout)
        handle.lagging = True

    def _caught_up(self, handle: WorkerHandle) -> None:
        if handle.lagging:
            handle.lagging = False
            log.warning("worker %d (pid %d) answers again", handle.index, handle.pid)

    def _live(self) -> list[WorkerHandle]:
        return [h for h in self.handles if h is not None and not h.chan.closed]

    def _send_entry(self, entry: Entry) -> None:
        """Every live worker gets every entry, a starting one too: it skips
        what its snapshot already held."""
        for handle in self._live():
            handle.chan.send(("entry", entry))

    async def settle(self, timeout: float = ACK_TIMEOUT) -> None:
        """Wait (without blocking) until every serving worker has applied the
        log up to now, or `timeout` passes (each late one logged)."""
        target = self.calls.last_change
        end = time.monotonic() + timeout
        while True:
            behind = [h for h in self._live()
                      if h.serving and not h.lagging and h.applied < target]
            left = end - time.monotonic()
            if not behind:
                return
            if left <= 0:
                for handle in behind:
                    self._lagging(handle, f"apply change {target}", timeout)
                return
            try:
                await asyncio.wait_for(self._progress.wait(), left)
            except TimeoutError:
                pass

    async def request(self, kind: str, *args: Any,
                      timeout: float = ACK_TIMEOUT) -> dict[int, Any]:
        """Send (kind, seq, *args) to every serving worker and await their
        replies, up to `timeout` (a lagging worker's is not waited for):
        {index: value} of those that answered."""
        asked = {handle.index: (handle, handle.chan.ask(kind, *args))
                 for handle in self._live() if handle.serving}
        for handle, future in asked.values():
            future.add_done_callback(partial(self._answered, handle))
        awaited = [future for handle, future in asked.values() if not handle.lagging]
        if awaited:
            await asyncio.wait(awaited, timeout=timeout)
        out = {}
        for index, (handle, future) in asked.items():
            if not future.done():
                if timeout >= ACK_TIMEOUT:  # a shorter wait (/health) says nothing
                    self._lagging(handle, f"answer {kind!r}", timeout)
                continue
            ok, value = future.result()
            if not ok:
                if not handle.chan.closed:
                    log.warning("worker %d (pid %d): %s failed: %s", handle.index,
                                handle.pid, kind, value)
                continue
            out[index] = value
        return out

    def _answered(self, handle: WorkerHandle, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.result()[0]:
            self._caught_up(handle)

    def release(self, run: str | None = None) -> int:
        """Forward the queries `run` holds in a fault's delay (None: every
        held query), in every worker; sent after the calls before it, so a
        settle() after it waits for it too.  Returns 0: the counts come back
        later, not awaited here."""
        for handle in self._live():
            handle.chan.send(("release", 0, run))
        return 0

    async def refresh(self, parts: tuple[str, ...] = COUNT_PARTS,
                      timeout: float = ACK_TIMEOUT) -> None:
        """Gather `parts` of every serving worker's counts into `last`."""
        got = await self.request("snapshot", parts, timeout=timeout)
        for index, snap in got.items():
            self.last.setdefault(index, {}).update(snap)

    def counted(self, part: str) -> list[Any]:
        """`part` of the last counts of every live worker."""
        return [snap[part] for index, snap in sorted(self.last.items())
                if part in snap and self.handles[index] is not None]

    def worker_rows(self) -> list[dict[str, Any]]:
        rows = []
        for index in range(self.count):
            handle = self.handles[index]
            snap = (self.last.get(index) or {}).get("forwarder") or {}
            stats = snap.get("stats") or {}
            rows.append({
                "worker": str(index), "pid": handle.pid if handle else None,
                "up": bool(handle and handle.ready and handle.proc.poll() is None),
                "queries": self.retired.queries.get(index, 0)
                + stats.get("queries_udp", 0) + stats.get("queries_tcp", 0),
                "restarts": self._restarts[index],
            })
        return rows
