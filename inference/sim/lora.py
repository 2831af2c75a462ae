"""LoRA adapters: validation on disk, the loaded set with LRU eviction, per-request resolution.

Mirrors SGLang 0.5.23 (`srt/lora/lora_registry.py`, `srt/lora/lora_manager.py`,
`srt/managers/tokenizer_control_mixin.py`, `tokenizer_manager._resolve_lora_path`):
- every adapter ever loaded is remembered by name (SGLang's `lora_ref_cache`);
  a request for one that is no longer loaded (evicted or unloaded) reloads it
  transparently, paying the load latency again;
- at most `max_loaded_loras` adapters stay loaded; after a load the least
  recently used unpinned one is evicted;
- pinned adapters may not take every per-batch slot (max_loras_per_batch - 1);
- the GPU memory pool (`LoraRegistry.batch_fits`, `fetch`; SGLang's
  `srt/lora/mem_pool.py` and `eviction_policy.py`): `max_loras_per_batch`
  slots, the base model taking one; a batch's adapters are copied into slots
  they do not hold yet, evicting by `--lora-eviction-policy` (`lru`, or `fifo`
  by first use) an unpinned adapter the batch does not use, the base model only
  when nothing else can go; pinned adapters hold their slots;
- the pool's shape (`LoraPoolShape`): the largest rank and the target modules
  (`--max-lora-rank`, `--lora-target-modules`, else inferred from the
  `--lora-paths` adapters); an adapter loaded later must fit it.

An adapter path must be a directory with `adapter_config.json` (keys `r`,
`lora_alpha`, `target_modules`; `base_model_name_or_path` is recorded) and a
weights file (`adapter_model.safetensors` or `adapter_model.bin`). Error
messages are SGLang's; a missing directory gives the `FileNotFoundError` text a
local path produces (SGLang would first try the Hugging Face hub).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

WEIGHT_FILE_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

LORA_DISABLED_MESSAGE = "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."

LORA_EVICTION_POLICIES = ("lru", "fifo")
LORA_BACKENDS = ("triton", "csgmv", "ascend", "torch_native", "triton_v2")
# SGLang 0.5.23's SUPPORTED_LORA_TARGET_MODULES (srt/utils/common.py), and "all".
SUPPORTED_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "kv_a_proj_with_mqa", "q_b_proj",
                            "kv_b_proj", "wq_b", "wk", "weights_proj", "gate_proj", "up_proj", "down_proj",
                            "qkv_proj", "gate_up_proj", "embed_tokens", "lm_head", "qkvr", "wo_ud")
ALL_TARGET_MODULES = "all"
# The LoRA weights SGLang keeps per module name (get_normalized_target_modules):
# q/k/v share qkv_proj, gate/up share gate_up_proj.
_NORMALIZED_MODULE = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj", "vocab_emb": "embed_tokens", "embeddings": "embed_tokens",
    "word_embeddings": "embed_tokens", "output": "lm_head", "unembed_tokens": "lm_head",
    "q_a_proj": "fused_qkv_a_proj_with_mqa", "kv_a_proj_with_mqa": "fused_qkv_a_proj_with_mqa",
    "wq_b": "indexer.wq_b", "wk": "indexer.wk", "weights_proj": "indexer.weights_proj",
}
# What "all" (or an adapter's "all-linear") comes to on the simulated model, a
# Llama-style decoder, as SGLang's auto_detect_lora_target_modules finds them.
MODEL_TARGET_MODULES = frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"})


def normalized_target_modules(modules) -> frozenset[str]:
    """SGLang's get_normalized_target_modules: weight names by module name
    suffix; the strings "all" and "all-linear" stand for every module."""
    if isinstance(modules, str):
        if modules not in ("all", "all-linear"):
            raise LoraError("Only 'all' or 'all-linear' can be used as the string for target module")
        return frozenset({ALL_TARGET_MODULES})
    names = (str(name).split(".")[-1] for name in modules)
    return frozenset(_NORMALIZED_MODULE.get(name, name) for name in names)


@dataclass(frozen=True, slots=True)
class LoraPoolShape:
    """What every adapter the GPU pool holds must fit: a rank of at most
    `max_rank`, target modules among `modules`."""

    max_rank: int
    modules: frozenset[str]

    @classmethod
    def resolved(cls, *, max_rank: int | None, target_modules, adapters: list["LoraAdapter"]) -> "LoraPoolShape":
        """SGLang's init_lora_shapes: the flags' figures, else those of the
        adapters loaded at start (the largest rank, the union of their modules)."""
        if target_modules:
            modules = normalized_target_modules(list(target_modules))
        else:
            modules = frozenset().union(*(adapter.modules for adapter in adapters))
        if ALL_TARGET_MODULES in modules:
            modules = MODEL_TARGET_MODULES
        return cls(max_rank if max_rank else max((adapter.rank for adapter in adapters), default=0), modules)

    def fits(self, adapter: "LoraAdapter") -> bool:
        """mem_pool.can_support."""
        return adapter.rank <= self.max_rank and (
            ALL_TARGET_MODULES in adapter.modules or adapter.modules <= self.modules)


class LoraError(ValueError):
    """A load/unload/resolve failure, with SGLang's message.

    `loaded_adapters_known`: SGLang reports `loaded_adapters` only for failures
    raised by the backend (validation, loading); front-end checks give null.
    """

    def __init__(self, message: str, *, loaded_adapters_known: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.loaded_adapters_known = loaded_adapters_known


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    name: str
    path: str
    pinned: bool
    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str  # as the adapter's config lists them ("all-linear" stays a string)
    base_model: str | None
    weight_bytes: int = 0  # the weights file's size: what a copy into the GPU pool moves

    @property
    def modules(self) -> frozenset[str]:
        return normalized_target_modules(self.target_modules)


def adapter_read(*, name: str, path: str, pinned: bool) -> LoraAdapter:
    """Read and validate an adapter directory like SGLang's LoRAConfig + weight loader."""
    config_path = os.path.join(path, "adapter_config.json")
    try:
        with open(config_path, encoding="utf-8") as config_file:
            config = json.load(config_file)
    except (OSError, json.JSONDecodeError) as error:
        raise LoraError(str(error)) from error
    if not isinstance(config, dict):
        raise LoraError(f"{config_path} must hold a JSON object")
    try:
        target_modules = config["target_modules"]
        rank = config["r"]
        alpha = config["lora_alpha"]
    except KeyError as error:
        raise LoraError(str(error)) from error  # str(KeyError('r')) == "'r'", as SGLang reports it
    if config.get("use_dora"):
        raise LoraError(f"Failed to load {name} because LoRA serving currently doesn't support DoRA adapters")
    weights = next((os.path.join(path, weights) for weights in WEIGHT_FILE_NAMES
                    if os.path.isfile(os.path.join(path, weights))), None)
    if weights is None:
        raise LoraError(f"Cannot find any model weights with `{path}`")
    if not isinstance(target_modules, str):
        target_modules = tuple(str(module) for module in target_modules or ())
    normalized_target_modules(target_modules)  # a string other than all / all-linear is refused
    return LoraAdapter(name=name, path=path, pinned=pinned, rank=int(rank), alpha=float(alpha),
                       target_modules=target_modules, base_model=config.get("base_model_name_or_path"),
                       weight_bytes=os.path.getsize(weights))


