"""Choosing a backend from a model's pool.

Interface (all synchronous, no I/O; one instance per pool, used on the event loop):

    routing_key_build(*, endpoint: str, body: dict, namespace: str = "") -> str
        The text prefix matching works on: the chat `tools` and every message
        (role, name, content as string or parts, tool calls) in order, or the
        completion `prompt`; preceded by `namespace`, the LoRA adapter of
        "base:adapter", and any `cache_salt` / `extra_key` in the body.
        namespace = tenant id when the tenant's cache is isolated with
        `cache_salt`, else "" so tenants share identical system prompts.
        A new turn appended to a conversation extends the previous key.

    policy_for(name: str, **options) -> Policy
        name: "round_robin", "least_outstanding" or "cache_aware"
        (`POLICY_NAMES`); options: CacheAware's keyword arguments.

    class Policy(Protocol):
        name: str
        home_lookup(model: ModelEntry, key: str) -> str | None
            The conversation id to ask the shared homes about before `pick`
            (a later turn this process has not routed), or None.
        pick(model, key, *, exclude=frozenset(), home=None) -> BackendState | None
            An available (active, not cooling down) backend whose URL is not in
            `exclude`, or None. `home`: the URL the shared homes gave. May
            advance `model.next_index` (tie rotation).
        observe(model, backend, key) -> str | None
            Call once per request when it is sent to `backend` (right after a
            successful pick, before awaiting the upstream, so that a burst of
            requests with a new prefix sees it). Cache-aware inserts the key into
            the backend's part of the model's prefix tree, evicts LRU leaves
            beyond the backend's KV capacity, and returns the conversation id
            when this placed the conversation (to record in the shared homes).
        usage_observe(model_name, key_chars, prompt_tokens) -> None
            When a request ends with the backend's prompt token count: teaches
            cache-aware the characters per token of the model.
        forget_backend(url: str) -> None
            Call when a backend leaves every pool or restarts (empty cache).

Wiring (`CompletionService._upstream_start`):

    key = routing_key_build(endpoint=request.endpoint, body=request.body,
                            namespace=tenant_id if isolated else "")
    conversation = policy.home_lookup(model, key)
    home = await homes.get(model.name, conversation) if conversation else None
    backend = policy.pick(model, key, exclude=tried, home=home)
    placed = policy.observe(model, backend, key); backend.enter(key_footprint(key))
    if placed and backend.url != home: homes.put(model.name, placed, backend.url)

Build the key once per request, outside the failover loop. `key` must be the
same string object in `pick` and `observe`: cache-aware splits it once.

Modules: `key` (routing keys), `prefix_tree` (the approximate per-model radix
tree over fixed character blocks, with per-backend LRU), `policies` (the
policies and the factory), `homes` (conversation → backend, shared by the
gateway processes in Redis), `sim_multiprocess` (replays a synthetic workload
to compare policies and routing state kept per process, shared homes and one
shared tree: `python -m inference.routing.sim_multiprocess`).

Routing state: each gateway process keeps its own prefix trees and load
counts; where each conversation lives is shared through Redis (one GET for a
later turn the process has not routed itself, one batched SET per
placement). Measured with `bench/run.sh routing` (4 simulators, 64
concurrent conversations, requests spread round robin over 4 gateway
processes so consecutive turns pass through different ones): with shared
homes 86.4 % hit rate against 86.9 % for one process, 99.8 % of later turns
finding their history; with everything per process (GATEWAY_ROUTING_SHARED_HOMES=0)
75.4 %, and 61.3 %, because a process that did not route a conversation's
earlier turns places it by its own view of load. The offline model
(`sim_multiprocess`, seed 1, 4 processes): per process + shared homes 93.9 %,
one shared tree 93.9 %, per process alone 82.0 %, one process 94.3 %. A
shared tree would add Redis work to every request for nothing more.
"""
from .key import routing_key_build
from .policies import POLICY_NAMES, CacheAware, LeastOutstanding, Policy, RoundRobin, key_footprint, policy_for
from .prefix_tree import PrefixTree

__all__ = [
    "key_footprint",
    "POLICY_NAMES",
    "CacheAware",
    "LeastOutstanding",
    "Policy",
    "PrefixTree",
    "RoundRobin",
    "policy_for",
    "routing_key_build",
]
