"""The simulator through real HTTP: OpenAI SDK, raw SSE and the /sim hooks."""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import threading
import time

import httpx2 as httpx
import openai
import pytest

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."}]


def sse_events(response: httpx.Response) -> list:
    """Decode `data:` events of a streamed response; [DONE] stays a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def openai_client(sim, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sim.base_url}/v1", api_key=sim.api_key or "x", max_retries=0, **kwargs)


def wait_for_stats(sim, predicate, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    with sim.client() as client:
        while True:
            stats = client.get("/sim/stats").json()
            if predicate(stats) or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)


# ---------------------------------------------------------------- OpenAI chat

def test_chat_completion_non_streaming(sim):
    completion = openai_client(sim).chat.completions.create(
        model="any-name-is-echoed", messages=CHAT, max_tokens=12, extra_body={"rid": "chat-unary-1"})

    assert completion.id == "chat-unary-1"  # bare rid, no chatcmpl- prefix
    assert completion.object == "chat.completion"
    assert completion.model == "any-name-is-echoed"
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content.startswith(" ")
    assert len(choice.message.content.split()) == 12
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12
    assert completion.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_response_raw_shape(sim):
    with sim.client() as client:
        body = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 3}).json()
    assert len(body["id"]) == 32  # uuid4().hex
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "metadata"}
    assert body["choices"][0]["message"] == {"role": "assistant", "content": body["choices"][0]["message"]["content"],
                                             "reasoning_content": None}
    assert body["choices"][0]["matched_stop"] is None
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
                                  "reasoning_tokens", "completion_tokens_details"}
    assert body["usage"]["completion_tokens_details"] is None


def test_same_request_same_output(sim):
    client = openai_client(sim)
    first = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, seed=3)
    second = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, seed=3)
    assert first.choices[0].message.content == second.choices[0].message.content


def test_chat_without_max_tokens_stops_at_natural_eos(sim):
    completion = openai_client(sim).chat.completions.create(model="m", messages=CHAT)
    assert completion.choices[0].finish_reason == "stop"
    assert 16 <= completion.usage.completion_tokens <= 64


def test_stop_string_is_matched_and_trimmed(sim):
    client = openai_client(sim)
    words = client.chat.completions.create(model="m", messages=CHAT, max_tokens=10).choices[0].message.content
    stop_word = words.split()[4]
    completion = client.chat.completions.create(model="m", messages=CHAT, max_tokens=10, stop=[" " + stop_word])
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["matched_stop"] == " " + stop_word
    assert choice.message.content == words[:words.index(" " + stop_word)]


def test_no_stop_trim_min_tokens_and_stop_tokens_as_sglang_applies_them(sim):
    client = openai_client(sim)
    words = client.chat.completions.create(model="m", messages=CHAT, max_tokens=10).choices[0].message.content
    stop = " " + words.split()[4]
    kept = client.chat.completions.create(model="m", messages=CHAT, max_tokens=10, stop=[stop],
                                          extra_body={"no_stop_trim": True}).choices[0]
    assert kept.finish_reason == "stop" and kept.message.content == words[:words.index(stop) + len(stop)]

    # min_tokens masks EOS: a reply that would end by itself goes on to at least
    # that length, and its EOS comes next (counted, like every EOS)
    natural = client.chat.completions.create(model="m", messages=CHAT).usage.completion_tokens
    longer = client.chat.completions.create(model="m", messages=CHAT, extra_body={"min_tokens": natural + 20})
    assert longer.choices[0].finish_reason == "stop" and longer.usage.completion_tokens == natural + 21
    assert longer.choices[0].message.content.startswith(
        client.chat.completions.create(model="m", messages=CHAT).choices[0].message.content)

    with sim.client() as http:
        ask = {"text": "Stop tokens.", "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}
        full = http.post("/generate", json=ask).json()
        stop_id = full["output_ids"][3]
        cut = http.post("/generate", json={**ask, "sampling_params": {
            **ask["sampling_params"], "stop_token_ids": [stop_id]}}).json()
        # the stop token is the last output id; SGLang drops its text
        assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
        assert cut["output_ids"] == full["output_ids"][:4]
        kept_text = http.post("/generate", json={**ask, "sampling_params": {
            **ask["sampling_params"], "stop_token_ids": [stop_id], "no_stop_trim": True}}).json()["text"]
        assert full["text"].startswith(kept_text) and len(cut["text"]) < len(kept_text)
        masked = http.post("/generate", json={**ask, "sampling_params": {
            **ask["sampling_params"], "stop_token_ids": [stop_id], "min_new_tokens": 6}}).json()
        assert masked["meta_info"]["finish_reason"]["type"] == "length" and masked["text"] == full["text"]


def test_sampling_params_are_verified_as_sglang_verifies_them(sim):
    """SamplingParams.verify's checks and wording: a 400 on the OpenAI routes (also
    when streaming), on /generate a 400, or an error event once a stream is open."""
    cases = [({"top_k": 0}, "top_k must be -1 (disable) or at least 1, got 0."),
             ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5."),
             ({"frequency_penalty": 2.5}, "frequency_penalty must be in [-2, 2], got 2.5."),
             ({"presence_penalty": -3}, "presence_penalty must be in [-2, 2], got -3.0."),
             ({"repetition_penalty": 0}, "repetition_penalty must be in (0, 2] (1.0 = no penalty), got 0.0."),
             ({"logit_bias": {"100000": 1.0}}, "logit_bias must has keys in [0, 99999], got 100000.")]
    with sim.client() as client:
        for params, message in cases:
            for stream in (False, True):
                reply = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 2,
                                                                  "stream": stream, **params})
                assert reply.status_code == 400 and reply.json()["message"] == message, (params, stream)
            native = client.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2, **params}})
            assert native.status_code == 400 and native.json() == {"error": {"message": message}}
        too_few = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2, "min_tokens": 3})
        assert too_few.json()["message"] == "min_new_tokens must be in [0, max_new_tokens(2)], got 3."
        with client.stream("POST", "/generate", json={"text": "x", "stream": True,
                                                      "sampling_params": {"top_k": 0}}) as response:
            assert response.status_code == 200
            events = sse_events(response)
        assert events[0]["error"]["message"] == cases[0][1] and events[-1] == "[DONE]"
        fine = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 2, "top_k": -1,
                                                         "min_p": 0.1, "repetition_penalty": 1.1,
                                                         "logit_bias": {"5": -100}})
        assert fine.status_code == 200


def test_chat_streaming_with_include_usage(sim):
    stream = openai_client(sim).chat.completions.create(
        model="m", messages=CHAT, max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)

    role, *contents, finish, usage = chunks
    assert role.choices[0].delta.role == "assistant" and role.choices[0].delta.content == ""
    assert len(contents) == 5 and all(c.choices[0].delta.content for c in contents)
    assert all(c.choices[0].finish_reason is None for c in contents)
    assert finish.choices[0].delta.content is None and finish.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage.completion_tokens == 5
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_chat_stream_raw_shape_and_done(sim):
    with sim.client() as client, client.stream("POST", "/v1/chat/completions", json={
            "model": "m", "messages": CHAT, "max_tokens": 2, "stream": True, "rid": "raw-stream"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"reasoning_content": None, "role": "assistant", "content": ""}
    assert events[-2]["choices"][0] == {"index": 0, "delta": {"reasoning_content": None}, "logprobs": None,
                                        "finish_reason": "length", "matched_stop": None}
    assert "usage" not in events[1]  # no include_usage → no usage anywhere
    assert all(event["id"] == "raw-stream" for event in events[:-1])


def test_continuous_usage_stats(sim):
    with sim.client() as client, client.stream("POST", "/v1/chat/completions", json={
            "model": "m", "messages": CHAT, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as response:
        events = sse_events(response)
    role, c1, c2, c3, finish, usage, done = events
    # SGLang attaches running usage to content chunks only
    assert "usage" not in role and "usage" not in finish
    assert [c["usage"]["completion_tokens"] for c in (c1, c2, c3)] == [1, 2, 3]
    assert c1["usage"]["prompt_tokens_details"] is not None  # cache report is on
    assert usage["usage"]["completion_tokens"] == 3


def test_cached_tokens_on_repeated_prompt(sim):
    messages = [{"role": "user", "content": "A prompt about caching that is repeated verbatim."}]
    client = openai_client(sim)
    # a unique salt gives this test its own cache namespace
    salt = {"cache_salt": "test-repeat"}
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=4, extra_body=salt)
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=4, extra_body=salt)
    other_salt = client.chat.completions.create(model="m", messages=messages, max_tokens=4,
                                                extra_body={"cache_salt": "test-repeat-other"})

    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # SGLang always recomputes the last prompt token
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert other_salt.usage.prompt_tokens_details.cached_tokens == 0


def test_multi_turn_reuses_previous_answer(sim):
    client = openai_client(sim)
    salt = {"cache_salt": "test-multi-turn"}
    turn_one = [{"role": "user", "content": "Tell me something."}]
    first = client.chat.completions.create(model="m", messages=turn_one, max_tokens=6, extra_body=salt)
    turn_two = turn_one + [{"role": "assistant", "content": first.choices[0].message.content},
                           {"role": "user", "content": "More."}]
    second = client.chat.completions.create(model="m", messages=turn_two, max_tokens=6, extra_body=salt)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens + 6


def test_cached_tokens_details_as_sglang_reports_them(sim):
    """`meta_info.cached_tokens_details` is null until something is cached,
    then all from the device; OpenAI replies carry it in a response-level
    `sglext` only when asked, streamed in a choice-less chunk before usage."""
    salt = {"cache_salt": "test-cached-details"}
    messages = [{"role": "user", "content": "Where did these cached tokens come from?"}]
    with sim.client() as client:
        cold = client.post("/generate", json={"text": "A native prompt about cache tiers.", **salt,
                                              "sampling_params": {"max_new_tokens": 2}}).json()
        warm = client.post("/generate", json={"text": "A native prompt about cache tiers.", **salt,
                                              "sampling_params": {"max_new_tokens": 2}}).json()
        assert cold["meta_info"]["cached_tokens"] == 0 and cold["meta_info"]["cached_tokens_details"] is None
        assert warm["meta_info"]["cached_tokens_details"] == {"device": warm["meta_info"]["cached_tokens"],
                                                               "host": 0}
        assert warm["meta_info"]["cached_tokens"] > 0

        ask = {"model": "m", "messages": messages, "max_tokens": 3, **salt}
        plain = client.post("/v1/chat/completions", json=ask).json()  # warms the prompt
        assert "sglext" not in plain
        asked = client.post("/v1/chat/completions", json={**ask, "return_cached_tokens_details": True}).json()
        cached = asked["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0 and asked["sglext"] == {"cached_tokens_details": {"device": cached, "host": 0}}

        with client.stream("POST", "/v1/chat/completions",
                           json={**ask, "stream": True, "return_cached_tokens_details": True,
                                 "stream_options": {"include_usage": True}}) as response:
            events = sse_events(response)
        extension, usage, done = events[-3:]
        assert done == "[DONE]" and usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
        assert extension["object"] == "chat.completion.chunk" and extension["choices"] == []
        assert extension["usage"] is None and extension["id"] == usage["id"]
        assert extension["sglext"] == {"cached_tokens_details": {
            "device": usage["usage"]["prompt_tokens_details"]["cached_tokens"], "host": 0}}
        assert events[-4]["choices"][0]["finish_reason"] == "length"

        prompt = {"model": "m", "prompt": "A completion prompt never sent before.", "max_tokens": 2,
                  "return_cached_tokens_details": True, "cache_salt": "test-cached-details-completion"}
        first = client.post("/v1/completions", json=prompt).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 and "sglext" not in first
        with client.stream("POST", "/v1/completions", json={**prompt, "stream": True}) as response:
            events = sse_events(response)
        assert events[-1] == "[DONE]" and events[-2]["object"] == "text_completion"
        assert events[-2]["choices"] == [] and events[-2]["sglext"]["cached_tokens_details"]["device"] > 0

def test_no_cache_report_without_flag(sim_factory):
    plain = sim_factory()
    completion = openai_client(plain).chat.completions.create(model="m", messages=CHAT, max_tokens=2)
    assert completion.usage.prompt_tokens_details is None


# ---------------------------------------------------------------- completions

def test_completions_non_streaming_and_streaming(sim):
    client = openai_client(sim)
    completion = client.completions.create(model="m", prompt="Once upon a time", max_tokens=4)
    assert completion.object == "text_completion" and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 4

    with sim.client() as raw, raw.stream("POST", "/v1/completions", json={
            "model": "m", "prompt": [5, 6, 7, 8], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        events = sse_events(response)
    *texts, usage, done = events
    assert done == "[DONE]" and len(texts) == 3
    assert [t["choices"][0]["finish_reason"] for t in texts] == [None, None, "length"]
    assert all(t["object"] == "text_completion" and t["usage"] is None for t in texts)
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 4
    assert "completion_tokens_details" not in usage["usage"]  # dumped with exclude_none


def test_completions_default_max_tokens_is_16(sim):
    completion = openai_client(sim).completions.create(model="m", prompt="Hello")
    assert completion.usage.completion_tokens == 16


# ---------------------------------------------------------------- errors

def test_context_length_exceeded_is_400_even_when_streaming(sim):
    long_prompt = "word " * 5000  # > 4096 tokens
    client = openai_client(sim)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": long_prompt}], max_tokens=4)
    body = error.value.response.json()
    assert body["object"] == "error" and body["code"] == 400 and body["param"] is None
    assert body["message"].startswith("The input (") and body["message"].endswith(
        "tokens) is longer than the model's context length (4096 tokens).")

    with sim.client() as raw:
        response = raw.post("/v1/chat/completions", json={
            "model": "m", "messages": CHAT, "max_tokens": 4090, "stream": True})
        assert response.status_code == 400
        assert response.json()["message"].startswith(
            "Requested token count exceeds the model's maximum context length of 4096 tokens.")
        assert response.json()["type"] == "BadRequestError"
        # More than the context for the output alone: serving_chat's own check, first.
        response = raw.post("/v1/chat/completions", json={
            "model": "m", "messages": CHAT, "max_completion_tokens": 5000, "stream": True})
        assert response.status_code == 400 and response.json()["type"] == "BadRequestError"
        assert response.json()["message"] == (
            "max_completion_tokens is too large: 5000.This model supports at most 4096 completion tokens.")


def prompt_ids(count: int) -> list[int]:
    return [10 + i % 50 for i in range(count)]


@pytest.fixture(scope="module")
def small_pool_sim(sim_factory):
    """A KV pool of 1,000 tokens under a context of 4,096."""
    return sim_factory("--enable-cache-report", "--context-length", "4096", "--max-total-tokens", "1000")


def test_the_kv_pool_bounds_a_request_as_sglangs_scheduler_does(small_pool_sim):
    """A prompt that leaves the pool no room (≥ min(context, pool) − 6) is
    refused; a request's output is cut to what its prompt leaves of the pool."""
    refusal = ("Input length (1200 tokens) exceeds the maximum allowed length (994 tokens). "
               "Use a shorter input or enable --allow-auto-truncate.")
    with small_pool_sim.client() as client:
        native = client.post("/generate", json={"input_ids": prompt_ids(1200), "sampling_params": {"max_new_tokens": 3}})
        assert native.status_code == 400 and native.json() == {"error": {"message": refusal}}
        streamed = sse_events(client.post("/generate", json={
            "input_ids": prompt_ids(1200), "sampling_params": {"max_new_tokens": 3}, "stream": True}))
        assert streamed[0]["error"]["message"] == refusal and streamed[0]["error"]["code"] == 400
        assert streamed[-1] == "[DONE]"

        cut = client.post("/generate", json={"input_ids": prompt_ids(500),
                                             "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}})
        assert cut.status_code == 200
        meta = cut.json()["meta_info"]
        assert meta["completion_tokens"] == 999 - 500 - 1 and meta["finish_reason"] == {"type": "length",
                                                                                       "length": 498}

        chat = client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "word " * 1100}], "max_tokens": 3})
        assert chat.status_code == 400 and chat.json()["type"] == "BadRequestError"
        assert chat.json()["message"].startswith("Input length (") and "(994 tokens)" in chat.json()["message"]
        stream = client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "word " * 1100}], "max_tokens": 3, "stream": True})
        assert stream.status_code == 200  # refused by the scheduler, after the headers
        events = sse_events(stream)
        assert events[0]["error"]["code"] == 400 and "(994 tokens)" in events[0]["error"]["message"]