class LoraRegistry:
    def __init__(self, *, enabled: bool, max_loras_per_batch: int, max_loaded_loras: int | None,
                 load_delay: Callable[[], Awaitable[None]], eviction_policy: str = "lru") -> None:
        self.enabled = enabled
        self.max_loras_per_batch = max_loras_per_batch
        self.max_loaded_loras = max_loaded_loras
        self._load_delay = load_delay  # simulated load latency (scaled by the caller)
        self._known: dict[str, LoraAdapter] = {}  # every adapter ever loaded, by name
        # Each load's own id (SGLang's lora_id, a uuid4 per load, reloads too): the
        # prefix cache keys on it, so a reloaded adapter finds nothing cached.
        self._load_ids: dict[str, str] = {}
        self._loaded: OrderedDict[str, LoraAdapter] = OrderedDict()  # least recently used first
        self._update_lock = asyncio.Lock()  # SGLang's lora_update_lock: one load/unload at a time
        self.loads_total = 0  # loads that succeeded, explicit and implicit
        self.reloads_total = 0  # implicit reloads of evicted/unloaded adapters by a request
        self.evictions_total = 0
        self.shape: LoraPoolShape | None = None  # set by settle_shape once the start's adapters are in
        # The GPU pool: which adapters (None: the base model) hold its slots, and
        # the eviction policy's order of adapters (lru: last use; fifo: first use).
        self.eviction_policy = eviction_policy
        self._in_gpu: set[str | None] = set()
        self._policy_order: OrderedDict[str, None] = OrderedDict()
        self.gpu_loads_total = 0  # adapters copied into the pool
        self.gpu_evictions_total = 0

    # ------------------------------------------------------------------ queries

    def loaded_adapters(self) -> dict[str, str]:
        return {name: adapter.path for name, adapter in self._loaded.items()}

    def loaded(self) -> list[LoraAdapter]:
        return list(self._loaded.values())

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def load_id(self, name: str) -> str:
        """The id of the adapter's current load (the prefix cache's key)."""
        return self._load_ids[name]

    def weights_of(self, name: str) -> str:
        """What the adapter's weights are (its path): replies follow them, not its name."""
        return os.path.realpath(self._known[name].path)

    @property
    def num_pinned(self) -> int:
        return sum(adapter.pinned for adapter in self._loaded.values())

    def snapshot(self) -> dict:
        return {
            "enabled": self.enabled,
            "loaded": [{"name": a.name, "path": a.path, "pinned": a.pinned, "r": a.rank} for a in self._loaded.values()],
            "known": sorted(self._known),
            "loads_total": self.loads_total,
            "reloads_total": self.reloads_total,
            "evictions_total": self.evictions_total,
            "max_lora_rank": self.shape.max_rank if self.shape else None,
            "target_modules": sorted(self.shape.modules) if self.shape else None,
            "in_gpu": sorted(self._in_gpu, key=lambda uid: (uid is not None, uid or "")),
            "gpu_loads_total": self.gpu_loads_total,
            "gpu_evictions_total": self.gpu_evictions_total,
        }

    # ------------------------------------------------------------------ the GPU pool

    def batch_fits(self, uids: set[str | None]) -> bool:
        """SGLang's validate_lora_batch: the adapters `uids` (None: the base
        model) can run in one batch, beside the slots pinned adapters hold."""
        if len(uids) > self.max_loras_per_batch:
            return False
        pinned = self.num_pinned
        if not pinned:
            return True
        pinned_in_batch = sum(1 for uid in uids if uid is not None and self._loaded.get(uid, None) is not None
                              and self._loaded[uid].pinned)
        return len(uids) - pinned_in_batch <= self.max_loras_per_batch - pinned

    def fetch(self, uids: set[str | None]) -> int:
        """SGLang's prepare_lora_batch for a batch of the adapters `uids` (which
        `batch_fits`): marks them used, copies the ones the pool lacks into
        free slots or ones it evicts. Returns the bytes copied."""
        names = sorted(uid for uid in uids if uid is not None)
        for name in names:
            if self.eviction_policy == "lru":
                self._policy_order.pop(name, None)
            self._policy_order.setdefault(name, None)
        copied = 0
        for uid in ([None] if None in uids else []) + names:
            if uid in self._in_gpu:
                continue
            if len(self._in_gpu) >= self.max_loras_per_batch:
                self._evict_from_gpu(uids)
            self._in_gpu.add(uid)
            if uid is not None:
                copied += self._known[uid].weight_bytes
                self.gpu_loads_total += 1
        return copied

    def _evict_from_gpu(self, batch: set[str | None]) -> None:
        """An adapter the batch does not use and that is not pinned leaves its
        slot, the first in the policy's order; the base model only when no
        adapter can."""
        candidates = {uid for uid in self._in_gpu if uid not in batch and (uid is None or not self._known[uid].pinned)}
        if not candidates:
            raise LoraError("No available buffer slots found. Please ensure the number of active (pinned) loras "
                            "is less than max_loras_per_batch.")
        victim = next((name for name in self._policy_order if name in candidates), None)
        self._drop_from_gpu(victim)
        self.gpu_evictions_total += 1

    def _drop_from_gpu(self, uid: str | None) -> None:
        self._in_gpu.discard(uid)
        if uid is not None:
            self._policy_order.pop(uid, None)

    # ------------------------------------------------------------------ updates

    def preload(self, *, name: str, path: str, pinned: bool) -> None:
        """--lora-paths at start: no latency; raises LoraError."""
        adapter = self._validate_new(name=name, path=path, pinned=pinned)
        self._register(adapter)
        self._evict_over_limit()

    def settle_shape(self, *, max_rank: int | None, target_modules) -> None:
        """The GPU pool's shape, once the start's adapters are loaded (which
        must fit it when the flags give it); raises LoraError."""
        self.shape = LoraPoolShape.resolved(max_rank=max_rank, target_modules=target_modules,
                                            adapters=list(self._loaded.values()))
        for adapter in self._loaded.values():
            modules = adapter.modules
            if target_modules and ALL_TARGET_MODULES not in modules and not modules <= self.shape.modules:
                # LoRAManager's own check of the start's adapters against the flag.
                raise LoraError(
                    f"LoRA adapter '{adapter.name}' contains target modules {sorted(modules - self.shape.modules)} "
                    f"that are not included in the specified --lora-target-modules {sorted(self.shape.modules)}. "
                    "Please update --lora-target-modules to include all required modules: "
                    f"{sorted(self.shape.modules | modules)}, or use 'all' to enable all supported modules.")
            self._check_fits(adapter)

    def _check_fits(self, adapter: LoraAdapter) -> None:
        if self.shape is not None and not self.shape.fits(adapter):
            raise LoraError(
                f"LoRA adapter {adapter.name} with rank {adapter.rank} is incompatible with the current LoRA memory "
                "pool configuration. Please ensure that the LoRA adapter's rank is within the configured "
                "`--max-lora-rank` and that the target modules are included in `--lora-target-modules`.")

    async def load(self, *, name: str, path: str, pinned: bool) -> dict[str, str]:
        """POST /load_lora_adapter. Returns loaded adapters; raises LoraError."""
        if not self.enabled:
            raise LoraError(LORA_DISABLED_MESSAGE, loaded_adapters_known=False)
        async with self._update_lock:
            adapter = self._validate_new(name=name, path=path, pinned=pinned)
            await self._load_delay()
            self._register(adapter)
            self._evict_over_limit()
            return self.loaded_adapters()

    async def unload(self, *, name: str) -> dict[str, str]:
        if not self.enabled:
            raise LoraError(LORA_DISABLED_MESSAGE, loaded_adapters_known=False)
        async with self._update_lock:
            if name not in self._loaded:
                keys = "odict_keys(" + repr(list(self._loaded)) + ")"
                raise LoraError(f"LoRA with name {name} does not exist. Loaded LoRAs: {keys}",
                                loaded_adapters_known=False)
            del self._loaded[name]
            self._drop_from_gpu(name)
            return self.loaded_adapters()

    def _require_enabled(self, name: str) -> None:
        if not self.enabled:
            raise LoraError(
                f"LoRA adapter '{name}' was requested, but LoRA is not enabled. "
                "Please launch the server with --enable-lora flag and preload adapters "
                "using --lora-paths or /load_lora_adapter endpoint.")

    async def resolve_batch(self, names: list[str | None]) -> None:
        """A batch's adapters, as SGLang's tokenizer manager resolves them before
        any prompt runs: no more distinct ones (the base model counted) than
        `max_loaded_loras`; those loaded count as used first, then the evicted
        ones are reloaded. Raises LoraError."""
        first = next((name for name in names if name), None)
        if first is None:
            return
        self._require_enabled(first)
        unique = set(names)
        if self.max_loaded_loras is not None and len(unique) > self.max_loaded_loras:
            raise LoraError(f"Received request with {len(unique)} unique loras requested "
                            f"but max loaded loras is {self.max_loaded_loras}")
        missing = []
        for name in unique:
            if name in self._loaded:
                self._loaded.move_to_end(name)
            elif name is not None:
                missing.append(name)
        for name in missing:
            await self._reload(name)

    async def resolve(self, name: str) -> LoraAdapter:
        """The adapter a request names; reloads it if it was evicted. Raises LoraError."""
        self._require_enabled(name)
        adapter = self._loaded.get(name)
        if adapter is None:
            adapter = await self._reload(name)
        if name in self._loaded:
            self._loaded.move_to_end(name)  # most recently used
        return adapter

    async def _reload(self, name: str) -> LoraAdapter:
        """An adapter loaded before and since evicted or unloaded, loaded again."""
        known = self._known.get(name)
        if known is None:
            keys = "dict_keys(" + repr(list(self._known)) + ")"
            raise LoraError(f"Got LoRA adapter that has never been loaded: {name}\n"
                            f"All loaded adapters: {keys}.")
        async with self._update_lock:
            if name not in self._loaded:  # another request may have reloaded it meanwhile
                await self._load_delay()
                self._register(known)
                self.reloads_total += 1
                self._evict_over_limit()
        return self._loaded.get(name, known)

    # ------------------------------------------------------------------ internals

    def _validate_new(self, *, name: str, path: str, pinned: bool) -> LoraAdapter:
        if name in self._loaded:
            raise LoraError(f"Failed to load LoRA adapter {name} because it is already loaded")
        adapter = adapter_read(name=name, path=path, pinned=pinned)
        self._check_fits(adapter)
        if pinned and self.num_pinned >= self.max_loras_per_batch - 1:
            raise LoraError(
                f"Failed to load LoRA adapter {name} as a pinned adapter. It is not allowed to pin all slots "
                "in the LoRA memory pool to avoid starvation for unpinned adapters and base models. Please increase "
                "your `--max-loras-per-batch` or load it as unpinned LoRA adapters.")
        return adapter

    def _register(self, adapter: LoraAdapter) -> None:
        self._known[adapter.name] = adapter
        self._loaded[adapter.name] = adapter
        self._loaded.move_to_end(adapter.name)
        self._load_ids[adapter.name] = uuid.uuid4().hex
        self.loads_total += 1

    def _evict_over_limit(self) -> None:
        limit = self.max_loaded_loras
        if limit is None:
            return
        while len(self._loaded) > limit:
            victim = next((name for name, adapter in self._loaded.items() if not adapter.pinned), None)
            if victim is None:
                raise LoraError("Didn't find any LoRA adapters when trying to evict LRU LoRA adapter. "
                                f"LoRA registry is: {dict(self._loaded)}")
            del self._loaded[victim]
            self._drop_from_gpu(victim)
            self.evictions_total += 1
