"""The public API through the official openai SDK, against a live gateway process
backed by live simulator processes."""
import json
import urllib.error
import urllib.request

import openai
import pytest

from tests.conftest import gateway_start, process_stop, usage_rows_wait

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


@pytest.fixture
def client(gateway, tenant_key):
    return openai.OpenAI(base_url=gateway.base_url, api_key=tenant_key.secret, max_retries=0)


def test_models_lists_the_registry(client):
    ids = {model.id for model in client.models.list()}
    assert {"test-llm", "slow-llm", "faulty-llm", "think-llm"} <= ids
    model = client.models.retrieve("test-llm")
    assert model.id == "test-llm"
    assert model.max_model_len == 4096  # the registered context length, as SGLang and vLLM name it
    assert {m.id: m.max_model_len for m in client.models.list()}["test-llm"] == 4096
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion_non_streaming(client, tenant_key):
    completion = client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=12)

    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "test-llm"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0

    [row] = usage_rows_wait(api_key=tenant_key.api_key, count=1)
    assert row.request_id == completion.id
    assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert row.status == "ok" and row.http_status == 200 and not row.stream
    assert row.tenant_id == tenant_key.tenant.id and row.model == "test-llm"
    assert row.latency_ms > 0


def test_chat_completion_streaming_with_usage(client, tenant_key):
    stream = client.chat.completions.create(
        model="test-llm", messages=MESSAGES, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content_chunks, "no tokens streamed"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    # The usage chunk comes last, with no choices; no other chunk carries usage.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert usage.completion_tokens == len(content_chunks)

    [row] = usage_rows_wait(api_key=tenant_key.api_key, count=1)
    assert row.stream and row.status == "ok"
    assert (row.prompt_tokens, row.completion_tokens, row.cached_tokens) == (
        usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens)
    assert row.ttft_ms is not None and 0 < row.ttft_ms <= row.latency_ms


def test_streaming_without_include_usage_sends_no_usage_but_records_it(client, tenant_key):
    chunks = list(client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=8, stream=True))

    assert all(c.usage is None for c in chunks)
    tokens = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    [row] = usage_rows_wait(api_key=tenant_key.api_key, count=1)
    assert row.completion_tokens == tokens and row.prompt_tokens > 0


def test_continuous_usage_stats_give_every_chunk_its_usage(client, tenant_key):
    """stream_options.continuous_usage_stats (SGLang's and vLLM's extension):
    each token's chunk carries the usage so far in the gateway's usage shape,
    each choice its own with n > 1; the final usage chunk sums them."""
    chunks = list(client.chat.completions.create(
        model="test-llm", messages=MESSAGES, max_tokens=6, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counted = [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].delta.content]
    assert counted == list(range(1, len(counted) + 1)) and len(counted) == 6
    final = chunks[-1].usage
    assert chunks[-1].choices == [] and final.completion_tokens == 6
    assert {c.usage.prompt_tokens for c in chunks if c.usage} == {final.prompt_tokens}
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks if c.usage)
    assert all(c.usage.prompt_tokens_details is not None for c in chunks if c.usage)

    two = list(client.completions.create(model="test-llm", prompt="Count with me", max_tokens=3, n=2, stream=True,
                                         stream_options={"continuous_usage_stats": True}))
    by_choice = {index: [c.usage.completion_tokens for c in two if c.choices and c.choices[0].index == index
                         and c.choices[0].text] for index in (0, 1)}
    assert by_choice == {0: [1, 2, 3], 1: [1, 2, 3]}
    assert two[-1].choices  # no include_usage: no final usage chunk
    rows = usage_rows_wait(api_key=tenant_key.api_key, count=2)
    assert sorted(row.completion_tokens for row in rows) == [6, 6]


