"""Counters kept as plain integers on the hot path and turned into
Prometheus metrics only when scraped (an attribute increment costs tens of
nanoseconds; a labelled prometheus-client call costs microseconds)."""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds (seconds) of the latency histograms' buckets; the last bucket is +Inf.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0)


class Histogram:
    """A latency histogram as a list of bucket counts and a sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, count of observations at or below it), as Prometheus wants."""
        out, running = [], 0
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class Stats:
    """Process-wide counters of the forwarder."""

    __slots__ = (
        "queries_udp", "queries_tcp", "answers", "refused", "malformed", "formerr", "notimp",
        "servfail_deadline", "servfail_overload", "truncated_retries", "tcp_upstream_errors",
        "unmatched_replies", "mismatched_replies", "servfail_sent",
        "faulted", "fault_dropped", "engine_errors", "tcp_connections", "tcp_rejected",
        "tcp_idle_closed", "tcp_evicted", "tcp_paused", "fast_path", "replies_unsent",
        "qtypes", "rcodes", "latency",
    )
    queries_udp: int
    queries_tcp: int
    answers: int
    refused: int
    malformed: int
    formerr: int
    notimp: int
    servfail_deadline: int
    servfail_overload: int
    truncated_retries: int
    tcp_upstream_errors: int
    unmatched_replies: int
    mismatched_replies: int
    servfail_sent: int
    faulted: int
    fault_dropped: int
    engine_errors: int
    tcp_connections: int
    tcp_rejected: int
    tcp_idle_closed: int
    tcp_evicted: int
    tcp_paused: int
    fast_path: int  # UDP queries the C relay forwarded on its own (proxy/accel.py)
    replies_unsent: int  # UDP replies on the relay's listeners the kernel did not take
    qtypes: list[int]
    rcodes: list[int]
    latency: Histogram

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        self.qtypes = [0] * 65536  # indexed by query type: a list beats a dict here
        self.rcodes = [0] * 16  # replies sent to clients, by rcode (the header's 4 bits)
        self.latency = Histogram()  # from the query's arrival to the reply


class UpstreamStats:
    """Counters of one upstream."""

    __slots__ = ("timeouts", "tcp_requests", "errors", "loops", "latency")
    timeouts: int
    tcp_requests: int
    errors: int
    loops: int
    latency: Histogram

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        self.latency = Histogram()  # from sending an attempt to its valid reply
