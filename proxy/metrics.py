"""Prometheus metrics, read from the plain counters at scrape time.

A custom collector turns the forwarder's integer counters into metric
families when /metrics is scraped, so the query path never calls
prometheus-client.  The registry is passed in, so each test gets its own.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from proxy import __version__


class ForwarderCollector(Collector):
    def __init__(self, forwarder: Any) -> None:
        self.forwarder = forwarder

    def collect(self) -> Iterator[Any]:
        fwd = self.forwarder
        s = fwd.stats
        info = InfoMetricFamily("dnschaos_build", "Version of dnschaos.")
        info.add_metric([], {"version": __version__})
        yield info

        queries = CounterMetricFamily(
            "dnschaos_queries", "Queries received from clients.", labels=["transport"])
        queries.add_metric(["udp"], s.queries_udp)
        queries.add_metric(["tcp"], s.queries_tcp)
        yield queries

        yield _counter("dnschaos_answers", "Upstream answers relayed to clients.", s.answers)
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
                       "Failures inside the fault engine (the query was forwarded unchanged).",
                       s.engine_errors)
        yield _gauge("dnschaos_inflight_queries", "Queries waiting for an upstream.",
                     fwd.inflight)
        yield _counter("dnschaos_tcp_connections", "Client TCP connections accepted.",
                       s.tcp_connections)
        yield _counter("dnschaos_tcp_connections_rejected",
                       "Client TCP connections refused at the connection cap.", s.tcp_rejected)

        per_upstream = {
            "timeouts": ("dnschaos_upstream_timeouts", "Attempts the upstream did not answer in time."),
            "tcp_requests": ("dnschaos_upstream_tcp_requests", "Queries retried over TCP."),
            "errors": ("dnschaos_upstream_errors", "Socket errors talking to the upstream."),
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
        yield from self._engine_metrics()
        up = GaugeMetricFamily("dnschaos_upstream_up",
                               "1 when the upstream is considered healthy.", labels=["upstream"])
        for upstream in fwd.upstreams:
            up.add_metric([upstream.name], 1 if upstream.up else 0)
        yield up


    def _engine_metrics(self) -> Iterator[Any]:
        engine = self.forwarder.engine
        labels = ["scenario", "phase", "rule", "fault"]
        matched = CounterMetricFamily(
            "dnschaos_rule_matches", "Queries a rule selected.", labels=labels)
        injected = CounterMetricFamily(
            "dnschaos_faults_injected", "Faults a rule injected.", labels=labels)
        for row in engine.stats() if hasattr(engine, "stats") else []:
            key = [row["scenario"], row["phase"], row["rule"], row["fault"]]
            matched.add_metric(key, row["matched"])
            injected.add_metric(key, row["injected"])
        yield matched
        yield injected
        active = GaugeMetricFamily(
            "dnschaos_active_phase", "1 for the scenario phase now in force.",
            labels=["scenario", "phase"])
        phase = engine.current_phase(time.time()) if hasattr(engine, "current_phase") else None
        if phase is not None:
            active.add_metric([engine.scenario or "", phase[1]], 1)
        yield active


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def make_registry(forwarder: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ForwarderCollector(forwarder))
    return registry
