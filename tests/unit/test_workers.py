"""proxy/workers/ without processes: the replicated log keeps a replica
engine in step (and a snapshot rebuilds one), counts from several workers
merge, forwarder counters sum, messages frame and replies come back without
blocking."""

from __future__ import annotations

import asyncio
import pickle
import random
import socket
from functools import partial
from types import SimpleNamespace

import dns.message
from prometheus_client import generate_latest

from proxy.config import Settings
from proxy.core.engine import Engine
from proxy.core.model import Rule, Scenario
from proxy.core.query import QueryView
from proxy.metrics import MetricsView, make_registry
from proxy.stats import Stats
from proxy.upstreams import Upstream
from proxy.workers import pool as pool_module
from proxy.workers.ipc import CLOSED, Channel, frame, unframe
from proxy.workers.merge import (
    AggregateUpstream,
    combine_forwarder,
    forwarder_snapshot,
    merge_clients,
    merge_stats,
    sum_stats,
    sum_upstreams,
)
from proxy.workers.pool import WorkerHandle, WorkerPool
from proxy.workers.replication import CallLog, Entry, LoggedEngine, Replica, worker_share

NOW = 1_800_000_000.0
SCENARIO = Scenario.model_validate({"name": "s", "phases": [
    {"name": "one", "duration": "10s",
     "rules": [{"name": "www", "match": {"name": "www.example.test"}, "fault": "nxdomain"}]},
    {"name": "two", "duration": "10s",
     "rules": [{"name": "www2", "match": {"name": "www.example.test"}, "fault": "servfail"}]},
]})
RULE = Rule.model_validate({"name": "r", "match": {"suffix": "db.test"}, "fault": "refused"})


class Replicas:
    """Ready workers fed the log at once: each entry goes over a pickle, as
    over the control channel, to every replica engine."""

    def __init__(self, *engines: Engine) -> None:
        self.replicas = [Replica(engine, 0, 1) for engine in engines]
        self.calls: list[str] = []

    def __call__(self, entry: Entry) -> None:
        self.calls.append(entry.method)
        for replica in self.replicas:
            replica.apply(pickle.loads(pickle.dumps(entry)))


class Counted:
    """WorkerCounts over engines standing for workers (their rows merged)."""

    def __init__(self, local: Engine, *workers: Engine) -> None:
        self.local, self.workers = local, workers

    def stats(self, run=None):
        return merge_stats(self.local.stats(run), [e.stats(run) for e in self.workers])

    def client_stats(self, run=None):
        return merge_clients(self.local, [e.client_stats(run) for e in self.workers], run)


def logged(*replicas: Engine, counts: bool = False) -> tuple[LoggedEngine, Replicas]:
    calls, fed = CallLog(), Replicas(*replicas)
    calls.subscribe(fed)
    local = Engine()
    return LoggedEngine(local, calls, Counted(local, *replicas) if counts else None), fed


def query(name: str, client: str = "127.0.0.1") -> QueryView:
    return QueryView.parse(dns.message.make_query(name, "A").to_wire(), client, "udp", "l")


def verdicts(engine: Engine, name: str, now: float) -> object:
    v = engine.on_query(query(name), now, random.Random(1))
    return None if v is None else type(v).__name__ + (v.wire[3] & 15).__str__()


def test_models_and_settings_pickle() -> None:
    assert pickle.loads(pickle.dumps(SCENARIO)) == SCENARIO
    assert pickle.loads(pickle.dumps(RULE)) == RULE
    settings = Settings(upstreams=["127.0.0.1:53"], workers=4,
                        client_groups={"10.0.0.0/8": "x"})
    assert pickle.loads(pickle.dumps(settings)) == settings


