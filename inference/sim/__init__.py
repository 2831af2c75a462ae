"""SGLang-protocol simulator: SGLang's HTTP API in front of a toy model.

Run with ``python -m inference.sim --port 30000``. Used as an upstream for
gateway tests and benchmarks, and as a worker behind the real sglang-router.
Only the standard library, aiohttp and orjson (uvloop if present) are used:
no Django, no sglang.

Modules:
- ``config``: command-line arguments and runtime-mutable fault settings;
- ``presets``: hardware presets (H100 / Llama-3.1 8B and 70B) with their sources;
- ``tokenizer``: deterministic tokenizer, chat template, pseudo-text;
- ``radix_cache``: radix tree over token ids (prefix cache; LRU eviction, or SGLang's other policies);
- ``timing``: step costs of the batching engine and the simulated clock (``--time-scale``);
- ``engine``: continuous-batching scheduler: waiting queue, KV capacity, chunked prefill, aborts;
- ``lora``: LoRA adapters: validation, loaded set with LRU eviction, per-request resolution;
- ``protocol``: SGLang/OpenAI request parsing and response shapes;
- ``metrics``: /sim/stats counters and Prometheus text;
- ``http_server``: the aiohttp application;
- ``cli``: process entry point.
"""

__version__ = "0.1.0"