def test_allow_auto_truncate_cuts_instead_of_refusing(sim_factory):
    truncating = sim_factory("--enable-cache-report", "--context-length", "4096", "--allow-auto-truncate")
    with truncating.client() as client:
        # max_new_tokens cut to what the context leaves, then to the scheduler's bound (context − 2 − prompt).
        cut = client.post("/generate", json={"input_ids": prompt_ids(100),
                                             "sampling_params": {"max_new_tokens": 5000, "ignore_eos": True}})
        assert cut.status_code == 200 and cut.json()["meta_info"]["completion_tokens"] == 4096 - 2 - 100
        # A prompt past the context: cut to the context, then to the scheduler's input bound (4,095 − 5).
        long = client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "word " * 4200}], "max_tokens": 5000})
        assert long.status_code == 200
        assert long.json()["usage"]["prompt_tokens"] == 4090


def test_validation_errors(sim):
    with sim.client() as client:
        not_json = client.post("/v1/chat/completions", content=b"{}", headers={"Content-Type": "text/plain"})
        assert not_json.status_code == 400 and not_json.json()["object"] == "error"
        empty = client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert empty.status_code == 400 and empty.json()["message"] == "Messages cannot be empty."
        missing = client.post("/v1/chat/completions", json={"model": "m"})
        assert missing.status_code == 400 and missing.json()["type"] == "Bad Request"
        bad_json = client.post("/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 400
        unknown_extra = client.post("/v1/chat/completions", json={
            "model": "m", "messages": CHAT, "max_tokens": 1, "some_future_field": {"x": 1}})
        assert unknown_extra.status_code == 200


def test_models_endpoints(sim):
    with sim.client() as client:
        listing = client.get("/v1/models").json()
        assert listing["object"] == "list"
        assert listing["data"][0]["id"] == "demo-llm" and listing["data"][0]["max_model_len"] == 4096
        assert client.get("/v1/models/demo-llm").json()["owned_by"] == "sglang"
        unknown = client.get("/v1/models/nope")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": {"message": "The model 'nope' does not exist", "type": "invalid_request_error",
                                        "param": "model", "code": "model_not_found"}}


# ---------------------------------------------------------------- native /generate

def test_generate_non_streaming(sim):
    with sim.client() as client:
        body = client.post("/generate", json={"text": "Hello world", "rid": "gen-1",
                                              "sampling_params": {"max_new_tokens": 4}}).json()
    assert list(body) == ["text", "output_ids", "meta_info"]
    meta = body["meta_info"]
    assert meta["id"] == "gen-1" and meta["finish_reason"] == {"type": "length", "length": 4}
    assert meta["completion_tokens"] == 4 == len(body["output_ids"])
    assert meta["prompt_tokens"] == 2 and meta["weight_version"] == "default" and meta["num_retractions"] == 0
    assert "e2e_latency" in meta and "cached_tokens" in meta and meta["reasoning_tokens"] == 0


def test_generate_streaming_is_cumulative(sim):
    with sim.client() as client, client.stream("POST", "/generate", json={
            "input_ids": [11, 12, 13], "sampling_params": {"max_new_tokens": 4}, "stream": True}) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    outputs = events[:-1]
    assert len(outputs) == 4
    for previous, current in zip(outputs, outputs[1:]):
        assert current["text"].startswith(previous["text"]) and len(current["text"]) > len(previous["text"])
        assert current["output_ids"][:len(previous["output_ids"])] == previous["output_ids"]
    assert [o["meta_info"]["finish_reason"] for o in outputs[:-1]] == [None, None, None]
    assert outputs[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert "e2e_latency" in outputs[-1]["meta_info"] and "e2e_latency" not in outputs[0]["meta_info"]


@pytest.fixture(scope="module")
def launch_flags_sim(sim_factory):
    """SGLang's streaming launch flags, and --random-seed (its name for --seed)."""
    return sim_factory("--incremental-streaming-output", "--stream-response-default-include-usage",
                       "--enable-metrics", "--random-seed", "7")


def test_incremental_streaming_output_sends_only_what_is_new(launch_flags_sim, sim):
    """--incremental-streaming-output: each /generate stream event has the new
    text, output ids and logprob entries only; counts stay cumulative; the
    pieces add up to the whole reply. A batch stream does it per index."""
    ask = {"text": "Tell me more", "return_logprob": True, "top_logprobs_num": 2,
           "sampling_params": {"max_new_tokens": 40}}
    with launch_flags_sim.client() as client:
        whole = client.post("/generate", json=ask).json()
        with client.stream("POST", "/generate", json={**ask, "stream": True}) as response:
            events = sse_events(response)[:-1]
        with client.stream("POST", "/generate", json={**ask, "text": [ask["text"], "Other"], "stream": True}) as response:
            batch = sse_events(response)[:-1]
        info = client.get("/server_info").json()
    assert info["incremental_streaming_output"] and info["stream_response_default_include_usage"]
    assert info["random_seed"] == 7
    assert len(events) == whole["meta_info"]["completion_tokens"] > 1
    assert all(len(event["output_ids"]) == 1 for event in events)
    assert "".join(event["text"] for event in events) == whole["text"]
    assert [i for event in events for i in event["output_ids"]] == whole["output_ids"]
    for key in ("output_token_logprobs", "output_top_logprobs"):
        assert [entry for event in events for entry in event["meta_info"][key]] == whole["meta_info"][key]
    assert [event["meta_info"]["completion_tokens"] for event in events] == list(range(1, len(events) + 1))
    assert events[-1]["meta_info"]["finish_reason"] == whole["meta_info"]["finish_reason"]
    first = [event for event in batch if event["index"] == 0]
    assert "".join(event["text"] for event in first) == whole["text"]
    # The same prompt on a server without the flag streams the whole reply so far.
    with sim.client() as client, client.stream("POST", "/generate", json={**ask, "stream": True}) as response:
        cumulative = sse_events(response)[:-1]
    assert [len(event["output_ids"]) for event in cumulative] == list(range(1, len(cumulative) + 1))
    assert len(cumulative[-1]["meta_info"]["output_token_logprobs"]) == len(cumulative)


def test_streams_end_with_usage_by_default_under_the_flag(launch_flags_sim, sim):
    """--stream-response-default-include-usage: an OpenAI stream ends with its
    usage chunk though the request did not ask; without the flag it does not."""
    ask = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    for server, expected in ((launch_flags_sim, True), (sim, False)):
        with server.client() as client:
            with client.stream("POST", "/v1/chat/completions", json=ask) as response:
                chat = sse_events(response)[:-1]
            with client.stream("POST", "/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 3,
                                                                 "stream": True}) as response:
                completion = sse_events(response)[:-1]
        for events in (chat, completion):
            assert (events[-1].get("usage") is not None and events[-1]["choices"] == []) == expected
            if expected:
                assert events[-1]["usage"]["completion_tokens"] == 3