def test_every_mutation_reaches_the_replicas_in_step() -> None:
    replica = Engine()
    fan, fed = logged(replica)
    fan.add_run("run1", SCENARIO, NOW, NOW, max_duration=100)
    fan.add_rule("rule:r", RULE, NOW, NOW + 50)
    assert fan.active and replica.active
    for t, want in ((NOW + 1, "Reply3"), (NOW + 12, "Reply2")):
        assert verdicts(replica, "www.example.test", t) == want
        assert verdicts(replica, "x.db.test", t) == "Reply5"
    fan.pause("run1", NOW + 13)
    assert replica.get_run("run1").paused_at == NOW + 13
    fan.resume("run1", NOW + 15)
    assert replica.get_run("run1").shift == fan.local.get_run("run1").shift == 2
    assert fan.tick(NOW + 20) == []
    assert replica.active
    assert sorted(fan.tick(NOW + 60)) == [("rule:r", "expired"), ("run1", "completed")]
    assert replica.get_run("rule:r").ended == "expired" and not replica.active
    fan.forget("rule:r")
    assert replica.get_run("rule:r") is None
    fan.add_rule("rule:q", RULE, NOW + 61)
    assert replica.active
    assert fan.reset(NOW + 70) == ["rule:q"]
    assert not replica.active and replica.get_run("rule:q").ended == "reset"
    assert fed.calls == ["add_run", "add_rule", "pause", "resume", "tick", "tick", "forget",
                         "add_rule", "reset"]
    assert fan.log.seq == 9 and fed.replicas[0].applied == 9


def test_a_failed_local_call_is_not_sent() -> None:
    fan, fed = logged(Engine())
    fan.add_rule("rule:r", RULE, NOW)
    try:
        fan.add_rule("rule:r", RULE, NOW)
    except ValueError:
        pass
    assert fed.calls == ["add_rule"] and fan.log.seq == 1


def restored(fan: LoggedEngine) -> Engine:
    """A new worker's engine, from the log's snapshot (sent as a pickle)."""
    fresh = Engine()
    Replica(fresh, 0, 1).restore(pickle.loads(pickle.dumps(fan.log.snapshot())))
    return fresh


def test_replay_rebuilds_the_state_of_a_new_worker() -> None:
    fan, _ = logged()
    fan.add_run("gone", SCENARIO, NOW, NOW)
    fan.add_run("run1", SCENARIO, NOW, NOW)
    fan.add_rule("rule:r", RULE, NOW)
    fan.pause("run1", NOW + 2)
    fan.resume("run1", NOW + 5)
    fan.stop_run("gone", NOW + 6)
    fan.forget("gone")
    fan.add_run("paused", SCENARIO, NOW, NOW)
    fan.pause("paused", NOW + 1)
    fresh = restored(fan)
    assert fresh.run_ids() == fan.local.run_ids() == ["rule:r", "run1", "paused"]
    assert fresh.runs_info(NOW + 8) == fan.local.runs_info(NOW + 8)
    assert fresh.get_run("run1").shift == 3
    for t in (NOW + 8, NOW + 14, NOW + 30):
        for name in ("www.example.test", "x.db.test", "other.test"):
            assert verdicts(fresh, name, t) == verdicts(fan.local, name, t)
    fan.reset(NOW + 9)
    fresh = restored(fan)
    fresh.tick(NOW + 30)  # the local engine saw run1 complete at a query at NOW + 30
    assert not fresh.active
    assert {r["run"]: r["state"] for r in fresh.runs_info(NOW + 30)} == {
        r["run"]: r["state"] for r in fan.local.runs_info(NOW + 30)}
    for run_id in fan.run_ids():
        fan.forget(run_id)
    assert fan.log.snapshot() == (fan.log.seq, [])


def test_a_worker_joining_late_skips_what_its_snapshot_holds() -> None:
    """Entries already in the snapshot are not applied twice; later ones are,
    in order, so snapshot + the rest == the whole log from the start."""
    fan, _ = logged()
    fan.add_run("run1", SCENARIO, NOW, NOW)
    fan.pause("run1", NOW + 2)
    seq, entries = fan.log.snapshot()
    late = Engine()
    replica = Replica(late, 0, 1)
    replica.restore((seq, entries))
    assert replica.applied == seq == 2
    everything: list[Entry] = []
    fan.log.subscribe(everything.append)
    fan.resume("run1", NOW + 5)
    fan.add_rule("rule:r", RULE, NOW + 6)
    for entry in [Entry(1, "add_run", ("run1", SCENARIO, NOW, NOW), {})] + everything:
        replica.apply(entry)  # the first is old news: skipped
    assert replica.applied == 4 and late.get_run("run1").shift == 3
    assert late.runs_info(NOW + 8) == fan.local.runs_info(NOW + 8)


