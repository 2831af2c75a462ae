"""routing_key_build: the text prefix matching works on."""
from inference.routing import routing_key_build

CHAT = "chat.completions"


def chat_key(messages: list, *, namespace: str = "", **extra) -> str:
    return routing_key_build(endpoint=CHAT, body={"model": "m", "messages": messages, **extra}, namespace=namespace)


SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 20}


def test_a_new_turn_extends_the_previous_key():
    # given a conversation and its continuation
    turn1 = [SYSTEM, {"role": "user", "content": "hello"}]
    turn2 = turn1 + [{"role": "assistant", "content": "hi there"}, {"role": "user", "content": "more"}]
    turn3 = turn2 + [{"role": "assistant", "content": "sure"}, {"role": "user", "content": "thanks"}]

    # then each key is a strict prefix of the next
    key1, key2, key3 = chat_key(turn1), chat_key(turn2), chat_key(turn3)
    assert key2.startswith(key1) and len(key2) > len(key1)
    assert key3.startswith(key2) and len(key3) > len(key2)


def test_every_message_counts_not_only_the_first():
    a = chat_key([SYSTEM, {"role": "user", "content": "question A"}])
    b = chat_key([SYSTEM, {"role": "user", "content": "question B"}])
    assert a != b
    # and they share the system prompt's prefix
    common = len(chat_key([SYSTEM]))
    assert a[:common] == b[:common]


def test_roles_and_message_boundaries_are_part_of_the_key():
    as_user = chat_key([{"role": "user", "content": "x"}])
    as_system = chat_key([{"role": "system", "content": "x"}])
    assert as_user != as_system
    # "ab" in one message is not "a" then "b" in two.
    assert chat_key([{"role": "user", "content": "ab"}]) != chat_key(
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    )


def test_content_parts_render_like_the_same_text():
    parts = chat_key([{"role": "user", "content": [{"type": "text", "text": "line one"},
                                                     {"type": "text", "text": "line two"}]}])
    plain = chat_key([{"role": "user", "content": "line one\nline two"}])
    assert parts == plain


def test_images_are_digested_and_distinguish_requests():
    big = "data:image/png;base64," + "A" * 1_000_000
    other = "data:image/png;base64," + "B" * 1_000_000
    key = chat_key([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}])
    key_other = chat_key([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": other}}]}])
    assert len(key) < 200
    assert key != key_other


def test_tool_calls_and_tools_are_included():
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}
    call_other = {**call, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 2}'}}]}
    result = {"role": "tool", "tool_call_id": "1", "content": "42"}
    key = chat_key([SYSTEM, call, result])
    assert key != chat_key([SYSTEM, call_other, result])
    assert '{"x": 1}' in key and "42" in key
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = chat_key([SYSTEM], tools=tools)
    assert with_tools != chat_key([SYSTEM])
    # tools come first, like chat templates render them into the system prompt
    assert with_tools.index('"name":"f"') < with_tools.index("careful assistant")
    # as SGLang renders them: none under tool_choice "none", only a named choice's
    both = tools + [{"type": "function", "function": {"name": "g", "parameters": {}}}]
    assert chat_key([SYSTEM], tools=both, tool_choice="none") == chat_key([SYSTEM])
    assert chat_key([SYSTEM], tools=both, tool_choice={"type": "function", "function": {"name": "f"}}) == with_tools
    assert chat_key([SYSTEM], tools=both, tool_choice="auto") == chat_key([SYSTEM], tools=both)


def test_namespace_isolates_tenants_and_empty_namespace_shares():
    messages = [SYSTEM, {"role": "user", "content": "hi"}]
    shared_1, shared_2 = chat_key(messages), chat_key(messages)
    tenant_1, tenant_2 = chat_key(messages, namespace="tenant-1"), chat_key(messages, namespace="tenant-2")
    assert shared_1 == shared_2
    assert tenant_1 != tenant_2
    # a namespace never turns into a prefix of another namespace's key
    assert not chat_key(messages, namespace="t1").startswith(chat_key([SYSTEM], namespace="t"))


def test_cache_salt_extra_key_and_adapter_separate_keys():
    messages = [SYSTEM]
    plain = chat_key(messages)
    assert chat_key(messages, cache_salt="s1") != plain
    assert chat_key(messages, cache_salt="s1") != chat_key(messages, cache_salt="s2")
    assert chat_key(messages, extra_key="k") != plain
    adapter = routing_key_build(endpoint=CHAT, body={"model": "m:sql", "messages": messages}, namespace="")
    assert adapter != plain


def test_completion_prompts():
    def key(prompt) -> str:
        return routing_key_build(endpoint="completions", body={"model": "m", "prompt": prompt}, namespace="")

    assert key("Once upon a time, there").startswith(key("Once upon a time"))
    assert key([1, 2, 3, 4]).startswith(key([1, 2, 3]))
    assert key([1, 2, 3]) != key([1, 2, 4])
    assert key(["first prompt", "second"]) == key("first prompt")
    # unexpected shapes never raise
    assert key([-1, 2]) and key(None) is not None


def test_deterministic_and_does_not_mutate_the_body():
    body = {"model": "m", "messages": [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "x"}]}]}
    snapshot = repr(body)
    assert routing_key_build(endpoint=CHAT, body=body, namespace="t") == routing_key_build(
        endpoint=CHAT, body=body, namespace="t")
    assert repr(body) == snapshot
