"""Step costs of the continuous-batching engine, and the simulated clock.

The engine runs one forward pass ("step") at a time, like SGLang's scheduler
without `--enable-mixed-chunk`: either a prefill step (chunks of admitted
requests' uncached prompt tokens, at most `chunked_prefill_size` in all) or a
decode step (one token for every running request past its prefill).

Step durations, in simulated seconds:
- prefill of N tokens: max(decode_base, N / prefill_tokens_per_s)
  + N × prefill_us_per_token (a roofline: a small chunk costs one weight read,
  a large one is compute-bound);
- decode with B requests: decode_base + B × decode_per_request + itl_ms.

`ttft_ms` (fixed delay before a request may be scheduled) and the legacy
`itl_ms` / `prefill_us_per_token` knobs come from `RuntimeSettings` and can be
changed at run time; the others are fixed by flags or a preset. With every
cost at 0 a step takes no time and the engine is an instant upstream.

Wall-clock time = simulated time × `time_scale` (0.1 runs ten times faster
than real time). Reported latencies (meta_info.e2e_latency, /metrics
histograms) are in simulated seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import RuntimeSettings


@dataclass(frozen=True, slots=True)
class EngineCosts:
    prefill_tokens_per_s: float = 0.0  # 0 = prefill is free
    decode_base_ms: float = 0.0  # a decode step at batch 1 (also the floor of a prefill step)
    decode_per_request_ms: float = 0.0  # extra decode-step time per running request
    time_scale: float = 1.0  # wall seconds per simulated second


class StepTiming:
    def __init__(self, costs: EngineCosts, settings: RuntimeSettings) -> None:
        self.costs = costs
        self._settings = settings  # shared, mutable: read at every call
        self.time_scale = costs.time_scale

    def now(self) -> float:
        """Simulated seconds (monotonic; only differences are meaningful)."""
        return time.monotonic() / self.time_scale

    def wall_s(self, simulated_s: float) -> float:
        return simulated_s * self.time_scale

    def prefill_step_s(self, tokens: int) -> float:
        costs = self.costs
        compute = tokens / costs.prefill_tokens_per_s if costs.prefill_tokens_per_s > 0 else 0.0
        return max(costs.decode_base_ms / 1e3, compute) + self._settings.prefill_us_per_token * tokens / 1e6

    def decode_step_s(self, batch_size: int) -> float:
        costs = self.costs
        return (costs.decode_base_ms + costs.decode_per_request_ms * batch_size + self._settings.itl_ms) / 1e3

    def is_instant(self) -> bool:
        """Every step takes no time (the default configuration)."""
        costs = self.costs
        settings = self._settings
        return (costs.prefill_tokens_per_s == 0 and costs.decode_base_ms == 0 and costs.decode_per_request_ms == 0
                and settings.itl_ms == 0 and settings.prefill_us_per_token == 0)

    def admission_delay_s(self) -> float:
        """Fixed delay before a request may join the waiting queue (`ttft_ms`)."""
        return self._settings.ttft_ms / 1e3
