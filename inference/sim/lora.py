"""LoRA adapters: validation on disk, the loaded set with LRU eviction, per-request resolution.

Mirrors SGLang 0.5.23 (`srt/lora/lora_registry.py`, `srt/lora/lora_manager.py`,
`srt/managers/tokenizer_control_mixin.py`, `tokenizer_manager._resolve_lora_path`):
- every adapter ever loaded is remembered by name (SGLang's `lora_ref_cache`);
  a request for one that is no longer loaded (evicted or unloaded) reloads it
  transparently, paying the load latency again;
- at most `max_loaded_loras` adapters stay loaded; after a load the least
  recently used unpinned one is evicted;
- pinned adapters may not take every per-batch slot (max_loras_per_batch - 1).

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
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

WEIGHT_FILE_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

LORA_DISABLED_MESSAGE = "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."


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
    target_modules: tuple[str, ...]
    base_model: str | None


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
    if not any(os.path.isfile(os.path.join(path, weights)) for weights in WEIGHT_FILE_NAMES):
        raise LoraError(f"Cannot find any model weights with `{path}`")
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    return LoraAdapter(name=name, path=path, pinned=pinned, rank=int(rank), alpha=float(alpha),
                       target_modules=tuple(str(module) for module in target_modules or ()),
                       base_model=config.get("base_model_name_or_path"))


class LoraRegistry:
    def __init__(self, *, enabled: bool, max_loras_per_batch: int, max_loaded_loras: int | None,
                 load_delay: Callable[[], Awaitable[None]]) -> None:
        self.enabled = enabled
        self.max_loras_per_batch = max_loras_per_batch
        self.max_loaded_loras = max_loaded_loras
        self._load_delay = load_delay  # simulated load latency (scaled by the caller)
        self._known: dict[str, LoraAdapter] = {}  # every adapter ever loaded, by name
        self._loaded: OrderedDict[str, LoraAdapter] = OrderedDict()  # least recently used first
        self._update_lock = asyncio.Lock()  # SGLang's lora_update_lock: one load/unload at a time
        self.loads_total = 0  # loads that succeeded, explicit and implicit
        self.reloads_total = 0  # implicit reloads of evicted/unloaded adapters by a request
        self.evictions_total = 0

    # ------------------------------------------------------------------ queries

    def loaded_adapters(self) -> dict[str, str]:
        return {name: adapter.path for name, adapter in self._loaded.items()}

    def loaded(self) -> list[LoraAdapter]:
        return list(self._loaded.values())

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

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
        }

    # ------------------------------------------------------------------ updates

    def preload(self, *, name: str, path: str, pinned: bool) -> None:
        """--lora-paths at start: no latency; raises LoraError."""
        adapter = self._validate_new(name=name, path=path, pinned=pinned)
        self._register(adapter)
        self._evict_over_limit()

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
            return self.loaded_adapters()

    async def resolve(self, name: str) -> LoraAdapter:
        """The adapter a request names; reloads it if it was evicted. Raises LoraError."""
        if not self.enabled:
            raise LoraError(
                f"LoRA adapter '{name}' was requested, but LoRA is not enabled. "
                "Please launch the server with --enable-lora flag and preload adapters "
                "using --lora-paths or /load_lora_adapter endpoint.")
        adapter = self._loaded.get(name)
        if adapter is None:
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
            adapter = self._loaded.get(name, known)
        if name in self._loaded:
            self._loaded.move_to_end(name)  # most recently used
        return adapter

    # ------------------------------------------------------------------ internals

    def _validate_new(self, *, name: str, path: str, pinned: bool) -> LoraAdapter:
        if name in self._loaded:
            raise LoraError(f"Failed to load LoRA adapter {name} because it is already loaded")
        adapter = adapter_read(name=name, path=path, pinned=pinned)
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
            self.evictions_total += 1
