"""Reasoning models (`--reasoning-parser`): the think block a reply opens with,
split into `reasoning_content` as SGLang's parsers split it."""

from __future__ import annotations

import json

import pytest

from inference.sim.reasoning import THINK_END, ReasoningSplitter

from .test_http_api import openai_client

ASK = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def qwen3_sim(sim_factory):
    return sim_factory("--reasoning-parser", "qwen3", "--enable-cache-report")


@pytest.fixture(scope="module")
def r1_sim(sim_factory):
    return sim_factory("--reasoning-parser", "deepseek-r1")


@pytest.mark.parametrize("which", ["qwen3", "deepseek-r1"])
def test_a_reply_thinks_then_answers_whole_and_streamed(which, qwen3_sim, r1_sim):
    client = openai_client(qwen3_sim if which == "qwen3" else r1_sim)
    whole = client.chat.completions.create(model="m", messages=ASK)
    message = whole.choices[0].message
    assert message.reasoning_content and message.content and whole.choices[0].finish_reason == "stop"
    assert "<think>" not in message.reasoning_content and THINK_END not in message.reasoning_content
    assert "think>" not in message.content and message.content.startswith("\n\n")
    usage = whole.usage
    assert 0 < usage.reasoning_tokens < usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == usage.reasoning_tokens

    chunks = list(client.chat.completions.create(model="m", messages=ASK, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    reasoning = "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas)
    content = "".join(delta.content or "" for delta in deltas)
    assert (reasoning, content) == (message.reasoning_content, message.content)
    # Every reasoning delta comes before the first content one.
    kinds = [bool(getattr(delta, "reasoning_content", None)) for delta in deltas if
             getattr(delta, "reasoning_content", None) or delta.content]
    assert kinds == sorted(kinds, reverse=True)
    assert chunks[-1].usage.reasoning_tokens == usage.reasoning_tokens


def test_qwen3_without_thinking_and_unseparated_reasoning(qwen3_sim):
    client = openai_client(qwen3_sim)
    plain = client.chat.completions.create(model="m", messages=ASK,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert plain.choices[0].message.reasoning_content is None and plain.usage.reasoning_tokens == 0
    assert plain.usage.completion_tokens_details is None
    raw = client.chat.completions.create(model="m", messages=ASK, extra_body={"separate_reasoning": False})
    assert raw.choices[0].message.reasoning_content is None
    assert raw.choices[0].message.content.startswith("<think>\n") and THINK_END in raw.choices[0].message.content
    # The answer after the block is the same reply the model gives without thinking.
    assert raw.choices[0].message.content.endswith(plain.choices[0].message.content)


def test_a_reply_cut_while_thinking_is_all_reasoning(r1_sim):
    client = openai_client(r1_sim)
    cut = client.chat.completions.create(model="m", messages=ASK, max_tokens=5)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == ""
    assert cut.choices[0].message.reasoning_content and cut.usage.reasoning_tokens == 5
    with r1_sim.client() as http:
        info = http.get("/model_info").json()
    assert info["reasoning_parser"] == "deepseek-r1"


@pytest.mark.parametrize("which", ["qwen3", "deepseek-r1"])
def test_stream_reasoning_false_sends_the_block_whole_once_it_ends(which, qwen3_sim, r1_sim):
    """`stream_reasoning: false`: SGLang's parser holds the reasoning back and
    sends it in one chunk when the block ends, the answer after it; a block
    cut short comes whole at the finish."""
    client = openai_client(qwen3_sim if which == "qwen3" else r1_sim)
    whole = client.chat.completions.create(model="m", messages=ASK).choices[0].message
    chunks = list(client.chat.completions.create(model="m", messages=ASK, stream=True,
                                                 extra_body={"stream_reasoning": False}))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    reasoning = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
    assert reasoning == [whole.reasoning_content]
    assert "".join(d.content or "" for d in deltas) == whole.content
    streamed = list(client.chat.completions.create(model="m", messages=ASK, stream=True))
    assert len([c for c in streamed if c.choices and getattr(c.choices[0].delta, "reasoning_content", None)]) > 1

    cut = client.chat.completions.create(model="m", messages=ASK, max_tokens=5).choices[0]
    chunks = list(client.chat.completions.create(model="m", messages=ASK, max_tokens=5, stream=True,
                                                 extra_body={"stream_reasoning": False}))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)] == \
        [cut.message.reasoning_content]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_generate_with_require_reasoning_counts_the_think_block(r1_sim):
    """/generate's `require_reasoning` on a reasoning model: the reply opens with
    its think block, and meta_info counts its tokens through the end tag (every
    token while the block is open), whole and streamed."""
    prompt = {"text": "<|user|>What is 1+3?<|end|><|assistant|>", "sampling_params": {"max_new_tokens": 200}}
    with r1_sim.client() as http:
        plain = http.post("/generate", json=prompt).json()
        whole = http.post("/generate", json={**prompt, "require_reasoning": True}).json()
        with http.stream("POST", "/generate", json={**prompt, "require_reasoning": True, "stream": True}) as reply:
            events = [json.loads(line[len("data: "):]) for line in reply.iter_lines()
                      if line.startswith("data: {")]
    assert plain["meta_info"]["reasoning_tokens"] == 0 and THINK_END not in plain["text"]
    reasoning, _, answer = whole["text"].partition(THINK_END)
    meta = whole["meta_info"]
    assert reasoning and answer.startswith("\n\n") and 0 < meta["reasoning_tokens"] < meta["completion_tokens"]
    # The block's tokens are those the chat route counts for the same reply.
    assert whole["output_ids"][:meta["reasoning_tokens"]] == http_tokens(r1_sim, reasoning + THINK_END)
    counts = [(event["meta_info"]["completion_tokens"], event["meta_info"]["reasoning_tokens"]) for event in events]
    assert all(thought == min(done, meta["reasoning_tokens"]) for done, thought in counts)
    assert counts[-1] == (meta["completion_tokens"], meta["reasoning_tokens"])


def http_tokens(sim, text: str) -> list[int]:
    with sim.client() as http:
        return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


@pytest.mark.parametrize("parser", ["qwen3", "deepseek-r1"])
def test_the_splitter_holds_back_a_tag_split_across_deltas(parser):
    text = ("<think>\n" if parser == "qwen3" else "") + "a <b> c\n</think>\n\nanswer </thin"
    splitter = ReasoningSplitter(parser)
    reasoning = content = ""
    for char in text:
        more_reasoning, more_content = splitter.feed(char)
        reasoning, content = reasoning + more_reasoning, content + more_content
    rest_reasoning, rest_content = splitter.finish()
    assert (reasoning + rest_reasoning, content + rest_content) == ("\na <b> c\n"[parser != "qwen3":],
                                                                     "\n\nanswer </thin")
    assert ReasoningSplitter(parser).split(text) == (reasoning + rest_reasoning, content + rest_content)
    # qwen3 without a block answers plainly; a tool call ends qwen3's block.
    assert ReasoningSplitter("qwen3").split("just an answer") == ("", "just an answer")
    assert ReasoningSplitter("qwen3").split("<think>hmm<tool_call>{}") == ("hmm", "<tool_call>{}")


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK_WEATHER = [{"role": "user", "content": "What does get_weather say for Oslo?"}]


@pytest.fixture(scope="module")
def thinking_tool_sims(sim_factory):
    return {parser: sim_factory("--reasoning-parser", parser, "--tool-call-parser", "qwen25")
            for parser in ("qwen3", "deepseek-r1")}


@pytest.fixture(scope="module")
def plain_tool_sim(sim_factory):
    return sim_factory("--tool-call-parser", "qwen25")


@pytest.mark.parametrize("parser", ["qwen3", "deepseek-r1"])
def test_a_reasoning_model_thinks_before_it_calls_a_tool(parser, thinking_tool_sims, plain_tool_sim):
    """The reply is the think block, then the call: SGLang's reasoning parser
    takes the block, its tool-call parser the call; whole, nothing is left for
    content; streamed, the blank line between them comes as content."""
    client = openai_client(thinking_tool_sims[parser])
    whole = client.chat.completions.create(model="m", messages=ASK_WEATHER, tools=[WEATHER])
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == ""
    assert choice.message.reasoning_content and THINK_END not in choice.message.reasoning_content
    [call] = choice.message.tool_calls
    # The same call a model without reasoning makes, after the thinking.
    plain = openai_client(plain_tool_sim).chat.completions.create(model="m", messages=ASK_WEATHER, tools=[WEATHER])
    assert (call.function.name, call.function.arguments) == (
        "get_weather", plain.choices[0].message.tool_calls[0].function.arguments)
    usage = whole.usage
    assert usage.reasoning_tokens > 0
    assert usage.completion_tokens == usage.reasoning_tokens + 2 + plain.usage.completion_tokens  # + "\n\n"

    chunks = list(client.chat.completions.create(model="m", messages=ASK_WEATHER, tools=[WEATHER], stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == choice.message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == "\n\n"
    calls = [piece for d in deltas for piece in (d.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert "".join(piece.function.arguments for piece in calls) == call.function.arguments
    kinds = ["reasoning" if getattr(d, "reasoning_content", None) else "content" if d.content else "call"
             for d in deltas if getattr(d, "reasoning_content", None) or d.content or d.tool_calls]
    assert kinds == sorted(kinds, key=["reasoning", "content", "call"].index)  # the block, the line, the call
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert chunks[-1].usage.reasoning_tokens == usage.reasoning_tokens


def test_a_thinking_tool_reply_unseparated_or_cut_short(thinking_tool_sims):
    client = openai_client(thinking_tool_sims["qwen3"])
    # Unseparated, the block is the text before the call: the message's content.
    raw = client.chat.completions.create(model="m", messages=ASK_WEATHER, tools=[WEATHER],
                                         extra_body={"separate_reasoning": False})
    message = raw.choices[0].message
    assert message.reasoning_content is None and message.tool_calls[0].function.name == "get_weather"
    assert message.content.startswith("<think>\n") and message.content.endswith(THINK_END)
    # Cut while thinking: all reasoning, no call; cut inside the call: the call is dropped.
    whole = client.chat.completions.create(model="m", messages=ASK_WEATHER, tools=[WEATHER])
    for limit in (6, whole.usage.completion_tokens - 2):  # the last token is the EOS after the call
        cut = client.chat.completions.create(model="m", messages=ASK_WEATHER, tools=[WEATHER], max_tokens=limit)
        choice = cut.choices[0]
        assert choice.finish_reason == "length" and choice.message.tool_calls is None
        assert choice.message.content == "" and choice.message.reasoning_content
        assert whole.choices[0].message.reasoning_content.startswith(choice.message.reasoning_content)
        chunks = list(client.chat.completions.create(model="m", messages=ASK_WEATHER, tools=[WEATHER],
                                                     max_tokens=limit, stream=True))
        deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == choice.message.reasoning_content
        # Streamed, what of the call was written went out before the cut.
        assert bool([piece for d in deltas for piece in (d.tool_calls or [])]) == (limit > 6)
        assert chunks[-1].choices[0].finish_reason == "length"
    # Thinking switched off: the call alone.
    quiet = client.chat.completions.create(model="m", messages=ASK_WEATHER, tools=[WEATHER],
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert quiet.choices[0].message.reasoning_content is None and quiet.usage.reasoning_tokens == 0
    assert quiet.choices[0].finish_reason == "tool_calls"


def test_parallel_samples_think_their_own_blocks(qwen3_sim):
    """With n > 1 every sample is drawn afresh, its reasoning too: the first is
    the single reply's, the others differ, whole and streamed alike; greedy
    samples are all the same."""
    client = openai_client(qwen3_sim)
    single = client.chat.completions.create(model="m", messages=ASK).choices[0].message
    whole = client.chat.completions.create(model="m", messages=ASK, n=3)
    thoughts = [choice.message.reasoning_content for choice in whole.choices]
    assert thoughts[0] == single.reasoning_content and len(set(thoughts)) == 3 and all(thoughts)
    assert all(choice.finish_reason == "stop" and choice.message.content for choice in whole.choices)
    chunks = list(client.chat.completions.create(model="m", messages=ASK, n=3, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = ["".join(getattr(chunk.choices[0].delta, "reasoning_content", None) or "" for chunk in chunks
                        if chunk.choices and chunk.choices[0].index == index) for index in range(3)]
    assert streamed == thoughts
    assert chunks[-1].usage.reasoning_tokens == whole.usage.reasoning_tokens
    assert whole.usage.reasoning_tokens > 3 * 8  # each block holds at least REASONING_WORDS[0] words
    greedy = client.chat.completions.create(model="m", messages=ASK, n=2, temperature=0)
    assert greedy.choices[0].message.reasoning_content == greedy.choices[1].message.reasoning_content