def test_stats_and_clients_merge_over_workers() -> None:
    workers = [Engine(), Engine()]
    fan, _ = logged(*workers, counts=True)
    fan.add_run("run1", SCENARIO, NOW, NOW)
    rng = random.Random(1)
    for i in range(3):
        workers[0].on_query(query("www.example.test", "10.0.0.1"), NOW + 1 + i, rng)
    workers[1].on_query(query("www.example.test", "10.0.0.1"), NOW + 0.5, rng)
    workers[1].on_query(query("www.example.test", "10.0.0.2"), NOW + 2, rng)
    workers[1].on_query(query("www.example.test", "10.0.0.2"), NOW + 12, rng)  # phase two
    rows = {(r["phase"], r["rule"]): r for r in fan.stats()}
    assert (rows[("one", "www")]["matched"], rows[("one", "www")]["injected"]) == (5, 5)
    assert rows[("two", "www2")]["injected"] == 1
    assert [r["rule"] for r in fan.stats("run1")] == ["www", "www2"]
    clients = {(r["rule"], r["client"]): r for r in fan.client_stats()}
    one = clients[("www", "10.0.0.1")]
    assert one["faults"] == {"nxdomain": 4} and one["names"] == {"www.example.test": 4}
    assert one["faulted"] == {"www.example.test": 4}
    assert (one["first_seen"], one["last_seen"]) == (NOW + 0.5, NOW + 3)
    assert clients[("www2", "10.0.0.2")]["faults"] == {"servfail": 1}
    assert len(clients) == 3
    # Rows of runs the main process no longer holds are left out.
    fan.forget("run1")
    assert fan.stats() == [] and fan.client_stats() == []


def test_merge_ignores_unknown_runs_and_keeps_local_rows() -> None:
    local = [{"run": "a", "rule": "x", "matched": 0, "injected": 0, "errors": 0}]
    worker = [{"run": "b", "rule": "x", "matched": 5, "injected": 5, "errors": 0},
              {"run": "a", "rule": "x", "matched": 2, "injected": 1, "errors": 1}]
    assert merge_stats(local, [worker, worker]) == [
        {"run": "a", "rule": "x", "matched": 4, "injected": 2, "errors": 2}]
    assert local[0]["matched"] == 0  # not modified
    assert merge_clients(None, []) == []


def test_forwarder_counters_sum() -> None:
    settings = Settings(upstreams=["127.0.0.1:53", "127.0.0.2:53"])

    def fake(queries: int, up: bool) -> SimpleNamespace:
        stats = Stats()
        stats.queries_udp, stats.queries_tcp, stats.answers = queries, 1, queries
        stats.qtypes[1] = queries
        stats.qtypes[28] = 2
        stats.rcodes[0] = queries
        stats.latency.observe(0.002)
        ups = [Upstream("127.0.0.1", 53, "127.0.0.1:53"), Upstream("127.0.0.2", 53, "127.0.0.2:53")]
        ups[0].sockets = [SimpleNamespace(sent=queries, replies=0)]  # type: ignore[list-item]
        ups[0].stats.timeouts = 1
        ups[0].stats.latency.observe(0.001)
        ups[1].down_until = 0.0 if up else 5.0
        return SimpleNamespace(stats=stats, upstreams=ups, inflight=2)

    snaps = [pickle.loads(pickle.dumps(forwarder_snapshot(fake(n, up))))
             for n, up in ((3, False), (4, True))]
    total = sum_stats(snaps)
    assert (total.queries_udp, total.queries_tcp, total.answers) == (7, 2, 7)
    assert total.qtypes[1] == 7 and total.qtypes[28] == 4 and total.rcodes[0] == 7
    assert sum(total.latency.counts) == 2 and abs(total.latency.total - 0.004) < 1e-9
    combined = combine_forwarder(snaps)
    again = sum_stats([combined])
    assert (again.queries_udp, again.qtypes[1], again.rcodes[0]) == (7, 7, 7)
    assert again.latency.counts == total.latency.counts
    assert [u["sent"] for u in combined["upstreams"]] == [7, 0]
    ups = sum_upstreams(settings, snaps[1:], snaps[:1])  # the first worker died
    assert [u.name for u in ups] == ["127.0.0.1:53", "127.0.0.2:53"]
    assert ups[0].sent() == 7 and ups[0].stats.timeouts == 2
    assert sum(ups[0].stats.latency.counts) == 2
    assert ups[1].up  # the live worker sees it up
    assert not sum_upstreams(settings, snaps[:1], [])[1].up