def test_a_stream_never_shows_a_stop_string_it_trims(sim, interval_sim):
    """SGLang holds a stream's output while its text ends with the start of a
    stop string, so a stop string spanning tokens, trimmed at the finish,
    never reaches the client: streamed text equals the whole reply's, native
    and OpenAI, at any stream interval."""
    ask = {"model": "m", "messages": [{"role": "user", "content": "Stop me"}], "max_tokens": 20}
    with sim.client() as client:
        words = client.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"].split(" ")
    stop = " " + words[3] + " " + words[4]  # two tokens
    for server in (sim, interval_sim):
        with server.client() as client:
            whole = client.post("/v1/chat/completions", json={**ask, "stop": [stop]}).json()["choices"][0]
            with client.stream("POST", "/v1/chat/completions", json={**ask, "stop": [stop], "stream": True}) as response:
                events = sse_events(response)[:-1]
            plain = client.post("/generate", json={"text": "Stop me", "sampling_params": {"max_new_tokens": 20}})
            native_words = plain.json()["text"].split(" ")
            native_stop = " " + native_words[3] + " " + native_words[4]
            native = {"text": "Stop me", "sampling_params": {"max_new_tokens": 20, "stop": [native_stop]}}
            whole_native = client.post("/generate", json=native).json()
            with client.stream("POST", "/generate", json={**native, "stream": True}) as response:
                native_events = sse_events(response)[:-1]
        assert whole["finish_reason"] == "stop" and stop.split()[0] not in whole["message"]["content"].split()[-1:]
        streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert streamed == whole["message"]["content"] == " ".join(words[:3])
        assert whole_native["meta_info"]["finish_reason"] == {"type": "stop", "matched": native_stop}
        assert whole_native["text"] == " ".join(native_words[:3])
        assert all(whole_native["text"].startswith(event["text"]) for event in native_events)
        assert native_events[-1]["text"] == whole_native["text"]


@pytest.fixture(scope="module")
def interval_sim(sim_factory):
    return sim_factory("--stream-interval", "4")


