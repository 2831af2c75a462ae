"""Several choices in one request: `n` > 1 (chat and completions) and a batch of
completion prompts, through the openai SDK and the WebSocket API against a live
gateway and live simulators; each choice streams under the request's id, usage
counts each prompt once and every choice's tokens, and the ledger bills that."""
import json

import openai
import pytest
from websockets.sync.client import connect

from tests.conftest import usage_rows_wait
from tests.inference.sim_control import sim_faults
from tests.inference.test_websocket import frames_until

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


@pytest.fixture
def client(gateway, tenant_key):
    return openai.OpenAI(base_url=gateway.base_url, api_key=tenant_key.secret, max_retries=0)


def test_chat_n_whole(client, tenant_key):
    single = client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=6)
    completion = client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=6, n=3)

    assert completion.id.startswith("chatcmpl-") and completion.model == "test-llm"
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in completion.choices]
    assert len(set(texts)) == 3 and all(texts)
    usage = completion.usage
    assert usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert usage.completion_tokens == sum(len(text.split()) for text in texts) == 18
    _, row = usage_rows_wait(api_key=tenant_key.api_key, count=2)
    assert row.request_id == completion.id and row.status == "ok"
    assert (row.prompt_tokens, row.completion_tokens, row.cached_tokens) == (
        usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens)


def test_chat_n_streamed(client, tenant_key):
    chunks = list(client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=5, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {chunk.model for chunk in chunks} == {"test-llm"}
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert finish == {0: "length", 1: "length"} and texts[0] != texts[1]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 10
    [row] = usage_rows_wait(api_key=tenant_key.api_key, count=1)
    assert row.stream and row.status == "ok" and row.request_id == chunks[0].id
    assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, 10)


def test_completions_batch_of_prompts(client, tenant_key):
    prompts = ["Once upon a time", "In a hole in the ground"]
    alone = [client.completions.create(model="test-llm", prompt=prompt, max_tokens=4) for prompt in prompts]
    batch = client.completions.create(model="test-llm", prompt=prompts, max_tokens=4)
    assert batch.id.startswith("cmpl-")
    assert [choice.text for choice in batch.choices] == [one.choices[0].text for one in alone]
    assert batch.usage.prompt_tokens == sum(one.usage.prompt_tokens for one in alone)

    chunks = list(client.completions.create(model="test-llm", prompt=prompts, max_tokens=4, n=2, stream=True,
                                            stream_options={"include_usage": True}))
    indexes = {choice.index for chunk in chunks for choice in chunk.choices}
    assert indexes == {0, 1, 2, 3} and len({chunk.id for chunk in chunks}) == 1
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == batch.usage.prompt_tokens
    rows = usage_rows_wait(api_key=tenant_key.api_key, count=4)
    assert [(row.completion_tokens, row.prompt_tokens) for row in rows[2:]] == [
        (8, batch.usage.prompt_tokens), (16, batch.usage.prompt_tokens)]


@pytest.mark.parametrize("n", [0, 129, "2", True, 1.5])
def test_invalid_n_is_refused(client, n):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="test-llm", messages=MESSAGES, extra_body={"n": n})
    assert caught.value.param == "n" and caught.value.code == "invalid_value"


def test_mixed_batch_prompt_is_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="test-llm", prompt=["text", [1, 2]])
    assert caught.value.param == "prompt"


def test_n_broken_mid_stream_bills_what_was_delivered(gateway, registry, tenant_key, client):
    """Each choice's chunks carry its own usage; a stream cut short bills the
    sum of what every choice delivered."""
    delivered = 0
    with sim_faults(registry["faulty"], crash_after_tokens=3):
        stream = client.chat.completions.create(model="faulty-llm", messages=MESSAGES, max_tokens=20, n=2,
                                                stream=True, extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                delivered += sum(1 for choice in chunk.choices if choice.delta.content)
    assert "mid-stream" in caught.value.message
    assert 3 <= delivered <= 5  # the first choice to crash ends the stream
    [row] = usage_rows_wait(api_key=tenant_key.api_key, count=1)
    assert (row.status, row.http_status, row.completion_tokens) == ("error", 502, delivered)
    assert row.prompt_tokens > 0


def test_websocket_deltas_carry_their_choice(gateway, tenant_key):
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tenant_key.secret}"}) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "auth.ok"
        ws.send(json.dumps({"type": "request", "id": "r", "body": {
            "model": "test-llm", "max_tokens": 4, "n": 2, "messages": MESSAGES}}))
        frames = frames_until(ws, lambda frame, _: frame["type"] in ("usage", "error"))
    deltas = [frame for frame in frames if frame["type"] == "delta"]
    assert sorted({frame["index"] for frame in deltas}) == [0, 1] and len(deltas) == 8
    assert frames[-1]["type"] == "usage" and frames[-1]["usage"]["completion_tokens"] == 8
    assert frames[-1]["finish_reason"] == "length" and frames[-1]["finish_reasons"] == ["length", "length"]
