"""Prometheus metrics, read from the plain counters at scrape time.

A custom collector turns the forwarder's integer counters into metric
families when /metrics is scraped, so the query path never calls
prometheus-client.  The registry is passed in, so each test gets its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.affected import ClientFaults, affected_counts
from proxy.config import Settings
from proxy.stats import Histogram, Stats, UpstreamStats

# Query types given their own label value; a bounded set keeps the series few.
COMMON_QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
                 28: "AAAA", 33: "SRV", 35: "NAPTR", 43: "DS", 48: "DNSKEY", 64: "SVCB",
                 65: "HTTPS", 255: "ANY", 257: "CAA"}
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
               5: "REFUSED", 6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH",
               10: "NOTZONE"}
RUNNING = "running"
"""The run state in which a run's phase is in force (`dnschaos_active_phase`)."""


class CountsSource(Protocol):
    """The engine-side counts the collector reads: the local Engine, or the
    workers' counts merged (proxy/workers/view.py WorkerCounts)."""

    def stats(self) -> list[dict[str, Any]]: ...

    def client_stats(self) -> list[dict[str, Any]]: ...

    def runs_info(self, now: float) -> list[dict[str, Any]]: ...


class UpstreamCounts(Protocol):
    """An upstream's counters (forwarder.Upstream, workers' AggregateUpstream)."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> UpstreamStats: ...

    @property
    def up(self) -> bool: ...

    @property
    def looped(self) -> bool: ...

    def sent(self) -> int: ...

    def replies(self) -> int: ...


class Traffic(Protocol):
    """The forwarder's counters (a Forwarder)."""

    @property
    def stats(self) -> Stats: ...

    @property
    def upstreams(self) -> Sequence[UpstreamCounts]: ...

    @property
    def inflight(self) -> int: ...

    def flush(self) -> None:
        """Bring counters kept elsewhere (the fast path's) into `stats`."""


@dataclass(frozen=True)
class MetricsView:
    """Everything one scrape reads."""

    stats: Stats
    upstreams: Sequence[UpstreamCounts]
    inflight: int
    counts: CountsSource
    engine_errors: int
    """The engine's own failures (the rules' are in counts.stats())."""
    workers: list[dict[str, Any]] | None = None
    """Per worker process: worker, queries, restarts; None: one process."""


def local_view(forwarder: Traffic, engine: Any) -> MetricsView:
    """The view of one process: its forwarder and its engine."""
    forwarder.flush()
    return MetricsView(stats=forwarder.stats, upstreams=forwarder.upstreams,
                       inflight=forwarder.inflight, counts=engine,
                       engine_errors=int(engine.errors))


class EndedRuns(Protocol):
    """What the game day keeps of the runs the engine has forgotten (GameDay)."""

    ended_rule_errors: int
    """The rule errors of every run the engine forgot."""

    def ended_runs(self, now: float) -> list[Any]:
        """The ended runs still to show: each with run, scenario, dry_run,
        ended_at, stats and clients (the engine's rows as it ended)."""
        ...

    def unrecovered(self) -> list[tuple[str, str, int]]:
        """(run, scenario, clients not recovered yet) of each watched run."""
        ...


