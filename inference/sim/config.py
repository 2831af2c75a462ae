"""Command-line arguments (fixed for a run) and runtime-mutable settings.

`ServerConfig` mirrors the subset of SGLang's server args the simulator
understands; `/server_info` reports it. `RuntimeSettings` holds the knobs
that `POST /sim/faults` may change while the server runs (faults and
latencies); the engine reads them at every decision, so a change applies to
the next request or step.

`--preset NAME` (see `presets`) fills the engine-model figures (capacity,
step costs, context length, model path); an explicit flag overrides one.
Without a preset every cost is 0: the simulator is an instant upstream.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .lora import ALL_TARGET_MODULES, LORA_BACKENDS, LORA_EVICTION_POLICIES, SUPPORTED_TARGET_MODULES
from .presets import PRESETS
from .radix_cache import EVICTION_POLICIES, HICACHE_WRITE_POLICIES, eviction_policy_checked
from .reasoning import REASONING_PARSERS
from .tools import TOOL_CALL_PARSERS

# Without a preset: capacity that never limits a test or a benchmark.
DEFAULT_MAX_RUNNING_REQUESTS = 4096
# --schedule-policy (SGLang's SchedulePolicy): the policies that match every
# waiting request against the cache to order the queue, and the others.
CACHE_AWARE_POLICIES = ("lpm", "dfs-weight", "hrrn", "shortest-prefill-first")
SCHEDULE_POLICIES = CACHE_AWARE_POLICIES + ("fcfs", "lof", "random", "routing-key")
DEFAULT_MAX_TOTAL_TOKENS = 1_000_000
DEFAULT_CHUNKED_PREFILL_SIZE = 8192


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str = "demo-llm"
    model_path: str = "demo/demo-llm"
    context_length: int = 8192  # tokens (prompt + completion)
    enable_cache_report: bool = False
    # --is-embedding: an embedding model (POST /v1/embeddings; no generation) of
    # `embedding_dim` dimensions.
    is_embedding: bool = False
    embedding_dim: int = 1024
    # The model's Matryoshka representation, as its config gives it (here
    # --json-model-override-args `is_matryoshka` / `matryoshka_dimensions`):
    # whether `dimensions` may shorten its vectors, and to which sizes (None: any).
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None
    api_key: str | None = None
    admin_api_key: str | None = None  # guards /flush_cache, /abort_request, LoRA (un)loading, weight updates
    # --tool-call-parser: chat replies may call the request's tools (`tools.py`).
    tool_call_parser: str | None = None
    # --reasoning-parser: chat replies think first, split into reasoning_content (`reasoning.py`).
    reasoning_parser: str | None = None
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS  # requests decoding or prefilling at once
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS  # KV capacity, tokens: radix cache + running requests
    chunked_prefill_size: int = DEFAULT_CHUNKED_PREFILL_SIZE  # tokens per prefill step; <= 0: no chunking
    schedule_policy: str = "fcfs"  # SCHEDULE_POLICIES
    # --enable-priority-scheduling: under fcfs the queue goes by request
    # `priority` (higher first, or lower with --schedule-low-priority-values-first;
    # none given: last, or --default-priority-value), then arrival; a request
    # that finds every slot taken preempts running ones more than
    # --priority-scheduling-preemption-threshold below it (unless
    # --disable-priority-preemption). Without it, --abort-on-priority-when-disabled
    # refuses requests that give a priority (503).
    enable_priority_scheduling: bool = False
    disable_priority_preemption: bool = False
    default_priority_value: int | None = None
    abort_on_priority_when_disabled: bool = False
    schedule_low_priority_values_first: bool = False
    priority_scheduling_preemption_threshold: int = 10
    # --retraction-policy: whom a full KV retracts first: "length" (the least
    # output, then the longest prompt) or "priority" (the lowest priority, then length).
    retraction_policy: str = "length"
    # --max-queued-requests: a request that would make the waiting queue longer
    # is refused with 503 (under priority scheduling, the least preferred queued
    # one instead, if the newcomer is strictly preferred). None: no limit.
    max_queued_requests: int | None = None
    # --allow-auto-truncate: a prompt too long for the context (or the KV pool)
    # is cut to fit, and max_new_tokens to what is left, instead of refused.
    allow_auto_truncate: bool = False
    # --skip-tokenizer-init: /generate takes input_ids only and answers output ids
    # without text, as a server launched without its tokenizer does.
    skip_tokenizer_init: bool = False
    # --enable-streaming-session: /open_session may open streaming sessions (sessions.Sessions).
    enable_streaming_session: bool = False
    # --weight-version: the version the served weights report (meta_info,
    # /model_info) until an update sets another; --known-model-paths: model
    # paths /update_weights_from_disk may load besides --model-path and existing
    # local directories (the simulator has no weights to look for).
    weight_version: str = "default"
    known_model_paths: tuple[str, ...] = ()
    # SGLang flags without effect here that the launch line gave (HARDWARE_FLAGS).
    hardware_flags: dict = field(default_factory=dict)
    # --dp-size: data-parallel replicas, each a scheduler with its own batch,
    # KV pool and radix cache (max_running_requests and max_total_tokens are
    # each one's); a request goes to the rank a router names (routed_dp_rank),
    # else by --load-balance-method: round_robin (SGLang's default outside PD
    # disaggregation), total_requests or total_tokens (the fewest in flight).
    dp_size: int = 1
    load_balance_method: str = "round_robin"
    # --disable-radix-cache: no prefix caching (SGLang's ChunkCache): every
    # request prefills its whole prompt, its KV is freed when it ends, and the
    # cache-aware schedule policies fall back to fcfs.
    disable_radix_cache: bool = False
    # --page-size: tokens per KV page; the radix cache holds whole pages only,
    # so cached prefixes are multiples of it.
    page_size: int = 1
    # --radix-eviction-policy and its --radix-eviction-policy-config (radix_cache.EVICTION_POLICIES).
    radix_eviction_policy: str = "lru"
    radix_eviction_policy_config: dict | None = None
    # --enable-hierarchical-cache (SGLang's HiCache): a host-memory tier under
    # the device's radix cache (radix_cache.RadixCache), of --hicache-size GB
    # per TP rank (tokens: the bytes over a rank's share of kv_bytes_per_token)
    # or else --hicache-ratio × the device pool; --hicache-write-policy says when nodes are copied to it. A
    # request's prefix found on the host is loaded back before its prefill, at
    # kv_bytes_per_token / host_to_device_bytes_per_s a token (presets give
    # both; 0: free), and counts as cached. --hicache-io-backend and
    # --hicache-mem-layout are accepted and change nothing here.
    enable_hierarchical_cache: bool = False
    hicache_ratio: float = 2.0
    hicache_size: int = 0
    hicache_write_policy: str = "write_through"
    hicache_io_backend: str = "kernel"
    hicache_mem_layout: str = "page_first"
    kv_bytes_per_token: int = 0  # the whole model's (all TP ranks)
    kv_tp_size: int = 1  # the TP ranks sharing it, each with its own host pool
    host_to_device_bytes_per_s: float = 0.0  # all ranks' links together
    preset: str | None = None
    prefill_tokens_per_s: float = 0.0  # 0: prefill is free
    decode_base_ms: float = 0.0  # decode step at batch 1
    decode_per_request_ms: float = 0.0  # extra decode-step time per running request
    time_scale: float = 1.0  # wall seconds per simulated second
    startup_delay_ms: float = 0.0  # /health, /ready answer 503 this long after start
    # /health and /health_generate: SGLang starts a one-token generation, then
    # looks every second (wall) whether the engine has answered, and gives up
    # with 503 after SGLANG_HEALTH_CHECK_TIMEOUT seconds (20);
    # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false makes /health answer at once.
    health_poll_ms: float = 1000.0
    health_check_timeout_s: float = 20.0
    health_generation: bool = True
    # SGLANG_ENABLE_WAITING_PREFIX_REFRESH (default on): the scheduler keeps the
    # cached prefixes of waiting requests recent (engine.WAITING_PREFIX_REFRESH_INTERVAL).
    waiting_prefix_refresh: bool = True
    # KV admission as SGLang's PrefillAdder estimates it: a new request counts
    # its whole output (at most `clip_max_new_tokens`), a running one what it
    # may still write × the new-token ratio (1 with ignore_eos), which starts
    # at `init_new_token_ratio` × `schedule_conservativeness` and falls to
    # `min_new_token_ratio_factor` of that over `new_token_ratio_decay_steps`
    # decode steps; a decode step that finds no KV retracts requests, which
    # frees `retract_decode_steps` tokens for each one left (the
    # SGLANG_INIT_NEW_TOKEN_RATIO, SGLANG_MIN_NEW_TOKEN_RATIO_FACTOR,
    # SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS, SGLANG_RETRACT_DECODE_STEPS and
    # SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION environment variables).
    schedule_conservativeness: float = 1.0
    init_new_token_ratio: float = 0.7
    min_new_token_ratio_factor: float = 0.14
    new_token_ratio_decay_steps: int = 600
    retract_decode_steps: int = 20
    clip_max_new_tokens: int = 4096
    enable_lora: bool = False
    lora_paths: tuple[dict, ...] = ()  # {"lora_name", "lora_path", "pinned"} loaded at start
    max_loras_per_batch: int = 8  # distinct adapters (base model included) in one running batch
    max_loaded_loras: int | None = None  # adapters kept loaded; LRU unpinned ones are evicted
    lora_load_ms: float = 0.0  # simulated latency of loading one adapter
    # The GPU pool's shape (None: inferred from lora_paths) and its eviction
    # policy (lora.LoraRegistry); copying an adapter into it takes its weights'
    # bytes / lora_h2d_bytes_per_s (0: free; presets give the host link's).
    max_lora_rank: int | None = None
    lora_target_modules: tuple[str, ...] | None = None
    lora_eviction_policy: str = "lru"
    lora_h2d_bytes_per_s: float = 0.0
    # Accepted as SGLang has them; they change no simulated figure.
    lora_backend: str = "csgmv"
    max_lora_chunk_size: int = 16
    enable_lora_overlap_loading: bool = False
    seed: int = 0
    # --incremental-streaming-output: a native /generate stream's events carry
    # only the new text and output ids (and their logprob entries), not the whole so far.
    incremental_streaming_output: bool = False
    # --stream-response-default-include-usage: OpenAI streams end with a usage chunk unasked.
    stream_response_default_include_usage: bool = False
    # --stream-interval: streams send the first token at once, then every this many tokens.
    stream_interval: int = 1
    # Natural (EOS) completion length when a request sets no max tokens, in tokens.
    natural_length_min: int = 16
    natural_length_max: int = 64

    def hicache_host_tokens(self) -> int:
        """The host pool of each scheduler, in tokens (0 without a hierarchical cache)."""
        if not self.enable_hierarchical_cache:
            return 0
        if self.hicache_size > 0:
            return int(self.hicache_size * 1e9 * self.kv_tp_size // self.kv_bytes_per_token)
        return int(self.max_total_tokens * self.hicache_ratio)

    def load_back_s_per_token(self) -> float:
        """Simulated seconds to copy one token's KV from the host pool back to the device."""
        if self.kv_bytes_per_token <= 0 or self.host_to_device_bytes_per_s <= 0:
            return 0.0
        return self.kv_bytes_per_token / self.host_to_device_bytes_per_s


