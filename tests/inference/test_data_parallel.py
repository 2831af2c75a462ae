"""A data-parallel SGLang server behind a live gateway: one scheduler and radix
cache per rank, which the server itself would feed round robin. The gateway
reads `dp_size` from /server_info and routes to each rank as a backend of its
own, naming the rank in the request, so a prefix stays where it is cached."""
import time

import openai
import pytest
from inference.models import ServedModel
from tests.conftest import gateway_running, pool_running, process_stop, sim_start, usage_rows_wait
from tests.inference.sim_control import sim_call


@pytest.fixture(scope="module")
def dp_server(live_tmp, django_db_blocker, django_db_setup):
    """Model dp-llm on one simulator running two data-parallel ranks, routed cache-aware."""
    with pool_running(live_tmp, django_db_blocker, "dp-llm", ServedModel.RoutingPolicy.CACHE_AWARE, 1,
                      "--dp-size", "2") as sims:
        yield sims[0]


@pytest.fixture(scope="module")
def dp_gateway(dp_server, live_tmp, django_db_setup):
    with gateway_running(live_tmp, GATEWAY_HEALTH_CHECK_SECONDS="0.2", GATEWAY_BACKEND_LOAD_POLL_SECONDS="0.2") as gateway:
        yield gateway


def test_each_conversation_stays_on_the_rank_that_caches_it(dp_gateway, dp_server, make_tenant):
    tk = make_tenant()
    client = openai.OpenAI(base_url=dp_gateway.base_url, api_key=tk.secret, max_retries=0)

    def ask(system: str):
        return client.chat.completions.create(model="dp-llm", max_tokens=2, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": "And then?"}])

    # The gateway read what the server runs before it served: the very first
    # request already goes to a rank.
    ask("warm-up")
    sent = 1
    assert usage_rows_wait(api_key=tk.api_key, count=sent)[0].backend.startswith(dp_server.url + "@")

    systems = [f"You are assistant number {index} of a long-winded company, answer briefly. " * 6
               for index in range(6)]
    replies = [[ask(system) for _ in range(3)] for system in systems]

    # Every repeat finds its prompt cached, all but the last token: the server's
    # own round robin would have sent the second of each to the other rank.
    for repeats in replies:
        assert repeats[0].usage.prompt_tokens_details.cached_tokens < repeats[0].usage.prompt_tokens - 1
        for reply in repeats[1:]:
            assert reply.usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1
    rows = usage_rows_wait(api_key=tk.api_key, count=sent + 18)[sent:]
    by_conversation = [{row.backend for row in rows[index:index + 3]} for index in range(0, 18, 3)]
    assert all(len(backends) == 1 for backends in by_conversation)
    assert set().union(*by_conversation) <= {f"{dp_server.url}@0", f"{dp_server.url}@1"}
    # A caller cannot name a rank: the gateway's choice goes (a rank the server
    # lacks would have been refused there).
    pinned = client.chat.completions.create(model="dp-llm", max_tokens=2, messages=[
        {"role": "user", "content": "Which rank?"}], extra_body={"routed_dp_rank": 5, "data_parallel_rank": 5})
    assert pinned.choices[0].finish_reason == "length"
    # each rank that homed a conversation served its repeats from its own cache
    loads = sim_call(dp_server, "/v1/loads")["loads"]
    served = {load["dp_rank"]: load["cache_hit_rate"] for load in loads}
    for backends in by_conversation:
        rank = int(next(iter(backends)).rsplit("@", 1)[1])
        assert served[rank] > 0


def test_with_the_ranks_unseen_the_server_spreads_a_prompt_over_its_caches(dp_server, live_tmp, make_tenant):
    """GATEWAY_DATA_PARALLEL_RANKS=0: the server is one backend and hands
    requests to its ranks itself, round robin, so a repeated prompt finds
    its cache on the other rank."""
    tk = make_tenant()
    with gateway_running(live_tmp, GATEWAY_DATA_PARALLEL_RANKS="0", GATEWAY_HEALTH_CHECK_SECONDS="0.2") as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
        client.chat.completions.create(model="dp-llm", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        time.sleep(1.0)  # past the gateway's first look at its backends
        messages = [{"role": "system", "content": "A prompt the server's round robin spreads. " * 8},
                    {"role": "user", "content": "And then?"}]
        first, second = (client.chat.completions.create(model="dp-llm", max_tokens=2, messages=messages)
                         for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - 1
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens - 1
    assert {row.backend for row in usage_rows_wait(api_key=tk.api_key, count=3)} == {dp_server.url}


def test_a_data_parallel_server_that_cannot_be_reached_is_left_rank_and_all(live_tmp, django_db_blocker,
                                                                            django_db_setup, make_tenant):
    """Failover: a connection the server refuses takes every rank of it out, so
    the next attempt goes to another server, not to the same one's next rank
    (two attempts, round robin over rank 0, rank 1 and a plain server)."""
    with pool_running(live_tmp, django_db_blocker, "dp-fail-llm", ServedModel.RoutingPolicy.ROUND_ROBIN, 1,
                      "--dp-size", "2") as (dp_sim,), \
            pool_running(live_tmp, django_db_blocker, "dp-fail-llm", ServedModel.RoutingPolicy.ROUND_ROBIN, 1) \
            as (plain,), \
            gateway_running(live_tmp, GATEWAY_FAILOVER_ATTEMPTS="2", GATEWAY_HEALTH_CHECK_SECONDS="60",
                            GATEWAY_BREAKER_OPEN_SECONDS="60") as gateway:
        tk = make_tenant()
        client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)

        def ask():
            return client.chat.completions.create(model="dp-fail-llm", max_tokens=1,
                                                  messages=[{"role": "user", "content": "hi"}])

        # Once the ranks are routed to, and the plain server served the last
        # request, the rotation starts again at rank 0: then the server goes.
        deadline, sent = time.monotonic() + 10, 0
        while True:
            ask()
            sent += 1
            rows = usage_rows_wait(api_key=tk.api_key, count=sent)
            if any(row.backend.startswith(dp_sim.url + "@") for row in rows) and rows[-1].backend == plain.url:
                break
            assert time.monotonic() < deadline, [row.backend for row in rows]
        process_stop(dp_sim.process)
        served = [ask().choices[0].finish_reason for _ in range(6)]
        rows = usage_rows_wait(api_key=tk.api_key, count=sent + len(served))
    assert served == ["length"] * 6
    assert len(rows) == sent + 6 and {row.backend for row in rows[sent:]} == {plain.url}


def test_a_data_parallel_server_added_at_run_time_is_routed_rank_by_rank(live_tmp, django_db_blocker,
                                                                        django_db_setup, make_tenant):
    """A server added while the gateway runs is read when the registry picks it
    up, not at the health loop's next pass (a minute away here)."""
    from inference.services import backend_add

    with pool_running(live_tmp, django_db_blocker, "dp-late-llm", ServedModel.RoutingPolicy.ROUND_ROBIN, 1) \
            as (plain,), gateway_running(live_tmp, GATEWAY_HEALTH_CHECK_SECONDS="60") as gateway:
        late = sim_start(live_tmp, "dp-late-llm", "--dp-size", "2")
        try:
            with django_db_blocker.unblock():
                backend_add(model=ServedModel.objects.get(name="dp-late-llm"), url=late.url)
            time.sleep(1.0)  # the registry reloads on the change; the server is read right after
            tk = make_tenant()
            client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
            for _ in range(6):
                client.chat.completions.create(model="dp-late-llm", max_tokens=1,
                                               messages=[{"role": "user", "content": "hi"}])
            backends = [row.backend for row in usage_rows_wait(api_key=tk.api_key, count=6)]
        finally:
            process_stop(late.process)
    assert len(backends) == 6 and plain.url in backends
    assert sorted(set(backends) - {plain.url}) == [f"{late.url}@0", f"{late.url}@1"]