def test_the_collector_reads_a_snapshot() -> None:
    stats = Stats()
    stats.queries_udp = 9
    view = MetricsView(stats, [AggregateUpstream("u:53")], 0, Engine(), 0,
                       [{"worker": "0", "queries": 4, "restarts": 0},
                        {"worker": "1", "queries": 5, "restarts": 2}])
    registry = make_registry(lambda: view, Settings())
    text = generate_latest(registry).decode()
    assert 'dnschaos_queries_total{transport="udp"} 9.0' in text
    assert 'dnschaos_worker_queries_total{worker="1"} 5.0' in text
    assert 'dnschaos_worker_restarts_total{worker="1"} 2.0' in text
    assert 'dnschaos_upstream_up{upstream="u:53"} 0.0' in text


async def test_frames_and_channel_replies() -> None:
    buffer = bytearray(frame(("a", 1)) + frame(("b", [2])) + frame(("c", 3))[:5])
    assert unframe(buffer) == [("a", 1), ("b", [2])]
    assert len(buffer) == 5
    ours, theirs = socket.socketpair()
    events: list[tuple] = []
    chan = Channel(ours, on_event=events.append)
    chan.attach(asyncio.get_running_loop())
    try:
        one, two = chan.ask("snapshot", ()), chan.ask("snapshot", ())
        theirs.sendall(frame(("reply", 1, True, "x")) + frame(("reply", 99, True, "late"))
                       + frame(("ready", {})))
        done, pending = await asyncio.wait([one, two], timeout=0.2)
        assert done == {one} and one.result() == (True, "x")  # 2 never came: not blocked
        assert events == [("ready", {})]
        asked = unframe(bytearray(theirs.recv(1 << 16)))
        assert asked == [("snapshot", 1, ()), ("snapshot", 2, ())]
        theirs.close()
        await asyncio.wait_for(two, 1.0)  # the channel closed: the waiting request ends
        assert two.result() == CLOSED and chan.closed
        assert chan.ask("snapshot", ()).result() == CLOSED
    finally:
        chan.close()
        theirs.close()


def test_first_and_limits_are_split_so_workers_together_never_exceed_them() -> None:
    scenario = Scenario.model_validate({"name": "s", "phases": [
        {"name": "p", "duration": "1h", "rules": [
        {"name": "capped", "match": {"name": "a.test", "first": 5}, "fault": "nxdomain",
         "limit": {"count": 7, "per_second": 3}},
        {"name": "nested", "match": {"any": [{"not": {"first": 2}}, {"name": "b.test"}]},
         "fault": "servfail"}]}]})
    shares = [worker_share(scenario, i, 3) for i in range(3)]
    rules = [share.phases[0].rules for share in shares]
    assert [r[0].match.first for r in rules] == [2, 2, 1]
    assert [r[0].limit.count for r in rules] == [3, 2, 2]
    assert [r[0].limit.per_second for r in rules] == [1.0] * 3
    assert [r[1].match.any[0].not_.first for r in rules] == [1, 1, 0]
    assert rules[0][0].match.name == ["a.test"]
    assert rules[0][0].fault == scenario.phases[0].rules[0].fault
    # The original is untouched; one worker keeps everything; ad hoc rule lists too.
    assert scenario.phases[0].rules[0].limit.count == 7
    assert worker_share(scenario, 0, 1) is scenario
    capped = Rule.model_validate({"match": {"name": "x.test"}, "fault": "nxdomain",
                                  "limit": {"count": 3}})
    plain, shared = worker_share([RULE, capped], 1, 2)
    assert plain is RULE and shared.limit.count == 1
    # Applied: three engines, each fed every query, answer NXDOMAIN 5 times in all.
    engines = []
    for share in shares:
        engine = Engine()
        engine.add_run("r", share, 0.0, 0.0)
        engines.append(engine)
    faulted = sum(verdicts(engine, "a.test", 1.0 + i) == "Reply3"
                  for engine in engines for i in range(10))
    assert faulted == 5


# --- the pool's requests: awaited, never blocking, a stuck worker waited for once -------