@dataclass(slots=True)
class RuntimeSettings:
    """Faults and latencies; every field can be changed through /sim/faults."""

    error_rate: float = 0.0  # fraction of generation requests answered 500 before any token
    crash_after_tokens: int | None = None  # mid-stream error after this many tokens
    hang: bool = False  # accept generation requests, never answer
    unhealthy: bool = False  # /health, /health_generate and /ready answer 503
    ttft_ms: float = 0.0  # fixed time to first token, milliseconds
    itl_ms: float = 0.0  # inter-token latency, milliseconds
    prefill_us_per_token: float = 0.0  # extra prefill-step time per prompt token prefilled, microseconds
    startup_delay_ms: float = 0.0  # setting it restarts a "starting" window: /health 503 for this long

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


# SGLang launch flags about hardware, kernels, parallel topology, weights and
# logging: a launch line written for SGLang (its test helpers always add
# --device) starts the simulator unchanged. They are accepted, reported in
# /server_info as given, and change nothing the simulator models.
# Flags that take a value, with their SGLang defaults (dest names)...
HARDWARE_FLAGS: dict[str, object] = {
    "device": None, "tp_size": 1, "pp_size": 1, "ep_size": 1, "nnodes": 1, "node_rank": 0,
    "base_gpu_id": 0, "gpu_id_step": 1, "dist_init_addr": None, "nccl_port": None, "dist_timeout": None,
    "mem_fraction_static": None, "cpu_offload_gb": 0, "dtype": "auto", "kv_cache_dtype": "auto",
    "quantization": None, "load_format": "auto", "revision": None, "download_dir": None,
    "tokenizer_path": None, "tokenizer_mode": "auto", "tokenizer_worker_num": 1,
    "model_loader_extra_config": "{}", "attention_backend": None, "prefill_attention_backend": None,
    "decode_attention_backend": None, "sampling_backend": None, "mm_attention_backend": None,
    "moe_runner_backend": "auto", "cuda_graph_max_bs": None, "torch_compile_max_bs": 32,
    "watchdog_timeout": 300.0, "log_level_http": None, "log_requests_level": 2,
}
# ...and switches.
HARDWARE_SWITCHES = (
    "trust_remote_code", "disable_cuda_graph", "disable_cuda_graph_padding", "enable_torch_compile",
    "disable_custom_all_reduce", "enable_p2p_check", "enable_nccl_nvls", "enable_symm_mem",
    "disable_flashinfer_autotune", "enable_memory_saver", "enable_deterministic_inference",
    "skip_server_warmup", "log_requests", "show_time_cost", "disable_outlines_disk_cache",
)
# SGLang's longer aliases of some of them.
_HARDWARE_ALIASES = {"tp_size": ["--tensor-parallel-size"], "pp_size": ["--pipeline-parallel-size"],
                     "ep_size": ["--expert-parallel-size"], "dist_init_addr": ["--nccl-init-addr"]}


