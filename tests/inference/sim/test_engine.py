"""The continuous-batching engine in process: queueing, prefill and decode costs, KV capacity, chunking.

Costs are large in simulated time and `--time-scale` shrinks them, so each
test runs in well under a second of wall time while the figures checked are
in simulated seconds (what the engine reports).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest

from inference.sim import engine as engine_module
from inference.sim.config import build_argument_parser, configs_from_args
from inference.sim.engine import WAITING, GenerationRequest, RunningRequest, SimEngine
from inference.sim.tokenizer import EOS_TOKEN_ID


def engine_make(*flags: str) -> SimEngine:
    config, settings = configs_from_args(build_argument_parser().parse_args(list(flags)))
    return SimEngine(config=config, settings=settings)


def request_make(rid: str, prompt_ids: list[int], max_new_tokens: int = 4, **kwargs) -> GenerationRequest:
    return GenerationRequest(rid=rid, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, **kwargs)


async def drive(engine: SimEngine, running: RunningRequest) -> list:
    async with contextlib.aclosing(engine.run(running)) as steps:
        return [step async for step in steps]


async def run_all(engine: SimEngine, requests: list[GenerationRequest], stagger_s: float = 0.0) -> list[RunningRequest]:
    admitted = []
    tasks = []
    for request in requests:
        running = engine.admit(request)
        admitted.append(running)
        tasks.append(asyncio.create_task(drive(engine, running)))
        if stagger_s:
            await asyncio.sleep(stagger_s)
    await asyncio.gather(*tasks)
    return admitted


def ttft(running: RunningRequest) -> float:
    return running.first_token_at - running.admitted_at


def mean_itl(running: RunningRequest) -> float:
    return (running.last_token_at - running.first_token_at) / (running.completion_tokens - 1)


def prompt(seed: int, length: int) -> list[int]:
    return [1000 + seed * 10_000 + index for index in range(length)]


# ---------------------------------------------------------------- queueing

async def test_requests_queue_when_max_running_is_reached():
    # given two slots and a 10 ms (simulated) decode step
    engine = engine_make("--max-running-requests", "2", "--decode-base-ms", "10", "--time-scale", "0.2")
    requests = [request_make(f"q{index}", prompt(index, 8), max_new_tokens=5) for index in range(4)]
    # when four arrive at once
    tasks_started = [engine.admit(request) for request in requests]
    tasks = [asyncio.create_task(drive(engine, running)) for running in tasks_started]
    await asyncio.sleep(0.005)
    # then two run, two wait, and the late ones' first token comes after the early ones finish
    assert engine.num_running_requests == 2 and engine.num_queue_requests == 2
    assert engine.stats_snapshot()["engine"]["queued_requests"] == 2
    await asyncio.gather(*tasks)
    first, second, third, fourth = tasks_started
    assert third.first_token_at >= first.finished_at and fourth.first_token_at >= second.finished_at
    assert ttft(third) > ttft(first) + 0.04  # waited ≈ 5 decode steps of 10 ms


# ---------------------------------------------------------------- prefill

async def test_ttft_grows_with_uncached_prompt_and_shrinks_on_a_cache_hit():
    # given prefill at 20,000 tokens/s (2,000 tokens ≈ 100 ms) and a 1 ms decode step
    # (real time: at a smaller time scale, a millisecond of scheduling delay on a
    # busy machine would be ten simulated ones)
    engine = engine_make("--prefill-tokens-per-s", "20000", "--decode-base-ms", "1", "--time-scale", "1")
    short, = await run_all(engine, [request_make("short", prompt(1, 100))])
    long, = await run_all(engine, [request_make("long", prompt(2, 2000))])
    # when the long prompt is sent again (all but its last token is cached)
    repeat, = await run_all(engine, [request_make("repeat", prompt(2, 2000))])
    # then TTFT follows the uncached prompt tokens
    assert ttft(short) == pytest.approx(0.005, abs=0.003)  # 100 / 20,000 s
    assert ttft(long) == pytest.approx(0.1, rel=0.15)  # 2,000 / 20,000 s
    assert repeat.cached_tokens == 1999
    assert ttft(repeat) < ttft(long) / 10


async def test_chunked_prefill_splits_a_long_prompt_into_steps():
    engine = engine_make("--chunked-prefill-size", "512", "--prefill-tokens-per-s", "51200",
                         "--decode-base-ms", "1", "--time-scale", "0.1")
    running, = await run_all(engine, [request_make("chunky", prompt(3, 2000), max_new_tokens=2)])
    # 2,000 tokens in chunks of 512 → 4 prefill steps of ≤ 10 ms each
    assert engine.steps_total["prefill"] == 4
    assert ttft(running) == pytest.approx(2000 / 51200, rel=0.2)


async def test_a_chunked_prefill_delays_decoding_of_other_requests():
    # SGLang's default runs prefill and decode as separate steps: a long
    # prompt arriving mid-stream stalls the running request's next token.
    engine = engine_make("--chunked-prefill-size", "1000", "--prefill-tokens-per-s", "10000",
                         "--decode-base-ms", "5", "--time-scale", "0.1")
    streaming = engine.admit(request_make("streaming", prompt(4, 10), max_new_tokens=40))
    gaps_task = asyncio.create_task(drive(engine, streaming))
    await asyncio.sleep(0.005)
    await run_all(engine, [request_make("big", prompt(5, 3000), max_new_tokens=1)])
    await gaps_task
    itl = engine.stats.priority().itl
    assert itl.total / itl.count > 0.005  # mean ITL above the bare decode step


# ---------------------------------------------------------------- decode

async def test_itl_grows_with_batch_size():
    flags = ("--decode-base-ms", "10", "--decode-per-request-ms", "5", "--time-scale", "0.1")
    alone, = await run_all(engine_make(*flags), [request_make("alone", prompt(6, 8), max_new_tokens=10)])
    crowd = await run_all(engine_make(*flags),
                          [request_make(f"crowd{index}", prompt(10 + index, 8), max_new_tokens=10) for index in range(8)])
    assert mean_itl(alone) == pytest.approx(0.015, rel=0.2)  # 10 + 5 × 1 ms
    assert mean_itl(crowd[0]) == pytest.approx(0.050, rel=0.2)  # 10 + 5 × 8 ms


async def test_zero_costs_are_instant_and_burst_tokens():
    engine = engine_make()
    running, = await run_all(engine, [request_make("instant", prompt(7, 8), max_new_tokens=100, ignore_eos=True)])
    assert running.completion_tokens == 100 and ttft(running) < 0.05
    assert running.finish_reason == {"type": "length", "length": 100}


async def test_a_natural_eos_comes_before_a_larger_max_tokens():
    """As a model does: the reply ends at its EOS (16-64 tokens here) unless
    max_new_tokens is smaller, or ignore_eos runs it to the limit; KV is
    budgeted for max_new_tokens either way, as SGLang's scheduler cannot know
    the EOS ahead."""
    engine = engine_make()
    natural, capped, ignoring = await run_all(engine, [
        request_make("natural", prompt(9, 8), max_new_tokens=500),
        request_make("capped", prompt(9, 8), max_new_tokens=10),
        request_make("ignoring", prompt(9, 8), max_new_tokens=500, ignore_eos=True)])
    assert 16 <= natural.completion_tokens <= 64 and natural.max_new_estimate == 500
    assert natural.finish_reason["type"] == "stop" and natural.finish_reason["matched"] == EOS_TOKEN_ID
    assert capped.completion_tokens == 10 and capped.finish_reason == {"type": "length", "length": 10}
    assert ignoring.completion_tokens == 500 and ignoring.finish_reason["type"] == "length"
    # The same text up to where each ends.
    assert ignoring.text.startswith(natural.text) and natural.text.startswith(capped.text)
    # The EOS is the last output id: counted, but it adds no text (a special token).
    n = natural.completion_tokens
    assert natural.output_ids[-1] == EOS_TOKEN_ID and EOS_TOKEN_ID not in natural.output_ids[:-1]
    assert natural.output_ids[:-1] == ignoring.output_ids[:n - 1] and len(natural.output_ids) == n
    # An EOS on the last allowed token still stops the reply (SGLang checks stop
    # tokens before the length cap); one token less and it is cut, with the same text.
    at_limit, before = await run_all(engine, [request_make("at-limit", prompt(9, 8), max_new_tokens=n),
                                              request_make("before", prompt(9, 8), max_new_tokens=n - 1)])
    assert at_limit.finish_reason == natural.finish_reason and at_limit.text == natural.text
    assert before.finish_reason == {"type": "length", "length": n - 1} and before.text == natural.text


# ---------------------------------------------------------------- KV capacity

async def test_kv_capacity_bounds_the_cache_and_evicts_lru():
    engine = engine_make("--max-total-tokens", "200")
    engine.cache.eviction_slack_tokens = 0  # exact LRU for the assertions
    # given four finished 50-token sequences (45 prompt + 5 output): 200 tokens
    for index in range(4):
        await run_all(engine, [request_make(f"fill{index}", prompt(20 + index, 45), max_new_tokens=5)])
    assert engine.cache.total_tokens == 200
    # when a fifth arrives
    await run_all(engine, [request_make("fill4", prompt(24, 45), max_new_tokens=5)])
    # then the cache stays within capacity: the oldest sequence was evicted, the newest kept
    assert engine.cache.total_tokens <= 200
    oldest, = await run_all(engine, [request_make("again0", prompt(20, 45), max_new_tokens=1)])
    assert oldest.cached_tokens == 0
    newest, = await run_all(engine, [request_make("again4", prompt(24, 45), max_new_tokens=1)])
    assert newest.cached_tokens == 44


@pytest.mark.parametrize("policy, kept", [("lru", False), ("priority", True), ("slru", True)])
async def test_the_radix_eviction_policy_decides_what_a_full_cache_keeps(policy, kept):
    """`--radix-eviction-policy`: a prompt sent first with a high priority, or
    by two requests, outlives newer priority-0 sequences used once under
    `priority` and `slru`; LRU drops it first."""
    engine = engine_make("--max-total-tokens", "200", "--radix-eviction-policy", policy)
    engine.cache.eviction_slack_tokens = 0
    assert engine.cache.eviction_policy == policy
    shared = prompt(30, 45)
    await run_all(engine, [request_make("vip", shared, max_new_tokens=5, priority=10)])
    if policy == "slru":
        await run_all(engine, [request_make("vip-again", shared, max_new_tokens=1)])
    for index in range(4):
        await run_all(engine, [request_make(f"fill{index}", prompt(40 + index, 45), max_new_tokens=5)])
    assert engine.cache.total_tokens <= 200
    again, = await run_all(engine, [request_make("again", shared, max_new_tokens=1)])
    assert again.cached_tokens == (44 if kept else 0)


def test_the_radix_eviction_policy_config_is_json_checked_at_start():
    config, settings = configs_from_args(build_argument_parser().parse_args([
        "--radix-eviction-policy", "slru", "--radix-eviction-policy-config", '{"protected_threshold": 4}']))
    assert (config.radix_eviction_policy, config.radix_eviction_policy_config) == ("slru", {"protected_threshold": 4})
    assert SimEngine(config=config, settings=settings).cache.eviction_settings == {"protected_threshold": 4}
    for flags, problem in [
            (["--radix-eviction-policy", "tlru"], "needs 'threshold' greater than 'next_prompt_estimate'"),
            (["--radix-eviction-policy", "slru", "--radix-eviction-policy-config", "{"], "is not JSON"),
            (["--radix-eviction-policy-config", "[1]"], "must be a JSON object"),
            (["--radix-eviction-policy-config", '{"threshold": 1}'], "unknown key 'threshold' for eviction policy 'lru'")]:
        with pytest.raises(SystemExit, match=problem):
            configs_from_args(build_argument_parser().parse_args(flags))


@pytest.mark.parametrize("refresh, policy, touched", [
    (True, "lru", [31, 63, 95]), (False, "lru", []), (True, "lfu", [])])
async def test_the_scheduler_keeps_waiting_requests_prefixes_recent(refresh, policy, touched):
    """SGLang 0.5.23 under fcfs and LRU eviction: every 32nd scheduling pass
    touches the cached prefixes of the waiting requests, so what a queued
    request will reuse is not evicted while it waits; not with
    SGLANG_ENABLE_WAITING_PREFIX_REFRESH=false, nor under another policy."""
    config, settings = configs_from_args(build_argument_parser().parse_args([
        "--chunked-prefill-size", "8", "--radix-eviction-policy", policy]))
    engine = SimEngine(config=replace(config, waiting_prefix_refresh=refresh), settings=settings)
    shared = prompt(50, 200)
    await run_all(engine, [request_make("first", shared, max_new_tokens=4)])
    node = engine.cache.match_prefix(shared).node
    # given a request queued behind a 1,000-token prompt prefilled 8 tokens a pass
    for running in (engine.admit(request_make("long", prompt(60, 1000), max_new_tokens=1)),
                    engine.admit(request_make("waiter", shared + [5, 6], max_new_tokens=1))):
        running.state = WAITING
        engine._waiting.append(running)
    # when the scheduler plans 120 passes, then the waiter's prefix was touched
    # on every 32nd (the first request's own pass was the first of all)
    passes = []
    for index in range(120):
        before = node.last_access
        assert engine._plan_prefill()
        if node.last_access != before:
            passes.append(index)
    assert passes == touched


def test_sglangs_environment_switches_the_waiting_prefix_refresh(monkeypatch):
    parse = build_argument_parser().parse_args
    assert configs_from_args(parse([]))[0].waiting_prefix_refresh is True
    monkeypatch.setenv("SGLANG_ENABLE_WAITING_PREFIX_REFRESH", "false")
    assert configs_from_args(parse([]))[0].waiting_prefix_refresh is False


async def test_running_requests_evict_the_cache_to_get_kv():
    engine = engine_make("--max-total-tokens", "300")
    engine.cache.eviction_slack_tokens = 0
    for index in range(5):
        await run_all(engine, [request_make(f"warm{index}", prompt(30 + index, 50), max_new_tokens=5)])
    assert engine.cache.total_tokens == 275
    # a request reserving 250 tokens (150 prompt + 100 output) forces evictions
    running = engine.admit(request_make("big", prompt(40, 150), max_new_tokens=100))
    task = asyncio.create_task(drive(engine, running))
    await asyncio.sleep(0)
    await task
    assert engine.cache.evicted_tokens_total >= 200
    assert engine.cache.total_tokens <= 300


@pytest.mark.parametrize("ignore_eos", [True, False])
async def test_a_request_waits_until_kv_is_free_for_what_running_ones_may_write(ignore_eos):
    """SGLang's PrefillAdder: a running request that ignores EOS counts all
    of its remaining output against the KV; one that may stop early counts
    it × the new-token ratio (0.7 at first), so a second request fits beside it."""
    engine = engine_make("--max-total-tokens", "400", "--decode-base-ms", "10", "--time-scale", "0.1")
    assert engine.new_token_ratio.current == pytest.approx(0.7)
    first = engine.admit(request_make("kv1", prompt(50, 100), max_new_tokens=200, ignore_eos=ignore_eos,
                                      min_new_tokens=100))  # 100 prompt + 200 output
    second = engine.admit(request_make("kv2", prompt(51, 100), max_new_tokens=50))  # needs 150
    tasks = [asyncio.create_task(drive(engine, running)) for running in (first, second)]
    await asyncio.sleep(0.01)
    # 400 - 100 prompt - 200 output < 150; 400 - 100 - (200 - written) × 0.7 >= 150
    if ignore_eos:
        assert engine.num_running_requests == 1 and engine.num_queue_requests == 1
        assert engine.stats_snapshot()["engine"]["reserved_tokens"] == 200 - first.completion_tokens
    else:
        assert engine.num_running_requests == 2 and engine.num_queue_requests == 0
    assert 0 < engine.token_usage() <= 1
    await asyncio.gather(*tasks)
    assert (second.first_token_at >= first.finished_at) is ignore_eos
    assert engine.stats_snapshot()["engine"]["reserved_tokens"] == 0
    assert first.retractions == second.retractions == engine.stats.retracted_requests_total == 0


def test_the_new_token_ratio_falls_from_its_start_to_its_floor():
    """SGLang's NewTokenRatioTracker: 0.7 × --schedule-conservativeness (at
    most 1), down to 0.14 of that over SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS (600)
    decode steps; back at the start on reset."""
    ratio = engine_make().new_token_ratio
    assert (ratio.start, ratio.floor) == (pytest.approx(0.7), pytest.approx(0.098))
    ratio.decay_steps(300)
    assert ratio.current == pytest.approx(0.399)
    ratio.decay_steps(1_000)
    assert ratio.current == pytest.approx(0.098)
    ratio.reset()
    assert ratio.current == pytest.approx(0.7)
    assert engine_make("--schedule-conservativeness", "2").new_token_ratio.start == 1.0


def test_sglangs_environment_sets_the_admission_estimates(monkeypatch):
    monkeypatch.setenv("SGLANG_INIT_NEW_TOKEN_RATIO", "0.5")
    monkeypatch.setenv("SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS", "10")
    monkeypatch.setenv("SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION", "256")
    config, _ = configs_from_args(build_argument_parser().parse_args([]))
    assert (config.init_new_token_ratio, config.new_token_ratio_decay_steps, config.clip_max_new_tokens) == (
        0.5, 10, 256)
    monkeypatch.setenv("SGLANG_RETRACT_DECODE_STEPS", "many")
    with pytest.raises(SystemExit, match="SGLANG_RETRACT_DECODE_STEPS must be an integer"):
        configs_from_args(build_argument_parser().parse_args([]))


async def test_a_full_kv_retracts_the_request_with_least_output_and_it_resumes(monkeypatch):
    """When the ratio bet fails (replies that run long although they could stop),
    a decode step without KV sends the request with the least output back to
    the queue (SGLang's retract_decode): its output's KV is freed, its prompt
    stays cached; it comes back once there is room, prefills prompt + output
    again and goes on with the same reply."""
    config, settings = configs_from_args(build_argument_parser().parse_args([
        "--max-total-tokens", "600", "--decode-base-ms", "1", "--time-scale", "0.2"]))
    engine = SimEngine(config=replace(config, init_new_token_ratio=0.1), settings=settings)
    # three replies of at least 190 tokens (EOS masked until then): 100 + 200 each admitted
    # against 600 tokens of KV, the third once the first two count 199 × 0.1 each
    requests = [request_make(f"long{index}", prompt(90 + index, 100), max_new_tokens=200, min_new_tokens=190)
                for index in range(3)]
    # SGLang's num_retracted_reqs gauge: the last retraction's count until decode
    # statistics are next logged (kept here to the end; cleared: the metrics test)
    monkeypatch.setattr(engine_module, "DECODE_LOG_INTERVAL", 10**9)
    first, second, third = await run_all(engine, requests)
    assert engine.last_retracted == 1
    assert [r.retractions for r in (first, second, third)] == [0, 0, 1]
    assert all(r.completion_tokens >= 190 for r in (first, second, third))
    stats = engine.stats
    assert (stats.retracted_requests_total, stats.retracted_input_tokens_total) == (1, 100)
    assert 0 < stats.retracted_output_tokens_total < 190
    assert engine.steps_total["prefill"] >= 3  # the third was prefilled again
    assert third.cached_tokens == 0  # the first attempt's hit, as SGLang reports
    # the same reply as without the retraction
    alone, = await run_all(engine_make(), [replace(requests[2], rid="alone")])
    assert third.output_ids == alone.output_ids and third.text == alone.text
    assert engine.stats_snapshot()["engine"]["reserved_tokens"] == 0 and engine.cache.protected_tokens == 0


async def test_abort_of_a_waiting_request_frees_its_place():
    engine = engine_make("--max-running-requests", "1", "--decode-base-ms", "10", "--time-scale", "0.1")
    first = engine.admit(request_make("run", prompt(60, 5), max_new_tokens=20))
    queued = engine.admit(request_make("queued", prompt(61, 5), max_new_tokens=20))
    tasks = [asyncio.create_task(drive(engine, running)) for running in (first, queued)]
    await asyncio.sleep(0.005)
    assert engine.abort(rid="queued", abort_all=False) == 1
    steps_first, steps_queued = await asyncio.gather(*tasks)
    # Taken from the waiting queue: the tokenizer manager's answer, not FINISH_ABORT's.
    assert steps_queued[-1].finish_reason == {"type": "abort", "message": "Abort in waiting queue"}
    assert queued.completion_tokens == 0
    assert steps_first[-1].finish_reason["type"] == "length"
    assert engine.num_queue_requests == 0 and "queued" in engine.stats.aborted_by_request


async def test_lpm_schedules_the_longest_cached_prefix_first():
    engine = engine_make("--schedule-policy", "lpm", "--max-running-requests", "1",
                         "--decode-base-ms", "10", "--time-scale", "0.1")
    shared = prompt(70, 100)
    await run_all(engine, [request_make("warm", shared, max_new_tokens=1)])
    blocker = engine.admit(request_make("blocker", prompt(71, 5), max_new_tokens=5))
    cold = engine.admit(request_make("cold", prompt(72, 100), max_new_tokens=1))
    hot = engine.admit(request_make("hot", shared + [5, 6], max_new_tokens=1))
    tasks = [asyncio.create_task(drive(engine, running)) for running in (blocker, cold, hot)]
    await asyncio.gather(*tasks)
    assert hot.first_token_at < cold.first_token_at  # arrived later, scheduled first


async def test_lof_schedules_the_longest_output_first():
    engine = engine_make("--schedule-policy", "lof", "--max-running-requests", "1",
                         "--decode-base-ms", "10", "--time-scale", "0.05")
    blocker = engine.admit(request_make("blocker", prompt(73, 5), max_new_tokens=5))
    tasks = [asyncio.create_task(drive(engine, blocker))]
    await asyncio.sleep(0.001)
    queued = [engine.admit(request_make(f"out{tokens}", prompt(74 + index, 5), max_new_tokens=tokens))
              for index, tokens in enumerate((3, 9, 6))]
    tasks += [asyncio.create_task(drive(engine, running)) for running in queued]
    await asyncio.gather(*tasks)
    assert [r.rid for r in sorted(queued, key=lambda r: r.first_token_at)] == ["out9", "out6", "out3"]


def waiting_make(engine: SimEngine, *requests: GenerationRequest) -> list[RunningRequest]:
    """Requests placed in the waiting queue as they arrived, without a scheduler running."""
    queued = []
    for request in requests:
        running = engine.admit(request)
        running.arrival_processed = engine._prefill_tokens_processed
        engine._waiting.append(running)
        queued.append(running)
    return queued


def ordered(engine: SimEngine, policy: str) -> list[str]:
    return [running.rid for running in engine._ordered_waiting(policy)]


def test_cache_aware_policies_order_the_queue_as_sglangs_schedule_policy():
    engine = engine_make()
    cached = prompt(80, 300)
    engine.cache.insert(cached)
    engine.cache.insert(cached + prompt(81, 50))
    engine.cache.insert(cached + prompt(82, 50))
    shared_new = prompt(83, 60)
    waiting_make(
        engine,
        request_make("new-a", shared_new + prompt(84, 400)),
        request_make("new-b", shared_new + prompt(85, 10)),  # shares 60 new tokens with new-a: goes last
        request_make("alone", prompt(86, 200)),
        request_make("cached-x", cached + prompt(81, 50) + prompt(87, 5)),
        request_make("cached-y", cached + prompt(82, 20)),
        request_make("cached-z", cached + prompt(82, 50) + prompt(88, 100)),
    )
    # lpm: the longest cached prefix first; new-b after everything (in-batch prefix caching)
    assert ordered(engine, "lpm") == ["cached-x", "cached-z", "cached-y", "new-a", "alone", "new-b"]
    # the fewest tokens to prefill first (new-b deferred all the same)
    assert ordered(engine, "shortest-prefill-first") == ["cached-y", "cached-x", "cached-z", "alone", "new-a",
                                                          "new-b"]
    # depth first through the cache, the subtree more requests end in first, a node's own requests after its subtree's
    assert ordered(engine, "dfs-weight") == ["cached-z", "cached-y", "cached-x", "new-a", "new-b", "alone"]


def test_hrrn_favours_the_highest_response_ratio():
    """Highest response ratio next, with the prompt tokens prefilled while a
    request waited as its clock: waited / uncached, ties by rid."""
    engine = engine_make()
    early = waiting_make(engine, request_make("early-long", prompt(90, 1001)))
    engine._prefill_tokens_processed = 300
    waiting_make(engine, request_make("late-short", prompt(91, 101)), request_make("late-long", prompt(92, 1001)))
    engine._prefill_tokens_processed = 500
    # early-long: 500 / 1000 = 0.5; late-short: 200 / 100 = 2; late-long: 200 / 1000 = 0.2
    assert early[0].arrival_processed == 0
    assert ordered(engine, "hrrn") == ["late-short", "early-long", "late-long"]


def test_routing_key_and_random_policies():
    engine = engine_make()
    waiting_make(engine, *(request_make(f"r{index}", prompt(93 + index, 10), routing_key=key)
                           for index, key in enumerate(("b", None, "a", "c", "a"))))
    assert ordered(engine, "routing-key") == ["r0", "r1", "r2", "r3", "r4"]  # nothing running: arrival order
    running = engine.admit(request_make("running", prompt(99, 10), routing_key="a"))
    engine._running[running] = None
    other = engine.admit(request_make("running-c", prompt(98, 10), routing_key="c"))
    engine._running[other] = None
    engine._running[engine.admit(request_make("running-a", prompt(97, 10), routing_key="a"))] = None
    # keys the running batch has most first, then the rest by key
    assert ordered(engine, "routing-key") == ["r2", "r4", "r3", "r1", "r0"]
    shuffles = {tuple(ordered(engine, "random")) for _ in range(10)}
    assert len(shuffles) > 1 and all(sorted(order) == ["r0", "r1", "r2", "r3", "r4"] for order in shuffles)


def test_unknown_schedule_policy_is_refused_at_start():
    with pytest.raises(SystemExit) as exited:
        engine_make("--schedule-policy", "priority")
    assert str(exited.value) == "Unknown schedule_policy: policy='priority'"


@pytest.mark.parametrize("retraction_policy, retracted", [("length", "long2"), ("priority", "long0")])
async def test_the_retraction_policy_picks_whom_a_full_kv_sends_back(retraction_policy, retracted):
    """`--retraction-policy length` retracts the request with the least output
    first, `priority` the one with the lowest priority."""
    config, settings = configs_from_args(build_argument_parser().parse_args([
        "--max-total-tokens", "600", "--decode-base-ms", "1", "--time-scale", "0.01",
        "--retraction-policy", retraction_policy]))
    engine = SimEngine(config=replace(config, init_new_token_ratio=0.1), settings=settings)
    requests = [request_make(f"long{index}", prompt(90 + index, 100), max_new_tokens=200, min_new_tokens=190,
                             priority=priority) for index, priority in enumerate((0, 5, 9))]
    done = await run_all(engine, requests)
    assert {r.rid for r in done if r.retractions} == {retracted}


# ---------------------------------------------------------------- priority scheduling

async def queue_order(*flags: str, priorities: list[int | None]) -> list[str]:
    """The order in which requests of these priorities, queued behind a running
    one with a single slot, get it."""
    engine = engine_make("--max-running-requests", "1", "--decode-base-ms", "10", "--time-scale", "0.05", *flags)
    blocker = engine.admit(request_make("blocker", prompt(100, 5), max_new_tokens=5))
    tasks = [asyncio.create_task(drive(engine, blocker))]
    await asyncio.sleep(0.001)
    queued = [engine.admit(request_make(f"p{priority}", prompt(101 + index, 5), max_new_tokens=2, priority=priority))
              for index, priority in enumerate(priorities)]
    tasks += [asyncio.create_task(drive(engine, running)) for running in queued]
    await asyncio.gather(*tasks)
    return [r.rid for r in sorted(queued, key=lambda r: r.first_token_at)]


async def test_priority_scheduling_orders_the_queue_by_priority_then_arrival():
    """--enable-priority-scheduling: higher priority values first (lower ones
    with --schedule-low-priority-values-first), then arrival; a request
    without one goes last, or gets --default-priority-value."""
    priorities = [1, None, 5, 3]
    assert await queue_order(priorities=priorities) == ["p1", "pNone", "p5", "p3"]  # FCFS without the flag
    flag = "--enable-priority-scheduling"
    assert await queue_order(flag, priorities=priorities) == ["p5", "p3", "p1", "pNone"]
    assert await queue_order(flag, "--schedule-low-priority-values-first", priorities=priorities) == [
        "p1", "p3", "p5", "pNone"]
    assert await queue_order(flag, "--default-priority-value", "4", priorities=priorities) == [
        "p5", "pNone", "p3", "p1"]


async def test_a_request_preempts_running_ones_more_than_the_threshold_below_it():
    """With every slot taken, a request whose priority is more than 10 above a
    running one's sends the lowest (then the newest) of those back to the
    queue; it resumes afterwards with the same reply. 10 above is not enough,
    nor is any with --disable-priority-preemption."""
    async def run(*flags: str, priority: int) -> tuple[RunningRequest, list[RunningRequest]]:
        engine = engine_make("--enable-priority-scheduling", "--max-running-requests", "2",
                             "--decode-base-ms", "10", "--time-scale", "0.05", *flags)
        low = [engine.admit(request_make(f"low{index}", prompt(110 + index, 5), max_new_tokens=40,
                                         ignore_eos=True, priority=0)) for index in range(2)]
        tasks = [asyncio.create_task(drive(engine, running)) for running in low]
        await asyncio.sleep(0.005)
        high = engine.admit(request_make("high", prompt(120, 5), max_new_tokens=2, priority=priority))
        tasks.append(asyncio.create_task(drive(engine, high)))
        await asyncio.gather(*tasks)
        return high, low

    high, (older, newer) = await run(priority=11)
    assert high.finished_at < older.finished_at and (older.retractions, newer.retractions) == (0, 1)
    assert newer.completion_tokens == 40 and newer.finish_reason["type"] == "length"
    alone, = await run_all(engine_make(), [replace(newer.request, rid="alone")])
    assert newer.output_ids == alone.output_ids
    for flags, priority in [((), 10), (("--disable-priority-preemption",), 100)]:
        high, low = await run(*flags, priority=priority)
        assert high.first_token_at >= min(r.finished_at for r in low) and not any(r.retractions for r in low)


async def test_a_priority_is_refused_when_scheduling_by_it_is_disabled_on_request():
    """--abort-on-priority-when-disabled: a request that gives a priority to a
    server without priority scheduling ends at once with SGLang's 503."""
    engine = engine_make("--abort-on-priority-when-disabled")
    refused, plain = await run_all(engine, [request_make("with", prompt(130, 5), priority=1),
                                            request_make("without", prompt(131, 5))])
    assert refused.finish_reason == {"type": "abort", "status_code": 503, "err_type": None,
                                     "message": "Using priority is disabled for this server. "
                                                "Please send a new request without a priority."}
    assert refused.completion_tokens == 0 and plain.finish_reason["type"] == "length"
    assert engine.stats.requests_failed == 1


@pytest.mark.parametrize("priority_flags, refused", [((), "late"), (("--enable-priority-scheduling",), "queued")])
async def test_a_full_waiting_queue_refuses_a_request_or_the_least_preferred(priority_flags, refused):
    """--max-queued-requests: a request that would make the queue longer is
    refused with SGLang's 503; under priority scheduling a strictly preferred
    one takes the place of the least preferred queued request instead."""
    engine = engine_make("--max-running-requests", "1", "--max-queued-requests", "1", "--decode-base-ms", "10",
                         "--time-scale", "0.05", *priority_flags)
    runner = engine.admit(request_make("runner", prompt(140, 5), max_new_tokens=40, priority=10))
    tasks = [asyncio.create_task(drive(engine, runner))]
    await asyncio.sleep(0.001)
    queued = engine.admit(request_make("queued", prompt(141, 5), max_new_tokens=2, priority=1))
    tasks.append(asyncio.create_task(drive(engine, queued)))
    await asyncio.sleep(0.001)
    late = engine.admit(request_make("late", prompt(142, 5), max_new_tokens=2, priority=5))
    tasks.append(asyncio.create_task(drive(engine, late)))
    await asyncio.gather(*tasks)
    by_rid = {r.rid: r for r in (runner, queued, late)}
    message = "The request is aborted by a higher priority request." if priority_flags else \
        "The request queue is full."
    assert by_rid[refused].finish_reason == {"type": "abort", "message": message, "status_code": 503,
                                             "err_type": None}
    assert all(r.finish_reason["type"] in ("length", "stop") for rid, r in by_rid.items() if rid != refused)


# ---------------------------------------------------------------- time scale

async def test_time_scale_runs_faster_than_real_time():
    engine = engine_make("--decode-base-ms", "50", "--time-scale", "0.05")
    loop = asyncio.get_running_loop()
    started = loop.time()
    running, = await run_all(engine, [request_make("fast", prompt(80, 4), max_new_tokens=10)])
    wall = loop.time() - started
    assert running.e2e_latency_s() == pytest.approx(0.5, rel=0.2)  # 10 × 50 ms simulated
    assert wall < 0.2


async def test_pages_of_sixteen_tokens_report_whole_pages_cached():
    """`--page-size 16`: SGLang's paged radix cache matches whole pages of the
    prompt less its last token, and keeps a sequence's last partial page out of
    the tree (freed with the request)."""
    engine = engine_make("--page-size", "16")
    shared = prompt(50, 45)
    first, = await run_all(engine, [request_make("page-first", shared, max_new_tokens=3)])
    assert first.cached_tokens == 0
    # 45 + 3 tokens written; 48 is three whole pages, so the whole sequence is kept
    assert engine.cache.total_tokens == 48
    again, = await run_all(engine, [request_make("page-again", shared + [7, 8], max_new_tokens=1)])
    assert again.cached_tokens == 32  # 46 tokens to match: two whole pages of the 45 cached
    # the second sequence (48 tokens) branches off inside the third page: a page of its own
    assert engine.cache.total_tokens == 64
    assert engine.used_tokens() == 0 and engine._private_tokens == 0  # the partial pages were freed


async def test_without_the_radix_cache_every_prompt_is_prefilled_and_its_kv_freed():
    """`--disable-radix-cache` (SGLang's ChunkCache): nothing is matched, and
    a finished request's KV goes back to the pool at once."""
    engine = engine_make("--disable-radix-cache", "--max-total-tokens", "400")
    shared = prompt(60, 45)
    runs = await run_all(engine, [request_make("nocache1", shared, max_new_tokens=4)])
    runs += await run_all(engine, [request_make("nocache2", shared, max_new_tokens=4)])
    assert [run.cached_tokens for run in runs] == [0, 0]
    assert engine.cache.total_tokens == 0 and engine.used_tokens() == 0
    # several at once, more than the pool would cache: each finishes and frees its share
    crowd = await run_all(engine, [request_make(f"crowd{index}", shared, max_new_tokens=20) for index in range(6)])
    assert all(run.completion_tokens == 20 and run.cached_tokens == 0 for run in crowd)
    assert engine.cache.total_tokens == 0 and engine.stats_snapshot()["cache"]["hit_rate"] == 0


def test_without_the_radix_cache_cache_aware_schedule_policies_fall_back_to_fcfs():
    config, _ = configs_from_args(build_argument_parser().parse_args(
        ["--disable-radix-cache", "--schedule-policy", "lpm"]))
    assert config.schedule_policy == "fcfs" and config.disable_radix_cache
    config, _ = configs_from_args(build_argument_parser().parse_args(["--schedule-policy", "lpm"]))
    assert config.schedule_policy == "lpm"
    with pytest.raises(SystemExit, match="Experimental shortest-prefill-first requires prefix caching"):
        configs_from_args(build_argument_parser().parse_args(
            ["--disable-radix-cache", "--schedule-policy", "shortest-prefill-first"]))
    with pytest.raises(SystemExit, match="--page-size must be positive"):
        configs_from_args(build_argument_parser().parse_args(["--page-size", "0"]))


def test_sglang_launch_lines_with_hardware_flags_start_the_simulator():
    """SGLang's test helpers add `--device` to every launch, and launch lines
    carry GPU settings: those flags are accepted, recorded as given (for
    /server_info) and change nothing; flags that would change what is served
    but are not modelled (`--enable-dp-attention`, an L3 HiCache tier) are still refused."""
    parser = build_argument_parser()
    args = parser.parse_args(["--device", "cuda", "--tp", "2", "--mem-fraction-static", "0.85",
                              "--trust-remote-code", "--cuda-graph-max-bs", "32", "--disable-cuda-graph",
                              "--attention-backend", "fa3", "--tensor-parallel-size", "4"])
    config, _ = configs_from_args(args)
    assert config.hardware_flags == {"device": "cuda", "tp_size": 4, "mem_fraction_static": 0.85,
                                     "cuda_graph_max_bs": 32, "attention_backend": "fa3",
                                     "trust_remote_code": True, "disable_cuda_graph": True}
    plain, _ = configs_from_args(parser.parse_args([]))
    assert plain.hardware_flags == {}
    assert replace(plain, hardware_flags=config.hardware_flags) == config  # nothing else differs
    with pytest.raises(SystemExit):
        parser.parse_args(["--enable-dp-attention"])
    with pytest.raises(SystemExit, match="L3 storage tier is not simulated"):
        configs_from_args(parser.parse_args(["--enable-hicache", "--hicache-storage-backend", "file"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--mem-fraction-static", "most"])


@pytest.mark.parametrize("method", ["total_requests", "total_tokens"])
async def test_data_parallel_load_balance_methods_pick_the_least_loaded_rank(method):
    """`--load-balance-method total_requests | total_tokens`: a request without
    a rank goes to the rank with the fewest requests (or tokens) in flight,
    ties to the lowest rank."""
    from inference.sim.data_parallel import DataParallel
    config, settings = configs_from_args(build_argument_parser().parse_args(
        ["--dp-size", "3", "--load-balance-method", method, "--decode-base-ms", "5", "--time-scale", "0.2"]))
    dp = DataParallel(config=config, settings=settings)
    assert dp.engine_for(request_make("first", prompt(1, 8))) is dp.ranks[0]  # idle: the lowest rank
    busy = dp.ranks[0].admit(request_make("busy", prompt(2, 30), max_new_tokens=50))
    task = asyncio.create_task(drive(dp.ranks[0], busy))
    await asyncio.sleep(0.01)
    assert dp.ranks[0].num_running_requests == 1
    assert dp.engine_for(request_make("next", prompt(3, 8))) is dp.ranks[1]
    assert dp.engine_for(request_make("named", prompt(4, 8), routed_dp_rank=0)) is dp.ranks[0]
    dp.ranks[0].abort(rid="busy", abort_all=False)
    await task
    dp.ranks[0].finalize(busy)


async def test_data_parallel_round_robin_and_shared_rids():
    from inference.sim.data_parallel import DataParallel
    from inference.sim.engine import RequestRejected
    config, settings = configs_from_args(build_argument_parser().parse_args(["--dp-size", "2"]))
    dp = DataParallel(config=config, settings=settings)
    picks = [dp.engine_for(request_make(f"r{index}", prompt(index, 8))).dp_rank for index in range(4)]
    assert picks == [0, 1, 0, 1]
    held = await dp.admit(request_make("same", prompt(5, 8)))
    with pytest.raises(RequestRejected, match="Duplicate request ID detected: same"):
        await dp.admit(request_make("same", prompt(6, 8)))  # the other rank: rids are the tokenizer's
    held.engine.finalize(held)
    with pytest.raises(RequestRejected, match=r"routed_dp_rank=-1 out of range \[0, 2\)"):
        dp.engine_for(request_make("negative", prompt(7, 8), routed_dp_rank=-1))