class ForwarderCollector(Collector):
    def __init__(self, read: Callable[[], MetricsView], settings: Settings,
                 clock: Callable[[], float] = time.time,
                 ended: EndedRuns | None = None) -> None:
        self.read = read
        self.clock = clock
        self.ended = ended
        self.affected_window = settings.affected_window
        self.client_faults = ClientFaults(settings.client_groups, settings.client_label_cap)

    def collect(self) -> Iterator[Any]:
        fwd = self.read()
        s = fwd.stats
        info = InfoMetricFamily("dnschaos_build", "Version of dnschaos.")
        info.add_metric([], {"version": __version__})
        yield info

        queries = CounterMetricFamily(
            "dnschaos_queries", "Queries received from clients.", labels=["transport"])
        queries.add_metric(["udp"], s.queries_udp)
        queries.add_metric(["tcp"], s.queries_tcp)
        yield queries

        types = CounterMetricFamily(
            "dnschaos_query_types",
            "Queries received, by query type (common types; the rest 'other').",
            labels=["qtype"])
        counted = 0
        for number, name in COMMON_QTYPES.items():
            types.add_metric([name], s.qtypes[number])
            counted += s.qtypes[number]
        types.add_metric(["other"], sum(s.qtypes) - counted)
        yield types
        responses = CounterMetricFamily(
            "dnschaos_responses", "Replies sent to clients, by rcode.", labels=["rcode"])
        for number, count in enumerate(s.rcodes):
            if count or number in (0, 2, 3, 5):
                responses.add_metric([RCODE_NAMES.get(number, str(number))], count)
        yield responses
        yield _histogram("dnschaos_request_duration_seconds",
                         "Time from a query's arrival to its reply (forwarded or faulted).",
                         [], [([], s.latency)])
        yield _counter("dnschaos_answers", "Upstream answers relayed to clients.", s.answers)
        yield _counter("dnschaos_fast_path_queries",
                       "UDP queries the C fast path forwarded without the Python path.",
                       s.fast_path)
        yield _counter("dnschaos_udp_replies_unsent",
                       "UDP replies of the C fast path's listeners the kernel did not take "
                       "(a full send buffer): lost, as a datagram may be.", s.replies_unsent)
        yield _counter("dnschaos_refused",
                       "Queries refused because the client is not in the allowed networks.",
                       s.refused)
        malformed = CounterMetricFamily(
            "dnschaos_malformed_queries", "Packets that are not forwardable queries, by reaction.",
            labels=["reaction"])
        malformed.add_metric(["formerr"], s.formerr)
        malformed.add_metric(["notimp"], s.notimp)
        malformed.add_metric(["dropped"], s.malformed - s.formerr - s.notimp)
        yield malformed
        servfail = CounterMetricFamily(
            "dnschaos_servfail_sent", "SERVFAIL answers the proxy made itself, by reason.",
            labels=["reason"])
        servfail.add_metric(["deadline"], s.servfail_deadline)
        servfail.add_metric(["overload"], s.servfail_overload)
        servfail.add_metric(["tcp_retry_failed"], s.tcp_upstream_errors)
        servfail.add_metric(["no_upstream"], s.servfail_sent - s.servfail_deadline
                            - s.servfail_overload - s.tcp_upstream_errors)
        yield servfail
        discarded = CounterMetricFamily(
            "dnschaos_upstream_replies_discarded",
            "Replies from upstreams that were not passed on, by reason.", labels=["reason"])
        discarded.add_metric(["unknown_id"], s.unmatched_replies)
        discarded.add_metric(["wrong_question"], s.mismatched_replies)
        yield discarded
        yield _counter("dnschaos_truncated_retries",
                       "Truncated upstream answers retried over TCP for TCP clients.",
                       s.truncated_retries)
        yield _counter("dnschaos_faulted_queries",
                       "Queries answered or dropped by a fault instead of the upstream.",
                       s.faulted)
        yield _counter("dnschaos_fault_dropped_answers",
                       "Upstream answers a response-side fault dropped.", s.fault_dropped)
        yield _counter("dnschaos_engine_errors",
                       "Failures inside the fault engine or a rule's fault (the query or "
                       "answer went through unchanged); per rule in dnschaos_rule_errors_total.",
                       s.engine_errors + fwd.engine_errors
                       + (self.ended.ended_rule_errors if self.ended is not None else 0)
                       + sum(row.get("errors", 0) for row in fwd.counts.stats()))
        yield _gauge("dnschaos_inflight_queries", "Queries waiting for an upstream.",
                     fwd.inflight)
        yield _counter("dnschaos_tcp_connections", "Client TCP connections accepted.",
                       s.tcp_connections)
        yield _counter("dnschaos_tcp_connections_rejected",
                       "Client TCP connections refused at the connection cap.", s.tcp_rejected)
        closed = CounterMetricFamily(
            "dnschaos_tcp_connections_closed",
            "Client TCP connections the proxy closed, by reason.",
            labels=["reason"])
        closed.add_metric(["idle"], s.tcp_idle_closed)
        closed.add_metric(["evicted"], s.tcp_evicted)
        yield closed
        yield _counter("dnschaos_tcp_reads_paused",
                       "Times a client TCP connection stopped being read because its client "
                       "did not read its answers.", s.tcp_paused)

        per_upstream = {
            "timeouts": ("dnschaos_upstream_timeouts",
                         "Attempts the upstream did not answer in time."),
            "tcp_requests": ("dnschaos_upstream_tcp_requests", "Queries retried over TCP."),
            "errors": ("dnschaos_upstream_errors",
                       "Socket errors talking to the upstream (ICMP unreachable, TCP failures)."),
            "loops": ("dnschaos_upstream_loops",
                      "Times a loop probe showed the upstream forwards back to this proxy."),
        }
        requests = CounterMetricFamily(
            "dnschaos_upstream_requests", "Queries sent to the upstream.", labels=["upstream"])
        replies = CounterMetricFamily(
            "dnschaos_upstream_replies", "Valid replies received from the upstream.",
            labels=["upstream"])
        for upstream in fwd.upstreams:
            requests.add_metric([upstream.name], upstream.sent())
            replies.add_metric([upstream.name], upstream.replies())
        yield requests
        yield replies
        for field, (name, doc) in per_upstream.items():
            family = CounterMetricFamily(name, doc, labels=["upstream"])
            for upstream in fwd.upstreams:
                family.add_metric([upstream.name], getattr(upstream.stats, field))
            yield family
        yield _histogram(
            "dnschaos_upstream_request_duration_seconds",
            "Time from sending an attempt to the upstream to its valid reply.", ["upstream"],
            [([u.name], u.stats.latency) for u in fwd.upstreams])
        yield from self._engine_metrics(fwd.counts)
        up = GaugeMetricFamily("dnschaos_upstream_up",
                               "1 when the upstream is considered healthy.", labels=["upstream"])
        for upstream in fwd.upstreams:
            up.add_metric([upstream.name], 1 if upstream.up else 0)
        yield up
        looped = GaugeMetricFamily(
            "dnschaos_upstream_looped",
            "1 while the upstream forwards back to this proxy (a forwarding loop): "
            "it gets no queries.", labels=["upstream"])
        for upstream in fwd.upstreams:
            looped.add_metric([upstream.name], 1 if upstream.looped else 0)
        yield looped
        yield from _worker_metrics(fwd, s)

    def _engine_metrics(self, engine: CountsSource) -> Iterator[Any]:
        now = self.clock()
        stats, clients = list(engine.stats()), list(engine.client_stats())
        ended = self._ended(engine, now)
        for run in ended:
            stats += run.stats
            clients += run.clients
        labels = ["run", "scenario", "phase", "rule", "fault"]
        matched = CounterMetricFamily(
            "dnschaos_rule_matches", "Queries a rule selected.", labels=labels)
        injected = CounterMetricFamily(
            "dnschaos_faults_injected", "Faults a rule injected.", labels=labels)
        errors = CounterMetricFamily(
            "dnschaos_rule_errors", "Failures inside a rule's fault (passed through unchanged).",
            labels=labels)
        dry = CounterMetricFamily(
            "dnschaos_dry_run_matches",
            "Queries a dry-run rule selected (forwarded unchanged, nothing injected).",
            labels=["run", "scenario", "rule"])
        dry_totals: dict[tuple[str, str, str], int] = {}
        for row in stats:
            run = _run_of(row)
            key = [run, row["scenario"], row["phase"], row["rule"], row["fault"]]
            if row.get("dry_run"):
                triple = (run, row["scenario"], row["rule"])
                dry_totals[triple] = dry_totals.get(triple, 0) + row["matched"]
                continue
            matched.add_metric(key, row["matched"])
            injected.add_metric(key, row["injected"])
            errors.add_metric(key, row.get("errors", 0))
        for triple, count in sorted(dry_totals.items()):
            dry.add_metric(list(triple), count)
        yield matched
        yield injected
        yield errors
        yield dry
        yield from self._client_metrics(clients, now)
        yield from self._run_metrics(engine, ended, now)
        unrecovered = GaugeMetricFamily(
            "dnschaos_unrecovered_clients",
            "Clients that got faults in an ended run and have not had a real answer for "
            "each faulted name since (watching, failing or unseen; see docs/gameday.md)",
            labels=["run", "scenario"])
        if self.ended is not None:
            for run, scenario, count in self.ended.unrecovered():
                unrecovered.add_metric([run, scenario], count)
        yield unrecovered

    def _ended(self, engine: CountsSource, now: float) -> list[Any]:
        """The ended runs to show besides the engine's own (none it still holds)."""
        if self.ended is None:
            return []
        held = {str(row.get("run")) for row in engine.runs_info(now)}
        return [run for run in self.ended.ended_runs(now) if run.run not in held]

    def _client_metrics(self, rows: list[dict[str, Any]], now: float) -> Iterator[Any]:
        window = self.affected_window
        ever = GaugeMetricFamily(
            "dnschaos_affected_clients",
            "Distinct client addresses that received a rule's faults since its run started.",
            labels=["run", "scenario", "rule"])
        recent = GaugeMetricFamily(
            "dnschaos_affected_clients_recent",
            f"Distinct client addresses that received a rule's faults in the last "
            f"affected_window ({window:g} s).", labels=["run", "scenario", "rule"])
        for key, (total, last) in sorted(affected_counts(rows, now, window).items()):
            ever.add_metric(list(key), total)
            recent.add_metric(list(key), last)
        yield ever
        yield recent
        dry = GaugeMetricFamily(
            "dnschaos_dry_run_clients",
            "Distinct client addresses a dry-run rule would have given a fault.",
            labels=["run", "scenario", "rule"])
        for key, (total, _) in sorted(affected_counts(rows, now, window, dry_run=True).items()):
            dry.add_metric(list(key), total)
        yield dry
        faults = CounterMetricFamily(
            "dnschaos_client_faults",
            "Faults received per client (group name from client_groups, else the address; "
            "past client_label_cap: 'other').", labels=["client", "run", "scenario", "fault"])
        for labels, count in sorted(self.client_faults.counts(rows).items()):
            faults.add_metric(list(labels), count)
        yield faults

    def _run_metrics(self, engine: CountsSource, ended: list[Any],
                     now: float) -> Iterator[Any]:
        active = GaugeMetricFamily(
            "dnschaos_active_phase", "1 for the scenario phase now in force (dry runs excluded).",
            labels=["scenario", "phase"])
        info = GaugeMetricFamily(
            "dnschaos_run_info",
            "1 per scenario run the engine knows, with its state and current phase.",
            labels=["run", "scenario", "state", "phase", "dry_run"])
        remaining = GaugeMetricFamily(
            "dnschaos_run_phase_remaining_seconds",
            "Seconds until the run's current phase ends.", labels=["run", "scenario"])
        seen: set[tuple[str, str]] = set()
        for run in engine.runs_info(now):
            run_id, scenario = str(run.get("run", "")), str(run.get("scenario") or "")
            state, phase = str(run.get("state") or ""), str(run.get("phase") or "")
            info.add_metric([run_id, scenario, state, phase,
                             "true" if run.get("dry_run") else "false"], 1)
            left = run.get("remaining")
            if left is not None and math.isfinite(float(left)):
                remaining.add_metric([run_id, scenario], float(left))
            if (state == RUNNING and phase and not run.get("dry_run")
                    and (scenario, phase) not in seen):
                seen.add((scenario, phase))
                active.add_metric([scenario, phase], 1)
        for run in ended:
            info.add_metric([run.run, run.scenario, "ended", "",
                             "true" if run.dry_run else "false"], 1)
        yield active
        yield info
        yield remaining


