"""SGLang-protocol simulator: SGLang's HTTP API in front of a toy model.

Run with ``python -m inference.sim --port 30000``. Used as an upstream for
gateway tests and benchmarks, and as a worker behind the real sglang-router.
Only the standard library, aiohttp and orjson (uvloop if present) are used:
no Django, no sglang.

Modules:
- ``config``: command-line arguments and runtime-mutable fault settings;
- ``presets``: hardware presets (H100 / Llama-3.1 8B and 70B) with their sources;
- ``tokenizer``: deterministic tokenizer, chat template, pseudo-text;
- ``radix_cache``: radix tree over token ids (prefix cache; LRU eviction, or SGLang's other
  policies; a host-memory tier, SGLang's HiCache);
- ``timing``: step costs of the batching engine and the simulated clock (``--time-scale``);
- ``engine``: continuous-batching scheduler: waiting queue, KV capacity, chunked prefill, aborts;
- ``data_parallel``: ``--dp-size`` ranks and how requests are handed to them;
- ``lora``: LoRA adapters: validation, loaded set with LRU eviction, per-request resolution;
- ``sessions``: SGLang's session control (``/open_session``, ``session_params``);
- ``weights``: the served weights and their in-place updates;
- ``protocol``: SGLang/OpenAI request parsing and response shapes;
- ``metrics``: /sim/stats counters and Prometheus text;
- ``http_server``: the aiohttp application;
- ``cli``: process entry point.
"""

__version__ = "0.1.0"
