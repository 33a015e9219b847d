"""Worker processes: `--workers N` serves DNS from N processes on one port.

How it works:
- The main process is the control plane: admin API, game-day manager,
  scheduler, scenario watcher.  It serves no DNS.  It starts N workers
  (`python -m proxy.workers --control-fd FD`), each a Forwarder and an
  Engine bound to every listen address with SO_REUSEPORT (UDP and TCP), so
  the kernel spreads clients over them.  First the main process binds every
  address without SO_REUSEPORT, to refuse one another program holds (it
  would share that program's queries); then it binds them with SO_REUSEPORT
  (a port 0 resolved to a number) and holds them until every worker is
  listening on the same number.
- Each worker has a control channel, a unix socketpair carrying
  length-prefixed pickles, in order.  The game day drives a `FanoutEngine`:
  every mutating engine call (add_run, add_rule, stop_run, pause, resume,
  reset, forget, load, set_rules, clear, tick) is applied to the main
  process's own engine (phases, runs_info, get_run stay local and exact) and
  sent with its exact arguments, `now` included, to every worker, which
  applies it to its engine.  Mutations wait for every ready worker's
  acknowledgement (bounded), so when an API call returns, every worker
  applies it to the very next query; ticks are not waited for.  The game
  day's `release` (the queries a stopped or paused run holds in a delay let
  go; no run id: every held query) is a message too, with the run's id.
- Reads that need traffic counts (`stats`, `client_stats`) and /metrics are
  gathered from every worker and merged: per (run, rule) counts summed, per
  (run, rule, client) fault and name counts summed, first_seen min,
  last_seen max; forwarder counters and histograms summed; an upstream is
  up when any worker sees it up.  The counts a dead worker had at the last
  gather are kept, so totals do not go backwards when it is replaced.
- A worker that dies is restarted (a warning is logged) with the current
  state replayed: every add_run/add_rule of a run the main process still
  holds, then that run's pause/resume/stop calls, each with its original
  arguments.  A worker exits when the main process dies (PR_SET_PDEATHSIG,
  and end of file on its control channel).
- Shutdown: the main process asks every worker to drain (stop reading,
  answer what is in flight up to the query deadline, exit 0), waits for
  them, and kills what is left after a bound.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from proxy.config import DNS_PORT, Settings, format_hostport, split_hostport
from proxy.core.model import Limit, Match
from proxy.errors import DnschaosError, ListenError
from proxy.stats import LATENCY_BUCKETS, Histogram, Stats, UpstreamStats

log = logging.getLogger("dnschaos.workers")

ACK_TIMEOUT = 2.0
"""Seconds to wait for every worker to confirm a state change or answer a read."""
START_TIMEOUT = 20.0
"""Seconds a worker has to start listening."""
MONITOR_INTERVAL = 0.1
MAX_BACKLOG = 64 << 20
"""Bytes of control messages a worker may leave unread before it is killed as stuck."""

MUTATING = ("add_run", "add_rule", "stop_run", "pause", "resume", "reset", "forget", "load",
            "set_rules", "clear")
_HEADER = struct.Struct("!I")
_STAT_FIELDS = tuple(n for n in Stats.__slots__ if n not in ("qtypes", "rcodes", "latency"))
_UPSTREAM_FIELDS = ("timeouts", "tcp_requests", "errors", "loops")


# --- framing --------------------------------------------------------------------------


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def unframe(buffer: bytearray) -> list[Any]:
    """Complete messages at the front of `buffer` (removed from it)."""
    out = []
    while len(buffer) >= 4:
        (size,) = _HEADER.unpack_from(buffer)
        if len(buffer) < 4 + size:
            break
        out.append(pickle.loads(bytes(buffer[4:4 + size])))
        del buffer[:4 + size]
    return out


class Channel:
    """The main process's end of one worker's control socket (non-blocking;
    waits are done with select, bounded)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.out = bytearray()
        self.inbuf = bytearray()
        self.replies: dict[int, tuple[bool, Any]] = {}
        self.awaiting: set[int] = set()
        """Sequence numbers whose replies are wanted (late ones are dropped)."""
        self.events: list[Any] = []
        self.closed = False

    def send(self, message: Any) -> None:
        if self.closed:
            return
        self.out += frame(message)
        self.flush()

    def flush(self) -> None:
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close()
                return
            del self.out[:sent]

    def pump(self) -> None:
        """Read what is there, without waiting."""
        while not self.closed:
            try:
                chunk = self.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._close()
                break
            self.inbuf += chunk
        for message in unframe(self.inbuf):
            if message[0] == "reply":
                if message[1] in self.awaiting:
                    self.replies[message[1]] = (message[2], message[3])
            else:
                self.events.append(message)

    def _close(self) -> None:
        self.closed = True
        self.out.clear()

    def close(self) -> None:
        self._close()
        try:
            self.sock.close()
        except OSError:
            pass


