"""Presets, /metrics backed by the engine, load endpoints, flush_cache while busy, slow start."""

from __future__ import annotations

import re
import threading
import time

import pytest

from inference.sim.config import build_argument_parser, configs_from_args
from inference.sim.presets import PRESETS

from .test_http_api import CHAT, openai_client

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def prometheus_parse(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Tiny Prometheus text parser: name → [(labels, value)]; checks TYPE lines and syntax."""
    samples: dict[str, list[tuple[dict, float]]] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"bad sample line: {line!r}"
        name, labels, value = match.groups()
        samples.setdefault(name, []).append((dict(_LABEL.findall(labels or "")), float(value)))
    for name in samples:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or base in types, f"{name} has no TYPE line"
    return samples


def metric(samples: dict, name: str) -> float:
    (labels, value), = samples[name]
    assert labels["model_name"] == "demo-llm" and labels["engine_type"] == "unified"
    return value


# ---------------------------------------------------------------- presets

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_plausible_figures(name):
    preset = PRESETS[name]
    per_token_ms = preset.decode_base_ms + preset.decode_per_request_ms
    assert 3 <= per_token_ms <= 30  # batch-1 ITL of a dense 8B-70B model on H100s
    assert 5_000 <= preset.prefill_tokens_per_s <= 100_000
    assert preset.chunked_prefill_size == 8192
    assert 2048 <= preset.max_running_requests <= 4096
    assert preset.sources


def test_preset_capacities_follow_kv_bytes_per_token():
    small, large = PRESETS["h100-8b"], PRESETS["8xh100-70b"]
    assert small.kv_bytes_per_token == 128 * 1024 and large.kv_bytes_per_token == 320 * 1024
    assert 350_000 <= small.max_total_tokens <= 500_000  # ≈ 52 GB of KV on one H100
    assert 1_000_000 <= large.max_total_tokens <= 1_500_000  # ≈ 50 GB per GPU × 8, 40 KiB per rank-token
    assert large.decode_per_request_ms > small.decode_per_request_ms


def test_preset_flags_and_overrides():
    parse = build_argument_parser().parse_args
    config, _ = configs_from_args(parse(["--preset", "h100-8b"]))
    assert config.max_total_tokens == PRESETS["h100-8b"].max_total_tokens
    assert config.model_path == "meta-llama/Llama-3.1-8B-Instruct" and config.context_length == 131_072
    overridden, _ = configs_from_args(parse(["--preset", "h100-8b", "--max-total-tokens", "1000",
                                            "--context-length", "4096", "--decode-base-ms", "1"]))
    assert overridden.max_total_tokens == 1000 and overridden.context_length == 4096
    assert overridden.decode_base_ms == 1 and overridden.prefill_tokens_per_s == 30_000
    default, _ = configs_from_args(parse([]))
    assert default.prefill_tokens_per_s == default.decode_base_ms == 0  # instant upstream
    legacy, _ = configs_from_args(parse(["--cache-capacity-tokens", "500"]))
    assert legacy.max_total_tokens == 500


def test_preset_server_reports_its_figures(sim_factory):
    sim = sim_factory("--preset", "8xh100-70b", "--time-scale", "0.05")
    with sim.client() as client:
        info = client.get("/server_info").json()
        started = time.monotonic()
        body = client.post("/generate", json={"text": "hello " * 200, "sampling_params": {"max_new_tokens": 20}})
        wall = time.monotonic() - started
    assert info["max_total_tokens"] == PRESETS["8xh100-70b"].max_total_tokens
    assert info["simulator"]["preset"] == "8xh100-70b" and info["chunked_prefill_size"] == 8192
    e2e = body.json()["meta_info"]["e2e_latency"]  # simulated seconds
    assert 20 * 0.0086 <= e2e <= 0.5  # 20 decode steps of ≈ 8.6 ms, plus a prefill
    assert wall < e2e  # ran faster than real time


# ---------------------------------------------------------------- metrics and loads

def test_metrics_parse_and_track_the_engine(sim_factory):
    sim = sim_factory("--max-running-requests", "1", "--itl-ms", "30")
    done = []

    def generate(rid: str) -> None:
        with sim.client() as client:
            client.post("/generate", json={"text": "metrics please", "rid": rid,
                                           "sampling_params": {"max_new_tokens": 15}})
        done.append(rid)

    threads = [threading.Thread(target=generate, args=(f"m{index}",)) for index in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 3
    with sim.client() as client:
        while True:
            busy = prometheus_parse(client.get("/metrics").text)
            if metric(busy, "sglang:num_queue_reqs") == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        loads = client.get("/v1/loads").json()["loads"][0]
        legacy = client.get("/get_load").json()[0]
        flush_busy = client.post("/flush_cache")
    for thread in threads:
        thread.join()
    with sim.client() as client:
        idle = prometheus_parse(client.get("/metrics").text)
        flush_idle = client.post("/flush_cache")

    assert metric(busy, "sglang:num_running_reqs") == 1 and metric(busy, "sglang:num_queue_reqs") == 2
    assert 0 < metric(busy, "sglang:token_usage") <= 1
    assert metric(busy, "sglang:num_used_tokens") > 0
    assert loads["num_running_reqs"] == 1 and loads["num_waiting_reqs"] == 2 and loads["queues"]["waiting"] == 2
    assert legacy["num_waiting_reqs"] == 2 and legacy["num_reqs"] == 3
    assert flush_busy.status_code == 400 and flush_idle.status_code == 200

    assert metric(idle, "sglang:num_running_reqs") == 0 and metric(idle, "sglang:token_usage") == 0
    assert metric(idle, "sglang:generation_tokens_total") == 45
    assert metric(idle, "sglang:num_requests_total") == 3
    assert metric(idle, "sglang:gen_throughput") > 0
    ttft_count = metric(idle, "sglang:time_to_first_token_seconds_count")
    assert ttft_count == 3
    itl_sum = metric(idle, "sglang:inter_token_latency_seconds_sum")
    itl_count = metric(idle, "sglang:inter_token_latency_seconds_count")
    assert itl_count == 42 and itl_sum / itl_count == pytest.approx(0.030, rel=0.3)
    buckets = [value for labels, value in idle["sglang:e2e_request_latency_seconds_bucket"]]
    assert buckets == sorted(buckets) and buckets[-1] == 3  # cumulative, +Inf = count


def test_metrics_carry_sglangs_labels_streaming_split_from_the_rest(sim_factory):
    """The scheduler's gauges carry its ranks; the tokenizer's per-request
    series are split by is_streaming, each flag once a request had it."""
    sim = sim_factory()
    with sim.client() as client:
        fresh = prometheus_parse(client.get("/metrics").text)
        client.post("/generate", json={"text": "whole", "sampling_params": {"max_new_tokens": 3}}).raise_for_status()
        whole = prometheus_parse(client.get("/metrics").text)
        with client.stream("POST", "/generate", json={"text": "streamed", "stream": True,
                                                      "sampling_params": {"max_new_tokens": 5}}) as streamed:
            streamed.read()
        both = prometheus_parse(client.get("/metrics").text)
    (gauge_labels, _), = both["sglang:num_running_reqs"]
    assert gauge_labels == {"model_name": "demo-llm", "engine_type": "unified", "tp_rank": "0", "pp_rank": "0",
                            "moe_ep_rank": "0"}
    assert "sglang:generation_tokens_total" not in fresh and "sglang:num_requests_total" not in fresh
    assert [labels["is_streaming"] for labels, _ in whole["sglang:generation_tokens_total"]] == ["false"]
    by_flag = {labels["is_streaming"]: value for labels, value in both["sglang:generation_tokens_total"]}
    assert by_flag == {"false": 3, "true": 5}
    assert {labels["is_streaming"]: value for labels, value in both["sglang:num_requests_total"]} == \
        {"false": 1, "true": 1}
    counts = {labels["is_streaming"]: value for labels, value in both["sglang:time_to_first_token_seconds_count"]}
    assert counts == {"false": 1, "true": 1}
    (itl_labels, _), = both["sglang:inter_token_latency_seconds_count"]
    assert "is_streaming" not in itl_labels


def test_priority_scheduling_labels_every_series_by_priority(sim_factory):
    """Under priority scheduling the scheduler's gauges carry priority="" for
    totals, the two queues a series per priority seen (kept at 0 after), and
    the tokenizer's series each request's priority, the default's when it
    gave none."""
    sim = sim_factory("--enable-priority-scheduling", "--default-priority-value", "0", "--max-running-requests", "1",
                      "--decode-base-ms", "20", "--time-scale", "0.5")
    with sim.client() as client:
        held = threading.Thread(target=lambda: client.post("/generate", json={
            "text": "first", "priority": 5, "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}))
        held.start()
        deadline = time.monotonic() + 5
        while metric_by_labels(client, "sglang:num_running_reqs", priority="5") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waiting = threading.Thread(target=lambda: client.post("/generate", json={
            "text": "second", "sampling_params": {"max_new_tokens": 2}}))
        waiting.start()
        while metric_by_labels(client, "sglang:num_queue_reqs", priority="0") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy = prometheus_parse(client.get("/metrics").text)
        held.join()
        waiting.join()
        idle = prometheus_parse(client.get("/metrics").text)
    running = {labels["priority"]: value for labels, value in busy["sglang:num_running_reqs"]}
    assert running == {"": 1, "5": 1, "0": 0} and all(labels["tp_rank"] == "0" for labels, _ in busy["sglang:num_running_reqs"])
    assert {labels["priority"]: value for labels, value in busy["sglang:num_queue_reqs"]} == {"": 1, "0": 1, "5": 0}
    assert {labels["priority"]: value for labels, value in idle["sglang:num_running_reqs"]} == {"": 0, "0": 0, "5": 0}
    tokens = {(labels["priority"], labels["is_streaming"]): value
              for labels, value in idle["sglang:generation_tokens_total"]}
    assert tokens == {("5", "false"): 40, ("0", "false"): 2}
    assert {labels["priority"] for labels, _ in idle["sglang:inter_token_latency_seconds_count"]} == {"0", "5"}


def metric_by_labels(client, name: str, **wanted: str) -> float | None:
    for labels, value in prometheus_parse(client.get("/metrics").text).get(name, []):
        if all(labels.get(key) == item for key, item in wanted.items()):
            return value
    return None


def test_evicted_tokens_metric_counts_what_the_radix_cache_dropped(sim_factory):
    sim = sim_factory("--max-total-tokens", "400")
    with sim.client() as client:
        before = prometheus_parse(client.get("/metrics").text)
        for index in range(4):
            client.post("/generate", json={"input_ids": list(range(1000 * (index + 1), 1000 * (index + 1) + 150)),
                                           "sampling_params": {"max_new_tokens": 2}}).raise_for_status()
        after = prometheus_parse(client.get("/metrics").text)
    assert before["sglang:evicted_tokens_total"] == [
        ({"cache_type": "UnifiedRadixCache", "tp_rank": "0", "pp_rank": "0", "dp_rank": "0"}, 0.0)]
    # 4 × 152 tokens through a 400-token cache: at least two sequences' worth dropped
    (_, evicted), = after["sglang:evicted_tokens_total"]
    assert evicted >= 2 * 152


def test_retractions_are_reported_per_request_and_in_metrics(sim_factory):
    """Replies that run long although they could stop, admitted at a new-token
    ratio of 0.1: the KV runs out while they decode and one is retracted
    (meta_info.num_retractions, SGLang's retraction counters)."""
    sim = sim_factory("--max-total-tokens", "600", "--decode-base-ms", "1", "--time-scale", "0.01",
                      env={"SGLANG_INIT_NEW_TOKEN_RATIO": "0.1"})
    body = {"sampling_params": {"max_new_tokens": 200, "min_new_tokens": 190}}
    with sim.client() as client:
        replies = client.post("/generate", json={
            **body, "input_ids": [list(range(1000 * (index + 1), 1000 * (index + 1) + 100)) for index in range(3)],
        }).raise_for_status().json()
        samples = prometheus_parse(client.get("/metrics").text)
        loads = client.get("/v1/loads").json()["loads"][0]
    assert sorted(reply["meta_info"]["num_retractions"] for reply in replies) == [0, 0, 1]
    assert all(reply["meta_info"]["completion_tokens"] >= 190 for reply in replies)
    assert metric(samples, "sglang:num_retracted_requests_total") == 1
    assert metric(samples, "sglang:num_retracted_input_tokens_total") == 100
    assert 0 < metric(samples, "sglang:num_retracted_output_tokens_total") < 190
    assert metric(samples, "sglang:num_retracted_reqs") == 0 == loads["queues"]["retracted"]  # cleared since


def test_cache_hit_rate_and_cached_tokens_metrics(sim):
    client = openai_client(sim)
    messages = [{"role": "user", "content": "metrics cache check " * 20}]
    for _ in range(2):
        client.chat.completions.create(model="m", messages=messages, max_tokens=2,
                                       extra_body={"cache_salt": "metrics-hit"})
    with sim.client() as raw:
        samples = prometheus_parse(raw.get("/metrics").text)
    assert metric(samples, "sglang:cached_tokens_total") > 0
    assert 0 < metric(samples, "sglang:cache_hit_rate") <= 1


# ---------------------------------------------------------------- slow start

def test_slow_start_by_flag_and_by_faults(sim_factory, sim):
    slow = sim_factory("--startup-delay-ms", "600")
    with slow.client() as client:
        starting = client.get("/health").status_code
        time.sleep(0.7)
        ready = client.get("/health").status_code
    assert (starting, ready) == (503, 200)
    with sim.client() as client:
        client.post("/sim/faults", json={"startup_delay_ms": 300}).raise_for_status()
        assert client.get("/health").status_code == 503 and client.get("/ready").status_code == 503
        # requests are still served while starting
        completion = openai_client(sim).chat.completions.create(model="m", messages=CHAT, max_tokens=1)
        assert completion.usage.completion_tokens == 1
        time.sleep(0.35)
        assert client.get("/health").status_code == 200
