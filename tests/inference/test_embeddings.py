"""POST /v1/embeddings through a live gateway to an embedding simulator
(`--is-embedding`), with the openai SDK and raw HTTP: vectors, encodings,
metering and pricing, errors in OpenAI's shape."""
import base64
import math
import os
import struct
import time

import httpx2 as httpx
import openai
import pytest

from inference.models import ServedModel
from tests.conftest import process_stop, sim_start, usage_rows_wait

DIM = 64


@pytest.fixture(scope="module")
def embed_model(live_tmp, django_db_blocker, django_db_setup, gateway):
    """Model embed-llm on an embedding simulator of its own, priced at 100 micros
    per input token, once the session gateway serves it."""
    from inference.services import backend_add, served_model_upsert
    from tenants.services import api_key_create, tenant_create

    sim = sim_start(live_tmp, "embed-llm", "--is-embedding", "--embedding-dim", str(DIM),
                    "--json-model-override-args", '{"is_matryoshka": true}')
    with django_db_blocker.unblock():
        model = served_model_upsert(name="embed-llm")
        model.routing_policy = ServedModel.RoutingPolicy.LEAST_OUTSTANDING
        model.input_price_per_million = 100
        model.save()
        backend_add(model=model, url=sim.url)
        tenant = tenant_create(slug=f"embed-probe-{os.getpid()}", name="Embedding probe")
        _, secret = api_key_create(tenant=tenant, name="probe")
    # Served (with its price) once the gateway has reloaded its registry.
    deadline = time.monotonic() + 10
    while httpx.post(gateway.base_url + "/embeddings", headers={"Authorization": f"Bearer {secret}"},
                     json={"model": "embed-llm", "input": "ready?"}).status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not pick up embed-llm"
        time.sleep(0.1)
    yield "embed-llm"
    process_stop(sim.process)


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_through_the_openai_sdk(gateway, embed_model, make_tenant):
    tk = make_tenant()
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    texts = ["the quick brown fox jumps over the lazy dog", "the quick brown fox jumps over the lazy cat",
             "completely unrelated words about invoices"]
    # The SDK asks for base64 unless told otherwise, and decodes it.
    response = client.embeddings.create(model=embed_model, input=texts)
    assert response.model == embed_model and response.object == "list"
    assert [item.index for item in response.data] == [0, 1, 2]
    vectors = [item.embedding for item in response.data]
    assert all(len(v) == DIM and math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-5) for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert response.usage.prompt_tokens > 0 and response.usage.total_tokens == response.usage.prompt_tokens
    again = client.embeddings.create(model=embed_model, input=texts[0], encoding_format="float")
    assert again.data[0].embedding == pytest.approx(vectors[0], rel=1e-6)


def test_float_and_base64_encodings_and_dimensions(gateway, embed_model, make_tenant):
    tk = make_tenant()
    headers = {"Authorization": f"Bearer {tk.secret}"}
    url = gateway.base_url + "/embeddings"
    floats = httpx.post(url, headers=headers, json={"model": embed_model, "input": "hello embeddings",
                                                    "encoding_format": "float"}).json()
    encoded = httpx.post(url, headers=headers, json={"model": embed_model, "input": "hello embeddings",
                                                     "encoding_format": "base64"}).json()
    vector = floats["data"][0]["embedding"]
    assert isinstance(vector, list) and len(vector) == DIM
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    assert list(struct.unpack(f"<{DIM}f", raw)) == pytest.approx(vector, rel=1e-6)
    assert floats["usage"] == encoded["usage"] == {"prompt_tokens": floats["usage"]["prompt_tokens"],
                                                    "total_tokens": floats["usage"]["prompt_tokens"]}
    short = httpx.post(url, headers=headers, json={"model": embed_model, "input": "hello embeddings",
                                                   "dimensions": 16}).json()
    assert len(short["data"][0]["embedding"]) == 16
    tokens = httpx.post(url, headers=headers, json={"model": embed_model, "input": [[1, 2, 3], [4, 5]]}).json()
    assert len(tokens["data"]) == 2 and tokens["usage"]["prompt_tokens"] == 5


