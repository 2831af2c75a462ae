"""Data parallelism as an SGLang server has it (`--dp-size`): several
schedulers, each with its own running batch, KV pool and radix cache, behind
one tokenizer manager, and the DataParallelController that hands each request
to one of them (sglang 0.5.23, managers/data_parallel_controller.py):

- a request naming a rank (`routed_dp_rank`, as routers such as sgl-router's
  dp-aware mode send it) goes there; a rank outside [0, dp_size) is refused
  with the tokenizer manager's message (with one scheduler, rank 0 is served);
- else `--load-balance-method`: `round_robin` (the default outside PD
  disaggregation), `total_requests` (the fewest running and waiting, ties to
  the lowest rank) or `total_tokens` (the fewest tokens held, ties by requests).

Round-robin dispatch is why a router that knows the ranks matters: each rank
caches only the prefixes it served.
"""

from __future__ import annotations

from .config import RuntimeSettings, ServerConfig
from .engine import GenerationRequest, RequestRejected, RunningRequest, SimEngine
from .metrics import SimStats
from .weights import ServedWeights


class DataParallel:
    def __init__(self, *, config: ServerConfig, settings: RuntimeSettings) -> None:
        # The tokenizer manager's state, shared by every rank: its series, and the rids in flight.
        self.stats = SimStats()
        active_rids: set[str] = set()
        self.weights = ServedWeights.launched(config)
        self.ranks = [SimEngine(config=config, settings=settings, dp_rank=rank, stats=self.stats,
                                active_rids=active_rids, weights=self.weights)
                      for rank in range(config.dp_size)]
        self.method = config.load_balance_method
        self._round_robin = 0

    def engine_for(self, request: GenerationRequest) -> SimEngine:
        """The rank that serves `request`. RequestRejected for a rank that does not exist."""
        ranks = self.ranks
        rank = request.routed_dp_rank
        if rank is not None:
            if not 0 <= rank < len(ranks):
                raise RequestRejected(f"routed_dp_rank={rank} out of range [0, {len(ranks)})",
                                      error_type="BadRequest")
            return ranks[rank]
        if len(ranks) == 1:
            return ranks[0]
        if self.method == "total_requests":
            return min(ranks, key=lambda engine: engine.num_running_requests + engine.num_waiting_requests)
        if self.method == "total_tokens":
            return min(ranks, key=lambda engine: (engine.running_tokens() + engine.waiting_uncached_tokens(),
                                                  engine.num_running_requests + engine.num_waiting_requests))
        engine = ranks[self._round_robin % len(ranks)]
        self._round_robin += 1
        return engine

    async def admit(self, request: GenerationRequest) -> RunningRequest:
        return await self.engine_for(request).admit_async(request)

    @property
    def active_requests(self) -> int:
        return sum(engine.active_requests for engine in self.ranks)

    def abort(self, *, rid: str, abort_all: bool) -> int:
        """/abort_request reaches every rank; the request counts once."""
        return sum(engine.abort(rid=rid, abort_all=abort_all, record=engine is self.ranks[0])
                   for engine in self.ranks)

    def flush_cache(self) -> bool:
        """Every rank's cache, only if no rank has requests running or waiting."""
        if any(engine.has_active_requests for engine in self.ranks):
            return False
        return all([engine.flush_cache() for engine in self.ranks])

    def release_hung_requests(self) -> int:
        return sum(engine.release_hung_requests() for engine in self.ranks)

    def reset_stats(self) -> None:
        self.stats = SimStats()
        for engine in self.ranks:
            engine.reset_stats(self.stats)

    def stats_snapshot(self) -> dict:
        """/sim/stats: the shared counters with rank 0's cache and engine, and
        with several ranks each one's."""
        snapshots = [engine.stats_snapshot() for engine in self.ranks]
        snapshot = snapshots[0]
        if len(snapshots) > 1:
            snapshot = {**snapshot,
                        "dp_ranks": [{"cache": own["cache"], "engine": own["engine"]} for own in snapshots],
                        "active_requests": sum(own["active_requests"] for own in snapshots),
                        "active_rids": sorted(rid for own in snapshots for rid in own["active_rids"])}
        return snapshot