def test_stream_interval_sends_the_first_token_then_every_nth(interval_sim, sim, launch_flags_sim):
    """--stream-interval N (or a native request's sampling_params.stream_interval):
    the first token goes out at once, then an event per N tokens, and the
    last at the finish; an OpenAI chunk then carries several tokens' text and
    logprobs, which add up to the whole reply's."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "Count for me"}], "max_tokens": 30,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 1}
    with interval_sim.client() as client:
        whole = client.post("/v1/chat/completions", json=chat).json()["choices"][0]
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as response:
            events = sse_events(response)[:-1]
        assert client.get("/server_info").json()["stream_interval"] == 4
    chunks = [event["choices"][0] for event in events if event["choices"] and event["choices"][0]["delta"].get("content")]
    assert "".join(chunk["delta"]["content"] for chunk in chunks) == whole["message"]["content"]
    entries = [entry for chunk in chunks for entry in chunk["logprobs"]["content"]]
    assert entries == whole["logprobs"]["content"]
    assert [len(chunk["logprobs"]["content"]) for chunk in chunks] == [1] + [4] * (len(chunks) - 2) + [
        len(entries) - 1 - 4 * (len(chunks) - 2)]
    assert len(chunks) == 1 + -(-29 // 4)  # 30 tokens: the first, then seven events of at most four

    native = {"text": "Count for me", "sampling_params": {"max_new_tokens": 11, "stream_interval": 3}, "stream": True}
    with sim.client() as client, client.stream("POST", "/generate", json=native) as response:
        cumulative = sse_events(response)[:-1]
    assert [len(event["output_ids"]) for event in cumulative] == [1, 4, 7, 10, 11]
    with launch_flags_sim.client() as client, client.stream("POST", "/generate", json=native) as response:
        incremental = sse_events(response)[:-1]
    assert [len(event["output_ids"]) for event in incremental] == [1, 3, 3, 3, 1]
    assert [event["meta_info"]["completion_tokens"] for event in incremental] == [1, 4, 7, 10, 11]


def test_generate_default_max_new_tokens_and_context_error(sim):
    with sim.client() as client:
        body = client.post("/generate", json={"text": "Hi", "sampling_params": {"ignore_eos": True}}).json()
        assert body["meta_info"]["completion_tokens"] == 128  # SGLang's default max_new_tokens
        natural = client.post("/generate", json={"text": "Hi"}).json()["meta_info"]
        assert natural["finish_reason"]["type"] == "stop" and 16 <= natural["completion_tokens"] <= 64
        too_long = client.post("/generate", json={"input_ids": list(range(4096))})
        assert too_long.status_code == 400
        assert too_long.json() == {"error": {"message": (
            "The input (4096 tokens) is longer than the model's context length (4096 tokens).")}}


def test_generate_batch_and_parallel_sampling(sim):
    """GenerateReqInput batches: a list of texts (or of id lists) answers a
    list in prompt order, rids `<rid>_<i>` from a string; `n` > 1 makes even
    one prompt a batch of n samples with fresh rids, after a prefill request
    that caches the prompt; streamed, each event carries its `index`."""
    with sim.client() as client:
        one = client.post("/generate", json={"text": "Once upon a time", "sampling_params": {"max_new_tokens": 3}})
        batch = client.post("/generate", json={"text": ["Once upon a time", "In a hole"], "rid": "b",
                                               "sampling_params": [{"max_new_tokens": 3}, {"max_new_tokens": 2}]})
        ids = client.post("/generate", json={"input_ids": [[5, 6, 7], [8, 9]], "rid": ["i1", "i2"],
                                             "sampling_params": {"max_new_tokens": 1}})
        before = client.get("/sim/stats").json()["requests_received"]
        sampled = client.post("/generate", json={"text": "A long time ago", "sampling_params": {
            "max_new_tokens": 4, "n": 3}})
        after = client.get("/sim/stats").json()["requests_received"]
        greedy = client.post("/generate", json={"text": "A long time ago", "sampling_params": {
            "max_new_tokens": 4, "n": 2, "temperature": 0}})
        mismatch = client.post("/generate", json={"text": ["a", "b"], "rid": ["only-one"]})
        mixed_n = client.post("/generate", json={"text": ["a", "b"], "sampling_params": [{"n": 1}, {"n": 2}]})
    outputs = batch.json()
    assert isinstance(outputs, list) and [o["meta_info"]["id"] for o in outputs] == ["b_0", "b_1"]
    assert outputs[0]["text"] == one.json()["text"]
    assert [o["meta_info"]["completion_tokens"] for o in outputs] == [3, 2]
    assert [o["meta_info"]["id"] for o in ids.json()] == ["i1", "i2"]
    assert [o["meta_info"]["prompt_tokens"] for o in ids.json()] == [3, 2]

    samples = sampled.json()
    assert len(samples) == 3 and len({o["text"] for o in samples}) == 3
    assert all(len(o["meta_info"]["id"]) == 32 for o in samples)  # fresh uuid4 hex rids
    assert after - before == 4  # the prefill request, then the 3 samples
    prompt = samples[0]["meta_info"]["prompt_tokens"]
    assert all(o["meta_info"]["cached_tokens"] >= prompt - 1 for o in samples)
    assert greedy.json()[0]["text"] == greedy.json()[1]["text"]
    assert mismatch.status_code == 400 and mismatch.json() == {"error": {"message": (
        "The specified rids length mismatch with the batch_size for batch processing.")}}
    assert mixed_n.status_code == 400
    assert "parallel_sample_num should be the same" in mixed_n.json()["error"]["message"]

    with sim.client() as client, client.stream("POST", "/generate", json={
            "text": ["Once upon a time", "In a hole"], "sampling_params": {"max_new_tokens": 3, "n": 2},
            "stream": True}) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    by_index: dict[int, list] = {}
    for event in events[:-1]:
        by_index.setdefault(event["index"], []).append(event)
    assert sorted(by_index) == [0, 1, 2, 3]
    for index, stream in by_index.items():
        assert len(stream) == 3 and stream[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
        assert all(later["text"].startswith(earlier["text"]) for earlier, later in zip(stream, stream[1:]))
    # Prompt by prompt, then sample: events 0 and 1 are the first prompt's samples.
    first_prompt = {by_index[i][-1]["meta_info"]["prompt_tokens"] for i in (0, 1)}
    second_prompt = {by_index[i][-1]["meta_info"]["prompt_tokens"] for i in (2, 3)}
    assert first_prompt == {one.json()["meta_info"]["prompt_tokens"]} and len(second_prompt) == 1
    assert first_prompt != second_prompt


# ---------------------------------------------------------------- abort / disconnect

def test_abort_request_ends_stream_with_abort(sim):
    with sim.client() as client:
        client.post("/sim/faults", json={"itl_ms": 20}).raise_for_status()
    stream = openai_client(sim).chat.completions.create(
        model="m", messages=CHAT, max_tokens=1000, stream=True, extra_body={"rid": "abort-me-1"})
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            with sim.client() as client:
                response = client.post("/abort_request", json={"rid": "abort-me-1"})
            assert response.status_code == 200 and response.content == b""
    assert chunks[-1].choices[0].finish_reason == "abort"
    assert len(chunks) < 50
    stats = wait_for_stats(sim, lambda s: "abort-me-1" in s["aborted_by_request"])
    assert "abort-me-1" in stats["aborted_by_request"] and "abort-me-1" in stats["aborted_rids"]
    assert "abort-me-1" not in stats["disconnected"] and "abort-me-1" in stats["abort_request_rids"]


def test_abort_of_native_request_reports_abort_finish_reason(sim):
    with sim.client() as client:
        client.post("/sim/faults", json={"ttft_ms": 5000}).raise_for_status()
        timer = threading.Timer(0.3, lambda: httpx.post(f"{sim.base_url}/abort_request", json={"rid": "native-abort"}))
        timer.start()
        body = client.post("/generate", json={"text": "x", "rid": "native-abort"}).json()
        timer.join()
    assert body["meta_info"]["finish_reason"] == {"type": "abort", "message": "Aborted", "status_code": None,
                                                  "err_type": None}
    assert body["meta_info"]["completion_tokens"] == 0


def test_abort_of_a_queued_native_request_gets_the_short_answer(sim_factory):
    """A request /abort_request takes from the waiting queue is answered by
    SGLang's tokenizer manager: "Abort in waiting queue", and a meta_info of
    its id, finish reason, weight version, latency and completion tokens."""
    one_slot = sim_factory("--max-running-requests", "1", "--decode-base-ms", "20", "--time-scale", "0.5")
    with httpx.Client(base_url=one_slot.base_url, timeout=30) as client:
        first = threading.Thread(target=lambda: client.post("/generate", json={
            "text": "first", "rid": "running-one", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}))
        first.start()
        time.sleep(0.2)
        timer = threading.Timer(0.3, lambda: httpx.post(f"{one_slot.base_url}/abort_request",
                                                        json={"rid": "queued-one"}))
        timer.start()
        body = client.post("/generate", json={"text": "second", "rid": "queued-one"}).json()
        timer.join()
        client.post("/abort_request", json={"rid": "running-one"}).raise_for_status()
        first.join()
    assert body["meta_info"] == {"id": "queued-one",
                                 "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
                                 "weight_version": body["meta_info"]["weight_version"],
                                 "e2e_latency": body["meta_info"]["e2e_latency"], "completion_tokens": 0}
    assert body["text"] == ""


def test_client_disconnect_is_recorded(sim):
    with sim.client() as client:
        client.post("/sim/faults", json={"itl_ms": 20}).raise_for_status()
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "m", "messages": CHAT, "max_tokens": 1000, "stream": True, "rid": "gone-1"}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # leave after the first event: the connection is closed
    stats = wait_for_stats(sim, lambda s: "gone-1" in s["disconnected"])
    assert "gone-1" in stats["disconnected"] and "gone-1" not in stats["aborted_by_request"]
    assert "gone-1" not in stats["active_rids"]


def test_disconnect_while_waiting_for_first_token(sim):
    with sim.client() as client:
        client.post("/sim/faults", json={"hang": True}).raise_for_status()
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "stream": True,
                                                      "rid": "hung-1"}, timeout=0.3)
    stats = wait_for_stats(sim, lambda s: "hung-1" in s["disconnected"])
    assert "hung-1" in stats["disconnected"]


# ---------------------------------------------------------------- faults

def test_error_rate_gives_500(sim):
    with sim.client() as client:
        settings = client.post("/sim/faults", json={"error_rate": 1.0}).json()
        assert settings["error_rate"] == 1.0 and settings["hang"] is False  # full settings echoed
        native = client.post("/generate", json={"text": "hi"})
        assert native.status_code == 500 and "message" in native.json()["error"]
        streaming = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "stream": True})
        assert streaming.status_code == 500 and streaming.json()["code"] == 500
    with pytest.raises(openai.InternalServerError):
        openai_client(sim).chat.completions.create(model="m", messages=CHAT, max_tokens=2)


def test_crash_after_tokens_sends_mid_stream_error(sim):
    with sim.client() as client:
        client.post("/sim/faults", json={"crash_after_tokens": 2}).raise_for_status()
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "m", "messages": CHAT, "max_tokens": 10, "stream": True}) as response:
            events = sse_events(response)
        with client.stream("POST", "/generate", json={"text": "hi", "stream": True}) as response:
            native_events = sse_events(response)
    role, first, second, error, done = events
    assert second["choices"][0]["delta"]["content"]
    assert error["error"]["code"] == 500 and error["error"]["object"] == "error"
    assert done == "[DONE]"
    assert len(native_events) == 4 and native_events[2]["error"]["code"] == 500


def test_faults_validation_and_get(sim):
    with sim.client() as client:
        assert client.post("/sim/faults", json={"error_rate": 2}).status_code == 400
        assert client.post("/sim/faults", json={"bogus": 1}).status_code == 400
        assert client.post("/sim/faults", json={"ttft_ms": 1.5}).json()["ttft_ms"] == 1.5
        assert client.get("/sim/faults").json() == {
            "error_rate": 0.0, "crash_after_tokens": None, "hang": False, "unhealthy": False,
            "ttft_ms": 1.5, "itl_ms": 0.0, "prefill_us_per_token": 0.0, "startup_delay_ms": 0.0}


def test_unhealthy_and_hang_release(sim):
    with sim.client() as client:
        assert client.get("/health").status_code == 200 and client.get("/health").content == b""
        client.post("/sim/faults", json={"unhealthy": True}).raise_for_status()
        assert client.get("/health").status_code == 503
        assert client.get("/health_generate").status_code == 503
        received = client.get("/sim/stats").json()["requests_received"]
        client.post("/sim/faults", json={"unhealthy": False, "hang": True}).raise_for_status()
        # A hung engine never answers the health probe's generation: 503 once
        # SGLANG_HEALTH_CHECK_TIMEOUT (1 s under test) has passed.
        assert client.get("/health").status_code == 503
        assert client.get("/health_generate").status_code == 503
        # Probes are not counted as requests.
        assert client.get("/sim/stats").json()["requests_received"] == received
        releaser = threading.Timer(0.3, lambda: httpx.post(f"{sim.base_url}/sim/faults", json={"hang": False}))
        releaser.start()
        started = time.monotonic()
        body = client.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}).json()
        releaser.join()
    assert time.monotonic() - started >= 0.25
    assert body["meta_info"]["finish_reason"]["type"] == "length"


def test_ttft_latency_is_applied(sim):
    with sim.client() as client:
        client.post("/sim/faults", json={"ttft_ms": 200}).raise_for_status()
        started = time.monotonic()
        client.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 1}}).raise_for_status()
    assert time.monotonic() - started >= 0.2


# ---------------------------------------------------------------- server endpoints

def test_info_endpoints(sim):
    with sim.client() as client:
        server_info = client.get("/server_info").json()
        assert server_info["context_length"] == 4096 and server_info["served_model_name"] == "demo-llm"
        assert server_info["enable_cache_report"] is True and server_info["internal_states"]
        assert "version" in server_info
        # The scheduler's init info at the top level, as SGLang merges it in.
        capacity = server_info["internal_states"][0]["max_total_num_tokens"]
        assert server_info["status"] == "ready" and server_info["max_total_num_tokens"] == capacity
        assert server_info["max_req_input_len"] == min(4096, capacity) - 1 - 5
        assert client.get("/get_server_info").json()["context_length"] == 4096
        model_info = client.get("/model_info").json()
        assert model_info["model_path"] == "demo/demo-llm" and model_info["is_generation"] is True
        assert client.get("/get_model_info").status_code == 200
        loads = client.get("/v1/loads").json()
        assert {"timestamp", "version", "accelerator", "num_accelerators", "loads"} <= set(loads)
        assert loads["loads"][0]["dp_rank"] == 0 and "num_running_reqs" in loads["loads"][0]
        legacy = client.get("/get_load").json()
        assert legacy[0]["num_reqs"] >= 0 and "num_tokens" in legacy[0]
        assert client.get("/ready").status_code == 200
        metrics = client.get("/metrics").text
        for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                     "sglang:cache_hit_rate", "sglang:gen_throughput", "sglang:prompt_tokens_total",
                     "sglang:generation_tokens_total", "sglang:cached_tokens_total", "sglang:num_requests_total",
                     "sglang:time_to_first_token_seconds_bucket", "sglang:inter_token_latency_seconds_count",
                     "sglang:e2e_request_latency_seconds_sum"):
            assert name in metrics
        assert 'model_name="demo-llm",engine_type="unified"' in metrics


def test_flush_cache(sim):
    with sim.client() as client:
        client.post("/generate", json={"text": "flush me please", "sampling_params": {"max_new_tokens": 1}})
        flushed = client.post("/flush_cache")
        assert flushed.status_code == 200 and flushed.text.startswith("Cache flushed.")
        assert client.get("/sim/stats").json()["cache"]["total_tokens"] == 0


def test_api_key(sim_factory):
    secured = sim_factory(api_key="secret-key")
    with httpx.Client(base_url=secured.base_url) as anonymous:
        response = anonymous.post("/v1/chat/completions", json={"model": "m", "messages": CHAT})
        assert response.status_code == 401 and response.json() == {"error": "Unauthorized"}
        assert anonymous.get("/v1/models").status_code == 401
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    completion = openai_client(secured).chat.completions.create(model="m", messages=CHAT, max_tokens=1)
    assert completion.usage.completion_tokens == 1


def test_admin_api_key_guards_cache_abort_and_lora_endpoints(sim_factory):
    lora = ("--enable-lora", "--max-lora-rank", "16", "--lora-target-modules", "all")
    secured = sim_factory(*lora, api_key="secret-key")
    admin = sim_factory(*lora, "--admin-api-key", "admin-key", api_key="secret-key")
    user = {"Authorization": "Bearer secret-key"}
    with httpx.Client(base_url=admin.base_url) as client:
        for path, body in (("/flush_cache", None), ("/abort_request", {"rid": "x"}),
                           ("/load_lora_adapter", {"lora_name": "a", "lora_path": "/nowhere"}),
                           ("/unload_lora_adapter", {"lora_name": "a"})):
            refused = client.post(path, json=body, headers=user)
            assert refused.status_code == 401 and refused.json() == {"error": "Unauthorized"}, path
            accepted = client.post(path, json=body, headers={"Authorization": "Bearer admin-key"})
            assert accepted.status_code != 401, path
        # Everything else still takes the API key, and only it.
        assert client.get("/v1/models", headers=user).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer admin-key"}).status_code == 401
    # Without an admin key, the API key opens the admin endpoints too.
    with httpx.Client(base_url=secured.base_url, headers=user) as client:
        assert client.post("/flush_cache").status_code == 200


def test_health_probe_waits_for_the_engine_unless_generation_is_off(sim_factory):
    quick = sim_factory(env={"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "false"})
    with quick.client() as client:
        client.post("/sim/faults", json={"hang": True}).raise_for_status()
        # /health no longer generates: the process is up, so 200 at once...
        assert client.get("/health").status_code == 200
        # ...while /health_generate still waits for an answer that never comes.
        assert client.get("/health_generate").status_code == 503
        client.post("/sim/faults", json={"hang": False}).raise_for_status()
        assert client.get("/health_generate").status_code == 200
    # SGLang looks for the engine's answer once a second: a probe takes that long.
    polling = sim_factory("--health-poll-ms", "1000")
    with polling.client() as client:
        started = time.monotonic()
        assert client.get("/health").status_code == 200
        assert time.monotonic() - started >= 0.9


def test_embedding_model_answers_v1_embeddings_as_sglang_does(sim_factory):
    embedder = sim_factory("--is-embedding", "--embedding-dim", "32", "--json-model-override-args",
                           '{"is_matryoshka": true}')
    with embedder.client() as client:
        body = client.post("/v1/embeddings", json={"model": "demo-llm", "input": ["one two three", "four"]}).json()
        assert body["object"] == "list" and body["model"] == "demo/demo-llm"  # SGLang reports the model path
        assert [(item["object"], item["index"]) for item in body["data"]] == [("embedding", 0), ("embedding", 1)]
        vector = body["data"][0]["embedding"]
        assert len(vector) == 32 and math.isclose(sum(x * x for x in vector), 1.0)
        assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4, "completion_tokens": 0,
                                 "prompt_tokens_details": None, "reasoning_tokens": 0,
                                 "completion_tokens_details": None}
        # Deterministic; `dimensions` keeps a renormalised prefix.
        again = client.post("/v1/embeddings", json={"model": "m", "input": "one two three"}).json()
        assert again["data"][0]["embedding"] == vector
        short = client.post("/v1/embeddings", json={"model": "m", "input": "one two three", "dimensions": 8}).json()
        assert len(short["data"][0]["embedding"]) == 8
        for bad, message in (("   ", "Input cannot be empty or whitespace only"),
                             ([1, -2], "Token ID at index 1 must be non-negative"),
                             ([[1], []], "Input at index 1 cannot be empty")):
            refused = client.post("/v1/embeddings", json={"model": "m", "input": bad})
            assert refused.status_code == 400 and refused.json()["message"] == message
        # No generation on an embedding model.
        chat = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT})
        assert chat.status_code == 400 and "--is-embedding" in chat.json()["message"]
        assert client.post("/generate", json={"text": "hi"}).status_code == 400
        assert client.get("/model_info").json()["is_generation"] is False
        assert client.get("/server_info").json()["is_embedding"] is True


def test_skip_tokenizer_init_serves_ids_only(sim_factory):
    """--skip-tokenizer-init, as SGLang's test_skip_tokenizer_init drives it:
    input_ids in, output_ids and meta_info out (no text, whole or streamed,
    nor in logprobs); a text prompt is refused with SGLang's message."""
    sim = sim_factory("--skip-tokenizer-init")
    prompt = {"input_ids": list(range(400, 420)), "return_logprob": True, "return_text_in_logprobs": True,
              "top_logprobs_num": 2, "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}
    with sim.client() as client:
        whole = client.post("/generate", json=prompt).json()
        with client.stream("POST", "/generate", json={**prompt, "stream": True}) as reply:
            events = [json.loads(line[len("data: "):]) for line in reply.iter_lines()
                      if line.startswith("data: {")]
        sampled = client.post("/generate", json={"input_ids": list(range(400, 420)),
                                                 "sampling_params": {"max_new_tokens": 3, "n": 2}}).json()
        text = client.post("/generate", json={"text": "hello"})
        flagged = client.get("/server_info").json()["skip_tokenizer_init"]
    assert set(whole) == {"output_ids", "meta_info"} and len(whole["output_ids"]) == 6
    assert all(entry[2] is None for entry in whole["meta_info"]["output_token_logprobs"])
    assert all("text" not in event for event in events) and events[-1]["output_ids"] == whole["output_ids"]
    assert len(sampled) == 2 and all(set(item) == {"output_ids", "meta_info"} for item in sampled)
    assert text.status_code == 400 and text.json()["error"]["message"] == (
        "The engine initialized with skip_tokenizer_init=True cannot accept text prompts. Please provide input_ids "
        "or re-initialize the engine with skip_tokenizer_init=False.")
    assert flagged is True


def test_native_encode_gives_the_embeddings_with_their_meta_info(sim_factory):
    """SGLang's POST /encode (EmbeddingReqInput): `text` or `input_ids`, one
    or a batch; the same vectors as /v1/embeddings, each with its meta_info;
    refused on a generation model."""
    embedder = sim_factory("--is-embedding", "--embedding-dim", "32", "--json-model-override-args",
                           '{"is_matryoshka": true}')
    with embedder.client() as client:
        openai_style = client.post("/v1/embeddings", json={"model": "m", "input": ["one two", "three"]}).json()
        one = client.post("/encode", json={"text": "one two", "rid": "enc-1"}).json()
        batch = client.put("/encode", json={"text": ["one two", "three"], "rid": "enc"}).json()
        ids = client.post("/tokenize", json={"prompt": "one two"}).json()["tokens"]
        by_ids = client.post("/encode", json={"input_ids": ids, "dimensions": 8}).json()
        neither = client.post("/encode", json={"rid": "x"})
    assert one["embedding"] == openai_style["data"][0]["embedding"]
    meta = one["meta_info"]
    assert meta["id"] == "enc-1" and meta["prompt_tokens"] == 2 and meta["finish_reason"] == {"type": "length",
                                                                                                "length": 0}
    assert set(meta) == {"id", "finish_reason", "prompt_tokens", "weight_version", "num_retractions", "e2e_latency"}
    assert [item["embedding"] for item in batch] == [item["embedding"] for item in openai_style["data"]]
    assert [item["meta_info"]["id"] for item in batch] == ["enc_0", "enc_1"]
    assert len(by_ids["embedding"]) == 8 and math.isclose(sum(x * x for x in by_ids["embedding"]), 1.0)
    assert neither.status_code == 400 and "error" in neither.json()
    generator = sim_factory()
    with generator.client() as client:
        refused = client.post("/encode", json={"text": "one two"})
    assert refused.status_code == 400 and "--is-embedding" in refused.json()["error"]["message"]


def test_embedding_encodings_and_matryoshka_dimensions_as_sglang_checks_them(sim_factory):
    """`encoding_format` base64 is the float32 bytes (any other format refused);
    `dimensions` only on a Matryoshka model, among the sizes its config lists,
    with the tokenizer manager's messages."""
    plain = sim_factory("--is-embedding", "--embedding-dim", "32")
    listed = sim_factory("--is-embedding", "--embedding-dim", "32", "--json-model-override-args",
                         '{"matryoshka_dimensions": [8, 16]}')
    with plain.client() as client:
        floats = client.post("/v1/embeddings", json={"model": "m", "input": "one two"}).json()["data"][0]["embedding"]
        encoded = client.post("/v1/embeddings", json={"model": "m", "input": "one two", "encoding_format": "base64"})
        bogus = client.post("/v1/embeddings", json={"model": "m", "input": "one two", "encoding_format": "hex"})
        shortened = client.post("/v1/embeddings", json={"model": "m", "input": "one two", "dimensions": 8})
    assert list(struct.unpack("<32f", base64.b64decode(encoded.json()["data"][0]["embedding"]))) == \
        pytest.approx(floats, rel=1e-6)
    assert bogus.status_code == 400 and bogus.json()["message"] == \
        "encoding_format must be either 'float' or 'base64', got 'hex'"
    assert shortened.status_code == 400 and shortened.json()["message"] == (
        "Model 'demo/demo-llm' does not support matryoshka representation, changing output dimensions will lead "
        "to poor results.")
    with listed.client() as client:
        allowed = client.post("/v1/embeddings", json={"model": "m", "input": "one two", "dimensions": 16}).json()
        refused = {size: client.post("/v1/embeddings", json={"model": "m", "input": "one two", "dimensions": size})
                   for size in (0, 12)}
    assert len(allowed["data"][0]["embedding"]) == 16
    assert refused[0].json()["message"] == "Requested dimensions must be greater than 0"
    assert refused[12].status_code == 400 and refused[12].json()["message"] == (
        "Model 'demo/demo-llm' only supports [8, 16] matryoshka dimensions, using other output dimensions will "
        "lead to poor results.")


def test_generation_model_refuses_embeddings(sim):
    with sim.client() as client:
        refused = client.post("/v1/embeddings", json={"model": "m", "input": "hi"})
    assert refused.status_code == 400 and "does not appear to be an embedding model" in refused.json()["message"]


def test_chat_logprobs(sim):
    with sim.client() as client:
        body = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 4,
                                                          "logprobs": True, "top_logprobs": 2}).json()
        entries = body["choices"][0]["logprobs"]["content"]
        assert "".join(entry["token"] for entry in entries) == body["choices"][0]["message"]["content"]
        for entry in entries:
            assert entry["bytes"] == list(entry["token"].encode()) and -2 < entry["logprob"] <= 0
            assert [alt["token"] for alt in entry["top_logprobs"]][0] == entry["token"]
            assert entry["top_logprobs"][0]["logprob"] > entry["top_logprobs"][1]["logprob"]
        # The same request gives the same figures.
        again = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 4,
                                                           "logprobs": True, "top_logprobs": 2}).json()
        assert again["choices"][0]["logprobs"] == body["choices"][0]["logprobs"]
        for extra in ({"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}):
            refused = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, **extra})
            assert refused.status_code == 400, extra