def _worker_metrics(fwd: MetricsView, s: Stats) -> Iterator[Any]:
    """Per worker process; a single process is worker "0"."""
    workers = fwd.workers
    if workers is None:
        workers = [{"worker": "0", "queries": s.queries_udp + s.queries_tcp, "restarts": 0}]
    queries = CounterMetricFamily(
        "dnschaos_worker_queries", "Queries received from clients, per worker process.",
        labels=["worker"])
    restarts = CounterMetricFamily(
        "dnschaos_worker_restarts", "Times a worker process died and was started again.",
        labels=["worker"])
    for row in workers:
        queries.add_metric([row["worker"]], row["queries"])
        restarts.add_metric([row["worker"]], row["restarts"])
    yield queries
    yield restarts


def _run_of(row: dict[str, Any]) -> str:
    return str(row.get("run") or "")


def _histogram(name: str, doc: str, labels: list[str],
               series: list[tuple[list[str], Histogram]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, histogram in series:
        family.add_metric(values, histogram.cumulative(), histogram.total)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class ControlCollector(Collector):
    """dnschaos_control_*: whether this instance follows the shared control
    plane (only with `control` set)."""

    def __init__(self, control: Callable[[], Any]) -> None:
        self.control = control

    def collect(self) -> Iterator[Any]:
        control = self.control()
        if control is None:
            return
        connected = GaugeMetricFamily(
            "dnschaos_control_connected",
            "1 while this instance follows the control plane (connected, not healed), "
            "else 0: it applies no fault then.")
        connected.add_metric([], 1.0 if control.following() else 0.0)
        yield connected
        leader = GaugeMetricFamily(
            "dnschaos_control_leader",
            "1 while this instance holds the lease that appends scheduled starts.")
        leader.add_metric([], 1.0 if control.leader else 0.0)
        yield leader


def make_registry(read: Callable[[], MetricsView], settings: Settings,
                  clock: Callable[[], float] = time.time,
                  ended: EndedRuns | None = None,
                  control: Callable[[], Any] | None = None) -> CollectorRegistry:
    """A registry whose collector reads `read()` at every scrape (and the
    control plane's state, with `control`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ForwarderCollector(read, settings, clock, ended))
    if control is not None:
        registry.register(ControlCollector(control))
    return registry
