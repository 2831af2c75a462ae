"""Function calling with `--tool-call-parser qwen25`, through the OpenAI SDK."""

from __future__ import annotations

import json

import openai
import pytest

from .test_http_api import openai_client, sse_events

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}}, "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What does get_weather say for tomorrow?"}]


@pytest.fixture(scope="module")
def tool_sim(sim_factory):
    return sim_factory("--tool-call-parser", "qwen25", "--enable-cache-report")


def test_auto_calls_the_tool_the_user_names(tool_sim):
    client = openai_client(tool_sim)
    completion = client.chat.completions.create(model="m", messages=ASK, tools=[CLOCK, WEATHER])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == ""
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] == "celsius"
    assert isinstance(arguments["city"], str)
    # The call is what the model wrote: its tokens are the completion's.
    assert completion.usage.completion_tokens > 10

    # Without a mention (or with tool_choice "none") the model answers in text.
    plain = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello"}],
                                           tools=[WEATHER], max_tokens=5)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"
    refused = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none",
                                             max_tokens=5)
    assert refused.choices[0].message.tool_calls is None


def test_required_and_named_choices(tool_sim):
    client = openai_client(tool_sim)
    hello = [{"role": "user", "content": "Hello"}]
    required = client.chat.completions.create(model="m", messages=hello, tools=[CLOCK, WEATHER],
                                              tool_choice="required")
    assert required.choices[0].message.tool_calls[0].function.name == "get_time"  # none named: the first
    named = client.chat.completions.create(model="m", messages=ASK, tools=[CLOCK, WEATHER],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"
    # No property marked required: every one gets a value.
    assert set(json.loads(named.choices[0].message.tool_calls[0].function.arguments)) == {"zone"}

    with pytest.raises(openai.BadRequestError) as missing:
        client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "Tool 'nope' not found in tools list." in str(missing.value)
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="m", messages=ASK, tool_choice="required")
    assert "Tools cannot be empty if tool choice is set to required." in str(empty.value)
    # A named choice without a name passes the schema (the name is optional) and names None.
    with pytest.raises(openai.BadRequestError) as unnamed:
        client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {}})
    assert unnamed.value.body["message"] == "Tool 'None' not found in tools list."


def test_the_template_renders_the_tools_tool_choice_leaves_it(tool_sim):
    """As SGLang's serving_chat passes tools to the chat template: none under
    tool_choice "none", only the named one under a named choice; /tokenize
    renders messages the same way."""
    client = openai_client(tool_sim)

    def prompt_tokens(**options) -> int:
        return client.chat.completions.create(model="m", messages=ASK, max_tokens=1, **options).usage.prompt_tokens

    bare = prompt_tokens()
    assert prompt_tokens(tools=[CLOCK, WEATHER], tool_choice="none") == bare
    both = prompt_tokens(tools=[CLOCK, WEATHER])
    named = prompt_tokens(tools=[CLOCK, WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert bare < named < both
    assert named == prompt_tokens(tools=[CLOCK])
    with tool_sim.client() as http:
        def tokenized(**options) -> int:
            return http.post("/tokenize", json={"messages": ASK, **options}).json()["count"]

        assert tokenized(tools=[CLOCK, WEATHER], tool_choice="none") == tokenized() == bare
        assert tokenized(tools=[CLOCK, WEATHER]) == both


def test_tools_and_tool_choice_outside_the_schema_get_pydantics_400(tool_sim):
    """What ChatCompletionRequest's schema refuses comes back as SGLang's
    validation handler words it: type "Bad Request", each location and problem."""
    client = openai_client(tool_sim)
    cases = [
        ({"tools": {"a": 1}}, "1 validation error for ChatCompletionRequest\ntools\n  Input should be a valid list"),
        ({"tools": [{"type": "function"}, WEATHER, {"function": {"name": 3}}]},
         "2 validation errors for ChatCompletionRequest\ntools.0.function\n  Field required\n"
         "tools.2.function.name\n  Input should be a valid string"),
        ({"tools": [WEATHER], "tool_choice": "foo"},
         "2 validation errors for ChatCompletionRequest\ntool_choice.ToolChoice\n"
         "  Input should be a valid dictionary or instance of ToolChoice\n"
         "tool_choice.literal['auto','required','none']\n  Input should be 'auto', 'required' or 'none'"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}},
         "2 validation errors for ChatCompletionRequest\ntool_choice.ToolChoice.function\n  Field required\n"
         "tool_choice.literal['auto','required','none']\n  Input should be 'auto', 'required' or 'none'"),
    ]
    for extra, message in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=ASK, extra_body=extra)
        assert refused.value.body["message"] == message and refused.value.body["type"] == "Bad Request"