# ---------------------------------------------------------------- several choices

def test_chat_n_choices_whole_and_streamed(sim):
    """n > 1: SGLang's parallel sampling. The prompt is prefilled once (its own
    request with max_new_tokens 0), then every sample finds it cached; usage
    counts the prompt once and every sample's tokens."""
    client = openai_client(sim)
    before = wait_for_stats(sim, lambda stats: True)["requests_received"]
    completion = client.chat.completions.create(model="m", messages=CHAT, max_tokens=5, n=3)
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in completion.choices]
    assert len(set(texts)) == 3  # samples differ
    assert all(len(text.split()) == 5 for text in texts)
    single = client.chat.completions.create(model="m", messages=CHAT, max_tokens=5)
    assert completion.usage.prompt_tokens == single.usage.prompt_tokens
    assert completion.usage.completion_tokens == 15
    # Every sample found the prompt that the prefill request had cached.
    assert completion.usage.prompt_tokens_details.cached_tokens >= completion.usage.prompt_tokens - 1
    stats = wait_for_stats(sim, lambda stats: stats["requests_received"] >= before + 5)
    assert stats["requests_received"] == before + 5  # 1 prefill + 3 samples + the single one

    greedy = client.chat.completions.create(model="m", messages=CHAT, max_tokens=5, n=2, temperature=0)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content

    chunks = list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=4, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    by_index: dict[int, str] = {0: "", 1: ""}
    finished = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            by_index[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert finished == {0: "length", 1: "length"}
    assert by_index[0] != by_index[1] and all(len(text.split()) == 4 for text in by_index.values())
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == single.usage.prompt_tokens


def test_chat_n_continuous_usage_is_per_choice(sim):
    with sim.client() as client, client.stream("POST", "/v1/chat/completions", json={
            "model": "m", "messages": CHAT, "max_tokens": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as response:
        events = sse_events(response)
    counted = [(event["choices"][0]["index"], event["usage"]["completion_tokens"])
               for event in events[:-1] if event["choices"] and event.get("usage")]
    assert sorted(counted) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert events[-2]["usage"]["completion_tokens"] == 6 and events[-1] == "[DONE]"
    with sim.client() as client:
        refused = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "n": 0})
    assert refused.status_code == 400 and refused.json()["object"] == "error"


def test_completions_batch_of_prompts(sim):
    """A list of prompts: one choice per prompt (times n), rids `<rid>_<i>`
    from a string rid, or the caller's list, which must hold one per prompt."""
    client = openai_client(sim)
    one = client.completions.create(model="m", prompt="Once upon a time", max_tokens=3)
    other = client.completions.create(model="m", prompt="In a hole", max_tokens=3)
    batch = client.completions.create(model="m", prompt=["Once upon a time", "In a hole"], max_tokens=3,
                                      echo=True)
    assert [choice.text for choice in batch.choices] == ["Once upon a time" + one.choices[0].text,
                                                         "In a hole" + other.choices[0].text]
    assert batch.usage.prompt_tokens == one.usage.prompt_tokens + other.usage.prompt_tokens
    assert batch.usage.completion_tokens == 6

    # Token ids echo as their text, the special tokens left out (SGLang decodes
    # them with skip_special_tokens), whole and streamed.
    with sim.client() as raw:
        ids = raw.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    by_ids = client.completions.create(model="m", prompt=[ids + [2], ids], max_tokens=3, echo=True)
    assert [choice.text[:len("Once upon a time")] for choice in by_ids.choices] == ["Once upon a time"] * 2
    assert by_ids.choices[1].text == "Once upon a time" + one.choices[0].text
    streamed = list(client.completions.create(model="m", prompt=ids, max_tokens=3, echo=True, stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == by_ids.choices[1].text

    sampled = client.completions.create(model="m", prompt=[[5, 6, 7], [8, 9]], max_tokens=2, n=2)
    assert [choice.index for choice in sampled.choices] == [0, 1, 2, 3]
    assert sampled.usage.prompt_tokens == 5 and sampled.usage.completion_tokens == 8

    with sim.client() as raw, raw.stream("POST", "/v1/completions", json={
            "model": "m", "prompt": ["Once upon a time", "In a hole"], "max_tokens": 2, "rid": "batch",
            "stream": True}) as response:
        events = sse_events(response)
    assert {(event["id"], event["choices"][0]["index"]) for event in events[:-1]} == {("batch_0", 0), ("batch_1", 1)}
    with sim.client() as raw:
        mismatch = raw.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"], "rid": ["only-one"]})
        listed = raw.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"], "rid": ["x1", "x2"],
                                                   "max_tokens": 1})
    assert mismatch.status_code == 400
    assert mismatch.json()["message"] == ("The specified rids length mismatch with the batch_size for batch "
                                          "processing.")
    assert listed.status_code == 200 and listed.json()["id"] == "x1"


def test_request_ids_must_differ(sim):
    """SGLang keeps one state per rid: a batch listing a rid twice is refused
    whole, and so is a request whose rid is still in flight; once that one
    ends, its rid may be used again."""
    with sim.client() as client:
        batch = client.post("/generate", json={"text": ["Hello", "World", "Again"], "rid": ["dup", "dup", "x"],
                                               "sampling_params": {"max_new_tokens": 2}})
        completions = client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"], "rid": ["d", "d"],
                                                            "max_tokens": 1})
        client.post("/sim/faults", json={"hang": True}).raise_for_status()
        with client.stream("POST", "/generate", json={"text": "Hello", "rid": "held", "stream": True,
                                                      "sampling_params": {"max_new_tokens": 2}}) as held:
            assert held.status_code == 200
            again = client.post("/generate", json={"text": "World", "rid": "held"})
            chat = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "rid": "held"})
            client.post("/sim/faults", json={"hang": False}).raise_for_status()
            held.read()
        reused = client.post("/generate", json={"text": "World", "rid": "held", "sampling_params": {"max_new_tokens": 2}})
    assert batch.status_code == 400
    assert batch.json()["error"]["message"] == "Duplicate request IDs detected within the request: ['dup']"
    assert completions.status_code == 400 and completions.json()["type"] == "BadRequest"
    assert completions.json()["message"] == "Duplicate request IDs detected within the request: ['d']"
    assert again.status_code == 400 and again.json()["error"]["message"] == "Duplicate request ID detected: held"
    assert chat.status_code == 400 and chat.json()["message"] == "Duplicate request ID detected: held"
    assert reused.status_code == 200 and reused.json()["meta_info"]["id"] == "held"


