"""Forwarding: from a client's query to the upstream's answer and back.

How it works:
- Each upstream has a few UDP sockets, each connected to it from its own
  kernel-chosen random port.  A query goes out on one of them, picked at
  random, under a fresh random ID; that socket's pending table maps the ID to
  the query's state (a list, see the field indexes below).  A connected
  socket only receives datagrams from its upstream's address.
- A reply is accepted only when its ID is pending on that socket, it is a
  response, and its question is the query's question; anything else is
  counted and dropped, and the query goes on waiting for the real answer.
  The client gets its own ID back.
- Timeouts need no timer per query.  Every attempt waits the same time
  (`deadline` split into equal attempts of at most `timeout`), and a pending
  table is a dict, which keeps insertion order: its oldest attempts are at
  the front.  A periodic sweep pops attempts from the front while they are
  expired and retries each on the next upstream of the query's order; after
  the last attempt the client gets SERVFAIL, at the deadline, never silence.
- An upstream that times out `max_fails` times in a row is marked down and
  tried last for `down_time` seconds, then gets another chance.  One that
  is unreachable (ICMP port unreachable on its socket) is marked down at
  once, and the queries waiting on that socket go to their next attempt
  at once: nothing will answer them there.
- Forwarding loops (an upstream that sends our queries back to us, directly
  or through other forwarders): at start, every PROBE_INTERVAL seconds and
  when many queries come from an upstream's address, each upstream is sent
  a probe, an HINFO query for `<random>.u<index>.<token>.dnschaos-loop.`
  (the token is this proxy's, shared by its worker processes).  A probe
  that reaches one of our listeners is never forwarded: it is answered
  with a marker record, and that upstream is marked looped (as is one
  whose answer to a probe carries the marker).  A looped upstream gets no
  queries (none left: SERVFAIL at once) until a probe gets a real answer.
- A query a fault delays waits in `_delayed` under a timer, filed under the
  run whose rule holds it (the verdict's `run`).  `release_delayed(run)`
  forwards that run's held queries at once, unfaulted, when it stops or
  pauses; other runs' keep their delay and their fault.  A TCP drop that
  closes the connection after a delay is held the same way, so the query
  stays outstanding on its connection until the drop (or the release, which
  answers it instead) ends it: exactly once.
- Nothing here decodes a whole message: the header and question are read
  from the bytes.  Only a query whose raw name the engine's `Screen` lists
  (or every query, while the screen is off) gets a QueryView and goes
  through the engine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

from proxy import accel
from proxy.config import Settings, split_hostport
from proxy.core import wire
from proxy.core.deps import DepMap
from proxy.core.engine import Engine
from proxy.core.query import QueryView, client_address
from proxy.core.replies import header_reply, rcode_reply
from proxy.core.verdict import Drop, Forward, Reply
from proxy.errors import DnschaosError, MalformedQuery
from proxy.loop_probes import (
    HINFO,
    PROBE_LABEL,
    PROBE_MIN_GAP,
    SUSPICIOUS,
    LoopProbes,
)
from proxy.stats import Stats
from proxy.upstreams import (
    ADDR,
    CLIENT_ID,
    ORDER,
    QUERY,
    QUESTION,
    REPLY_TO,
    RESPOND,
    SENT,
    START,
    TCP,
    TRIES,
    VIEW,
    Upstream,
    UpstreamSocket,
    tcp_exchange,
)

log = logging.getLogger("dnschaos.forwarder")

SWEEP_INTERVAL = 0.05  # seconds between timeout sweeps: the timeouts' granularity


_QR_BIT = wire.QR
_TC_BIT = wire.TC


class Forwarder(LoopProbes):
    """Takes queries from the frontends and carries them to the upstreams."""

    def __init__(self, settings: Settings, engine: Engine, stats: Stats | None = None,
                 rng: random.Random | None = None, loop_token: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """clock: seconds for timeouts, latencies and upstream health;
        monotonic with sub-millisecond resolution (uvloop's loop.time()
        counts whole ms).  Fault times come from time.time() (wall clock)."""
        self.settings = settings
        self.engine = engine
        self.clock = clock
        self.stats = stats or Stats()
        self.rng = rng or random.Random(int.from_bytes(os.urandom(8), "big"))
        self.upstreams = [
            Upstream(*split_hostport(u, 53), name=u) for u in settings.upstreams
        ]
        # Equal attempts of at most `timeout` that add up to the deadline.
        self.attempts = max(1, math.ceil(settings.deadline / settings.timeout - 1e-9))
        self.attempt_timeout = settings.deadline / self.attempts
        self.sockets: list[UpstreamSocket] = []
        self.pending_cap = 1
        self._orders: list[tuple[Upstream, ...]] = []
        self._turn = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._allowed = [ipaddress.ip_network(n) for n in settings.allow]
        self._acl_cache: dict[str, bool] = {}
        self._random = b""
        self._random_pos = 0
        self._delayed: dict[int, tuple[asyncio.TimerHandle, tuple, str | None]] = {}
        """Queries held in a fault's delay: key -> (timer, what to forward on
        release, the run that holds it)."""
        self._delay_seq = 0
        self._tasks: set[asyncio.Task] = set()
        self.loop: Any = None
        # Loop probes: the token names this proxy (its workers share it).
        self.loop_token = (loop_token or os.urandom(4).hex()).lower().encode()
        self._probe_marker = (bytes([len(PROBE_LABEL)]) + PROBE_LABEL
                              + bytes([len(self.loop_token)]) + self.loop_token)
        self._next_probe = 0.0  # 0: probing not started
        self._last_probe = 0.0
        self._upstream_hosts = frozenset(u.addr[0] for u in self.upstreams)
        self._from_upstreams = 0  # queries from an upstream's address since the last sweep
        self.accel: accel.Accelerator | None = None
        """The C relay of the UDP fast path (proxy/accel.py), once started; None: off."""
        self.deps: DepMap | None = (DepMap(settings.deps_max_clients, settings.deps_max_names,
                                              settings.deps_max_entries)
                                    if settings.deps else None)
        """Who asked for what (core/deps.py); fed on the reply path, None when off."""
        if self.deps is not None:
            self.deps.tick(time.time())

    @property
    def inflight(self) -> int:
        """Queries waiting for an upstream."""
        return (sum(len(sock.pending) for sock in self.sockets) + len(self._tasks)
                + (self.accel.pending if self.accel is not None else 0))

    # --- life cycle --------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        # With the fast path, `upstream_sockets` are shared out: most are the relay's.
        count = self.settings.upstream_sockets
        relayed = accel.relay_sockets(self)
        await self._open_sockets(count - relayed)
        self.accel = accel.attach(self, self.loop, relayed) if relayed else None
        if relayed and self.accel is None:
            await self._open_sockets(relayed)
        self.pending_cap = (self.accel.cap if self.accel is not None else
                            max(1, self.settings.max_pending // max(1, len(self.sockets))))
        self._recompute_orders()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def _open_sockets(self, count: int) -> None:
        for upstream in self.upstreams:
            for _ in range(count):
                _, protocol = await self.loop.create_datagram_endpoint(
                    lambda u=upstream: UpstreamSocket(self, u), remote_addr=upstream.addr
                )
                upstream.sockets.append(protocol)
                self.sockets.append(protocol)

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        for handle, _args, _run in self._delayed.values():
            handle.cancel()
        self._delayed.clear()
        for task in list(self._tasks):
            task.cancel()
        if self.accel is not None:
            self.flush()
            self.accel.close()
            self.accel = None
        for sock in self.sockets:
            if sock.transport:
                sock.transport.close()
        self.sockets.clear()
        for upstream in self.upstreams:
            upstream.sockets.clear()

    # --- the query path ----------------------------------------------------

    def handle(self, data: bytes, addr: Any, reply_to: Any, tcp: bool, listener: str) -> None:
        """A query from a client.  `reply_to.sendto(bytes, addr)` answers it."""
        try:
            qend = wire.question_end(data)
        except MalformedQuery as exc:
            self._malformed(data, addr, reply_to, tcp, exc)
            return
        qtype = wire.qtype_of(data, qend)
        self.stats.qtypes[qtype] += 1
        if qtype == HINFO and self._own_probe(data, qend, addr, reply_to, listener):
            return
        if addr[0] in self._upstream_hosts:
            self._from_upstreams += 1  # a loop, or a client beside the upstream
        allowed = self._acl_cache.get(addr[0])
        if allowed is None:
            allowed = self._acl_check(addr[0])
        if not allowed:
            self.stats.refused += 1
            self.stats.rcodes[wire.REFUSED] += 1
            reply_to.sendto(rcode_reply(data, qend, wire.REFUSED), addr)
            return
        if self.engine.active:
            self._consult_engine(data, qend, addr, reply_to, tcp, listener)
        else:
            self.forward(data, qend, addr, reply_to, tcp, None, None)

    def forward(self, data: bytes, qend: int, addr: Any, reply_to: Any, tcp: bool,
                respond: Forward | None, view: QueryView | None) -> None:
        """Forward a query, with `respond` to pass the answer through the engine."""
        orders = self._orders
        if not orders:
            self._servfail_now(data, qend, addr, reply_to)
            return
        if self.accel is None:
            self._turn += 1
        else:  # one rotation for both paths
            self._turn = self.accel.relay.next_turn()
        self._send_attempt([data[:2], addr, reply_to, tcp, data[12:qend], data,
                            orders[self._turn % len(orders)], 0, 0.0, respond, view, 0.0])

    def _send_attempt(self, entry: list) -> None:
        order = entry[ORDER]
        tries = entry[TRIES]
        entry[SENT] = now = self.clock()
        if not tries:
            entry[START] = now
        upstream = order[tries % len(order)]
        while upstream.looped:  # in the order before its loop was found: skipping it uses the try
            tries += 1
            if tries >= self.attempts:
                self._servfail(entry)
                return
            upstream = order[tries % len(order)]
        entry[TRIES] = tries + 1
        pos = self._random_pos
        randoms = self._random
        if pos >= len(randoms):
            self._random = randoms = os.urandom(3 * 4096)
            pos = 0
        self._random_pos = pos + 3
        sockets = upstream.sockets
        sock = sockets[randoms[pos + 2] % len(sockets)]
        pending = sock.pending
        if len(pending) >= self.pending_cap:
            self.stats.servfail_overload += 1
            self._servfail(entry)
            return
        txid = randoms[pos:pos + 2]
        while txid in pending:
            txid = os.urandom(2)
        pending[txid] = entry
        sock.sent += 1
        sock.transport.sendto(txid + entry[QUERY][2:])  # type: ignore[union-attr]

    def retry_tcp_or_apply_fault(self, entry: list, data: bytes, upstream: Upstream) -> None:
        """A valid reply that needs more than relaying: a truncated answer
        for a TCP client, or an answer a fault acts on."""
        if entry[TCP] and data[2] & _TC_BIT:
            self.stats.truncated_retries += 1
            self._spawn(self._retry_over_tcp(entry, upstream))
            return
        self._deliver(entry, entry[CLIENT_ID] + data[2:])

    def _deliver(self, entry: list, answer: bytes) -> None:
        if self.deps is not None:
            self.deps.answer(entry[ADDR][0], entry[QUESTION], answer)  # before any fault
        respond = entry[RESPOND]
        if respond is not None:
            reply: bytes | None = answer
            try:
                reply = self.engine.on_response(entry[VIEW], respond, answer, time.time(),
                                                self.rng)
            except Exception:  # a bug in a fault must not lose the answer
                log.exception("fault engine failed on a response; passing it through")
                self.stats.engine_errors += 1
            if reply is None:
                self.stats.fault_dropped += 1
                if entry[TCP]:
                    entry[REPLY_TO].no_reply()
                return
            answer = reply
        self.stats.answers += 1
        self.stats.rcodes[answer[3] & 15] += 1
        self.stats.latency.observe(self.clock() - entry[START])
        entry[REPLY_TO].sendto(answer, entry[ADDR])

    def _servfail(self, entry: list) -> None:
        query = entry[QUERY]
        self._servfail_now(query, 12 + len(entry[QUESTION]), entry[ADDR], entry[REPLY_TO])

    def _servfail_now(self, query: bytes, qend: int, addr: Any, reply_to: Any) -> None:
        self.stats.servfail_sent += 1
        self.stats.rcodes[wire.SERVFAIL] += 1
        reply_to.sendto(rcode_reply(query, qend, wire.SERVFAIL), addr)

    # --- timeouts and health ------------------------------------------------

    def flush(self) -> None:
        """Bring the fast path's counters into `stats` (and the upstreams'):
        called by every sweep and before the counters are read."""
        if self.accel is not None:
            self.accel.flush()

    def _sweep(self) -> None:
        now = self.clock()
        if self.deps is not None:
            self.deps.tick(time.time())  # the map's clock: one read per sweep, not per query
        sent_before = now - self.attempt_timeout
        if self.accel is not None:
            self.accel.flush()  # first: an answer it relayed resets its upstream's fails
            for upstream, entry in self.accel.expired(sent_before):
                self._expire(entry, upstream, now)
        for sock in self.sockets:
            pending = sock.pending
            expired = []
            for txid, entry in pending.items():
                if entry[SENT] > sent_before:
                    break  # the rest were sent later still
                expired.append(txid)
            for txid in expired:
                self._expire(pending.pop(txid), sock.upstream, now)
        for upstream in self.upstreams:
            if upstream.down_until and upstream.down_until <= now:
                self._give_another_chance(upstream)
        if self._next_probe and (now >= self._next_probe or (
                self._from_upstreams >= SUSPICIOUS and now >= self._last_probe + PROBE_MIN_GAP)):
            self.probe_loops()
        self._from_upstreams = 0
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _expire(self, entry: list, upstream: Upstream, now: float) -> None:
        upstream.stats.timeouts += 1
        upstream.fails += 1
        if upstream.fails >= self.settings.max_fails and upstream.up:
            upstream.down_until = now + self.settings.down_time
            log.warning("upstream %s marked down after %d timeouts in a row",
                        upstream.name, upstream.fails)
            self._recompute_orders()
        self._next_attempt(entry)

    def _next_attempt(self, entry: list) -> None:
        if entry[TRIES] < self.attempts:
            self._send_attempt(entry)  # the next upstream of the query's order
        else:
            self.stats.servfail_deadline += 1
            if self.deps is not None:
                self.deps.timeout(entry[ADDR][0], entry[QUESTION])
            self._servfail(entry)

    def unreachable(self, sock: UpstreamSocket, exc: Exception) -> None:
        """An ICMP error on `sock`: its upstream's port is closed (or its
        host unreachable).  Marked down at once; the queries waiting on that
        socket are retried now, each within its attempts, so a set of dead
        upstreams ends in SERVFAIL after a query's attempts, not a storm."""
        waiting = list(sock.pending.values())
        sock.pending.clear()
        self.upstream_unreachable(sock.upstream, exc, waiting)

    def upstream_unreachable(self, upstream: Upstream, exc: Exception,
                             waiting: list[list]) -> None:
        """An ICMP error on one of `upstream`'s sockets; `waiting`: the
        entries pending on that socket, taken from it."""
        upstream.stats.errors += 1
        upstream.fails += 1
        if upstream.up:
            upstream.down_until = self.clock() + self.settings.down_time
            log.warning("upstream %s unreachable (%s): marked down", upstream.name,
                        (exc.strerror if isinstance(exc, OSError) else None) or exc)
            self._recompute_orders()
        for entry in waiting:
            self._next_attempt(entry)

    def mark_alive(self, upstream: Upstream) -> None:
        was_down = not upstream.up
        upstream.fails = 0
        upstream.down_until = 0.0
        if was_down:
            log.warning("upstream %s answers again", upstream.name)
            self._recompute_orders()

    def _give_another_chance(self, upstream: Upstream) -> None:
        # Back among the healthy, one timeout away from being marked down again.
        upstream.down_until = 0.0
        upstream.fails = self.settings.max_fails - 1
        log.info("upstream %s gets another chance", upstream.name)
        self._recompute_orders()

    def _recompute_orders(self) -> None:
        """The orders in which upstreams are tried: healthy ones first, in
        configured order (sequential), rotated per query (round_robin), or a
        random rotation per query (random)."""
        usable = [u for u in self.upstreams if not u.looped]
        up = [u for u in usable if u.up]
        down = [u for u in usable if not u.up]
        policy = self.settings.policy
        if policy == "sequential" or len(up) <= 1:
            orders = [tuple(up + down)]
        else:
            orders = [tuple(up[i:] + up[:i] + down) for i in range(len(up))]
            if policy == "random":
                # Queries walk this list in turn; a long shuffled list makes the
                # first choice random per query without a draw per query.
                orders = [self.rng.choice(orders) for _ in range(64 * len(orders))]
        self._orders = orders if usable else []
        if self.accel is not None:
            self.accel.set_orders(self._orders)

    # --- TCP retry after truncation -----------------------------------------

    async def _retry_over_tcp(self, entry: list, upstream: Upstream) -> None:
        upstream.stats.tcp_requests += 1
        try:
            reply = await asyncio.wait_for(
                tcp_exchange(upstream.addr, entry[QUERY], entry[QUESTION]),
                max(0.05, self.settings.deadline - (self.clock() - entry[START])),
            )
        except (TimeoutError, OSError, DnschaosError) as exc:
            log.info("TCP retry to %s failed: %s", upstream.name, exc or type(exc).__name__)
            upstream.stats.errors += 1
            self.stats.tcp_upstream_errors += 1
            self._servfail(entry)
            return
        self._deliver(entry, entry[CLIENT_ID] + reply[2:])

    # --- the engine ----------------------------------------------------------

    def _consult_engine(self, data: bytes, qend: int, addr: Any, reply_to: Any, tcp: bool,
                        listener: str) -> None:
        try:
            now = time.time()
            verdict = view = None
            # Most names have no rule to try: the screen tells from the raw bytes.
            if self.engine.screen(now).may_select(data[12:qend - 4].lower()):
                view = QueryView(data, qend, wire.qname_text(data, qend),
                                 wire.qtype_of(data, qend), addr[0], "tcp" if tcp else "udp",
                                 listener)
                verdict = self.engine.on_query(view, now, self.rng)
        except Exception:  # fail open: a bug in a fault must not break DNS
            log.exception("fault engine failed on a query; forwarding it unchanged")
            self.stats.engine_errors += 1
            verdict, view = None, None
        if verdict is None:
            self.forward(data, qend, addr, reply_to, tcp, None, None)
            return
        released = (data, qend, addr, reply_to, tcp, None, None)  # forwarded unfaulted
        if type(verdict) is Forward:
            respond = verdict if verdict.respond is not None else None
            if verdict.delay > 0:
                self._later(verdict.delay, self.forward,
                            (data, qend, addr, reply_to, tcp, respond, view), released,
                            verdict.run)
            else:
                self.forward(data, qend, addr, reply_to, tcp, respond, view)
            return
        self.stats.faulted += 1
        if type(verdict) is Reply:
            self.stats.rcodes[verdict.wire[3] & 15 if len(verdict.wire) > 3 else 0] += 1
            self.stats.latency.observe(verdict.delay)
            if verdict.delay > 0:
                self._later(verdict.delay, reply_to.sendto, (verdict.wire, addr), released,
                            verdict.run)
            else:
                reply_to.sendto(verdict.wire, addr)
        elif type(verdict) is Drop and tcp:
            if verdict.close_tcp:
                # Held until the close: the query stays outstanding on its
                # connection until then, and a release answers it instead.
                self._later(verdict.delay, _drop_and_close, (reply_to,), released, verdict.run,
                            at_cap=True)
            else:
                reply_to.no_reply()

    def _later(self, delay: float, callback: Any, args: tuple, released: tuple,
               run: str | None, at_cap: bool = False) -> None:
        """Run callback(*args) after `delay`, filed under `run`;
        `release_delayed` forwards `released` instead, at once.  Queries held
        in delays count against `max_pending`: beyond it, the callback runs now
        (`at_cap`: a drop), or the query gets SERVFAIL."""
        if len(self._delayed) + self.inflight >= self.settings.max_pending:
            if at_cap:
                callback(*args)
            else:
                self.stats.servfail_overload += 1
                self._servfail_now(*released[:4])
            return
        self._delay_seq += 1
        key = self._delay_seq

        def fire() -> None:
            del self._delayed[key]
            callback(*args)

        self._delayed[key] = (self.loop.call_later(delay, fire), released, run)  # type: ignore

    def release_delayed(self, run: str | None = None) -> int:
        """Forward now, unfaulted, the queries that `run` holds in a fault's
        delay (None: every held query); the number released.  Called when a
        run stops or pauses, so nothing of it is left hanging, while the
        queries other runs hold keep their delay and their fault."""
        keys = [key for key, (_, _, owner) in self._delayed.items()
                if run is None or owner == run]
        for key in keys:
            handle, released, _ = self._delayed.pop(key)
            handle.cancel()
            self.forward(*released)
        return len(keys)

    # --- small helpers -------------------------------------------------------

    def _malformed(self, data: bytes, addr: Any, reply_to: Any, tcp: bool,
                   exc: MalformedQuery) -> None:
        self.stats.malformed += 1
        if exc.rcode is None:
            if tcp:
                reply_to.no_reply()
            return
        self.stats.rcodes[exc.rcode] += 1
        if exc.rcode == wire.FORMERR:
            self.stats.formerr += 1
        else:
            self.stats.notimp += 1
        reply_to.sendto(header_reply(data, exc.rcode), addr)

    def _acl_check(self, ip: str) -> bool:
        try:
            address = client_address(ip)
        except ValueError:
            allowed = False
        else:
            allowed = any(address in net for net in self._allowed)
        if len(self._acl_cache) >= 65536:
            self._acl_cache.clear()
            if self.accel is not None:
                self.accel.clear_allowed()
        self._acl_cache[ip] = allowed
        if allowed and self.accel is not None:
            self.accel.allow(ip, ip in self._upstream_hosts)  # its next UDP queries may go fast
        return allowed

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _drop_and_close(connection: Any) -> None:
    """A TCP query dropped by closing its connection: it ends unanswered."""
    connection.no_reply()
    connection.close()