def wait_replies(waits: list[tuple[Channel, int]], timeout: float) -> dict[int, tuple[bool, Any]]:
    """Flush and read the channels until every (channel, seq) has its reply,
    a channel closes, or `timeout` passes; {seq: (ok, value)} of those that came."""
    try:
        return _wait_replies(waits, timeout)
    finally:
        for chan, seq in waits:
            chan.awaiting.discard(seq)
            chan.replies.pop(seq, None)


def _wait_replies(waits: list[tuple[Channel, int]], timeout: float) -> dict[int, tuple[bool, Any]]:
    end = time.monotonic() + timeout
    got: dict[int, tuple[bool, Any]] = {}
    while True:
        pending = []
        for chan, seq in waits:
            if seq in got:
                continue
            chan.flush()
            chan.pump()
            if seq in chan.replies:
                got[seq] = chan.replies.pop(seq)
            elif not chan.closed:
                pending.append(chan)
        left = end - time.monotonic()
        if not pending or left <= 0:
            return got
        readers = [c.sock for c in pending]
        writers = [c.sock for c in pending if c.out]
        try:
            select.select(readers, writers, [], min(left, 0.05))
        except (OSError, ValueError):
            return got


# --- the main process: worker pool ---------------------------------------------------


@dataclass
class WorkerHandle:
    index: int
    proc: subprocess.Popen
    chan: Channel
    started: float
    ready: bool = False
    failed: str | None = None
    restarts: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Retired:
    """Counts of workers that died, as of the last gather before they did."""

    forwarder: list[dict[str, Any]] = field(default_factory=list)
    stats: list[list[dict[str, Any]]] = field(default_factory=list)
    clients: list[list[dict[str, Any]]] = field(default_factory=list)
    queries: dict[int, int] = field(default_factory=dict)


