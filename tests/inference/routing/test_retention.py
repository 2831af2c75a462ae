"""Prefix retention's choices: which shared prefixes are touched, where and when."""
import time

from inference.routing import CacheAware, routing_key_build
from inference.routing.policies import conversation_head
from inference.routing.retention import PrefixRetention

from .conftest import model_build

SYSTEM = "You are the support assistant of ACME. Follow the policy below.\n" + "Policy line. " * 200


def chat(*messages: str, system: str = SYSTEM, **fields) -> tuple[str, dict]:
    """A routing key and its upstream body: a system prompt, then alternating turns."""
    rendered = [{"role": "system", "content": system}]
    for index, content in enumerate(messages):
        rendered.append({"role": "user" if index % 2 == 0 else "assistant", "content": content})
    body = {"model": "m", "messages": rendered, **fields}
    return routing_key_build(endpoint="chat.completions", body=body), body


def setup(kv_tokens: int = 2_000):
    policy = CacheAware()
    retention = PrefixRetention(policy, retention_seconds=300)
    model = model_build("http://a", "http://b")
    for backend in model.backends:
        backend.kv_tokens = backend.cache_tokens = kv_tokens
    return policy, retention, model


def observe(policy, retention, model, backend, key, body, now):
    """What the streaming service does for a chat request placed on `backend`."""
    policy.tree(model.name).insert(key, backend.url, now=now)
    retention.observe(model, key, lambda: body)


def fill(policy, model, backend, now, chars=9_000):
    """Other conversations on `backend`, newer than anything else there."""
    tree = policy.tree(model.name)
    for index in range(chars // 1_000):
        tree.insert(f"other {index} " + "x" * 1_000, backend.url, now=now)


def test_a_shared_prompt_is_touched_where_it_is_among_the_oldest_of_a_full_picture():
    policy, retention, model = setup()
    a, b = model.backends
    for index, now in enumerate((100.0, 101.0)):  # two conversations start with it, on a
        key, body = chat(f"question {index}", cache_salt="tenant-1")
        observe(policy, retention, model, a, key, body, now)
    # Not full yet: nothing to touch.
    assert retention.due(model, 102.0) == []
    fill(policy, model, a, now=110.0)
    fill(policy, model, b, now=110.0)
    due = retention.due(model, 111.0)
    assert [(backend.url, len(head.blocks)) for backend, head in due] == [
        ("http://a", len(conversation_head(key)) // policy.block_chars)]
    head = due[0][1]
    # The touch is the first message alone, with what decides the cache it matches.
    assert head.touch == {"model": "m", "messages": [{"role": "system", "content": SYSTEM}], "max_tokens": 1,
                          "temperature": 0, "stream": False, "cache_salt": "tenant-1"}
    # Once touched it is the most recent there, and not due again until it ages.
    retention.touched(model, a, head, prompt_tokens=700, cached_tokens=698)
    assert retention.due(model, time_after_touch()) == []


def time_after_touch() -> float:
    return time.monotonic() + 0.01


def test_a_prompt_one_conversation_used_or_past_its_retention_is_not_touched():
    policy, retention, model = setup()
    a = model.backends[0]
    key, body = chat("only once")
    observe(policy, retention, model, a, key, body, 100.0)
    fill(policy, model, a, now=110.0)
    assert retention.due(model, 111.0) == []  # one conversation: no reason to expect another
    key, body = chat("a second")
    observe(policy, retention, model, a, key, body, 100.5)
    head = next(iter(retention._heads[model.name].values()))
    assert head.conversations == 2
    head.last_use = 100.5
    assert retention.due(model, 111.0) != []
    assert retention.due(model, 100.5 + 301) == []  # retention (300 s) over


def test_later_turns_count_no_new_conversation_and_a_busy_backend_is_left_alone():
    policy, retention, model = setup()
    a = model.backends[0]
    for now, turns in ((100.0, ("hi",)), (100.2, ("hi", "hello", "more"))):
        key, body = chat(*turns)
        observe(policy, retention, model, a, key, body, now)
    head = next(iter(retention._heads[model.name].values()))
    assert head.conversations == 1
    key, body = chat("another")
    observe(policy, retention, model, a, key, body, 100.4)
    fill(policy, model, a, now=110.0)
    assert len(retention.due(model, 111.0)) == 1
    a.waiting = 2  # a queue: room is for the requests running there
    assert retention.due(model, 111.0) == []
    a.waiting, a.kv_usage = 0, 0.9
    assert retention.due(model, 111.0) == []
    a.kv_usage = 0.5
    a.healthy = False
    assert retention.due(model, 111.0) == []


def test_a_prompt_twice_found_uncached_is_touched_no_more():
    policy, retention, model = setup()
    a = model.backends[0]
    for index, now in enumerate((100.0, 100.1)):
        key, body = chat(f"q{index}")
        observe(policy, retention, model, a, key, body, now)
    fill(policy, model, a, now=110.0)
    (backend, head), = retention.due(model, 111.0)
    retention.touched(model, backend, head, prompt_tokens=700, cached_tokens=100)
    assert not head.retired and retention.touch_misses == 1
    retention.touched(model, backend, head, prompt_tokens=700, cached_tokens=100)
    assert head.retired and retention.touches == 2
    fill(policy, model, a, now=time_after_touch() + 10)
    assert retention.due(model, time_after_touch() + 20) == []


def test_a_tools_block_or_a_lone_message_is_not_a_prefix_to_keep():
    policy, retention, model = setup()
    a = model.backends[0]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for index, now in enumerate((100.0, 100.1)):
        key, body = chat(f"q{index}", tools=tools)
        observe(policy, retention, model, a, key, body, now)
    key, body = chat()  # the system prompt alone: nothing after it to share it with
    observe(policy, retention, model, a, key, body, 100.2)
    assert retention._heads.get(model.name, {}) == {}
