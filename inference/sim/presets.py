"""Hardware presets: what one SGLang server on real GPUs can hold and how fast it steps.

A preset fixes the engine model's capacity (max running requests, KV-cache
tokens, chunked-prefill size) and its step costs (prefill throughput, decode
step time as a function of batch size); `--preset NAME` applies one, and any
explicit flag overrides a single figure. See `timing.StepCosts` for how the
figures become step durations.

Where each figure comes from (sources are cited next to the constants):
- KV bytes per token: from the model config (layers × KV heads × head dim ×
  2 for K and V × 2 bytes for BF16);
- KV capacity: SGLang 0.5.23's own memory rule (`srt/arg_groups/memory_hook.py`:
  `mem_fraction_static = (gpu_mem - reserved_mem) / gpu_mem`, with
  `reserved_mem = 512 + 1.5 × chunked_prefill_size + tp/8 × 1024 +
  2 × cuda_graph_max_bs` MiB, at least 10 GiB on GPUs over 60 GiB), minus the
  weights — an estimate, because the real server also profiles free memory;
- max running requests: SGLang's default (`srt/model_executor/pool_configurator.py`,
  `_resolve_max_running_requests_per_worker`): clamp(tokens / context × 512,
  2048, 4096), at most tokens / 2;
- decode step: the weight read at H100 HBM3 bandwidth (an estimate) as the
  batch-1 cost, plus a per-request slope taken from NVIDIA's published NIM
  concurrency sweeps;
- prefill throughput: an estimate from H100 dense BF16 peak and a typical
  model-FLOPs utilisation for large prefill chunks; no directly comparable
  SGLang measurement was found.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024

# NVIDIA H100 SXM5 80 GB: `nvidia-smi` reports 81,559 MiB of memory.
H100_MEMORY_MIB = 81_559
# H100 SXM5 datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16 (1,979 with sparsity).
H100_HBM_BYTES_PER_S = 3.35e12
H100_BF16_DENSE_FLOPS = 989e12
# Fraction of peak HBM bandwidth a decode step's weight read achieves (estimate:
# well-tuned GEMV/GEMM kernels reach 75-85 % of peak on H100).
HBM_EFFICIENCY = 0.8

# The H100 SXM5's host link is PCIe 5.0 x16 (datasheet): 32 GT/s × 16 lanes with
# 128b/130b coding ≈ 63 GB/s each way. SGLang keeps adapters' CPU weights in
# pinned memory (srt/lora/mem_pool.py), so a copy into the GPU pool runs near
# that; estimate 80 % of it.
H100_HOST_TO_DEVICE_BYTES_PER_S = 0.8 * 63e9

# SGLang 0.5.23 defaults for GPUs of 60-90 GiB (`memory_hook.py`):
# chunked_prefill_size 8k; decode CUDA-graph max batch 256 when tp < 4, else 512.
SGLANG_H100_CHUNKED_PREFILL = 8192


@dataclass(frozen=True, slots=True)
class EnginePreset:
    name: str
    description: str
    model_path: str
    context_length: int  # tokens
    max_running_requests: int
    max_total_tokens: int  # KV-cache capacity, tokens (radix cache + running requests)
    chunked_prefill_size: int  # tokens per prefill step
    prefill_tokens_per_s: float  # uncached prompt tokens prefilled per second
    decode_base_ms: float  # one decode step with a batch of 1, milliseconds
    decode_per_request_ms: float  # extra decode-step time per running request, milliseconds
    kv_bytes_per_token: int  # whole model (all TP ranks), bytes
    sources: tuple[str, ...]
    tp_size: int = 1  # tensor-parallel ranks: each keeps 1/tp of every token's KV (and its own host pool)
    # Copying a LoRA adapter's weights into the GPU pool (each TP rank copies its
    # shard over its own link, so the whole adapter moves at one link's rate × tp).
    lora_h2d_bytes_per_s: float = H100_HOST_TO_DEVICE_BYTES_PER_S


def kv_bytes_per_token(*, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token."""
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def sglang_kv_capacity_tokens(*, weight_bytes: float, kv_bytes: int, tp_size: int,
                              chunked_prefill_size: int, cuda_graph_max_bs: int,
                              gpu_memory_mib: int = H100_MEMORY_MIB) -> int:
    """KV-cache tokens SGLang 0.5.23 would allocate by default (estimate).

    Per GPU: static memory = gpu_mem × mem_fraction_static; KV = static − weights/tp;
    tokens = KV / (kv_bytes / tp) (KV heads are split across TP ranks).
    """
    reserved_mib = 512 + 1.5 * chunked_prefill_size + tp_size / 8 * 1024 + 2 * cuda_graph_max_bs
    reserved_mib = max(reserved_mib, 10 * 1024)
    mem_fraction_static = round((gpu_memory_mib - reserved_mib) / gpu_memory_mib, 3)
    static_bytes = gpu_memory_mib * MIB * mem_fraction_static
    kv_bytes_per_gpu = static_bytes - weight_bytes / tp_size
    return int(kv_bytes_per_gpu // (kv_bytes / tp_size))


def sglang_default_max_running_requests(*, max_total_tokens: int, context_length: int) -> int:
    estimated = int(max_total_tokens / context_length * 512)
    return min(max(min(estimated, 4096), 2048), max_total_tokens // 2)


def _h100_8b() -> EnginePreset:
    # Llama-3.1-8B (HF config): 32 layers, 8 KV heads, head dim 128, 8.03 B
    # parameters, 131,072-token context. BF16 → 128 KiB of KV per token.
    kv = kv_bytes_per_token(layers=32, kv_heads=8, head_dim=128)
    weight_bytes = 8.03e9 * 2
    tokens = sglang_kv_capacity_tokens(weight_bytes=weight_bytes, kv_bytes=kv, tp_size=1,
                                       chunked_prefill_size=SGLANG_H100_CHUNKED_PREFILL, cuda_graph_max_bs=256)
    context = 131_072
    return EnginePreset(
        name="h100-8b",
        description="one H100 SXM 80 GB, Llama-3.1-8B-Instruct in BF16, SGLang defaults",
        model_path="meta-llama/Llama-3.1-8B-Instruct",
        context_length=context,
        max_running_requests=sglang_default_max_running_requests(max_total_tokens=tokens, context_length=context),
        max_total_tokens=tokens,  # ≈ 422,000 tokens (mem_fraction_static 0.835)
        chunked_prefill_size=SGLANG_H100_CHUNKED_PREFILL,
        # Estimate: 989 TFLOP/s × 50 % MFU / (2 × 8.03e9 FLOP per token) ≈ 30,800 tokens/s.
        prefill_tokens_per_s=30_000.0,
        # Estimate: 16.06 GB of weights / (3.35 TB/s × 0.8) ≈ 6.0 ms per step at batch 1.
        decode_base_ms=round(weight_bytes / (H100_HBM_BYTES_PER_S * HBM_EFFICIENCY) * 1e3, 2),
        # NVIDIA NIM benchmarking (docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance,
        # Llama-3.1-8b-instruct, NIM 1.8.0): ITL 4.63 ms at concurrency 1, 5.91 ms at 50,
        # 7.57 ms at 100, 12.65 ms at 200 → (7.57 − 4.63) / 99 ≈ 0.030 ms per request up to
        # 100; beyond that the table also contains prefill interference, which the engine
        # models separately. (NIM's batch-1 ITL of 4.63 ms is below the BF16 weight-read
        # floor of 4.8 ms, so that run was not BF16 TP1; only its slope is used.)
        decode_per_request_ms=0.03,
        kv_bytes_per_token=kv,
        sources=(
            "SGLang 0.5.23 srt/arg_groups/memory_hook.py (mem_fraction_static, chunked_prefill_size 8192)",
            "SGLang 0.5.23 srt/model_executor/pool_configurator.py (default max running requests)",
            "NVIDIA H100 SXM5 datasheet (3.35 TB/s HBM3, 989 TFLOP/s dense BF16, PCIe 5.0 x16 host link)",
            "NVIDIA NIM LLM benchmarking 1.0.0, Llama-3.1-8b-instruct concurrency sweep (ITL slope)",
        ),
    )


def _8xh100_70b() -> EnginePreset:
    # Llama-3.1-70B (HF config): 80 layers, 8 KV heads, head dim 128, 70.55 B
    # parameters. BF16 → 320 KiB of KV per token, 40 KiB per rank at TP8.
    kv = kv_bytes_per_token(layers=80, kv_heads=8, head_dim=128)
    weight_bytes = 70.55e9 * 2
    tp = 8
    tokens = sglang_kv_capacity_tokens(weight_bytes=weight_bytes, kv_bytes=kv, tp_size=tp,
                                       chunked_prefill_size=SGLANG_H100_CHUNKED_PREFILL, cuda_graph_max_bs=512)
    context = 131_072
    return EnginePreset(
        name="8xh100-70b",
        description="eight H100 SXM 80 GB (TP8, NVLink), Llama-3.1-70B-Instruct in BF16, SGLang defaults",
        model_path="meta-llama/Llama-3.1-70B-Instruct",
        context_length=context,
        max_running_requests=sglang_default_max_running_requests(max_total_tokens=tokens, context_length=context),
        max_total_tokens=tokens,  # ≈ 1.28 M tokens (mem_fraction_static 0.818 per GPU)
        chunked_prefill_size=SGLANG_H100_CHUNKED_PREFILL,
        # Estimate: 8 × 989 TFLOP/s × 40 % MFU (TP all-reduces cost more than at TP1)
        # / (2 × 70.55e9 FLOP per token) ≈ 22,400 tokens/s.
        prefill_tokens_per_s=22_000.0,
        # Estimate: 17.6 GB of weights per rank / (3.35 TB/s × 0.8) ≈ 6.6 ms, plus
        # 160 all-reduces per step (2 per layer) at ≈ 12 µs each ≈ 1.9 ms → 8.5 ms.
        decode_base_ms=8.5,
        # NVIDIA NIM benchmarking 1.0.0, Llama-3.1-70b-instruct (NIM 1.3.0): ITL 13.21 ms at
        # concurrency 1, 17.42 ms at 50, 23.28 ms at 100 → ≈ 0.10 ms per request.
        # Cross-check with SGLang's own v0.3 run on 4×H100 (TP4, fewer ranks than this
        # preset): median ITL 21.67 ms at 4 req/s, 24.45 ms at 8 req/s
        # (sgl-project/sglang benchmark/benchmark_vllm_060/README.md).
        decode_per_request_ms=0.10,
        kv_bytes_per_token=kv,
        lora_h2d_bytes_per_s=H100_HOST_TO_DEVICE_BYTES_PER_S * tp,
        tp_size=tp,
        sources=(
            "SGLang 0.5.23 srt/arg_groups/memory_hook.py (mem_fraction_static, chunked_prefill_size 8192)",
            "SGLang 0.5.23 srt/model_executor/pool_configurator.py (default max running requests)",
            "NVIDIA H100 SXM5 datasheet (3.35 TB/s HBM3, 989 TFLOP/s dense BF16, PCIe 5.0 x16 host link)",
            "NVIDIA NIM LLM benchmarking 1.0.0, Llama-3.1-70b-instruct concurrency sweep (ITL slope)",
            "sgl-project/sglang benchmark/benchmark_vllm_060/README.md (70B on 4xH100 ITL)",
        ),
    )


PRESETS: dict[str, EnginePreset] = {preset.name: preset for preset in (_h100_8b(), _8xh100_70b())}