def test_a_routers_data_parallel_rank_is_checked_against_the_servers_one(sim):
    """A router may pin a request to a data-parallel rank: `routed_dp_rank`,
    its deprecated alias `data_parallel_rank`, or on the OpenAI routes the
    X-Data-Parallel-Rank header, which wins over the body. One scheduler
    serves here, so rank 0 is taken (and ignored) and the others are refused
    with the tokenizer manager's message."""
    params = {"max_new_tokens": 2}
    with sim.client() as client:
        rank0 = client.post("/generate", json={"text": "Hello", "routed_dp_rank": 0, "sampling_params": params})
        alias = client.post("/generate", json={"text": "Hello", "data_parallel_rank": 1, "sampling_params": params})
        chat = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "routed_dp_rank": 2,
                                                          "max_tokens": 2})
        header_wins = client.post("/v1/completions", json={"model": "m", "prompt": "Hi", "routed_dp_rank": 3,
                                                            "max_tokens": 2},
                                  headers={"X-Data-Parallel-Rank": "0"})
        header_out = client.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2},
                                 headers={"X-Data-Parallel-Rank": "1"})
        header_bad = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 2},
                                 headers={"X-Data-Parallel-Rank": "first"})
    assert rank0.status_code == 200 and rank0.json()["meta_info"]["completion_tokens"] == 2
    assert alias.status_code == 400 and alias.json() == {"error": {"message": "routed_dp_rank=1 out of range [0, 1)"}}
    assert chat.status_code == 400 and chat.json()["type"] == "BadRequest"
    assert chat.json()["message"] == "routed_dp_rank=2 out of range [0, 1)"
    assert header_wins.status_code == 200
    assert header_out.status_code == 400 and header_out.json()["message"] == "routed_dp_rank=1 out of range [0, 1)"
    assert header_bad.status_code == 400 and header_bad.json() == {
        "object": "error", "type": "400", "param": None, "code": 400,
        "message": "Invalid X-Data-Parallel-Rank header: must be an integer, got 'first'"}


