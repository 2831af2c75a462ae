"""What per-process routing state costs: replays one synthetic workload through
N gateway processes in front of the same backends and reports the backends'
prefix-cache hit rate and a time-to-first-token estimate.

    .venv/bin/python -m inference.routing.sim_multiprocess [--seed 1] [--conversations 600]

Workload (deterministic for a seed): tenants with long system prompts, chosen
with Zipf popularity; some tenants isolated with `cache_salt` (their routing
key and backend cache are namespaced by tenant); conversations that grow turn
by turn, each turn sent after the previous reply plus a think time; requests
spread round-robin over the gateway processes, so consecutive turns of one
conversation usually pass through different processes.

Model of a gateway process: its own `ModelEntry` / `BackendState`s (so its own
outstanding counts) and its own policy instance, or, for "shared tree", one
CacheAware instance used by all processes (what a Redis-held tree would give,
without its latency); "+ shared homes" adds one dict of conversation homes
used as the gateway uses `homes.ConversationHomes` in Redis.

Model of a backend: an exact LRU prefix cache of `backend_cache_chars`
characters (a `PrefixTree` with 64-character pages, standing in for
RadixAttention), filled with the prompt at prefill and with prompt + reply when
the request finishes; one prefill at a time (FIFO), taking `prefill_fixed_s` +
uncached characters / `prefill_chars_per_s`; decoding overlaps other requests.
TTFT = prefill queueing + own prefill.

Hit rate = cached prompt characters / prompt characters, over all requests.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..registry import BackendState, ModelEntry
from .key import routing_key_build
from .policies import CacheAware, Policy, key_footprint, policy_for
from .prefix_tree import PrefixTree

CHAT = "chat.completions"
MODEL = "sim-model"


@dataclass(frozen=True)
class Workload:
    seed: int = 1
    tenants: int = 16
    isolated_fraction: float = 0.5  # tenants whose caches are isolated with cache_salt
    zipf_s: float = 1.1
    conversations: int = 600
    conversations_per_s: float = 2.0
    system_chars: tuple[int, int] = (2_000, 16_000)
    turns_mean: float = 5.0  # geometric
    user_chars: tuple[int, int] = (100, 1_500)
    reply_chars: tuple[int, int] = (200, 2_000)
    think_s_mean: float = 8.0


@dataclass(frozen=True)
class Cluster:
    backends: int = 4
    backend_cache_chars: int = 600_000  # ~150 k tokens of KV per backend
    prefill_chars_per_s: float = 40_000.0  # ~10 k tokens/s
    prefill_fixed_s: float = 0.01
    decode_chars_per_s: float = 200.0  # ~50 tokens/s per request
    page_chars: int = 64


@dataclass
class Conversation:
    tenant: int
    turns: list[tuple[str, str]]  # (user message, assistant reply)
    start_s: float
    messages: list[dict] = field(default_factory=list)
    next_turn: int = 0


@dataclass
class Result:
    label: str
    requests: int
    hit_rate: float
    ttft_mean_s: float
    ttft_p99_s: float
    busiest_backend_share: float

    def row(self) -> str:
        return (f"{self.label:<50} {self.hit_rate:>8.1%} {self.ttft_mean_s * 1000:>9.0f} "
                f"{self.ttft_p99_s * 1000:>9.0f} {self.busiest_backend_share:>9.1%}")


HEADER = f"{'policy / gateway processes / state':<50} {'hit rate':>8} {'TTFT ms':>9} {'p99 ms':>9} {'busiest':>9}"


def _text(rng: random.Random, chars: int) -> str:
    return rng.randbytes(chars // 2 + 1).hex()[:chars]


def workload_build(workload: Workload) -> tuple[list[str], list[bool], list[Conversation]]:
    rng = random.Random(workload.seed)
    systems = [_text(rng, rng.randint(*workload.system_chars)) for _ in range(workload.tenants)]
    isolated = [rng.random() < workload.isolated_fraction for _ in range(workload.tenants)]
    weights = [1 / (rank + 1) ** workload.zipf_s for rank in range(workload.tenants)]
    conversations = []
    now = 0.0
    for _ in range(workload.conversations):
        now += rng.expovariate(workload.conversations_per_s)
        tenant = rng.choices(range(workload.tenants), weights)[0]
        turns = 1
        while rng.random() > 1 / workload.turns_mean:
            turns += 1
        conversations.append(Conversation(
            tenant=tenant,
            turns=[(_text(rng, rng.randint(*workload.user_chars)), _text(rng, rng.randint(*workload.reply_chars)))
                   for _ in range(turns)],
            start_s=now,
        ))
    return systems, isolated, conversations


def simulate(
    *,
    label: str,
    policies: list[Policy],
    workload: Workload,
    cluster: Cluster,
    key_body: Callable[[dict], dict] = lambda body: body,
    homes: dict[str, str] | None = None,
) -> Result:
    """One replay; `policies` has one entry per gateway process (the same
    object repeated = shared state). `key_body` may reduce the body the routing
    key is built from (e.g. to the first message, as sgl-router does).
    `homes`: a dict standing in for the shared conversation homes in Redis
    (`homes.ConversationHomes`), used as the gateway uses it; None: none."""
    systems, isolated, conversations = workload_build(workload)
    urls = [f"http://backend-{index}" for index in range(cluster.backends)]
    processes = [ModelEntry(MODEL, MODEL, 1 << 20, "sim", 0, backends=[BackendState(url) for url in urls])
                 for _ in policies]
    caches = [PrefixTree(block_chars=cluster.page_chars) for _ in urls]
    prefill_free_at = [0.0] * len(urls)
    served = [0] * len(urls)
    rng = random.Random(workload.seed + 1)
    sequence = itertools.count()
    events: list[tuple[float, int, str, object]] = [(c.start_s, next(sequence), "turn", c) for c in conversations]
    heapq.heapify(events)
    next_process = itertools.count()
    prompt_chars = cached_chars = 0
    ttfts: list[float] = []

    def cache_fill(index: int, text: str) -> None:
        caches[index].insert(text, "kv")
        caches[index].evict("kv", cluster.backend_cache_chars)

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "turn":
            conversation = payload
            if not conversation.messages:
                conversation.messages.append({"role": "system", "content": systems[conversation.tenant]})
            user, reply = conversation.turns[conversation.next_turn]
            conversation.messages.append({"role": "user", "content": user})
            namespace = f"tenant-{conversation.tenant}" if isolated[conversation.tenant] else ""
            body = {"model": MODEL, "messages": conversation.messages}
            prompt = routing_key_build(endpoint=CHAT, body=body, namespace=namespace)
            key = routing_key_build(endpoint=CHAT, body=key_body(body), namespace=namespace)
            process = next(next_process) % len(processes)
            model, policy = processes[process], policies[process]
            conversation_id = policy.home_lookup(model, key) if homes is not None else None
            home = homes.get(conversation_id) if conversation_id is not None else None
            backend = policy.pick(model, key, exclude=frozenset(), home=home)
            placed = policy.observe(model, backend, key)
            if placed is not None and homes is not None and backend.url != home:
                homes[placed] = backend.url
            footprint = key_footprint(key)
            backend.enter(footprint)
            index = urls.index(backend.url)
            served[index] += 1
            hit, _ = caches[index].match(prompt)
            prompt_chars += len(prompt)
            cached_chars += hit
            start = max(now, prefill_free_at[index])
            prefill_free_at[index] = start + cluster.prefill_fixed_s + (len(prompt) - hit) / cluster.prefill_chars_per_s
            ttfts.append(prefill_free_at[index] - now)
            cache_fill(index, prompt)
            done = prefill_free_at[index] + len(reply) / cluster.decode_chars_per_s
            heapq.heappush(events, (done, next(sequence), "finish", (conversation, backend, index, namespace, footprint)))
        else:
            conversation, backend, index, namespace, footprint = payload
            backend.leave(footprint)
            _, reply = conversation.turns[conversation.next_turn]
            conversation.messages.append({"role": "assistant", "content": reply})
            body = {"model": MODEL, "messages": conversation.messages}
            cache_fill(index, routing_key_build(endpoint=CHAT, body=body, namespace=namespace))
            conversation.next_turn += 1
            if conversation.next_turn < len(conversation.turns):
                think = rng.expovariate(1 / workload.think_s_mean)
                heapq.heappush(events, (now + think, next(sequence), "turn", conversation))
    ttfts.sort()
    requests = len(ttfts)
    return Result(
        label=label,
        requests=requests,
        hit_rate=cached_chars / prompt_chars if prompt_chars else 0.0,
        ttft_mean_s=sum(ttfts) / requests if requests else 0.0,
        ttft_p99_s=ttfts[min(requests - 1, int(requests * 0.99))] if requests else 0.0,
        busiest_backend_share=max(served) / requests if requests else 0.0,
    )


def _first_message_only(body: dict) -> dict:
    return {**body, "messages": body["messages"][:1]}


def scenarios_run(workload: Workload, cluster: Cluster, *, process_counts: tuple[int, ...] = (1, 4)) -> list[Result]:
    def cache_aware(**options) -> CacheAware:
        return CacheAware(max_tree_chars=cluster.backend_cache_chars, **options)

    results = []
    for processes in process_counts:
        for name in ("round_robin", "least_outstanding"):
            results.append(simulate(label=f"{name} / {processes} / per process",
                                    policies=[policy_for(name) for _ in range(processes)],
                                    workload=workload, cluster=cluster))
        if processes > 1:
            results.append(simulate(label=f"cache_aware / {processes} / per process + shared homes",
                                    policies=[cache_aware() for _ in range(processes)],
                                    workload=workload, cluster=cluster, homes={}))
        for suffix, options in (("", {}), (" no affinity", {"conversation_affinity": False})):
            results.append(simulate(label=f"cache_aware{suffix} / {processes} / per process",
                                    policies=[cache_aware(**options) for _ in range(processes)],
                                    workload=workload, cluster=cluster))
            if processes > 1:
                shared = cache_aware(**options)
                results.append(simulate(label=f"cache_aware{suffix} / {processes} / shared tree",
                                        policies=[shared] * processes, workload=workload, cluster=cluster))
        results.append(simulate(label=f"sgl-router style, 1st msg key / {processes} / per process",
                                policies=[cache_aware(conversation_affinity=False) for _ in range(processes)],
                                workload=workload, cluster=cluster, key_body=_first_message_only))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=Workload.seed)
    parser.add_argument("--conversations", type=int, default=Workload.conversations)
    parser.add_argument("--rate", type=float, default=Workload.conversations_per_s, help="new conversations per second")
    parser.add_argument("--tenants", type=int, default=Workload.tenants)
    parser.add_argument("--cache-chars", type=int, default=Cluster.backend_cache_chars, help="per backend")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args(argv)
    workload = replace(Workload(), seed=args.seed, conversations=args.conversations,
                       conversations_per_s=args.rate, tenants=args.tenants)
    cluster = replace(Cluster(), backend_cache_chars=args.cache_chars)
    print(f"{workload}\n{cluster}\n")
    print(HEADER)
    for result in scenarios_run(workload, cluster, process_counts=tuple(args.processes)):
        print(result.row())
    print(f"({result.requests} requests per run)")


if __name__ == "__main__":
    main()
