"""What the main process reads when workers serve DNS: the workers' counts
merged with the local engine's run state.

`WorkerCounts` gives the game day its stats/client_stats; `PoolForwarder`
stands for the forwarder (/health reads `upstreams`, the metrics collector
reads `metrics_view()`).  Both read the counts the pool gathered last
(WorkerPool.last, plus what dead workers had counted); `refresh()` gathers
fresh ones without blocking, and the admin listener awaits it before a
request that reads counts (proxy/admin.py)."""

from __future__ import annotations

from typing import Any

from proxy.config import Settings
from proxy.core.deps import merge_rows
from proxy.core.engine import Engine
from proxy.metrics import MetricsView
from proxy.workers.merge import (
    AggregateUpstream,
    merge_clients,
    merge_stats,
    sum_stats,
    sum_upstreams,
)
from proxy.workers.pool import ACK_TIMEOUT, COUNT_PARTS, WorkerPool


class WorkerCounts:
    """Traffic counts of every worker (live and retired) for the runs the
    local engine holds."""

    def __init__(self, local: Engine, pool: WorkerPool) -> None:
        self.local = local
        self.pool = pool

    def stats(self, run: str | None = None) -> list[dict[str, Any]]:
        sources = self.pool.counted("stats") + self.pool.retired.stats
        if run is not None:
            sources = [[row for row in rows if row["run"] == run] for rows in sources]
        return merge_stats(self.local.stats(run), sources)

    def client_stats(self, run: str | None = None) -> list[dict[str, Any]]:
        return merge_clients(self.local, self.pool.counted("clients")
                             + self.pool.retired.clients, run)

    def runs_info(self, now: float) -> list[dict[str, Any]]:
        return self.local.runs_info(now)

    def deps_rows(self) -> dict[str, Any]:
        """The dependency maps of every worker (and of the dead ones) as one."""
        return merge_rows(self.pool.counted("deps") + self.pool.retired.deps)


class PoolForwarder:
    """Stands for the forwarder in the main process."""

    def __init__(self, settings: Settings, pool: WorkerPool, counts: WorkerCounts) -> None:
        self.settings = settings
        self.pool = pool
        self.counts = counts

    async def refresh(self, parts: tuple[str, ...] = COUNT_PARTS,
                      timeout: float = ACK_TIMEOUT) -> None:
        await self.pool.refresh(parts, timeout)

    @property
    def upstreams(self) -> list[AggregateUpstream]:
        return sum_upstreams(self.settings, self.pool.counted("forwarder"), [])

    @property
    def inflight(self) -> int:
        return sum(f["inflight"] for f in self.pool.counted("forwarder"))

    def release_delayed(self, run: str | None = None) -> int:
        return self.pool.release(run)

    def metrics_view(self) -> MetricsView:
        retired = self.pool.retired
        live = self.pool.counted("forwarder")
        return MetricsView(
            stats=sum_stats(live + retired.forwarder),
            upstreams=sum_upstreams(self.settings, live, retired.forwarder),
            inflight=sum(f["inflight"] for f in live),
            counts=self.counts, engine_errors=self.counts.local.errors,
            workers=self.pool.worker_rows())