def hardware_flags_given(args: argparse.Namespace) -> dict[str, object]:
    """The SGLang flags without effect here that the launch line set, by dest name."""
    given = {name: getattr(args, name) for name, default in HARDWARE_FLAGS.items()
             if getattr(args, name) != default}
    given.update({name: True for name in HARDWARE_SWITCHES if getattr(args, name)})
    return given


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inference.sim",
        description="SGLang-protocol simulator: SGLang's HTTP API with a toy model.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--served-model-name", default=None, help="defaults to --model-path")
    parser.add_argument("--model-path", default=None, help="default demo/demo-llm, or the preset's model")
    parser.add_argument("--context-length", type=int, default=None, help="tokens (default 8192, or the preset's)")
    parser.add_argument("--enable-cache-report", action="store_true",
                        help="report usage.prompt_tokens_details.cached_tokens in OpenAI replies")
    parser.add_argument("--skip-tokenizer-init", action="store_true",
                        help="no tokenizer: /generate takes input_ids only and answers without text")
    parser.add_argument("--is-embedding", action="store_true",
                        help="serve an embedding model: POST /v1/embeddings, no generation")
    parser.add_argument("--embedding-dim", type=int, default=1024, help="dimensions of an embedding model's vectors")
    parser.add_argument("--json-model-override-args", default="{}", metavar="JSON",
                        help="overrides of the model's config, as SGLang takes them; the simulator reads "
                             "is_matryoshka and matryoshka_dimensions (an embedding model's `dimensions`)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                        help="parse tool calls out of chat replies, in this model family's format")
    parser.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                        help="a reasoning model: chat replies open with a think block, given as reasoning_content")
    parser.add_argument("--admin-api-key", default=None,
                        help="key for /flush_cache, /abort_request, LoRA loading and weight updates (else --api-key)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="hardware preset for the engine model (capacity and step costs)")
    parser.add_argument("--max-running-requests", type=int, default=None,
                        help=f"requests running at once (default {DEFAULT_MAX_RUNNING_REQUESTS} or the preset's)")
    parser.add_argument("--max-total-tokens", type=int, default=None,
                        help=f"KV-cache capacity in tokens (default {DEFAULT_MAX_TOTAL_TOKENS:,} or the preset's)")
    parser.add_argument("--cache-capacity-tokens", dest="max_total_tokens", type=int,
                        help="deprecated alias of --max-total-tokens")
    parser.add_argument("--chunked-prefill-size", type=int, default=None,
                        help=f"tokens per prefill step; <= 0 disables chunking (default {DEFAULT_CHUNKED_PREFILL_SIZE})")
    parser.add_argument("--schedule-policy", choices=SCHEDULE_POLICIES + ("priority",), default="fcfs",
                        help="the waiting queue's order, as SGLang's: fcfs, lpm (longest cached prefix), "
                             "dfs-weight, hrrn, shortest-prefill-first, lof (longest output), random, routing-key")
    parser.add_argument("--enable-priority-scheduling", action="store_true",
                        help="fcfs queues by request priority (higher first), and a request may preempt lower ones")
    parser.add_argument("--disable-priority-preemption", action="store_true",
                        help="priority scheduling orders the queue only")
    parser.add_argument("--default-priority-value", type=int, default=None,
                        help="priority of requests that give none, under priority scheduling")
    parser.add_argument("--abort-on-priority-when-disabled", action="store_true",
                        help="without priority scheduling, refuse requests that give a priority")
    parser.add_argument("--schedule-low-priority-values-first", action="store_true",
                        help="under priority scheduling, lower priority values go first")
    parser.add_argument("--priority-scheduling-preemption-threshold", type=int, default=10,
                        help="how much higher a request's priority must be to preempt a running one")
    parser.add_argument("--retraction-policy", choices=["length", "priority"], default="length",
                        help="whom a full KV retracts first: the least output, or the lowest priority")
    parser.add_argument("--max-queued-requests", type=int, default=None,
                        help="the longest the waiting queue may grow; beyond, requests are refused with 503")
    parser.add_argument("--schedule-conservativeness", type=float, default=1.0,
                        help="scales the share of max_new_tokens reserved for running requests (SGLang's)")
    parser.add_argument("--weight-version", default="default",
                        help="the served weights' version, as meta_info and /model_info report it")
    parser.add_argument("--known-model-paths", nargs="*", default=(), metavar="PATH",
                        help="model paths /update_weights_from_disk may load (besides --model-path and "
                             "existing local directories)")
    parser.add_argument("--dp-size", "--data-parallel-size", dest="dp_size", type=int, default=1,
                        help="data-parallel replicas, each with its own scheduler, KV pool and prefix cache")
    parser.add_argument("--load-balance-method", default="auto",
                        choices=["auto", "round_robin", "total_requests", "total_tokens"],
                        help="how requests without a routed_dp_rank are spread over the data-parallel ranks "
                             "(auto: round_robin)")
    parser.add_argument("--disable-radix-cache", action="store_true",
                        help="no prefix caching: every prompt is prefilled whole and its KV freed when it ends")
    parser.add_argument("--page-size", type=int, default=1,
                        help="tokens per KV page; only whole pages are cached and matched (SGLang's default 1)")
    parser.add_argument("--radix-eviction-policy", choices=EVICTION_POLICIES, default="lru",
                        help="which unused cached prefixes go first when the KV cache is full (as SGLang's)")
    parser.add_argument("--radix-eviction-policy-config", default=None, metavar="JSON",
                        help='the policy\'s settings: slru {"protected_threshold": 2}, '
                             'tlru {"threshold": 4096, "next_prompt_estimate": 512}')
    parser.add_argument("--enable-streaming-session", action="store_true",
                        help="let /open_session open streaming sessions (append-only, one request at a time)")
    parser.add_argument("--enable-hierarchical-cache", "--enable-hicache", dest="enable_hierarchical_cache",
                        action="store_true",
                        help="a host-memory tier under the prefix cache: evicted prefixes stay on the host and "
                             "are loaded back when a request reuses them")
    parser.add_argument("--hicache-ratio", type=float, default=None,
                        help="host pool size over the device pool's (default 2.0)")
    parser.add_argument("--hicache-size", type=int, default=0,
                        help="host pool size in GB; overrides --hicache-ratio (needs a --preset's KV bytes per token)")
    parser.add_argument("--hicache-write-policy", choices=HICACHE_WRITE_POLICIES, default="write_through",
                        help="when prefixes are copied to the host: at their first use, their second "
                             "(write_through_selective), or when evicted (write_back)")
    parser.add_argument("--hicache-io-backend", choices=["direct", "kernel", "kernel_ascend"], default="kernel",
                        help="accepted as SGLang has it (copies are not simulated kernel by kernel)")
    parser.add_argument("--hicache-mem-layout", default="page_first",
                        choices=["layer_first", "page_first", "page_first_direct", "page_first_kv_split", "page_head"],
                        help="accepted as SGLang has it")
    parser.add_argument("--hicache-storage-backend", default=None,
                        help="an L3 storage tier: not simulated, refused")
    parser.add_argument("--prefill-tokens-per-s", type=float, default=None, help="prefill throughput; 0 = free")
    parser.add_argument("--decode-base-ms", type=float, default=None, help="decode step time at batch 1")
    parser.add_argument("--decode-per-request-ms", type=float, default=None,
                        help="extra decode step time per running request")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="wall seconds per simulated second (0.1 runs 10x faster than real time)")
    parser.add_argument("--health-poll-ms", type=float, default=1000.0,
                        help="how often /health looks for the engine's answer (SGLang: every second)")
    parser.add_argument("--startup-delay-ms", type=float, default=0.0,
                        help="/health and /ready answer 503 for this long after start")
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--lora-paths", nargs="+", default=None,
                        help='adapters to load at start: NAME=PATH, PATH, or JSON {"lora_name","lora_path","pinned"}')
    parser.add_argument("--max-loras-per-batch", type=int, default=8)
    parser.add_argument("--max-loaded-loras", type=int, default=None)
    parser.add_argument("--lora-load-ms", type=float, default=0.0, help="simulated latency of loading an adapter")
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="the largest adapter rank the GPU pool holds (default: the --lora-paths adapters')")
    parser.add_argument("--lora-target-modules", nargs="*", default=None,
                        choices=SUPPORTED_TARGET_MODULES + (ALL_TARGET_MODULES,),
                        help="the modules adapters may target (default: the --lora-paths adapters')")
    parser.add_argument("--lora-eviction-policy", choices=LORA_EVICTION_POLICIES, default="lru",
                        help="which adapter leaves a full GPU pool: least recently used, or first in")
    parser.add_argument("--lora-backend", choices=LORA_BACKENDS, default="csgmv",
                        help="accepted as SGLang has it (kernels are not simulated)")
    parser.add_argument("--max-lora-chunk-size", type=int, default=16,
                        help="accepted as SGLang has it (a power of 2 from 16 to 128)")
    parser.add_argument("--enable-lora-overlap-loading", action="store_true",
                        help="accepted as SGLang has it (copies into the GPU pool are not overlapped)")
    parser.add_argument("--seed", "--random-seed", dest="seed", type=int, default=0,
                        help="seeds the replies (SGLang's name: --random-seed)")
    parser.add_argument("--incremental-streaming-output", action="store_true",
                        help="native /generate streams send each event's new text and output ids only")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="stream the first token at once, then every this many tokens (SGLang's default 1)")
    parser.add_argument("--allow-auto-truncate", action="store_true",
                        help="cut prompts too long for the context or the KV pool (and max_new_tokens) "
                             "instead of refusing them")
    parser.add_argument("--stream-response-default-include-usage", action="store_true",
                        help="OpenAI streams end with a usage chunk even when stream_options do not ask")
    parser.add_argument("--enable-metrics", action="store_true",
                        help="accepted for SGLang's launch lines; the simulator always serves /metrics")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--prefill-us-per-token", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--crash-after-tokens", type=int, default=None)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--unhealthy", action="store_true")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    hardware = parser.add_argument_group(
        "SGLang flags without effect here", "hardware, kernels, parallelism, weights and logging: accepted so "
        "that SGLang launch lines run unchanged, and reported in /server_info")
    for name, default in HARDWARE_FLAGS.items():
        kind = type(default) if default is not None else str
        if name in ("mem_fraction_static", "watchdog_timeout"):
            kind = float
        elif name in ("cuda_graph_max_bs", "nccl_port", "dist_timeout"):
            kind = int
        hardware.add_argument(f"--{name.replace('_', '-')}", *_HARDWARE_ALIASES.get(name, ()), dest=name,
                              type=kind, default=default, help=argparse.SUPPRESS)
    for name in HARDWARE_SWITCHES:
        hardware.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_lora_path_spec(spec: str) -> dict:
    """SGLang's --lora-paths forms: NAME=PATH, PATH (name = path), or a JSON object."""
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            entry = json.loads(spec)
        except json.JSONDecodeError as error:
            raise ValueError(f"Invalid JSON in --lora-paths: {spec}") from error
        if not isinstance(entry, dict) or not isinstance(entry.get("lora_name"), str) or not isinstance(
                entry.get("lora_path"), str):
            raise ValueError(f"--lora-paths JSON needs string lora_name and lora_path: {spec}")
        return {"lora_name": entry["lora_name"], "lora_path": entry["lora_path"],
                "pinned": bool(entry.get("pinned", False))}
    if "=" in spec:
        name, path = spec.split("=", 1)
        return {"lora_name": name, "lora_path": path, "pinned": False}
    return {"lora_name": spec, "lora_path": spec, "pinned": False}