def test_streamed_call_arrives_in_pieces(tool_sim):
    client = openai_client(tool_sim)
    chunks = list(client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], stream=True,
                                                 stream_options={"include_usage": True}))
    calls = [call for chunk in chunks if chunk.choices for call in (chunk.choices[0].delta.tool_calls or [])]
    assert len(calls) >= 2
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == ""
    assert all(call.id is None and call.function.name is None for call in calls[1:])
    whole = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER])
    assert "".join(call.function.arguments for call in calls) == whole.choices[0].message.tool_calls[0].function.arguments
    assert not any(chunk.choices[0].delta.content for chunk in chunks if chunk.choices)
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # The raw chunk has every delta field, as SGLang's pydantic models dump it.
    with tool_sim.client() as raw, raw.stream("POST", "/v1/chat/completions", json={
            "model": "m", "messages": ASK, "tools": [WEATHER], "stream": True}) as response:
        events = sse_events(response)
    first_call = next(event for event in events[:-1] if event["choices"] and "tool_calls" in event["choices"][0]["delta"])
    assert list(first_call["choices"][0]["delta"]) == ["role", "content", "reasoning_content", "tool_calls"]
    assert first_call["usage"] is None


def test_the_next_turn_finds_the_call_cached(tool_sim):
    """The assistant's tool_calls render as the model wrote them, so the turn
    that brings the tool's result reuses the whole previous sequence."""
    client = openai_client(tool_sim)
    first = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."}]
    second = client.chat.completions.create(model="m", messages=history, tools=[WEATHER], max_tokens=4)
    assert second.choices[0].message.tool_calls is None  # the last message is the tool's: an answer
    previous = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= previous - 1


def test_a_call_cut_by_max_tokens_is_dropped(tool_sim):
    client = openai_client(tool_sim)
    form = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        f"field_{index}": {"type": "string"} for index in range(12)}}}}
    whole = client.chat.completions.create(model="m", messages=ASK, tools=[form])
    assert whole.usage.completion_tokens > 64  # longer than any plain reply of the simulator
    # Cut early, and cut past where a plain reply would have ended.
    for limit in (3, whole.usage.completion_tokens - 2):
        cut = client.chat.completions.create(model="m", messages=ASK, tools=[form], max_tokens=limit)
        assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == limit
        assert cut.choices[0].message.tool_calls is None and cut.choices[0].message.content == ""
    # Cut only the EOS after it: the call is whole and parsed, the finish stays `length`.
    no_eos = client.chat.completions.create(model="m", messages=ASK, tools=[form],
                                            max_tokens=whole.usage.completion_tokens - 1)
    assert no_eos.choices[0].finish_reason == "length"
    assert no_eos.choices[0].message.tool_calls[0].function.arguments == \
        whole.choices[0].message.tool_calls[0].function.arguments


def test_without_a_parser_tools_only_lengthen_the_prompt(sim):
    client = openai_client(sim)
    bare = client.chat.completions.create(model="m", messages=ASK, max_tokens=3)
    with_tools = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=3)
    assert with_tools.choices[0].message.tool_calls is None
    assert with_tools.usage.prompt_tokens > bare.usage.prompt_tokens


def test_model_and_server_info_name_the_parser(tool_sim, sim):
    """Clients read the parser from /model_info (and /server_info's server args)."""
    for server, parser in ((tool_sim, "qwen25"), (sim, None)):
        with server.client() as client:
            assert client.get("/model_info").json()["tool_call_parser"] == parser
            assert client.get("/server_info").json()["tool_call_parser"] == parser


def test_a_servers_parser_sends_stray_logprobs_in_chunks_of_their_own(tool_sim, sim):
    """With a tool-call (or reasoning) parser configured, SGLang sends the
    logprobs of a step that no chunk carried (a tool call's tokens, the EOS)
    in a chunk of their own, so a stream's logprobs are the whole reply's;
    a server without a parser drops the EOS's."""
    plain = {"model": "m", "messages": [{"role": "user", "content": "Say a little."}], "logprobs": True}
    calling = {**plain, "messages": ASK, "tools": [WEATHER]}
    for server, ask, eos_streamed in ((tool_sim, plain, True), (tool_sim, calling, True), (sim, plain, False)):
        client = openai_client(server)
        whole = client.chat.completions.create(**ask).choices[0].logprobs.content
        chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
        streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert whole[-1].token == "<|endoftext|>"
        assert streamed == (whole if eos_streamed else whole[:-1])
        bare = [c for c in chunks if c.choices[0].logprobs and not c.choices[0].delta.content
                and not c.choices[0].delta.tool_calls and not getattr(c.choices[0].delta, "reasoning_content", None)]
        assert bool(bare) == eos_streamed
