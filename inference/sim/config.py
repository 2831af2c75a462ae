"""Command-line arguments (fixed for a run) and runtime-mutable settings.

`ServerConfig` mirrors the subset of SGLang's server args the simulator
understands; `/server_info` reports it. `RuntimeSettings` holds the knobs
that `POST /sim/faults` may change while the server runs (faults and
latencies); the engine reads them at every decision, so a change applies to
the next request or token.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str = "demo-llm"
    model_path: str = "demo/demo-llm"
    context_length: int = 8192  # tokens (prompt + completion)
    enable_cache_report: bool = False
    api_key: str | None = None
    max_running_requests: int = 256  # reported only; no queueing model yet
    cache_capacity_tokens: int = 1_000_000
    seed: int = 0
    # Natural (EOS) completion length when a request sets no max tokens, in tokens.
    natural_length_min: int = 16
    natural_length_max: int = 64


@dataclass(slots=True)
class RuntimeSettings:
    """Faults and latencies; every field can be changed through /sim/faults."""

    error_rate: float = 0.0  # fraction of generation requests answered 500 before any token
    crash_after_tokens: int | None = None  # mid-stream error after this many tokens
    hang: bool = False  # accept generation requests, never answer
    unhealthy: bool = False  # /health, /health_generate and /ready answer 503
    ttft_ms: float = 0.0  # fixed time to first token, milliseconds
    itl_ms: float = 0.0  # inter-token latency, milliseconds
    prefill_us_per_token: float = 0.0  # extra TTFT per uncached prompt token, microseconds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def update_from(self, changes: dict[str, Any]) -> None:
        """Apply a partial update, all or nothing. Raises ValueError on bad input."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"Unknown fault setting(s): {', '.join(unknown)}")
        validated: dict[str, Any] = {}
        for name, value in changes.items():
            validated[name] = _validate_setting(name, value)
        for name, value in validated.items():
            setattr(self, name, value)


def _validate_setting(name: str, value: Any) -> Any:
    if name in ("hang", "unhealthy"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean")
        return value
    if name == "crash_after_tokens":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError("crash_after_tokens must be null or an integer >= 0")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    if name == "error_rate" and value > 1:
        raise ValueError("error_rate must be in [0, 1]")
    return float(value)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inference.sim",
        description="SGLang-protocol simulator: SGLang's HTTP API with a toy model.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--served-model-name", default=None, help="defaults to --model-path")
    parser.add_argument("--model-path", default="demo/demo-llm")
    parser.add_argument("--context-length", type=int, default=8192, help="tokens")
    parser.add_argument("--enable-cache-report", action="store_true",
                        help="report usage.prompt_tokens_details.cached_tokens in OpenAI replies")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--cache-capacity-tokens", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--prefill-us-per-token", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--crash-after-tokens", type=int, default=None)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--unhealthy", action="store_true")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[ServerConfig, RuntimeSettings]:
    if args.context_length <= 0:
        raise SystemExit("--context-length must be positive")
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name or args.model_path,
        model_path=args.model_path,
        context_length=args.context_length,
        enable_cache_report=args.enable_cache_report,
        api_key=args.api_key,
        max_running_requests=args.max_running_requests,
        cache_capacity_tokens=args.cache_capacity_tokens,
        seed=args.seed,
    )
    settings = RuntimeSettings()
    try:
        settings.update_from({
            "error_rate": args.error_rate,
            "crash_after_tokens": args.crash_after_tokens,
            "hang": args.hang,
            "unhealthy": args.unhealthy,
            "ttft_ms": args.ttft_ms,
            "itl_ms": args.itl_ms,
            "prefill_us_per_token": args.prefill_us_per_token,
        })
    except ValueError as error:
        raise SystemExit(str(error)) from error
    return server_config, settings
