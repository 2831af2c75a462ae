"""Latency model: how long prefill and each decode step take.

Today a request runs alone: TTFT = `ttft_ms` + `prefill_us_per_token` × the
prompt tokens not served from the radix cache, then one token every `itl_ms`.
The continuous-batching engine will replace these per-request delays with
per-step costs that depend on the batch; it should keep this interface.
"""

from __future__ import annotations

from .config import RuntimeSettings


class TimingModel:
    def __init__(self, settings: RuntimeSettings) -> None:
        self._settings = settings  # shared, mutable: read at every call

    def prefill_delay_s(self, *, uncached_prompt_tokens: int) -> float:
        """Seconds from admission to the first output token."""
        settings = self._settings
        return settings.ttft_ms / 1e3 + settings.prefill_us_per_token * uncached_prompt_tokens / 1e6

    def decode_delay_s(self) -> float:
        """Seconds between two consecutive output tokens."""
        return self._settings.itl_ms / 1e3
