"""Prefix retention through a live gateway: a tenant's system prompt that two
conversations started with stays in a small backend cache while other traffic
passes through, where without retention it is evicted."""
import time

import openai
import pytest
from django.db import connection

from inference.models import ServedModel
from tests.conftest import gateway_start, pool_running, process_stop
from tests.inference.sim_control import sim_call

SYSTEM = "You are the claims assistant of Northwind Mutual. Answer from the policy text. " * 40


@pytest.fixture(scope="module")
def pools(live_tmp, django_db_blocker, django_db_setup):
    """Two models, each on a simulator of its own with a 4,000-token KV cache."""
    with pool_running(live_tmp, django_db_blocker, "kept-llm", ServedModel.RoutingPolicy.CACHE_AWARE, 1,
                      "--max-total-tokens", "4000") as kept, \
            pool_running(live_tmp, django_db_blocker, "unkept-llm", ServedModel.RoutingPolicy.CACHE_AWARE, 1,
                         "--max-total-tokens", "4000") as unkept:
        yield kept[0], unkept[0]


def run_tenant_day(gateway, secret: str, model: str) -> tuple[int, int]:
    """Two conversations start with the tenant's prompt, other tenants' traffic
    fills the cache several times over, then a third conversation starts.
    Returns the cached prompt tokens of the second one's first turn (the
    prompt, found in cache) and of the third one's."""
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)

    def first_turn(system: str, question: str) -> int:
        reply = client.chat.completions.create(
            model=model, max_tokens=4,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
        return reply.usage.prompt_tokens_details.cached_tokens

    first_turn(SYSTEM, "Is hail damage covered?")
    shared = first_turn(SYSTEM, "How do I file a claim?")
    for index in range(14):  # about 280 tokens each
        first_turn(f"Another tenant's assistant, number {index}. " * 30, "Hello")
        time.sleep(0.15)  # the gateway looks for prefixes to keep every 0.05 s
    return shared, first_turn(SYSTEM, "What is my deductible?")


def test_a_shared_system_prompt_outlives_other_traffic_with_retention(pools, make_tenant, live_tmp):
    kept, unkept = pools
    with_retention = gateway_start(live_tmp, connection.settings_dict["NAME"],
                                   GATEWAY_PREFIX_RETENTION_TICK_SECONDS="0.05")
    without = gateway_start(live_tmp, connection.settings_dict["NAME"], GATEWAY_PREFIX_RETENTION_SECONDS="0")
    try:
        tk = make_tenant(tier="premium")
        before = sim_call(kept, "/sim/stats")["requests_received"]
        shared, kept_cached = run_tenant_day(with_retention, tk.secret, "kept-llm")
        touches = sim_call(kept, "/sim/stats")["requests_received"] - before - 17
        _, unkept_cached = run_tenant_day(without, tk.secret, "unkept-llm")
    finally:
        process_stop(with_retention.process)
        process_stop(without.process)
    assert shared > 500  # the system prompt, about 600 tokens
    # The whole prompt (the user header after it may match a token more or less).
    assert kept_cached >= shared - 8, (kept_cached, shared, touches)
    assert unkept_cached < 64, unkept_cached
    # It took a few one-token requests, not one per request.
    assert 1 <= touches <= 14