def test_repeated_prefix_reports_cached_tokens(client, tenant_key):
    long_system = "You answer questions about the platform. " * 40
    messages = [{"role": "system", "content": long_system}, {"role": "user", "content": "First question?"}]
    first = client.chat.completions.create(model="test-llm", messages=messages, max_tokens=4)
    messages[-1] = {"role": "user", "content": "Second question?"}
    second = client.chat.completions.create(model="test-llm", messages=messages, max_tokens=4)

    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens // 2
    rows = usage_rows_wait(api_key=tenant_key.api_key, count=2)
    assert rows[1].cached_tokens == second.usage.prompt_tokens_details.cached_tokens


def test_an_isolated_tenants_prefix_cache_is_out_of_every_other_tenants_reach(gateway, make_tenant):
    """Tenant.cache_isolation: the tenant's prompts live in a cache namespace of
    its own. Another tenant sending the same prompt finds nothing of it
    cached, not even by naming the tenant's id as its cache_salt (its own
    salts are kept apart from tenants' ids); its own repeats still hit."""
    isolated, other = make_tenant(), make_tenant()
    isolated.tenant.cache_isolation = True
    isolated.tenant.save(update_fields=["cache_isolation"])
    prompt = [{"role": "system", "content": "A confidential system prompt of the isolated tenant. " * 20},
              {"role": "user", "content": "Go on."}]

    def cached(key, **extra) -> tuple[int, int]:
        reply = openai.OpenAI(base_url=gateway.base_url, api_key=key.secret, max_retries=0).chat.completions.create(
            model="test-llm", messages=prompt, max_tokens=2, **extra)
        return reply.usage.prompt_tokens_details.cached_tokens, reply.usage.prompt_tokens

    cached(isolated)
    own_hit, prompt_tokens = cached(isolated)
    guessed_salt, _ = cached(other, extra_body={"cache_salt": str(isolated.tenant.public_id)})
    plain_first, _ = cached(other)
    plain_again, _ = cached(other)
    assert own_hit == prompt_tokens - 1
    assert guessed_salt < prompt_tokens // 4 and plain_first < prompt_tokens // 4
    assert plain_again == prompt_tokens - 1


def test_completions_non_streaming_and_streaming(client, tenant_key):
    completion = client.completions.create(model="test-llm", prompt="Once upon a time", max_tokens=10)
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.choices[0].text and completion.usage.completion_tokens <= 10

    chunks = list(client.completions.create(model="test-llm", prompt="Once upon a time", max_tokens=10,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == completion.choices[0].text  # the simulator is deterministic
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens

    rows = usage_rows_wait(api_key=tenant_key.api_key, count=2)
    assert [r.endpoint for r in rows] == ["completions", "completions"]
    assert [r.stream for r in rows] == [False, True]


def test_async_client_streams_concurrently(gateway, tenant_key):
    import asyncio

    async def main():
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=tenant_key.secret, max_retries=0)
        async def one(i):
            stream = await client.chat.completions.create(
                model="test-llm", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=6, stream=True)
            return [c async for c in stream]
        results = await asyncio.gather(*(one(i) for i in range(20)))
        await client.close()
        return results

    results = asyncio.run(main())
    assert len({chunks[0].id for chunks in results}) == 20
    usage_rows = usage_rows_wait(api_key=tenant_key.api_key, count=20)
    assert len(usage_rows) == 20 and all(r.status == "ok" for r in usage_rows)


def test_chat_logprobs_reach_the_client_whole_and_streamed(client):
    completion = client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=6,
                                                logprobs=True, top_logprobs=3)
    entries = completion.choices[0].logprobs.content
    assert "".join(entry.token for entry in entries) == completion.choices[0].message.content
    assert len(entries) == completion.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 and entry.top_logprobs[0].token == entry.token
               for entry in entries)
    # The same request streamed: one entry per content chunk, passed through as the backend sent it.
    streamed_text, streamed = "", []
    for chunk in client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=6,
                                                logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            streamed_text += chunk.choices[0].delta.content
            streamed.extend(chunk.choices[0].logprobs.content)
    assert "".join(entry.token for entry in streamed) == streamed_text
    assert all(entry.top_logprobs == [] for entry in streamed)
    # Without logprobs, none.
    plain = client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_and_echo_reach_the_client(client):
    completion = client.completions.create(model="test-llm", prompt="Once upon a time", max_tokens=4,
                                           logprobs=1, echo=True)
    logprobs = completion.choices[0].logprobs
    assert completion.choices[0].text.startswith("Once upon a time")
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.token_logprobs[0] is None and len(logprobs.top_logprobs) == len(logprobs.tokens)
    # The echoed prompt is not billed as completion tokens.
    assert completion.usage.completion_tokens == 4


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK_WEATHER = [{"role": "user", "content": "Please call get_weather for Lisbon."}]