def _env_number(name: str, default: float, kind: type = float) -> float:
    value = os.environ.get(name, "").strip()
    try:
        return kind(value) if value else default
    except ValueError as error:
        raise SystemExit(f"{name} must be a{'n integer' if kind is int else ' number'}, not {value!r}") from error


def _env_flag(name: str) -> bool:
    """An SGLang boolean environment variable that is on unless set to a false value."""
    return os.environ.get(name, "true").strip().lower() not in ("false", "0", "no", "off")


def _check_lora_args(config: ServerConfig) -> None:
    """SGLang's start-up checks of the LoRA flags (srt/arg_groups/lora_hook.py), its wording."""
    if not config.enable_lora:
        return
    modules = config.lora_target_modules or ()
    if ALL_TARGET_MODULES in modules and len(modules) > 1:
        raise SystemExit("If 'all' is specified in --lora-target-modules, it should be the only module specified.")
    if not config.lora_paths and not (config.max_lora_rank and modules):
        raise SystemExit("When no initial --lora-paths is provided, you need to specify both --max-lora-rank and "
                         "--lora-target-modules for LoRA initialization.")
    if config.max_loaded_loras is not None:
        if config.max_loaded_loras < config.max_loras_per_batch:
            raise SystemExit("max_loaded_loras should be greater than or equal to max_loras_per_batch. "
                             f"max_loaded_loras={config.max_loaded_loras}, "
                             f"max_loras_per_batch={config.max_loras_per_batch}")
        if len(config.lora_paths) > config.max_loaded_loras:
            raise SystemExit("The number of LoRA paths should not exceed max_loaded_loras. "
                             f"max_loaded_loras={config.max_loaded_loras}, lora_paths={len(config.lora_paths)}")
    chunk = config.max_lora_chunk_size
    if not (16 <= chunk <= 128 and chunk & (chunk - 1) == 0):
        raise SystemExit("--max-lora-chunk-size must be a power of 2 between 16 and 128.")