class Worker:
    """The far end of one worker's control channel, answered by hand."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        ours, self.sock = socket.socketpair()
        self.sock.setblocking(False)
        self.handle = WorkerHandle(index, SimpleNamespace(poll=lambda: None, pid=1000 + index),
                                   Channel(ours), 0.0, ready=True)  # type: ignore[arg-type]
        self.handle.chan.on_event = partial(pool._on_event, self.handle)
        self.handle.chan.attach(asyncio.get_running_loop())
        pool.handles[index] = self.handle
        self.buffer = bytearray()

    def received(self) -> list[tuple]:
        try:
            self.buffer += self.sock.recv(1 << 20)
        except BlockingIOError:
            pass
        return unframe(self.buffer)

    def send(self, *messages: tuple) -> None:
        self.sock.sendall(b"".join(frame(m) for m in messages))


async def test_a_stuck_worker_is_waited_for_once_and_the_loop_goes_on(monkeypatch) -> None:
    monkeypatch.setattr(pool_module, "ACK_TIMEOUT", 0.2)
    calls = CallLog()
    pool = WorkerPool(Settings(upstreams=["127.0.0.1:53"]), 2, calls)
    quick, stuck = Worker(pool, 0), Worker(pool, 1)
    ticks: list[str] = []

    async def ticker() -> None:  # runs while the request waits: the loop is not blocked
        for _ in range(3):
            ticks.append("tick")
            await asyncio.sleep(0.01)

    request = asyncio.ensure_future(pool.request("snapshot", ("stats",), timeout=0.2))
    await asyncio.gather(ticker(), asyncio.sleep(0.05))
    ((kind, seq, parts),) = quick.received()
    assert (kind, parts) == ("snapshot", ("stats",)) and not request.done()
    quick.send(("reply", seq, True, {"stats": []}))
    assert await request == {0: {"stats": []}}  # the stuck one timed out, nothing else
    assert ticks == ["tick"] * 3 and stuck.handle.lagging and not quick.handle.lagging
    # Next time the stuck worker is asked but not waited for: the quick one's
    # answer is enough, before any timeout.
    again = asyncio.ensure_future(pool.request("snapshot", ("stats",)))
    await asyncio.sleep(0.02)
    ((_, seq2, _),) = quick.received()
    quick.send(("reply", seq2, True, {"stats": [1]}))
    timer = asyncio.ensure_future(asyncio.sleep(0.2))
    done, _ = await asyncio.wait([again, timer], return_when=asyncio.FIRST_COMPLETED)
    assert done == {again} and again.result() == {0: {"stats": [1]}}
    timer.cancel()
    assert [m[0] for m in stuck.received()] == ["snapshot", "snapshot"]  # asked both times
    # A log entry: the quick one acknowledges, the lagging one is not waited for;
    # ticks after it are not acknowledged on their own and hold nothing up.
    calls.append("forget", ("x",), {}, False)
    calls.append("tick", (NOW,), {}, [])
    assert [m[1].method for m in quick.received()] == ["forget", "tick"]
    quick.send(("applied", 1))
    settle = asyncio.ensure_future(pool.settle())
    timer = asyncio.ensure_future(asyncio.sleep(0.2))
    done, _ = await asyncio.wait([settle, timer], return_when=asyncio.FIRST_COMPLETED)
    assert done == {settle} and quick.handle.applied == 1 and stuck.handle.applied == 0
    timer.cancel()
    # It answers again: waited for again.
    stuck.send(("applied", 2))
    await asyncio.sleep(0.02)
    assert not stuck.handle.lagging
    for worker in (quick, stuck):
        worker.handle.chan.close()
        worker.sock.close()


def test_a_worker_answers_a_request_already_waiting_when_it_connects() -> None:
    """A request the main process sent while the worker was starting sits in
    the control socket; under uvloop it is delivered before
    create_unix_connection returns.  The worker must answer it and go on,
    not fail on a control it has not set yet and exit."""
    import uvloop

    from proxy.workers.child import Worker
    from proxy.workers.replication import CallLog

    main_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    settings = Settings(upstreams=["127.0.0.1:9"], listen=["127.0.0.1:0"])
    init = {"settings": settings, "index": 0, "count": 1, "parent": 0, "loop_token": None,
            "snapshot": CallLog().snapshot()}
    early = frame(("snapshot", 1, ("stats",)))
    worker = Worker(worker_end, init, bytearray(early[:3]))  # part came with the init
    worker_end.setblocking(False)
    main_end.sendall(early[3:] + frame(("snapshot", 2, ("stats",))))

    async def go() -> tuple[bool, list[object]]:
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.3)
        stopped_by_itself = worker.stop.is_set()
        worker.stop.set()
        assert await asyncio.wait_for(task, 5) == 0
        main_end.setblocking(False)
        buffer = bytearray(main_end.recv(1 << 20))
        return stopped_by_itself, [m for m in unframe(buffer) if m[0] == "reply"]

    try:
        stopped_by_itself, replies = uvloop.run(go())
    finally:
        main_end.close()
        worker_end.close()
    assert not stopped_by_itself
    assert [(m[1], m[2]) for m in replies] == [(1, True), (2, True)]