def test_embeddings_are_metered_and_priced(gateway, embed_model, make_tenant):
    tk = make_tenant()
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    response = client.embeddings.create(model=embed_model, input=["first text to bill", "and a second one"])
    row, = usage_rows_wait(api_key=tk.api_key, count=1)
    assert (row.endpoint, row.status, row.stream) == ("embeddings", "ok", False)
    assert row.prompt_tokens == response.usage.prompt_tokens and row.completion_tokens == 0
    assert row.cost_micros == 100 * row.prompt_tokens
    assert row.model == embed_model and row.backend


@pytest.mark.parametrize("body, status, code, param", [
    ({}, 400, "missing_required_parameter", "input"),
    ({"input": ""}, 400, "invalid_value", "input"),
    ({"input": []}, 400, "invalid_value", "input"),
    ({"input": [1, "two"]}, 400, "invalid_value", "input"),
    ({"input": [[1, 2], []]}, 400, "invalid_value", "input"),
    ({"input": ["x"] * 2049}, 400, "invalid_value", "input"),
    ({"input": "x", "encoding_format": "hex"}, 400, "invalid_value", "encoding_format"),
    ({"input": "x", "dimensions": 0}, 400, "invalid_value", "dimensions"),
    ({"input": "x", "model": "no-such-model"}, 404, "model_not_found", "model"),
])
def test_invalid_requests_get_openai_errors(gateway, embed_model, make_tenant, body, status, code, param):
    tk = make_tenant()
    response = httpx.post(gateway.base_url + "/embeddings", headers={"Authorization": f"Bearer {tk.secret}"},
                          json={"model": embed_model, **body})
    assert response.status_code == status
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and error["message"]


def test_the_backend_refuses_what_its_model_cannot_do(gateway, embed_model, make_tenant):
    tk = make_tenant()
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="generation model"):
        client.chat.completions.create(model=embed_model, messages=[{"role": "user", "content": "hi"}])
    # test-llm is served by a generation simulator.
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.embeddings.create(model="test-llm", input="hi")


def test_embeddings_over_the_websocket_api(gateway, embed_model, make_tenant):
    """An "embeddings" request on the socket gets one result frame, the HTTP
    answer's body, and is metered like it; bad input is an error frame."""
    import json

    from websockets.sync.client import connect

    tk = make_tenant()
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    over_http = client.embeddings.create(model=embed_model, input=["one text", "another"], encoding_format="float")
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tk.secret}"}) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "auth.ok"
        ws.send(json.dumps({"type": "request", "id": "e1", "endpoint": "embeddings",
                            "body": {"model": embed_model, "input": ["one text", "another"]}}))
        frame = json.loads(ws.recv(timeout=10))
        ws.send(json.dumps({"type": "request", "id": "e2", "endpoint": "embeddings",
                            "body": {"model": embed_model, "input": []}}))
        refused = json.loads(ws.recv(timeout=10))
    assert frame["type"] == "result" and frame["id"] == "e1" and frame["request_id"].startswith("embd-")
    assert frame["result"]["object"] == "list" and frame["result"]["model"] == embed_model
    assert len(frame["result"]["data"]) == 2
    for item, expected in zip(frame["result"]["data"], over_http.data):
        assert item["embedding"] == pytest.approx(expected.embedding, rel=1e-6)
    assert frame["headers"]["x-ratelimit-limit-requests"]
    assert refused["type"] == "error" and refused["id"] == "e2" and refused["error"]["param"] == "input"
    rows = usage_rows_wait(api_key=tk.api_key, count=2)
    assert [(row.transport, row.endpoint) for row in rows] == [("http", "embeddings"), ("websocket", "embeddings")]
    assert rows[1].prompt_tokens == over_http.usage.prompt_tokens and rows[1].completion_tokens == 0