class WorkerPool:
    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.handles: list[WorkerHandle | None] = [None] * count
        self.listen: list[str] = []
        self.worker_settings: Settings | None = None
        self.replay: Callable[[], list[tuple[str, tuple, dict]]] = list
        self.known_run: Callable[[str], bool] = lambda run: True
        self.stopping = False
        self._seq = 0
        self._monitor: asyncio.Task | None = None
        self._reserved: list[socket.socket] = []
        self._restarts = [0] * count
        self._quick_deaths = [0] * count
        self._restart_at: dict[int, float] = {}
        self._last: dict[int, dict[str, Any]] = {}
        """Per worker index: its last gathered 'forwarder', 'stats', 'clients'."""
        self.retired = Retired()
        self.loop_token = os.urandom(4).hex()
        """Names this proxy in loop probes: every worker knows the others' probes."""

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.listen = self._reserve_ports()
        self.worker_settings = self.settings.model_copy(update={"listen": self.listen,
                                                               "workers": 1})
        try:
            for index in range(self.count):
                self._spawn(index)
            await self._wait_ready(list(range(self.count)), START_TIMEOUT)
        except BaseException:
            self.kill_all()
            raise
        finally:
            for sock in self._reserved:
                sock.close()
            self._reserved.clear()
        # Probe for loops again now that only workers hold the ports: the
        # probes they sent at start may have reached a reserving socket.
        self.request("probe_loops", wait=False)
        self._monitor = asyncio.get_running_loop().create_task(self._watch(),
                                                               name="worker monitor")

    def _reserve_ports(self) -> list[str]:
        """The listen addresses with concrete ports, held (SO_REUSEPORT, UDP and
        TCP) until the workers bind them; a port 0 becomes a free port.

        Every address is first bound without SO_REUSEPORT: a SO_REUSEPORT bind
        succeeds next to another program's socket that has it set too (unbound,
        CoreDNS, another dnschaos), and the kernel would then share that
        program's queries with the workers."""
        probed = [probe_free(text, DNS_PORT, ("tcp", "udp"), "--listen")
                  for text in self.settings.listen]
        out = []
        try:
            for text, (host, port) in zip(self.settings.listen, probed):
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    sock = _reuse_socket(family, kind)
                    self._reserved.append(sock)
                    sock.bind((host, port))
                out.append(format_hostport(host, port))
        except OSError as exc:
            for sock in self._reserved:
                sock.close()
            self._reserved.clear()
            proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
            raise ListenError.from_os_error(text, proto, exc, "--listen") from None
        return out

    def _spawn(self, index: int) -> WorkerHandle:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.workers", "--control-fd", str(child.fileno())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=env,
                start_new_session=False)
        finally:
            child.close()
        chan = Channel(parent)
        chan.send(("init", {"settings": self.worker_settings, "index": index,
                            "count": self.count, "parent": os.getpid(),
                            "loop_token": self.loop_token,
                            "replay": self.replay()}))
        restarts = self._restarts[index]
        handle = WorkerHandle(index, proc, chan, time.monotonic(), restarts=restarts)
        self.handles[index] = handle
        return handle

    async def _wait_ready(self, indexes: list[int], timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            waiting = []
            for index in indexes:
                handle = self.handles[index]
                assert handle is not None
                self._check_events(handle)
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

    def _check_events(self, handle: WorkerHandle) -> None:
        handle.chan.flush()
        handle.chan.pump()
        events, handle.chan.events = handle.chan.events, []
        for event in events:
            if event[0] == "ready" and not handle.ready:
                handle.ready = True
                what = "restarted" if handle.restarts else "started"
                log.info("worker %d %s (pid %d), listening on %s", handle.index, what,
                         handle.pid, ", ".join(event[1]["listen"]))
            elif event[0] == "failed":
                handle.failed = event[1]

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
            self._check_events(handle)
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
            self._spawn(index)
        except OSError as exc:
            log.error("cannot restart worker %d: %s", index, exc)
            self._restart_at[index] = time.monotonic() + 1.0

    def _retire(self, index: int) -> None:
        """Keep what a dead worker had counted (as of the last gather)."""
        last = self._last.pop(index, None)
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
        retired.stats = [rows for rows in ([r for r in rows if self.known_run(r["run"])]
                                           for rows in retired.stats) if rows]
        retired.clients = [rows for rows in ([r for r in rows if self.known_run(r["run"])]
                                             for rows in retired.clients) if rows]

    async def shutdown(self, grace: float) -> None:
        """Every worker drains and exits; whatever is left after `grace`
        seconds more than the drain is killed."""
        self.stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._monitor = None
        live = [h for h in self.handles if h is not None]
        for handle in live:
            handle.chan.send(("drain",))
            handle.chan.flush()
        end = time.monotonic() + grace
        while time.monotonic() < end and any(h.proc.poll() is None for h in live):
            for handle in live:
                handle.chan.flush()
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
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()

    # --- messages -----------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _live(self) -> list[WorkerHandle]:
        return [h for h in self.handles if h is not None and not h.chan.closed]

    def request(self, kind: str, *args: Any, wait: bool = True,
                timeout: float = ACK_TIMEOUT) -> dict[int, Any]:
        """Send (kind, seq, *args) to the ready workers (state changes, kind
        'call', to starting ones too: they apply them after the state they
        started with) and wait for the ready ones' replies: {index: value}.
        seq 0 asks for no reply."""
        waits: list[tuple[Channel, int]] = []
        owners: dict[int, WorkerHandle] = {}
        for handle in self._live():
            if not handle.ready and kind != "call":
                continue
            seq = self._next_seq() if wait and handle.ready else 0
            if seq:
                handle.chan.awaiting.add(seq)
                waits.append((handle.chan, seq))
                owners[seq] = handle
            handle.chan.send((kind, seq, *args))
        if not waits:
            return {}
        got = wait_replies(waits, timeout)
        out = {}
        for seq, handle in owners.items():
            if seq not in got:
                if handle.proc.poll() is None and not handle.chan.closed:
                    log.warning("worker %d (pid %d) did not answer %r within %.1f s",
                                handle.index, handle.pid, kind, timeout)
                continue
            ok, value = got[seq]
            if not ok:
                log.warning("worker %d (pid %d): %s failed: %s", handle.index, handle.pid,
                            kind, value)
                continue
            out[handle.index] = value
        return out

    def call(self, method: str, args: tuple, kwargs: dict, wait: bool = True) -> None:
        self.request("call", method, args, kwargs, wait=wait)

    def release(self, run: str | None = None) -> int:
        """Forward the queries `run` holds in a fault's delay (None: every
        held query), in every worker."""
        return sum(self.request("release", run).values())

    def gather(self, parts: tuple[str, ...], run: str | None = None) -> dict[int, dict[str, Any]]:
        """{worker index: {part: value}} from every ready worker."""
        got = self.request("snapshot", parts, run)
        if run is None:
            for index, snap in got.items():
                self._last.setdefault(index, {}).update(snap)
        return got

    def worker_rows(self, forwarders: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        rows = []
        for index in range(self.count):
            handle = self.handles[index]
            snap = forwarders.get(index) or {}
            stats = snap.get("stats") or {}
            rows.append({
                "worker": str(index), "pid": handle.pid if handle else None,
                "up": bool(handle and handle.ready and handle.proc.poll() is None),
                "queries": self.retired.queries.get(index, 0)
                + stats.get("queries_udp", 0) + stats.get("queries_tcp", 0),
                "restarts": self._restarts[index],
            })
        return rows

    def pids(self) -> list[int]:
        return [h.pid for h in self.handles if h is not None]


def probe_free(text: str, default_port: int, protocols: tuple[str, ...],
               flag: str) -> tuple[str, int]:
    """(host, port) of the address `text` after checking that nobody holds it
    for any of `protocols` ("tcp", "udp"): each is bound without SO_REUSEPORT
    (TCP with SO_REUSEADDR, so connections in TIME_WAIT do not count), then
    closed.  A port 0 becomes a number free for all of them.  Raises
    AddressInUse (or ListenError) naming the address, the protocol and `flag`."""
    host, port = split_hostport(text, default_port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50 if port == 0 else 1):
        number, held = port, []
        try:
            for proto in protocols:
                sock = socket.socket(family, socket.SOCK_STREAM if proto == "tcp"
                                     else socket.SOCK_DGRAM)
                held.append(sock)
                if proto == "tcp":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, number))
                number = sock.getsockname()[1]
            return host, number
        except OSError as exc:
            if port == 0 and exc.errno == errno.EADDRINUSE:
                continue  # the number picked for TCP is taken for UDP: another one
            raise ListenError.from_os_error(text, proto, exc, flag) from None
        finally:
            for sock in held:
                sock.close()
    raise ListenError(f"cannot listen on {text}: no port free for {' and '.join(protocols)}")