def test_a_server_without_prefix_caching_or_with_pages_says_so_and_serves_accordingly(sim_factory):
    """`--disable-radix-cache` and `--page-size` as /server_info reports them
    and as `cached_tokens` shows them."""
    prompt = {"text": "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                      "sixteen seventeen eighteen nineteen twenty", "sampling_params": {"max_new_tokens": 2}}
    answers = {}
    for flags in (("--disable-radix-cache", "--schedule-policy", "lpm"), ("--page-size", "8")):
        server = sim_factory(*flags)
        with server.client() as client:
            info = client.get("/server_info").json()
            answers[flags[0]] = (info, [client.post("/generate", json=prompt).json()["meta_info"]
                                        for _ in range(2)])
    info, (first, second) = answers["--disable-radix-cache"]
    assert info["disable_radix_cache"] is True and info["schedule_policy"] == "fcfs" and info["page_size"] == 1
    assert first["cached_tokens"] == second["cached_tokens"] == 0
    info, (first, second) = answers["--page-size"]
    assert info["page_size"] == 8 and info["disable_radix_cache"] is False
    prompt_tokens = second["prompt_tokens"]
    assert first["cached_tokens"] == 0 and prompt_tokens > 9
    assert second["cached_tokens"] == (prompt_tokens - 1) // 8 * 8 and second["cached_tokens"] % 8 == 0


def test_completion_logprobs_with_echo_whole_and_streamed(sim):
    """Completions' `logprobs` in SGLang's shape: parallel lists, the echoed
    prompt's tokens first (the first without a log probability), text
    offsets -1; streamed, each chunk carries its own tokens'."""
    client = openai_client(sim)
    completion = client.completions.create(model="m", prompt="The cat sat", max_tokens=3, logprobs=2, echo=True)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.tokens[:3] == ["The", " cat", " sat"] and len(logprobs.tokens) == 6
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(-2 < value <= 0 for value in logprobs.token_logprobs[1:])
    assert all(len(top) == 2 and max(top, key=top.get) == token
               for token, top in zip(logprobs.tokens[1:], logprobs.top_logprobs[1:]))
    assert logprobs.text_offset == [-1] * 6

    streamed = list(client.completions.create(model="m", prompt="The cat sat", max_tokens=3, logprobs=2,
                                              echo=True, stream=True))
    tokens = [token for chunk in streamed for token in chunk.choices[0].logprobs.tokens]
    values = [value for chunk in streamed for value in chunk.choices[0].logprobs.token_logprobs]
    assert tokens == logprobs.tokens and values == logprobs.token_logprobs

    # A reply that ends on its EOS: the finish chunk carries the EOS's logprob,
    # which the whole reply lists last, as SGLang's serving_completions sends it.
    ended = client.completions.create(model="m", prompt="The cat sat", max_tokens=200, logprobs=2)
    assert ended.choices[0].finish_reason == "stop" and ended.choices[0].logprobs.tokens[-1] == "<|endoftext|>"
    streamed = list(client.completions.create(model="m", prompt="The cat sat", max_tokens=200, logprobs=2,
                                              stream=True))
    assert all(chunk.choices[0].logprobs for chunk in streamed)
    assert streamed[-1].choices[0].finish_reason == "stop" and streamed[-1].choices[0].text == ""
    assert [token for chunk in streamed for token in chunk.choices[0].logprobs.tokens] == ended.choices[0].logprobs.tokens
    assert ([value for chunk in streamed for value in chunk.choices[0].logprobs.token_logprobs]
            == ended.choices[0].logprobs.token_logprobs)

    plain = client.completions.create(model="m", prompt="The cat sat", max_tokens=3, logprobs=0)
    assert plain.choices[0].logprobs.tokens == logprobs.tokens[3:]
    assert plain.choices[0].logprobs.top_logprobs == [{}, {}, {}]
    assert client.completions.create(model="m", prompt="The cat sat", max_tokens=1).choices[0].logprobs is None


def test_a_reply_fed_back_scores_as_it_was_generated_and_token_ids_logprob(sim):
    """A token scores by its place in the sequence: prompt plus reply sent
    back as input scores the reply's tokens as their generation did
    (SGLang's test_logprob_match). `token_ids_logprob` gives the listed ids'
    logprobs at every scored position, the token there scoring its own."""
    prompt = list(range(300, 340))
    with sim.client() as client:
        generated = client.post("/generate", json={
            "input_ids": prompt, "return_logprob": True, "top_logprobs_num": 3,
            "token_ids_logprob": [5, 300, 2],
            "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}).json()
        rescored = client.post("/generate", json={
            "input_ids": prompt + generated["output_ids"], "return_logprob": True, "logprob_start_len": 0,
            "top_logprobs_num": 3, "token_ids_logprob": [5, 300, 2] + generated["output_ids"][:1],
            "sampling_params": {"max_new_tokens": 0}}).json()
        refused = client.post("/generate", json={"input_ids": prompt, "return_logprob": True,
                                                 "token_ids_logprob": [10**7]})
        not_flat = client.post("/generate", json={"input_ids": prompt, "return_logprob": True,
                                                  "token_ids_logprob": ["a"]})
    meta, again = generated["meta_info"], rescored["meta_info"]
    assert again["input_token_logprobs"][len(prompt):] == meta["output_token_logprobs"]
    assert again["input_top_logprobs"][len(prompt):] == meta["output_top_logprobs"]
    outputs = meta["output_token_ids_logprobs"]
    assert len(outputs) == 8 and meta["input_token_ids_logprobs"] == []
    for (logprob, token_id, _), listed, top in zip(meta["output_token_logprobs"], outputs,
                                                    meta["output_top_logprobs"]):
        assert [entry[1] for entry in listed] == [5, 300, 2]
        assert all(entry[0] < top[-1][0] for entry in listed if entry[1] not in {t[1] for t in top})
    first_id = generated["output_ids"][0]
    assert again["input_token_ids_logprobs"][0] is None
    assert again["input_token_ids_logprobs"][len(prompt)][3] == [meta["output_token_logprobs"][0][0], first_id, None]
    assert [entry[:3] for entry in again["input_token_ids_logprobs"][len(prompt):]] == outputs
    assert refused.status_code == 400 and refused.json()["error"]["message"] == (
        "token_ids_logprob contains out-of-vocabulary token id 10000000; valid range is [0, 100000).")
    assert not_flat.status_code == 400


def test_logit_bias_forces_or_forbids_a_token_per_request(sim):
    """SGLang's logit_bias tests: a bias of +100 makes every output token that
    one (the reply runs to max_new_tokens), -100 keeps a token out; a batch's
    other prompts are untouched, and a small bias changes nothing."""
    prompt = "The capital of France is"
    with sim.client() as client:
        paris = client.post("/tokenize", json={"prompt": " Paris"}).json()["tokens"][0]
        plain = client.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 30}}).json()
        batch = client.post("/generate", json={"text": [prompt, prompt], "sampling_params": [
            {"max_new_tokens": 4, "logit_bias": {str(paris): 100.0}}, {"max_new_tokens": 4}]}).json()
        banned_id = plain["output_ids"][0]
        banned = client.post("/generate", json={"text": prompt, "sampling_params": {
            "max_new_tokens": 30, "logit_bias": {str(banned_id): -100.0}}}).json()
        nudged = client.post("/generate", json={"text": prompt, "sampling_params": {
            "max_new_tokens": 30, "logit_bias": {str(banned_id): -1.0}}}).json()
        chat = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 3,
                                                         "logit_bias": {str(paris): 100}}).json()
    assert batch[0]["output_ids"] == [paris] * 4 and batch[0]["text"] == " Paris" * 4
    assert batch[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert batch[1]["output_ids"] == plain["output_ids"][:4]
    assert banned_id not in banned["output_ids"] and banned["output_ids"] != plain["output_ids"]
    assert nudged["output_ids"] == plain["output_ids"]
    assert chat["choices"][0]["message"]["content"] == " Paris" * 3


def test_generate_logprobs(sim):
    """`return_logprob` on /generate: meta_info's `[logprob, id, text]` entries,
    the input's from `logprob_start_len` (first unscored), top alternatives with
    `top_logprobs_num`, texts with `return_text_in_logprobs`; the same scores
    the completions route gives the same tokens with echo; cumulative in a
    stream; a start past the prompt refused as SGLang's scheduler does."""
    text = "The quick brown fox jumps"
    with sim.client() as client:
        plain = client.post("/generate", json={"text": text, "return_logprob": True,
                                               "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}).json()
        full = client.post("/generate", json={
            "text": text, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
            "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}).json()
        echoed = client.post("/v1/completions", json={"model": "demo-llm", "prompt": text, "max_tokens": 5,
                                                       "echo": True, "logprobs": 2, "ignore_eos": True}).json()
        mixed = client.post("/generate", json={"text": [text, "Hello"], "return_logprob": [False, True],
                                               "sampling_params": {"max_new_tokens": 2}}).json()
        too_far = client.post("/generate", json={"text": "one two", "return_logprob": True,
                                                 "logprob_start_len": 5})
        with client.stream("POST", "/generate", json={
                "text": text, "return_logprob": True, "stream": True,
                "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: {")]
        with client.stream("POST", "/generate", json={"text": "one two", "return_logprob": True,
                                                      "logprob_start_len": 9, "stream": True}) as response:
            refused_stream = [line for line in response.iter_lines() if line.startswith("data: ")]

    meta = plain["meta_info"]
    assert meta["input_token_logprobs"] == []  # the default start: the output only
    assert [entry[1] for entry in meta["output_token_logprobs"]] == plain["output_ids"]
    assert all(isinstance(entry[0], float) and entry[0] <= 0 and entry[2] is None
               for entry in meta["output_token_logprobs"])
    assert meta["output_token_logprobs_length"] == 5 and "output_top_logprobs" not in meta

    meta = full["meta_info"]
    inputs = meta["input_token_logprobs"]
    assert len(inputs) == meta["prompt_tokens"] == 5
    assert inputs[0][0] is None and "".join(entry[2] for entry in inputs) == text
    assert "".join(entry[2] for entry in meta["output_token_logprobs"]) == full["text"]
    assert meta["input_top_logprobs"][0] is None
    for entry, top in zip(inputs[1:] + meta["output_token_logprobs"],
                          meta["input_top_logprobs"][1:] + meta["output_top_logprobs"]):
        assert len(top) == 2 and top[0] == entry and top[1][0] < entry[0]
    choice = echoed["choices"][0]
    assert choice["text"] == text + full["text"]
    assert choice["logprobs"]["token_logprobs"] == [entry[0] for entry in inputs + meta["output_token_logprobs"]]

    assert "input_token_logprobs" not in mixed[0]["meta_info"]
    assert len(mixed[1]["meta_info"]["output_token_logprobs"]) == 2

    assert too_far.status_code == 400 and too_far.json() == {"error": {"message": (
        "req.logprob_start_len=5 is higher than the number of input tokens len(req.origin_input_ids)=2. "
        "Please use a smaller logprob_start_len.")}}
    assert len(refused_stream) == 2 and "is higher than the number of input tokens" in refused_stream[0]

    assert len(events) == 4
    for event in events:
        count = event["meta_info"]["completion_tokens"]
        assert [entry[1] for entry in event["meta_info"]["output_token_logprobs"]] == event["output_ids"][:count]
    # The same prompt generates the same tokens, scored the same, streamed or not.
    assert events[-1]["meta_info"]["output_token_logprobs"] == plain["meta_info"]["output_token_logprobs"][:4]
    assert events[-1]["meta_info"]["output_token_logprobs_length"] == 4


def test_stop_regex_ends_a_reply_as_sglang_does(sim):
    """`stop_regex` (native sampling params, OpenAI extra): the reply ends at
    the token that first makes a pattern match, finish `stop` with the pattern
    as `matched`; SGLang then trims `matched` like a stop string, so a literal
    pattern is cut from the text and another pattern is not."""
    prompt = "Tell me a story about the sea"
    with sim.client() as client:
        plain = client.post("/generate", json={"text": prompt, "sampling_params": {
            "max_new_tokens": 40, "ignore_eos": True}}).json()["text"]
        word = plain.split(" ")[3]
        literal = client.post("/generate", json={"text": prompt, "sampling_params": {
            "max_new_tokens": 40, "ignore_eos": True, "stop_regex": " " + word}}).json()
        pattern = r" [a-z]{6,}"
        regex = client.post("/generate", json={"text": prompt, "sampling_params": {
            "max_new_tokens": 40, "ignore_eos": True, "stop_regex": [r"\d", pattern]}}).json()
        chat = client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "ignore_eos": True,
            "stop_regex": pattern}).json()
        invalid = client.post("/generate", json={"text": prompt, "sampling_params": {"stop_regex": "(open"}})
        too_many = client.post("/v1/completions", json={"model": "m", "prompt": prompt,
                                                        "stop_regex": [f"x{i}" for i in range(33)]})
    assert literal["text"] == plain[:plain.find(" " + word)]
    assert literal["meta_info"]["finish_reason"] == {"type": "stop", "matched": " " + word}
    found = re.search(pattern, plain)
    assert regex["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    # Not trimmed: the reply ends with the token (a whole word) that made the first match.
    assert regex["text"] == plain[:found.end()]
    assert chat["choices"][0]["finish_reason"] == "stop" and chat["choices"][0]["matched_stop"] == pattern
    assert invalid.status_code == 400 and invalid.json()["error"]["message"].startswith("invalid stop_regex '(open'")
    assert too_many.status_code == 400 and "at most 32 stop_regex patterns" in too_many.json()["message"]


def test_tokenize_and_detokenize_as_sglang_serves_them(sim):
    """POST /tokenize and /detokenize (and their /v1/ twins): a prompt, a list
    of prompts or chat messages to token ids, rendered as the chat route
    renders them; ids back to text, the template's special tokens left out
    unless asked for."""
    ask = [{"role": "user", "content": "How many tokens is this?"}]
    with sim.client() as client:
        chat = client.post("/v1/chat/completions", json={"model": "m", "messages": ask, "max_tokens": 1}).json()
        by_messages = client.post("/v1/tokenize", json={"messages": ask}).json()
        by_prompt = client.post("/tokenize", json={"prompt": "Hello there, world"}).json()
        by_list = client.post("/tokenize", json={"prompt": ["Hello there", "world"]}).json()
        text = client.post("/detokenize", json={"tokens": by_prompt["tokens"]}).json()
        rendered = client.post("/v1/detokenize", json={"tokens": by_messages["tokens"],
                                                       "skip_special_tokens": False}).json()
        plain = client.post("/v1/detokenize", json={"tokens": by_messages["tokens"]}).json()
        batch = client.post("/detokenize", json={"tokens": by_list["tokens"]}).json()
        neither = client.post("/tokenize", json={"model": "m"})
        both = client.post("/tokenize", json={"prompt": "a", "messages": ask})
        bad_ids = client.post("/detokenize", json={"tokens": [[1, "a"]]})
        negative = client.post("/detokenize", json={"tokens": [1, -1, 2]})
        past_vocabulary = client.post("/detokenize", json={"tokens": [[5, 10**9]]})
        form = client.post("/tokenize", content=b"prompt=a", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert by_messages["count"] == len(by_messages["tokens"]) == chat["usage"]["prompt_tokens"]
    with sim.client() as client:
        context = client.get("/v1/models").json()["data"][0]["max_model_len"]
    assert by_messages["max_model_len"] == by_prompt["max_model_len"] == context
    assert by_prompt["count"] == len(by_prompt["tokens"]) == 4  # "Hello", " there", ",", " world"
    assert by_list["count"] == [2, 1] and by_list["tokens"][0] == by_prompt["tokens"][:2]
    assert text == {"text": "Hello there, world"} and batch == {"text": ["Hello there", "world"]}
    assert rendered["text"] == "<|user|>\nHow many tokens is this?\n<|assistant|>\n"
    assert plain["text"] == "\nHow many tokens is this?\n\n"
    for refused in (neither, both):
        assert refused.status_code == 400 and refused.json()["type"] == "Bad Request"
        assert "Exactly one of 'prompt' or 'messages' must be provided." in refused.json()["message"]
    assert bad_ids.status_code == 400 and bad_ids.json()["object"] == "error"
    # A tokenizer cannot decode a negative id (SGLang's route: a 500); one past the vocabulary is nothing.
    assert negative.status_code == 500 and negative.json()["type"] == "InternalServerError"
    assert negative.json()["message"].startswith("Internal server error during detokenization: ")
    assert past_vocabulary.status_code == 200 and past_vocabulary.json() == {"text": [""]}
    assert form.status_code == 400


def test_message_roles_are_checked_as_sglangs_message_params_check_them(sim):
    """A role is one of the generic message params' (any case, lower-cased
    before the template) or exactly "user"; anything else is a 400 listing
    both union members' complaints, on chat completions and /tokenize alike."""
    with sim.client() as client:
        lower = client.post("/tokenize", json={"messages": [{"role": "system", "content": "Be brief."}]}).json()
        upper = client.post("/tokenize", json={"messages": [{"role": "SYSTEM", "content": "Be brief."}]}).json()
        bogus = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "bogus", "content": "x"}]})
        no_content = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user"}]})
        tokenize_bogus = client.post("/tokenize", json={"messages": [{"role": "bogus", "content": "x"}]})
    assert lower == upper
    assert bogus.status_code == 400 and bogus.json()["type"] == "Bad Request"
    message = bogus.json()["message"]
    assert message.startswith("2 validation errors for ChatCompletionRequest\n")
    assert "messages.0.ChatCompletionMessageGenericParam.role\n  Value error, 'role' must be one of 'system'" in message
    assert "messages.0.ChatCompletionMessageUserParam.role\n  Input should be 'user'" in message
    assert "messages.0.ChatCompletionMessageUserParam.content\n  Field required" in no_content.json()["message"]
    assert tokenize_bogus.status_code == 400
    assert tokenize_bogus.json()["message"].startswith("2 validation errors for TokenizeRequest\n")


def test_the_eos_token_in_logprobs_and_the_vocabulary(sim):
    """The EOS is a special token, `<|endoftext|>` (id 2): a whole reply that
    ends by itself lists its logprob last, as SGLang's do (a plain stream
    has no chunk to carry it); /tokenize and /detokenize know it."""
    ask = {"model": "m", "messages": [{"role": "user", "content": "Say a little."}], "logprobs": True}
    with sim.client() as client:
        whole = client.post("/v1/chat/completions", json=ask).json()
        with client.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as response:
            events = sse_events(response)[:-1]
        native = client.post("/generate", json={"text": "Say a little.", "return_logprob": True,
                                                "return_text_in_logprobs": True,
                                                "sampling_params": {"max_new_tokens": 200}}).json()
        tokenized = client.post("/tokenize", json={"prompt": "<|endoftext|>"}).json()
        shown = client.post("/detokenize", json={"tokens": [2], "skip_special_tokens": False}).json()
        skipped = client.post("/detokenize", json={"tokens": [2]}).json()
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["matched_stop"] == 2
    entries = choice["logprobs"]["content"]
    assert len(entries) == whole["usage"]["completion_tokens"] and entries[-1]["token"] == "<|endoftext|>"
    assert "".join(entry["token"] for entry in entries[:-1]) == choice["message"]["content"]
    streamed = [entry for event in events if event["choices"] and event["choices"][0]["logprobs"]
                for entry in event["choices"][0]["logprobs"]["content"]]
    assert streamed == entries[:-1]
    assert native["output_ids"][-1] == 2 and native["meta_info"]["output_token_logprobs"][-1][1:] == [2, "<|endoftext|>"]
    assert tokenized["tokens"] == [2] and shown == {"text": "<|endoftext|>"} and skipped == {"text": ""}


def test_separate_reasoning_and_parse_function_call_endpoints(sim):
    """SGLang's native parsing endpoints, over the simulator's parsers."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' \
           '\n<tool_call>\n{"name": "unlisted", "arguments": {}}\n</tool_call>'
    with sim.client() as client:
        r1 = client.post("/separate_reasoning", json={"text": "why\n</think>\n\nbecause",
                                                      "reasoning_parser": "deepseek-r1"}).json()
        qwen = client.post("/separate_reasoning", json={"text": "<think>hm</think>ok", "reasoning_parser": "qwen3",
                                                        "return_blocks": True}).json()
        plain = client.post("/separate_reasoning", json={"text": "just this", "reasoning_parser": "qwen3"}).json()
        unknown = client.post("/separate_reasoning", json={"text": "x", "reasoning_parser": "nope"})
        calls = client.post("/parse_function_call", json={"text": text, "tools": [clock, weather],
                                                          "tool_call_parser": "qwen25"}).json()
        no_tools = client.post("/parse_function_call", json={"text": text, "tool_call_parser": "qwen25"}).json()
        no_call = client.post("/parse_function_call", json={"text": "hello", "tools": [weather],
                                                            "tool_call_parser": "qwen25"}).json()
        bad_parser = client.post("/parse_function_call", json={"text": text, "tools": [weather],
                                                               "tool_call_parser": "nope"})
    assert r1 == {"reasoning_text": "why\n", "text": "\n\nbecause"}
    assert qwen == {"reasoning_text": "hm", "text": "ok", "reasoning_blocks": ["hm"], "text_blocks": ["ok"],
                    "blocks": [{"type": "reasoning", "text": "hm"}, {"type": "text", "text": "ok"}]}
    assert plain == {"reasoning_text": "", "text": "just this"}
    assert unknown.status_code == 400 and "nope" in unknown.json()["detail"]
    assert calls == {"normal_text": "Let me look.",
                     "calls": [{"tool_index": 1, "name": "get_weather", "parameters": '{"city": "Oslo"}'}]}
    assert no_tools == {"normal_text": text, "calls": []} and no_call == {"normal_text": "hello", "calls": []}
    assert bad_parser.status_code == 400


def test_request_priority_and_the_priority_eviction_policy(sim_factory):
    """`priority` on native and OpenAI requests, a signed 64-bit integer as
    SGLang checks it; under `--radix-eviction-policy priority` a high-priority
    prompt outlives newer low-priority ones in a full cache."""
    sim = sim_factory("--radix-eviction-policy", "priority", "--max-total-tokens", "700")
    vip = list(range(100, 300))
    with sim.client() as client:
        info = client.get("/server_info").json()
        assert (info["radix_eviction_policy"], info["radix_eviction_policy_config"]) == ("priority", None)
        first = client.post("/generate", json={"input_ids": vip, "priority": 10,
                                               "sampling_params": {"max_new_tokens": 4}})
        assert first.status_code == 200, first.text
        for index in range(4):
            filler = client.post("/v1/completions", json={
                "model": "m", "prompt": list(range(1000 * (index + 1), 1000 * (index + 1) + 200)),
                "max_tokens": 4, "priority": 0})
            assert filler.status_code == 200, filler.text
        again = client.post("/generate", json={"input_ids": vip, "sampling_params": {"max_new_tokens": 1}}).json()
        assert again["meta_info"]["cached_tokens"] == 199

        too_large = 1 << 63
        chat = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "priority": too_large})
        assert chat.status_code == 400
        assert chat.json()["message"] == ("priority must be a signed 64-bit integer between "
                                          "-9223372036854775808 and 9223372036854775807")
        native = client.post("/generate", json={"text": "Hi", "priority": too_large})
        assert native.status_code == 400 and "signed 64-bit integer" in native.json()["error"]["message"]
        wrong = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "priority": "high"})
        assert wrong.status_code == 400 and "priority" in wrong.text and "valid integer" in wrong.text


def test_a_priority_refused_by_a_server_without_priority_scheduling(sim_factory):
    """--abort-on-priority-when-disabled: SGLang answers a request that gives a
    priority with 503, in the flat error shape of an abort with a status; one
    without is served. /server_info reports the scheduling flags."""
    sim = sim_factory("--abort-on-priority-when-disabled")
    message = "Using priority is disabled for this server. Please send a new request without a priority."
    with sim.client() as client:
        info = client.get("/server_info").json()
        assert (info["enable_priority_scheduling"], info["abort_on_priority_when_disabled"],
                info["priority_scheduling_preemption_threshold"], info["retraction_policy"]) == (
            False, True, 10, "length")
        chat = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "priority": 1})
        assert chat.status_code == 503 and chat.json()["message"] == message and chat.json()["code"] == 503
        native = client.post("/generate", json={"text": "Hi", "priority": 1})
        assert native.status_code == 503 and native.json()["message"] == message
        plain = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 3})
        assert plain.status_code == 200, plain.text


def test_data_parallel_ranks_cache_apart_and_serve_the_rank_a_router_names(sim_factory):
    """`--dp-size 2`: two schedulers, each with its own radix cache, as an
    SGLang server with data parallelism has them. Requests without a rank go
    round-robin (SGLang's default), so the same prompt twice in a row finds
    nothing cached; a router naming the rank (`routed_dp_rank`) keeps a prefix
    where it was cached. Loads, /server_info and /metrics are per rank."""
    server = sim_factory("--dp-size", "2", "--enable-cache-report")
    text = " ".join(f"word{index}" for index in range(40))

    def cached(client, prompt, **extra):
        reply = client.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 2}, **extra})
        assert reply.status_code == 200, reply.text
        return reply.json()["meta_info"]["cached_tokens"]

    with server.client() as client:
        info = client.get("/server_info").json()
        round_robin = [cached(client, text) for _ in range(3)]
        pinned = [cached(client, "pinned " + text, routed_dp_rank=1) for _ in range(2)]
        other_rank = cached(client, "pinned " + text, data_parallel_rank=0)
        out_of_range = client.post("/generate", json={"text": text, "routed_dp_rank": 2})
        loads = client.get("/v1/loads").json()["loads"]
        one_rank = client.get("/v1/loads", params={"dp_rank": "1"}).json()["loads"]
        no_rank = client.get("/v1/loads", params={"dp_rank": "5"}).json()["loads"]
        legacy = client.get("/get_load").json()
        metrics = client.get("/metrics").text
        stats = client.get("/sim/stats").json()
        assert client.post("/flush_cache").status_code == 200
        after_flush = cached(client, "pinned " + text, routed_dp_rank=1)
        update = client.post("/update_weights_from_disk", json={"model_path": "demo/demo-llm"})
    assert info["dp_size"] == 2 and info["load_balance_method"] == "round_robin"
    assert len(info["internal_states"]) == 2
    assert round_robin[0] == round_robin[1] == 0 and round_robin[2] > 0  # ranks 0, 1, then 0 again
    assert pinned[0] == 0 and pinned[1] > 0 and other_rank == 0
    assert out_of_range.status_code == 400
    assert out_of_range.json()["error"]["message"] == "routed_dp_rank=2 out of range [0, 2)"
    assert [load["dp_rank"] for load in loads] == [0, 1] and [load["dp_rank"] for load in one_rank] == [1]
    assert no_rank == [] and [load["dp_rank"] for load in legacy] == [0, 1]
    assert all(load["cache_hit_rate"] > 0 for load in loads)  # each rank's own
    assert 'sglang:num_running_reqs{model_name="demo-llm",engine_type="unified",tp_rank="0",pp_rank="0",' \
           'moe_ep_rank="0",dp_rank="1"}' in metrics
    assert 'sglang:evicted_tokens_total{cache_type="UnifiedRadixCache",tp_rank="0",pp_rank="0",dp_rank="1"}' \
        in metrics
    assert metrics.count("# TYPE sglang:prompt_tokens_total counter") == 1  # the tokenizer's series, once
    assert stats["requests_finished"] == 6 and len(stats["dp_ranks"]) == 2
    assert after_flush == 0  # every rank's cache went
    assert update.json() == {"success": True, "num_paused_requests": [0, 0],  # each rank answers
                             "message": "Succeeded to update model weights. | Succeeded to update model weights."}


def test_weights_updated_from_disk_change_replies_name_and_version_and_wait_for_requests(sim_factory):
    """SGLang's /update_weights_from_disk as its test suite drives it: the
    server then answers under the new path (model_info, /v1/models), replies
    follow the new weights and come back with the old ones, the prefix cache
    is flushed, a path without weights fails and changes nothing; an update
    waits for the requests in flight. /update_weight_version sets the version
    that meta_info and the OpenAI replies' metadata report."""
    server = sim_factory("--enable-cache-report", "--known-model-paths", "org/other-model", "--weight-version", "v0",
                         "--load-format", "dummy")
    prompt = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 16}}

    with server.client() as client:
        def decode() -> dict:
            return client.post("/generate", json=prompt).json()

        def update(path: str, **extra) -> httpx.Response:
            return client.post("/update_weights_from_disk", json={"model_path": path, **extra})

        origin = client.get("/model_info").json()
        launched = client.get("/server_info").json()
        first, cached = decode(), decode()
        updated = update("org/other-model", weight_version="v1")
        info = client.get("/model_info").json()
        models = client.get("/v1/models").json()["data"]
        other = decode()
        chat = client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 2}).json()
        missing = update("org/missing-model")
        after_missing = client.get("/model_info").json()
        back = update(origin["model_path"])
        again = decode()
        version = client.post("/update_weight_version", json={"new_version": "v2"})
        versioned = decode()

        # An update waits for the request in flight: a 16-token stream at 20 ms
        # a token, 80 ms in, keeps it waiting about 240 ms (without the wait it
        # answers in a few); the stream itself runs to its end.
        client.post("/sim/faults", json={"itl_ms": 20}).raise_for_status()
        finished = {}

        def stream():
            with httpx.stream("POST", server.base_url + "/generate", timeout=10,
                              json={**prompt, "stream": True}) as response:
                finished["stream"] = response.read().decode()

        thread = threading.Thread(target=stream)
        thread.start()
        time.sleep(0.08)
        posted = time.monotonic()
        waited = update(origin["model_path"])
        update_took = time.monotonic() - posted
        thread.join()
        client.post("/sim/faults", json={"itl_ms": 0}).raise_for_status()

    assert (origin["model_path"], origin["served_model_name"]) == ("demo/demo-llm", "demo-llm")
    assert origin["weight_version"] == first["meta_info"]["weight_version"] == "v0"
    assert origin["load_format"] == launched["load_format"] == "dummy"
    assert cached["meta_info"]["cached_tokens"] > 0
    assert updated.status_code == 200 and updated.json() == {
        "success": True, "message": "Succeeded to update model weights. Weight version updated to v1.",
        "num_paused_requests": 0}
    assert info["model_path"] == info["served_model_name"] == "org/other-model" and info["weight_version"] == "v1"
    assert models[0]["id"] == "org/other-model"
    assert other["text"] != first["text"] and other["meta_info"]["cached_tokens"] == 0  # flushed
    assert other["meta_info"]["weight_version"] == "v1" and chat["metadata"] == {"weight_version": "v1"}
    assert missing.status_code == 400 and missing.json() == {
        "success": False, "num_paused_requests": 0,
        "message": "Failed to get weights iterator: Cannot find any model weights with `org/missing-model`."}
    assert after_missing["model_path"] == "org/other-model"
    assert back.json()["success"] and again["text"] == first["text"]
    assert version.json() == {"success": True, "message": "Weight version updated to v2", "new_version": "v2"}
    assert versioned["meta_info"]["weight_version"] == "v2"
    assert waited.json()["success"] and update_took > 0.15
    assert '"completion_tokens":16' in finished["stream"].replace(" ", "")


