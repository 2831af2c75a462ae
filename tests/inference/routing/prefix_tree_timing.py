"""Timing of the cache-aware routing path (not a test; numbers vary by machine).

    .venv/bin/python tests/inference/routing/prefix_tree_timing.py
"""
import random
import timeit

from inference.registry import BackendState, ModelEntry
from inference.routing import CacheAware, PrefixTree, routing_key_build


def chat(rng: random.Random, system: str, total_chars: int) -> dict:
    messages = [{"role": "system", "content": system}]
    size = len(system)
    role = "user"
    while size < total_chars:
        text = rng.randbytes(rng.randint(100, 600)).hex()
        messages.append({"role": role, "content": text})
        size += len(text)
        role = "assistant" if role == "user" else "user"
    return {"model": "m", "messages": messages}


def per_call_us(statement, number: int) -> float:
    return min(timeit.repeat(statement, number=number, repeat=5)) / number * 1e6


def main() -> None:
    rng = random.Random(1)
    systems = [rng.randbytes(rng.randint(500, 2000)).hex() for _ in range(50)]
    model = ModelEntry("m", "m", 8192, "o", 0, backends=[BackendState(f"http://b{i}") for i in range(4)])
    policy = CacheAware(max_tree_chars=2_000_000)
    # A populated tree: 2000 conversations of 2-20 KB over 4 backends.
    for index in range(2000):
        body = chat(rng, rng.choice(systems), rng.randint(2000, 20000))
        policy.observe(model, model.backends[index % 4], routing_key_build(endpoint="chat.completions", body=body, namespace=""))
    tree = policy.tree("m")
    print(f"tree: {tree.node_count()} nodes, chars per backend {[tree.chars(b.url) for b in model.backends]}")
    print(f"{'key chars':>10} {'key_build':>10} {'blocks':>8} {'match':>8} {'insert':>8} {'pick':>8} {'pick+observe':>13}  (µs per call)")
    for size in (2000, 8000, 20000, 50000):
        body = chat(rng, rng.choice(systems), size)
        key = routing_key_build(endpoint="chat.completions", body=body, namespace="tenant")
        policy.observe(model, model.backends[0], key)
        blocks = tree.blocks(key)
        build = per_call_us(lambda: routing_key_build(endpoint="chat.completions", body=body, namespace="tenant"), 2000)
        split = per_call_us(lambda: tree.blocks(key), 2000)
        match = per_call_us(lambda: tree.match(blocks), 2000)
        insert = per_call_us(lambda: tree.insert(blocks, "http://b0"), 2000)

        def fresh_pick():
            # A new key object each time, so the block memo does not help pick.
            policy.pick(model, key[:-1] + key[-1])

        def pick_observe():
            fresh = key[:-1] + key[-1]
            backend = policy.pick(model, fresh)
            policy.observe(model, backend, fresh)

        pick = per_call_us(fresh_pick, 2000)
        both = per_call_us(pick_observe, 2000)
        print(f"{len(key):>10} {build:>10.1f} {split:>8.1f} {match:>8.1f} {insert:>8.1f} {pick:>8.1f} {both:>13.1f}")
    empty = PrefixTree()
    print(f"match on an empty tree, 8 KB key: {per_call_us(lambda: empty.match(key[:8000]), 2000):.1f} µs")


if __name__ == "__main__":
    main()