def _reuse_socket(family: int, kind: int) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


# --- the main process: the engine the game day drives --------------------------------


class FanoutEngine:
    """The engine API over the main process's engine and every worker's.
    Mutations apply locally and to every worker; `stats`/`client_stats`
    merge the workers' counts; everything else reads the local engine."""

    def __init__(self, local: Any, pool: WorkerPool) -> None:
        self.local = local
        self.pool = pool
        self._log: dict[str, list[tuple[str, tuple, dict]]] = {}
        """Per run id: the calls that made its state (replayed to a new worker)."""
        pool.replay = self.replay_calls
        pool.known_run = lambda run: local.get_run(run) is not None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.local, name)

    # --- mutations ---------------------------------------------------------------------

    def _mirror(self, method: str, args: tuple, kwargs: dict, wait: bool = True) -> Any:
        result = getattr(self.local, method)(*args, **kwargs)
        self.pool.call(method, args, kwargs, wait=wait)
        return result

    def add_run(self, *args: Any, **kwargs: Any) -> Any:
        result = self._mirror("add_run", args, kwargs)
        self._log.pop(args[0], None)
        self._log[args[0]] = [("add_run", args, kwargs)]
        return result

    def add_rule(self, *args: Any, **kwargs: Any) -> Any:
        result = self._mirror("add_rule", args, kwargs)
        self._log.pop(args[0], None)
        self._log[args[0]] = [("add_rule", args, kwargs)]
        return result

    def _run_call(self, method: str, args: tuple, kwargs: dict) -> Any:
        result = self._mirror(method, args, kwargs)
        if result and args and args[0] in self._log:
            self._log[args[0]].append((method, args, kwargs))
        return result

    def stop_run(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_call("stop_run", args, kwargs)

    def pause(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_call("pause", args, kwargs)

    def resume(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_call("resume", args, kwargs)

    def forget(self, *args: Any, **kwargs: Any) -> Any:
        result = self._mirror("forget", args, kwargs)
        self._log.pop(args[0], None)
        return result

    def reset(self, now: float, reason: str = "reset") -> list[str]:
        ended = self._mirror("reset", (now, reason), {})
        for run_id in ended:
            if run_id in self._log:
                self._log[run_id].append(("stop_run", (run_id, now, reason), {}))
        return ended

    def clear(self) -> None:
        self._mirror("clear", (), {})
        self._log.clear()

    def load(self, scenario: Any, started_at: float, now: float) -> None:
        self._mirror("load", (scenario, started_at, now), {})
        self._log = {scenario.name: [("add_run", (scenario.name, scenario, started_at, now), {})]}

    def set_rules(self, *args: Any, **kwargs: Any) -> None:
        self._mirror("set_rules", args, kwargs)
        self._log = {kwargs.get("name", "adhoc"): [("set_rules", args, kwargs)]}

    def tick(self, now: float) -> list[tuple[str, str]]:
        return self._mirror("tick", (now,), {}, wait=False)

    def replay_calls(self) -> list[tuple[str, tuple, dict]]:
        """The calls that rebuild the current state in a new worker, in order."""
        return [call for calls in self._log.values() for call in calls]

    # --- reads ---------------------------------------------------------------------------

    def stats(self, run: str | None = None) -> list[dict[str, Any]]:
        got = self.pool.gather(("stats",), run)
        return merge_stats(self.local.stats(run), [s["stats"] for s in got.values()]
                           + self.pool.retired.stats)

    def client_stats(self, run: str | None = None) -> list[dict[str, Any]]:
        got = self.pool.gather(("clients",), run)
        return merge_clients(self.local, [s["clients"] for s in got.values()]
                             + self.pool.retired.clients, run)


def merge_stats(local: list[dict[str, Any]],
                sources: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The local engine's rows (it knows which runs exist) with the counts of
    every source summed in; a source's rows are matched by run and position."""
    rows = [dict(row) for row in local]
    index: dict[tuple[str, int], dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for row in rows:
        n = seen.get(row["run"], 0)
        seen[row["run"]] = n + 1
        index[(row["run"], n)] = row
    for source in sources:
        seen = {}
        for row in source:
            n = seen.get(row["run"], 0)
            seen[row["run"]] = n + 1
            mine = index.get((row["run"], n))
            if mine is None or mine["rule"] != row["rule"]:
                continue  # a run the main process no longer holds
            for key in ("matched", "injected", "errors"):
                mine[key] += row[key]
    return rows


def merge_clients(local: Any, sources: list[list[dict[str, Any]]],
                  run: str | None = None) -> list[dict[str, Any]]:
    """Rows per (run, phase, rule, client): fault and name counts (names,
    faulted) summed, first_seen the earliest, last_seen the latest; only runs
    the local engine holds."""
    merged: dict[tuple, dict[str, Any]] = {}
    for source in sources:
        for row in source:
            if run is not None and row["run"] != run:
                continue
            if local is not None and local.get_run(row["run"]) is None:
                continue
            key = (row["run"], row["phase"], row["rule"], row["client"])
            mine = merged.get(key)
            if mine is None:
                merged[key] = mine = dict(row, faults=dict(row["faults"]),
                                          names=dict(row["names"]),
                                          faulted=dict(row.get("faulted") or {}))
                continue
            mine["first_seen"] = min(mine["first_seen"], row["first_seen"])
            mine["last_seen"] = max(mine["last_seen"], row["last_seen"])
            for part in ("faults", "names", "faulted"):
                counts = mine[part]
                for name, count in (row.get(part) or {}).items():
                    counts[name] = counts.get(name, 0) + count
    return list(merged.values())


# --- the main process: what /metrics and /health read -------------------------------


class AggregateUpstream:
    """An upstream as every worker sees it: counters summed, up if any sees it up."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = UpstreamStats()
        self.requests = 0
        self.reply_count = 0
        self.up = False
        self.looped = False

    def sent(self) -> int:
        return self.requests

    def replies(self) -> int:
        return self.reply_count


@dataclass
class Aggregate:
    """What the metrics collector reads: forwarder-like, summed over workers."""

    stats: Stats
    upstreams: list[AggregateUpstream]
    inflight: int
    engine: Any
    settings: Settings
    workers: list[dict[str, Any]]


class _MergedEngine:
    """Engine reads for one scrape: gathered counts, local run state."""

    def __init__(self, local: Any, stats: list[dict[str, Any]],
                 clients: list[dict[str, Any]]) -> None:
        self.local = local
        self._stats = stats
        self._clients = clients

    def stats(self) -> list[dict[str, Any]]:
        return self._stats

    def client_stats(self) -> list[dict[str, Any]]:
        return self._clients

    def runs_info(self, now: float) -> list[dict[str, Any]]:
        return self.local.runs_info(now)


class PoolForwarder:
    """Stands for the forwarder in the main process: /health reads
    `upstreams`, the metrics collector calls `metrics_snapshot()`."""

    def __init__(self, settings: Settings, pool: WorkerPool, engine: FanoutEngine) -> None:
        self.settings = settings
        self.pool = pool
        self.engine = engine

    @property
    def upstreams(self) -> list[AggregateUpstream]:
        got = self.pool.gather(("forwarder",))
        return sum_upstreams(self.settings, [s["forwarder"] for s in got.values()], [])

    @property
    def inflight(self) -> int:
        got = self.pool.gather(("forwarder",))
        return sum(s["forwarder"]["inflight"] for s in got.values())

    def release_delayed(self, run: str | None = None) -> int:
        return self.pool.release(run)

    def metrics_snapshot(self) -> Aggregate:
        got = self.pool.gather(("forwarder", "stats", "clients"))
        retired = self.pool.retired
        live = [s["forwarder"] for s in got.values()]
        local = self.engine.local
        engine = _MergedEngine(
            local,
            merge_stats(local.stats(), [s["stats"] for s in got.values()] + retired.stats),
            merge_clients(local, [s["clients"] for s in got.values()] + retired.clients))
        return Aggregate(
            stats=sum_stats(live + retired.forwarder),
            upstreams=sum_upstreams(self.settings, live, retired.forwarder),
            inflight=sum(f["inflight"] for f in live),
            engine=engine, settings=self.settings,
            workers=self.pool.worker_rows({i: s["forwarder"] for i, s in got.items()}))


def combine_forwarder(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Several forwarder snapshots as one (counters summed)."""
    total = sum_stats(snapshots)
    qtypes: dict[int, int] = {}
    for snap in snapshots:
        for qtype, count in snap["qtypes"].items():
            qtypes[qtype] = qtypes.get(qtype, 0) + count
    upstreams: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        for row in snap["upstreams"]:
            mine = upstreams.get(row["name"])
            if mine is None:
                upstreams[row["name"]] = dict(row, latency=(list(row["latency"][0]),
                                                            row["latency"][1]))
                continue
            for key in ("sent", "replies", *_UPSTREAM_FIELDS):
                mine[key] += row[key]
            counts, seconds = mine["latency"]
            mine["latency"] = ([a + b for a, b in zip(counts, row["latency"][0])],
                               seconds + row["latency"][1])
    return {"stats": {name: getattr(total, name) for name in _STAT_FIELDS}, "qtypes": qtypes,
            "rcodes": list(total.rcodes),
            "latency": (list(total.latency.counts), total.latency.total),
            "inflight": 0, "upstreams": list(upstreams.values())}


def sum_stats(snapshots: list[dict[str, Any]]) -> Stats:
    total = Stats()
    for snap in snapshots:
        for name, value in snap["stats"].items():
            setattr(total, name, getattr(total, name) + value)
        for qtype, count in snap["qtypes"].items():
            total.qtypes[qtype] += count
        for rcode, count in enumerate(snap["rcodes"]):
            total.rcodes[rcode] += count
        _add_histogram(total.latency, snap["latency"])
    return total


def sum_upstreams(settings: Settings, live: list[dict[str, Any]],
                  retired: list[dict[str, Any]]) -> list[AggregateUpstream]:
    upstreams = {name: AggregateUpstream(name) for name in settings.upstreams}
    for snap, counts_up in [(s, True) for s in live] + [(s, False) for s in retired]:
        for row in snap["upstreams"]:
            upstream = upstreams.get(row["name"])
            if upstream is None:
                continue
            upstream.requests += row["sent"]
            upstream.reply_count += row["replies"]
            for name in _UPSTREAM_FIELDS:
                setattr(upstream.stats, name, getattr(upstream.stats, name) + row[name])
            _add_histogram(upstream.stats.latency, row["latency"])
            if counts_up and row["up"]:
                upstream.up = True
            if counts_up and row.get("looped"):
                upstream.looped = True
    return list(upstreams.values())


def _add_histogram(into: Histogram, data: tuple[list[int], float]) -> None:
    counts, total = data
    for i, count in enumerate(counts[:len(LATENCY_BUCKETS) + 1]):
        into.counts[i] += count
    into.total += total


# --- the worker process ------------------------------------------------------------------


def forwarder_snapshot(forwarder: Any) -> dict[str, Any]:
    """A worker's forwarder counters, as plain picklable data."""
    s = forwarder.stats
    return {
        "stats": {name: getattr(s, name) for name in _STAT_FIELDS},
        "qtypes": {i: c for i, c in enumerate(s.qtypes) if c},
        "rcodes": list(s.rcodes),
        "latency": (list(s.latency.counts), s.latency.total),
        "inflight": forwarder.inflight,
        "upstreams": [
            {"name": u.name, "sent": u.sent(), "replies": u.replies(), "up": u.up,
             "looped": u.looped,
             "latency": (list(u.stats.latency.counts), u.stats.latency.total),
             **{name: getattr(u.stats, name) for name in _UPSTREAM_FIELDS}}
            for u in forwarder.upstreams],
    }


class _Control(asyncio.Protocol):
    """The worker's end of the control channel: messages are handled as they
    arrive, in order."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for message in unframe(self.buffer):
            self.worker.handle(message)

    def send(self, message: Any) -> None:
        if message[0] == "reply" and not message[1]:
            return  # seq 0: no reply wanted
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(message))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.worker.on_main_gone()


def worker_share(value: Any, index: int, count: int) -> Any:
    """`value` (a Scenario, a Rule, a list of rules, anything else unchanged)
    with the numbers that bound a fault's reach -- `first`, `limit.count` and
    `limit.per_second` -- split among `count` workers, so that together they
    never fault more than the scenario allows: worker `index` gets an equal
    share, the remainder going to the lowest indexes.  A worker that sees
    less of the traffic may use less than its share."""
    if isinstance(value, list):
        shared = [worker_share(item, index, count) for item in value]
        return value if all(a is b for a, b in zip(shared, value)) else shared
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


class Worker:
    def __init__(self, sock: socket.socket, init: dict[str, Any],
                 rest: bytearray | None = None) -> None:
        from proxy.core.engine import Engine

        self.sock = sock
        self.rest = rest or bytearray()
        self.settings: Settings = init["settings"]
        self.index: int = init["index"]
        self.count: int = init["count"]
        self.loop_token: str | None = init.get("loop_token")
        self.engine = Engine()
        for method, args, kwargs in init["replay"]:
            self._apply(method, args, kwargs)
        self.forwarder: Any = None
        self.control: _Control | None = None
        self.stop = asyncio.Event()
        self.udp: list[Any] = []
        self.frontends: list[Any] = []
        self.tcp: list[asyncio.AbstractServer] = []
        self.connections: set = set()

    def _apply(self, method: str, args: tuple, kwargs: dict) -> Any:
        args = tuple(worker_share(arg, self.index, self.count) for arg in args)
        kwargs = {key: worker_share(arg, self.index, self.count) for key, arg in kwargs.items()}
        return getattr(self.engine, method)(*args, **kwargs)

    async def run(self) -> int:
        from proxy.forwarder import Forwarder
        from proxy.frontends import TcpConnection, UdpFrontend

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        self.forwarder = Forwarder(self.settings, self.engine, loop_token=self.loop_token)
        await self.forwarder.start()
        _, self.control = await loop.create_unix_connection(lambda: _Control(self), sock=self.sock)
        self.control.data_received(bytes(self.rest))  # sent while we were starting
        try:
            for text in self.settings.listen:
                host, port = split_hostport(text, DNS_PORT)
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                tcp = await loop.create_server(
                    lambda text=text: TcpConnection(self.forwarder, text, self.connections),
                    host, port, reuse_port=True, family=family)
                self.tcp.append(tcp)
                udp, frontend = await loop.create_datagram_endpoint(
                    lambda text=text: UdpFrontend(self.forwarder, text),
                    local_addr=(host, port), family=family, reuse_port=True)
                self.udp.append(udp)
                self.frontends.append(frontend)
        except OSError as exc:
            self.control.send(("failed", f"cannot listen: {exc}"))
            await asyncio.sleep(0.1)
            await self.forwarder.stop()
            return 1
        self.forwarder.start_loop_probes()
        gc.freeze()  # as in Server.start: long-lived objects out of the collector's way
        self.control.send(("ready", {"pid": os.getpid(), "listen": list(self.settings.listen)}))
        await self.stop.wait()
        await self.drain()
        return 0

    async def drain(self) -> None:
        for frontend in self.frontends:
            frontend.handle = _ignore  # keep the socket: answers in flight still go out
        for tcp in self.tcp:
            tcp.close()
        loop = asyncio.get_running_loop()
        end = loop.time() + self.settings.deadline + 0.2
        while self.forwarder.inflight > 0 and loop.time() < end:
            await asyncio.sleep(0.02)
        for udp in self.udp:
            udp.close()
        for connection in list(self.connections):
            connection.close()
        await self.forwarder.stop()

    def on_main_gone(self) -> None:
        if not self.stop.is_set():
            logging.getLogger("dnschaos.worker").warning(
                "the main process is gone: draining and exiting")
            self.stop.set()

    def handle(self, message: Any) -> None:
        kind = message[0]
        if kind == "drain":
            self.stop.set()
            return
        seq = message[1]
        try:
            if kind == "call":
                _, _, method, args, kwargs = message
                self._apply(method, args, kwargs)
                value: Any = None
                if method == "tick":
                    return  # not acknowledged
            elif kind == "release":
                value = self.forwarder.release_delayed(message[2])
            elif kind == "probe_loops":
                self.forwarder.probe_loops()
                value = None
            elif kind == "snapshot":
                _, _, parts, run = message
                value = {}
                if "forwarder" in parts:
                    value["forwarder"] = forwarder_snapshot(self.forwarder)
                if "stats" in parts:
                    value["stats"] = self.engine.stats(run)
                if "clients" in parts:
                    value["clients"] = self.engine.client_stats(run)
            else:
                raise ValueError(f"unknown message {kind!r}")
        except Exception as exc:  # noqa: BLE001 - report it; the worker goes on
            logging.getLogger("dnschaos.worker").exception("control message %s failed", kind)
            assert self.control is not None
            self.control.send(("reply", seq, False, f"{type(exc).__name__}: {exc}"))
            return
        assert self.control is not None
        self.control.send(("reply", seq, True, value))


def _ignore(*args: object) -> None:
    pass


def _die_with_parent() -> None:
    """SIGTERM when the main process dies (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _read_init(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    """The init message, and the bytes after it (messages sent since)."""
    buffer = bytearray()
    while True:
        if len(buffer) >= 4:
            (size,) = _HEADER.unpack_from(buffer)
            if len(buffer) >= 4 + size:
                kind, init = pickle.loads(bytes(buffer[4:4 + size]))
                if kind != "init":
                    raise SystemExit(f"unexpected first control message {kind!r}")
                return init, buffer[4 + size:]
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise SystemExit(0)  # the main process is gone
        buffer += chunk


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.workers")
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the main process decides; it tells us
    _die_with_parent()
    sock = socket.socket(fileno=args.control_fd)
    init, rest = _read_init(sock)
    if os.getppid() != init["parent"]:
        return 0  # the main process died before we could watch it
    settings: Settings = init["settings"]
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper()), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s %(name)s [worker {init['index']} pid {os.getpid()}]: "
               "%(message)s")
    from proxy.cli import run_event_loop

    async def main() -> int:
        return await Worker(sock, init, rest).run()

    return run_event_loop(main(), settings.uvloop)


if __name__ == "__main__":
    sys.exit(worker_main())
