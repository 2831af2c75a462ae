"""Tenant tiers reach the backends' queues: a model whose backends schedule by
priority (SGLang's --enable-priority-scheduling) gets each request's tier as
`priority`, so a premium request preempts a free one that holds the only slot;
callers cannot set the priority themselves. Live gateway, live simulators."""
import threading
import time
from unittest import mock

import openai
import orjson
import pytest
from django.core.management import call_command

from inference.models import ServedModel
from tests.conftest import pool_start, process_stop

MESSAGES = [{"role": "user", "content": "Who goes first?"}]
# One running slot, 20 ms (simulated = wall) per decode step: a 60-token reply holds it for 1.2 s.
SIM_FLAGS = ("--enable-priority-scheduling", "--max-running-requests", "1", "--decode-base-ms", "20")
LONG_TOKENS = 60


@pytest.fixture(scope="module")
def pools(live_tmp, django_db_blocker, django_db_setup):
    """prio-llm (backend_priority on) and fifo-llm (off), each on a simulator of its own."""
    sims = {}
    for model, tiers in (("prio-llm", True), ("fifo-llm", False)):
        sims[model], = pool_start(live_tmp, django_db_blocker, model, ServedModel.RoutingPolicy.ROUND_ROBIN, 1,
                                  *SIM_FLAGS)
        with django_db_blocker.unblock():
            ServedModel.objects.filter(name=model).update(backend_priority=tiers)
    yield sims
    for sim in sims.values():
        process_stop(sim.process)


def wait_for_models(gateway, secret: str, names: set[str]) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    deadline = time.monotonic() + 10
    while not names <= {model.id for model in client.models.list()}:
        assert time.monotonic() < deadline, f"{names} never reached the gateway's registry"
        time.sleep(0.1)


def race(gateway, model: str, free_secret: str, premium_secret: str) -> tuple[float, float, int]:
    """A free tenant's long stream takes the backend's only slot; once its first
    token is out, a premium tenant asks for a short reply. Returns when each
    ended (monotonic) and the completion tokens the free stream was billed."""
    free = openai.OpenAI(base_url=gateway.base_url, api_key=free_secret, max_retries=0)
    premium = openai.OpenAI(base_url=gateway.base_url, api_key=premium_secret, max_retries=0)
    started = threading.Event()
    ended = {}

    def long_stream() -> None:
        # The caller's own priority is the gateway's to set: it is dropped.
        stream = free.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=LONG_TOKENS, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "priority": 10**6})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()
            if chunk.usage is not None:
                ended["usage"] = chunk.usage.completion_tokens
        ended["free"] = time.monotonic()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(10)
    reply = premium.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3)
    ended["premium"] = time.monotonic()
    thread.join(15)
    assert reply.choices[0].message.content and not thread.is_alive()
    return ended["free"], ended["premium"], ended["usage"]


def test_a_premium_request_preempts_a_free_one_on_backends_that_schedule_by_priority(
        pools, gateway, make_tenant):
    free_key, premium_key = make_tenant(tier="free"), make_tenant(tier="premium")
    wait_for_models(gateway, free_key.secret, set(pools))
    # Tiers as priorities: premium (40) is more than SGLang's threshold (10) above
    # free (0), so it preempts the free stream and is answered while that waits.
    free_end, premium_end, billed = race(gateway, "prio-llm", free_key.secret, premium_key.secret)
    assert premium_end < free_end and billed == LONG_TOKENS
    # Without backend_priority nothing is sent: the premium request waits its turn.
    free_end, premium_end, billed = race(gateway, "fifo-llm", free_key.secret, premium_key.secret)
    assert premium_end > free_end and billed == LONG_TOKENS


def upstream_body_of(caller_body: dict, tier_priorities: dict | None = None) -> dict:
    """What the gateway sends a backend for a premium tenant's chat request `caller_body`."""
    from inference.registry import ModelEntry, Resolution
    from inference.streaming import CHAT, _upstream_body, completion_request_build
    from tenants.selectors import ApiKeyPrincipal

    principal = ApiKeyPrincipal(api_key_id=1, api_key_prefix="sk", tenant_id=1, tenant_public_id="t1",
                                tenant_slug="t1", tenant_tier="premium", tenant_status="active",
                                suspended_reason="", expires_at=None, revoked=False)
    request = completion_request_build(principal=principal, endpoint=CHAT, transport="http", body=caller_body)
    model = ModelEntry("m", "m-upstream", 4096, "platform", 0, tier_priorities=tier_priorities)
    return orjson.loads(_upstream_body(request, Resolution(model), stream=False, cap=("max_tokens", 16)))


@pytest.mark.parametrize("tier_priorities, sent", [({"premium": 40, "free": 0}, 40), (None, None)])
def test_the_upstream_body_carries_the_tier_priority_and_never_the_callers(tier_priorities, sent):
    body = upstream_body_of({"model": "m", "messages": MESSAGES, "priority": 10**6}, tier_priorities)
    assert body.get("priority") == sent


def test_fields_that_reach_past_the_callers_own_request_never_go_upstream():
    """SGLang's schema takes fields a router or operator sets: the data-parallel
    rank, sessions, server-side code, the prefill-decode hand-off. A caller's
    are dropped; its sampling fields go through."""
    owned = {"rid": "other-tenants-rid", "lora_path": "other-adapter", "routed_dp_rank": 5,
             "data_parallel_rank": 5, "disagg_prefill_dp_rank": 1, "session_id": "s-1",
             "session_params": {"id": "s-1", "rid": "r"}, "custom_logit_processor": "gASV...",
             "custom_params": {"a": 1}, "bootstrap_host": "10.0.0.9", "bootstrap_port": 8998, "bootstrap_room": 7}
    body = upstream_body_of({"model": "m", "messages": MESSAGES, "top_k": 5, "cache_salt": "mine", **owned})
    assert not (set(owned) - {"rid"}) & set(body)
    assert body["rid"] != "other-tenants-rid"
    assert body["top_k"] == 5 and body["cache_salt"] == "shared:mine" and body["model"] == "m-upstream"


@pytest.mark.django_db
def test_a_models_backend_priority_maps_tiers_through_settings(settings):
    from inference.runtime import _registry_rows
    from inference.services import served_model_upsert

    settings.GATEWAY_TIER_BACKEND_PRIORITY = {"premium": 7, "standard": 3, "free": 1}
    served_model_upsert(name="tiers-on", backend_priority=True)
    served_model_upsert(name="tiers-off")
    with mock.patch("inference.runtime.close_old_connections"):  # keep the test's transaction
        rows = {row.name: row.tier_priorities for row in _registry_rows()}
    assert rows["tiers-on"] == {"premium": 7, "standard": 3, "free": 1} and rows["tiers-off"] is None
    # the management command's flag (and leaving it out leaves it as it is)
    call_command("model_register", "tiers-off", "--backend-priority", "--routing-policy", "least_outstanding")
    call_command("model_register", "tiers-off")
    model = ServedModel.objects.get(name="tiers-off")
    assert model.backend_priority and model.routing_policy == "least_outstanding"
