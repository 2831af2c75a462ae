"""A request the backend refuses as too long for its KV pool (SGLang's scheduler:
"Input length … exceeds the maximum allowed length", a 400 that a stream gets
as its first event, after the headers) is the caller's error: 400
`context_length_exceeded`, no other backend tried, no breaker counting it.
Live gateway, live simulators."""
import openai
import pytest

from inference.models import ServedModel
from tests.conftest import pool_running
from tests.inference.sim_control import sim_call

MODEL = "small-pool-llm"
# A KV pool of 1,000 tokens under a 4,096-token context.
SIM_FLAGS = ("--context-length", "4096", "--max-total-tokens", "1000")
LONG = [{"role": "user", "content": "word " * 1100}]


@pytest.fixture(scope="module")
def small_pool(live_tmp, django_db_blocker, django_db_setup):
    with pool_running(live_tmp, django_db_blocker, MODEL, ServedModel.RoutingPolicy.ROUND_ROBIN, 2, *SIM_FLAGS) as sims:
        yield sims


def received(sims) -> int:
    return sum(sim_call(sim, "/sim/stats")["requests_received"] for sim in sims)


@pytest.mark.parametrize("stream", [True, False])
def test_a_prompt_too_long_for_the_backends_kv_pool_is_the_callers_error(small_pool, gateway, make_tenant, stream):
    tk = make_tenant(tier="premium")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    before = received(small_pool)
    for _ in range(6):  # more than the failures that would open a breaker
        with pytest.raises(openai.BadRequestError) as raised:
            response = client.chat.completions.create(model=MODEL, messages=LONG, max_tokens=2, stream=stream)
            list(response) if stream else response
        assert raised.value.body["code"] == "context_length_exceeded"
        assert "exceeds the maximum allowed length (994 tokens)" in raised.value.body["message"]
    assert received(small_pool) - before == 6  # one backend each: no failover
    # and both backends still serve
    for _ in range(2):
        assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