def test_a_stop_at_a_line_break_ends_the_reply_there(sim):
    """Replies have punctuation and line breaks, so the most common stop
    string of completion clients, "\\n", ends a reply as it would a real
    model's: at its first line, finish_reason "stop", the break trimmed."""
    with sim.client() as client:
        for index in range(50):
            prompt = f"Write line {index}:"
            whole = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 64,
                                                          "ignore_eos": True}).json()["choices"][0]["text"]
            if "\n" in whole:
                break
        else:
            pytest.fail("no reply with a line break in 50 prompts")
        stopped = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 64,
                                                        "ignore_eos": True, "stop": ["\n"]}).json()["choices"][0]
        streamed = "".join(
            json.loads(line[6:])["choices"][0]["text"]
            for line in client.post("/v1/completions", json={
                "model": "m", "prompt": prompt, "max_tokens": 64, "ignore_eos": True, "stop": ["\n"],
                "stream": True}).text.splitlines()
            if line.startswith("data: {"))
    assert stopped["finish_reason"] == "stop" and stopped["matched_stop"] == "\n"
    assert stopped["text"] == whole.split("\n")[0] == streamed


def test_a_hierarchical_cache_serves_a_prefix_evicted_from_the_device_from_host_memory(sim_factory):
    """`--enable-hierarchical-cache`: a prompt pushed out of the device pool by
    others is still a hit, loaded back from the host pool, and `meta_info`
    says so (`cached_tokens_details`); without the host tier it is a miss.
    /server_info and /metrics report the tier."""
    def prompt(first_id: int) -> dict:
        return {"input_ids": list(range(first_id, first_id + 300)), "sampling_params": {"max_new_tokens": 1}}

    results = {}
    for flags in (("--enable-hicache", "--hicache-ratio", "4"), ()):
        server = sim_factory("--max-total-tokens", "1000", *flags)
        with server.client() as client:
            client.post("/generate", json=prompt(1000))
            for first_id in (2000, 3000, 4000, 5000):  # 1,200 tokens more than the device holds
                client.post("/generate", json=prompt(first_id))
            again = client.post("/generate", json=prompt(1000)).json()["meta_info"]
            results[bool(flags)] = (again, client.get("/server_info").json(), client.get("/metrics").text)

    again, info, metrics = results[True]
    assert again["cached_tokens"] == 299
    assert again["cached_tokens_details"] == {"device": 0, "host": 299}
    assert info["enable_hierarchical_cache"] is True and info["hicache_ratio"] == 4.0
    assert info["hicache_write_policy"] == "write_through"
    assert 'sglang:hicache_host_total_tokens{tp_rank="0",pp_rank="0",dp_rank="0"} 4000.0' in metrics
    assert 'sglang:load_back_tokens_total{cache_type="UnifiedRadixCache",tp_rank="0",pp_rank="0",dp_rank="0"} ' \
           '299.0' in metrics

    again, info, metrics = results[False]
    assert again["cached_tokens"] == 0 and info["enable_hierarchical_cache"] is False
    assert "sglang:hicache_host_total_tokens" not in metrics