def _matryoshka(override_args: str) -> tuple[bool, tuple[int, ...] | None]:
    """(is_matryoshka, matryoshka_dimensions) from --json-model-override-args, as
    SGLang's ModelConfig reads them: a list of dimensions makes a model Matryoshka."""
    try:
        overrides = json.loads(override_args)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--json-model-override-args: {error}") from error
    if not isinstance(overrides, dict):
        raise SystemExit("--json-model-override-args must be a JSON object")
    dimensions = overrides.get("matryoshka_dimensions")
    if dimensions is not None and not (isinstance(dimensions, list) and all(
            isinstance(size, int) and not isinstance(size, bool) for size in dimensions)):
        raise SystemExit("--json-model-override-args: matryoshka_dimensions must be a list of integers")
    return bool(dimensions) or bool(overrides.get("is_matryoshka", False)), tuple(dimensions) if dimensions else None


def configs_from_args(args: argparse.Namespace) -> tuple[ServerConfig, RuntimeSettings]:
    preset = PRESETS[args.preset] if args.preset else None

    def pick(value, preset_field: str, default):
        if value is not None:
            return value
        return getattr(preset, preset_field) if preset is not None else default

    context_length = pick(args.context_length, "context_length", 8192)
    model_path = pick(args.model_path, "model_path", "demo/demo-llm")
    if context_length <= 0:
        raise SystemExit("--context-length must be positive")
    is_matryoshka, matryoshka_dimensions = _matryoshka(args.json_model_override_args)
    if args.time_scale <= 0:
        raise SystemExit("--time-scale must be positive")
    try:
        lora_paths = tuple(parse_lora_path_spec(spec) for spec in args.lora_paths or ())
    except ValueError as error:
        raise SystemExit(str(error)) from error
    if args.schedule_policy not in SCHEDULE_POLICIES:  # in SGLang's choices, refused at start
        raise SystemExit(f"Unknown schedule_policy: policy={args.schedule_policy!r}")
    schedule_policy = args.schedule_policy
    if args.disable_radix_cache and schedule_policy in CACHE_AWARE_POLICIES:
        # SGLang's SchedulePolicy without a tree to match against.
        if schedule_policy == "shortest-prefill-first":
            raise SystemExit("Experimental shortest-prefill-first requires prefix caching")
        schedule_policy = "fcfs"
    if args.page_size < 1:
        raise SystemExit("--page-size must be positive")
    if args.enable_hierarchical_cache and args.disable_radix_cache:
        raise SystemExit("The arguments enable-hierarchical-cache and disable-radix-cache are mutually exclusive "
                         "and cannot be used at the same time. Please use only one of them.")
    if args.hicache_storage_backend is not None:
        raise SystemExit("--hicache-storage-backend: an L3 storage tier is not simulated")
    hicache_ratio = 2.0 if args.hicache_ratio is None else args.hicache_ratio
    if args.enable_hierarchical_cache and (not math.isfinite(hicache_ratio) or hicache_ratio <= 0
                                           or args.hicache_size < 0):
        raise SystemExit("--hicache-ratio must be positive and --hicache-size non-negative")
    if args.enable_hierarchical_cache and args.hicache_size > 0 and preset is None:
        raise SystemExit("--hicache-size needs a --preset: its KV bytes per token turn gigabytes into tokens "
                         "(or give --hicache-ratio)")
    if args.dp_size < 1:
        raise SystemExit("--dp-size must be positive")
    policy_config = None
    if args.radix_eviction_policy_config is not None:
        try:
            policy_config = json.loads(args.radix_eviction_policy_config)
        except json.JSONDecodeError as error:
            raise SystemExit(f"--radix-eviction-policy-config is not JSON: {error}") from error
        if not isinstance(policy_config, dict):
            raise SystemExit("--radix-eviction-policy-config must be a JSON object")
    try:
        eviction_policy_checked(args.radix_eviction_policy, policy_config)
    except ValueError as error:
        raise SystemExit(str(error)) from error
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name or model_path,
        model_path=model_path,
        context_length=context_length,
        enable_cache_report=args.enable_cache_report,
        is_embedding=args.is_embedding,
        embedding_dim=args.embedding_dim,
        is_matryoshka=is_matryoshka,
        matryoshka_dimensions=matryoshka_dimensions,
        api_key=args.api_key,
        admin_api_key=args.admin_api_key,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        max_running_requests=pick(args.max_running_requests, "max_running_requests", DEFAULT_MAX_RUNNING_REQUESTS),
        max_total_tokens=pick(args.max_total_tokens, "max_total_tokens", DEFAULT_MAX_TOTAL_TOKENS),
        chunked_prefill_size=pick(args.chunked_prefill_size, "chunked_prefill_size", DEFAULT_CHUNKED_PREFILL_SIZE),
        schedule_policy=schedule_policy,
        enable_priority_scheduling=args.enable_priority_scheduling,
        disable_priority_preemption=args.disable_priority_preemption,
        default_priority_value=args.default_priority_value,
        abort_on_priority_when_disabled=args.abort_on_priority_when_disabled,
        schedule_low_priority_values_first=args.schedule_low_priority_values_first,
        priority_scheduling_preemption_threshold=args.priority_scheduling_preemption_threshold,
        retraction_policy=args.retraction_policy,
        max_queued_requests=args.max_queued_requests,
        allow_auto_truncate=args.allow_auto_truncate,
        skip_tokenizer_init=args.skip_tokenizer_init,
        weight_version=args.weight_version,
        known_model_paths=tuple(args.known_model_paths),
        dp_size=args.dp_size,
        load_balance_method="round_robin" if args.load_balance_method == "auto" else args.load_balance_method,
        disable_radix_cache=args.disable_radix_cache,
        page_size=args.page_size,
        radix_eviction_policy=args.radix_eviction_policy,
        radix_eviction_policy_config=policy_config,
        enable_streaming_session=args.enable_streaming_session,
        enable_hierarchical_cache=args.enable_hierarchical_cache,
        hicache_ratio=hicache_ratio,
        hicache_size=args.hicache_size,
        hicache_write_policy=args.hicache_write_policy,
        hicache_io_backend=args.hicache_io_backend,
        hicache_mem_layout=args.hicache_mem_layout,
        kv_bytes_per_token=preset.kv_bytes_per_token if preset is not None else 0,
        kv_tp_size=preset.tp_size if preset is not None else 1,
        host_to_device_bytes_per_s=preset.lora_h2d_bytes_per_s if preset is not None else 0.0,
        preset=args.preset,
        prefill_tokens_per_s=pick(args.prefill_tokens_per_s, "prefill_tokens_per_s", 0.0),
        decode_base_ms=pick(args.decode_base_ms, "decode_base_ms", 0.0),
        decode_per_request_ms=pick(args.decode_per_request_ms, "decode_per_request_ms", 0.0),
        time_scale=args.time_scale,
        startup_delay_ms=args.startup_delay_ms,
        health_poll_ms=args.health_poll_ms,
        health_check_timeout_s=_env_number("SGLANG_HEALTH_CHECK_TIMEOUT", 20.0),
        health_generation=_env_flag("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"),
        waiting_prefix_refresh=_env_flag("SGLANG_ENABLE_WAITING_PREFIX_REFRESH"),
        schedule_conservativeness=args.schedule_conservativeness,
        init_new_token_ratio=_env_number("SGLANG_INIT_NEW_TOKEN_RATIO", 0.7),
        min_new_token_ratio_factor=_env_number("SGLANG_MIN_NEW_TOKEN_RATIO_FACTOR", 0.14),
        new_token_ratio_decay_steps=_env_number("SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS", 600, int),
        retract_decode_steps=_env_number("SGLANG_RETRACT_DECODE_STEPS", 20, int),
        clip_max_new_tokens=_env_number("SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION", 4096, int),
        enable_lora=args.enable_lora or bool(lora_paths),  # --lora-paths implies --enable-lora
        lora_paths=lora_paths,
        max_loras_per_batch=args.max_loras_per_batch,
        max_loaded_loras=args.max_loaded_loras,
        lora_load_ms=args.lora_load_ms,
        max_lora_rank=args.max_lora_rank,
        lora_target_modules=tuple(args.lora_target_modules) if args.lora_target_modules else None,
        lora_eviction_policy=args.lora_eviction_policy,
        lora_h2d_bytes_per_s=preset.lora_h2d_bytes_per_s if preset is not None else 0.0,
        lora_backend=args.lora_backend,
        max_lora_chunk_size=args.max_lora_chunk_size,
        enable_lora_overlap_loading=args.enable_lora_overlap_loading,
        seed=args.seed,
        incremental_streaming_output=args.incremental_streaming_output,
        stream_response_default_include_usage=args.stream_response_default_include_usage,
        stream_interval=args.stream_interval,
        hardware_flags=hardware_flags_given(args),
    )
    for name in ("max_running_requests", "max_total_tokens", "max_loras_per_batch", "embedding_dim",
                 "stream_interval", "new_token_ratio_decay_steps", "clip_max_new_tokens"):
        if getattr(server_config, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    for name in ("prefill_tokens_per_s", "decode_base_ms", "decode_per_request_ms", "startup_delay_ms",
                 "lora_load_ms", "health_poll_ms", "health_check_timeout_s", "schedule_conservativeness",
                 "init_new_token_ratio", "min_new_token_ratio_factor", "retract_decode_steps"):
        value = getattr(server_config, name)
        if not math.isfinite(value) or value < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be a non-negative number")
    if server_config.max_queued_requests is not None and server_config.max_queued_requests < 0:
        raise SystemExit("--max-queued-requests must not be negative")
    if server_config.max_loaded_loras is not None and server_config.max_loaded_loras <= 0:
        raise SystemExit("--max-loaded-loras must be positive")
    _check_lora_args(server_config)
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
            "startup_delay_ms": args.startup_delay_ms,
        })
    except ValueError as error:
        raise SystemExit(str(error)) from error
    return server_config, settings