def test_tool_calls_reach_the_client_whole_and_streamed(client, tenant_key):
    """Function calling through the gateway (the simulator parses calls as
    SGLang's qwen25 parser does): the call whole, its deltas streamed under our
    id, and the stream's usage row with a time to first token although no
    chunk carried text."""
    whole = client.chat.completions.create(model="test-llm", messages=ASK_WEATHER, tools=[WEATHER])
    assert whole.id.startswith("chatcmpl-") and whole.choices[0].finish_reason == "tool_calls"
    [call] = whole.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}

    chunks = list(client.chat.completions.create(model="test-llm", messages=ASK_WEATHER, tools=[WEATHER],
                                                 stream=True, stream_options={"include_usage": True}))
    assert {chunk.id for chunk in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    deltas = [delta for chunk in chunks if chunk.choices for delta in (chunk.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    assert "".join(delta.function.arguments for delta in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    usage = chunks[-1].usage
    assert usage.completion_tokens == whole.usage.completion_tokens

    rows = usage_rows_wait(api_key=tenant_key.api_key, count=2)
    streamed = next(row for row in rows if row.stream)
    assert streamed.status == "ok" and streamed.completion_tokens == usage.completion_tokens
    assert streamed.ttft_ms is not None and 0 < streamed.ttft_ms <= streamed.latency_ms

    # The tool's result goes back with the call; the model then answers in text.
    follow = client.chat.completions.create(model="test-llm", max_tokens=4, tools=[WEATHER], messages=ASK_WEATHER + [
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny."}])
    assert follow.choices[0].message.tool_calls is None and follow.choices[0].message.content


def test_a_reasoning_models_think_block_reaches_the_client_and_is_metered(client, tenant_key):
    """A reasoning model (the simulator as SGLang with --reasoning-parser qwen3):
    the think block arrives as reasoning_content, whole and streamed, before
    the answer; its tokens are completion tokens in usage and in the usage
    row, and the stream's time to first token is the first reasoning delta's."""
    ask = [{"role": "user", "content": "Think, then answer."}]
    whole = client.chat.completions.create(model="think-llm", messages=ask, max_tokens=200)
    message = whole.choices[0].message
    assert message.reasoning_content and message.content and whole.choices[0].finish_reason == "stop"
    assert 0 < whole.usage.completion_tokens_details.reasoning_tokens < whole.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="think-llm", messages=ask, max_tokens=200, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == message.content
    # The backend streams three tokens a chunk (--stream-interval 3): they pass through whole.
    assert len([d for d in deltas if getattr(d, "reasoning_content", None) or d.content]) \
        < whole.usage.completion_tokens / 2
    usage = chunks[-1].usage
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == whole.usage.completion_tokens_details.reasoning_tokens

    rows = usage_rows_wait(api_key=tenant_key.api_key, count=2)
    assert all(row.completion_tokens == usage.completion_tokens for row in rows)
    streamed = next(row for row in rows if row.stream)
    assert streamed.ttft_ms is not None and 0 < streamed.ttft_ms <= streamed.latency_ms


def test_a_reasoning_model_thinks_then_calls_a_tool_through_the_gateway(client, tenant_key):
    """Agents on a reasoning model get both: the think block as
    reasoning_content and the call as tool_calls, whole and streamed, with the
    thinking metered as completion tokens."""
    whole = client.chat.completions.create(model="think-llm", messages=ASK_WEATHER, tools=[WEATHER])
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    assert 0 < whole.usage.completion_tokens_details.reasoning_tokens < whole.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="think-llm", messages=ASK_WEATHER, tools=[WEATHER],
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == choice.message.reasoning_content
    pieces = [piece for d in deltas for piece in (d.tool_calls or [])]
    assert pieces[0].function.name == "get_weather"
    assert "".join(piece.function.arguments for piece in pieces) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    rows = usage_rows_wait(api_key=tenant_key.api_key, count=2)
    assert all(row.completion_tokens == whole.usage.completion_tokens for row in rows)
    streamed = next(row for row in rows if row.stream)
    assert streamed.ttft_ms is not None and 0 < streamed.ttft_ms <= streamed.latency_ms


def test_sglangs_cached_token_details_pass_through_and_usage_stays_exact(client, tenant_key):
    """`return_cached_tokens_details` is SGLang's: the backend adds a response-level
    `sglext`, streamed as a choice-less chunk before the usage chunk. The client
    gets it, and the stream's usage (and the metered row) is still the backend's."""
    ask = {"model": "test-llm", "messages": [{"role": "user", "content": "Cache tiers, please: " * 20}],
           "max_tokens": 5, "extra_body": {"return_cached_tokens_details": True}}
    client.chat.completions.create(**ask)  # the prompt is cached from here on
    whole = client.chat.completions.create(**ask)
    cached = whole.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and whole.model_extra["sglext"] == {"cached_tokens_details": {"device": cached, "host": 0}}

    chunks = list(client.chat.completions.create(**ask, stream=True))
    extension = [chunk for chunk in chunks if not chunk.choices and "sglext" in (chunk.model_extra or {})]
    assert len(extension) == 1 and extension[0].id == chunks[0].id and extension[0].model == "test-llm"
    assert extension[0].model_extra["sglext"]["cached_tokens_details"]["device"] > 0
    assert all(chunk.usage is None for chunk in chunks)  # the client did not ask for usage

    rows = usage_rows_wait(api_key=tenant_key.api_key, count=3)
    streamed = next(row for row in rows if row.stream)
    assert streamed.completion_tokens == 5 and streamed.prompt_tokens == whole.usage.prompt_tokens
    assert streamed.cached_tokens == extension[0].model_extra["sglext"]["cached_tokens_details"]["device"]

def test_without_max_tokens_the_default_leaves_room_for_the_prompt(client, tenant_key):
    """The gateway's default max_tokens (4096 here) would overflow test-llm's 4096-token
    context with any prompt; it is cut to the room the prompt leaves."""
    long = [{"role": "user", "content": "tell me more " * 250}]  # 3,250 bytes, 756 tokens
    natural = client.chat.completions.create(model="test-llm", messages=long)
    assert natural.choices[0].finish_reason == "stop"  # the model's own end (the simulator's 16-64 tokens)
    # ignore_eos runs to the max_tokens the gateway sent: the room left by the
    # prompt's bound (a token per byte, plus a few per message).
    capped = client.chat.completions.create(model="test-llm", messages=long, extra_body={"ignore_eos": True})
    usage = capped.usage
    assert capped.choices[0].finish_reason == "length"
    assert 700 < usage.completion_tokens < 4096 - usage.prompt_tokens


def test_default_cap_arithmetic():
    from inference.streaming import completion_tokens_cap

    class Request:
        endpoint, body = "chat.completions", {}

    assert completion_tokens_cap(Request, 4096, context_length=8192, prompt_bound=1000) == ("max_tokens", 4096)
    assert completion_tokens_cap(Request, 4096, context_length=4096, prompt_bound=1000) == ("max_tokens", 3096)
    # A byte count above the context: a quarter of it, as tokens of English text.
    assert completion_tokens_cap(Request, 4096, context_length=4096, prompt_bound=6000) == ("max_tokens", 2596)
    assert completion_tokens_cap(Request, 4096, context_length=4096, prompt_bound=20000) == ("max_tokens", 1)
    Request.body = {"max_completion_tokens": 9}
    assert completion_tokens_cap(Request, 4096, context_length=4096, prompt_bound=20000) == (
        "max_completion_tokens", 9)


def test_structured_output_parses_through_the_gateway(client):
    """The SDK's parse helper (a strict json_schema response_format) through the
    gateway: the backend's constrained JSON reaches the client whole."""
    import pydantic

    class Order(pydantic.BaseModel):
        item: str
        quantity: int
        gift: bool

    completion = client.chat.completions.parse(model="test-llm", messages=MESSAGES, response_format=Order)
    order = completion.choices[0].message.parsed
    assert isinstance(order, Order) and isinstance(order.quantity, int)
    assert completion.id.startswith("chatcmpl-") and completion.choices[0].finish_reason == "stop"


def test_a_structural_tag_reaches_the_backend_through_the_gateway(client):
    """SGLang's structural_tag response_format (how tool-call tags are forced)
    passes the gateway untouched."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    completion = client.chat.completions.create(model="test-llm", messages=MESSAGES, response_format={
        "type": "structural_tag", "triggers": ["<function="], "at_least_one": True,
        "structures": [{"begin": "<function=get_weather>", "schema": schema, "end": "</function>"}]})
    content = completion.choices[0].message.content
    assert content.startswith("<function=get_weather>")
    assert "city" in json.loads(content[len("<function=get_weather>"):content.index("</function>")])


def _http(url: str, *, method: str = "GET", body: dict | None = None, headers: dict | None = None):
    """(status, headers lower-cased, body bytes) of one plain HTTP request."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def test_browser_pages_may_call_the_api_across_origins(gateway, tenant_key):
    """CORS as a browser checks it: the preflight of a page's POST with an
    Authorization header, then the response's headers (errors too, so a page
    can read them). Without an Origin, none of it."""
    page = "https://app.example.com"
    status, headers, _ = _http(gateway.base_url + "/chat/completions", method="OPTIONS", headers={
        "Origin": page, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert status == 204
    assert headers["access-control-allow-origin"] == "*"
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"

    ask = {"model": "test-llm", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    auth = {"Authorization": f"Bearer {tenant_key.secret}", "Content-Type": "application/json"}
    status, headers, body = _http(gateway.base_url + "/chat/completions", method="POST", body=ask,
                                  headers={**auth, "Origin": page})
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert headers["access-control-allow-origin"] == "*"
    assert "x-request-id" in headers["access-control-expose-headers"]
    status, headers, _ = _http(gateway.base_url + "/models", headers={"Origin": page})
    assert status == 401 and headers["access-control-allow-origin"] == "*"

    status, headers, _ = _http(gateway.base_url + "/chat/completions", method="POST", body=ask, headers=auth)
    assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_may_be_limited_to_listed_origins(registry, live_tmp, django_db_setup, tenant_key):
    from django.db import connection

    listed = "https://app.example.com"
    gw = gateway_start(live_tmp, connection.settings_dict["NAME"], GATEWAY_CORS_ORIGINS=f"{listed},https://b.example")
    try:
        auth = {"Authorization": f"Bearer {tenant_key.secret}"}
        status, headers, _ = _http(gw.base_url + "/models", headers={**auth, "Origin": listed})
        assert status == 200
        assert headers["access-control-allow-origin"] == listed and headers["vary"] == "origin"
        status, headers, _ = _http(gw.base_url + "/models", headers={**auth, "Origin": "https://other.example"})
        assert status == 200 and "access-control-allow-origin" not in headers
        status, headers, _ = _http(gw.base_url + "/models", method="OPTIONS", headers={
            "Origin": "https://other.example", "Access-Control-Request-Method": "GET"})
        assert status == 204 and "access-control-allow-origin" not in headers
    finally:
        process_stop(gw.process)
