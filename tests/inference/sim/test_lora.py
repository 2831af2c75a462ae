"""LoRA through real HTTP: load/unload endpoints, selection by model name and lora_path, eviction."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import contextlib

import openai
import pytest

from inference.sim.config import build_argument_parser, configs_from_args
from inference.sim.engine import GenerationRequest, SimEngine
from inference.sim.lora import LoraError

from .test_http_api import CHAT, openai_client


def adapter_dir_make(root: Path, name: str, *, weights: bool = True, config: dict | None = None) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config if config is not None else {
        "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "demo/demo-llm", "peft_type": "LORA"}))
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: adapter_dir_make(root, name) for name in ("sql", "poet", "legal", "extra")}


@pytest.fixture(scope="module")
def lora_sim(sim_factory, adapters):
    """Two adapters loaded at start, at most three kept loaded, 50 ms per load."""
    return sim_factory("--enable-cache-report", "--lora-paths", f"sql={adapters['sql']}",
                       json.dumps({"lora_name": "poet", "lora_path": str(adapters["poet"]), "pinned": True}),
                       "--max-loaded-loras", "3", "--max-loras-per-batch", "3", "--lora-load-ms", "50")


def test_models_list_loaded_adapters(lora_sim, adapters):
    with lora_sim.client() as client:
        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert cards["demo-llm"]["max_model_len"] == 4096 or cards["demo-llm"]["max_model_len"] > 0
    assert cards["sql"] == {"id": "sql", "object": "model", "created": cards["sql"]["created"], "owned_by": "sglang",
                            "root": str(adapters["sql"]), "parent": "demo-llm", "max_model_len": None}
    assert cards["poet"]["parent"] == "demo-llm"


def test_adapter_selected_by_model_name_answers_differently(lora_sim):
    client = openai_client(lora_sim)
    base = client.chat.completions.create(model="demo-llm", messages=CHAT, max_tokens=8)
    sql = client.chat.completions.create(model="demo-llm:sql", messages=CHAT, max_tokens=8)
    sql_again = client.chat.completions.create(model="anything:sql", messages=CHAT, max_tokens=8)
    poet = client.chat.completions.create(model="demo-llm:poet", messages=CHAT, max_tokens=8)
    assert sql.model == "demo-llm:sql"  # echoed as sent
    texts = {base.choices[0].message.content, sql.choices[0].message.content, poet.choices[0].message.content}
    assert len(texts) == 3  # each adapter answers differently
    assert sql_again.choices[0].message.content == sql.choices[0].message.content  # base name not validated
    # adapters do not share prefix cache with the base model
    assert sql.usage.prompt_tokens_details.cached_tokens == 0


def test_model_name_overrides_body_lora_path_and_native_lora_path(lora_sim):
    client = openai_client(lora_sim)
    by_model = client.chat.completions.create(model="demo-llm:sql", messages=CHAT, max_tokens=6,
                                              extra_body={"lora_path": "poet"})
    by_body = client.chat.completions.create(model="demo-llm", messages=CHAT, max_tokens=6,
                                             extra_body={"lora_path": "sql"})
    assert by_model.choices[0].message.content == by_body.choices[0].message.content
    with lora_sim.client() as raw:
        native_poet = raw.post("/generate", json={"text": "hi", "lora_path": "poet",
                                                  "sampling_params": {"max_new_tokens": 5}}).json()
        native_base = raw.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 5}}).json()
    assert native_poet["text"] != native_base["text"]


def test_unknown_adapter_is_400(lora_sim):
    with pytest.raises(openai.BadRequestError) as error:
        openai_client(lora_sim).chat.completions.create(model="demo-llm:nope", messages=CHAT, max_tokens=2)
    body = error.value.response.json()
    assert body["object"] == "error" and body["code"] == 400
    assert body["message"].startswith("Got LoRA adapter that has never been loaded: nope\nAll loaded adapters: ")
    with lora_sim.client() as raw:
        native = raw.post("/generate", json={"text": "hi", "lora_path": "nope"})
    assert native.status_code == 400
    assert native.json()["error"]["message"].startswith("Got LoRA adapter that has never been loaded: nope")


def test_load_unload_and_lru_eviction(lora_sim, adapters):
    with lora_sim.client() as client:
        # given sql and poet (pinned) loaded, at most three loaded
        started = time.monotonic()
        loaded = client.post("/load_lora_adapter", json={"lora_name": "legal", "lora_path": str(adapters["legal"])})
        assert time.monotonic() - started >= 0.05  # --lora-load-ms
        assert loaded.status_code == 200 and set(loaded.json()["loaded_adapters"]) == {"sql", "poet", "legal"}
        loaded = client.post("/load_lora_adapter", json={"lora_name": "extra", "lora_path": str(adapters["extra"])})
        # then the least recently used unpinned adapter (sql) was evicted
        assert loaded.status_code == 200
        assert loaded.json() == {"rid": None, "http_worker_ipc": None, "success": True, "error_message": "",
                                 "loaded_adapters": {"poet": str(adapters["poet"]), "legal": str(adapters["legal"]),
                                                     "extra": str(adapters["extra"])}}
        again = client.post("/load_lora_adapter", json={"lora_name": "legal", "lora_path": str(adapters["legal"])})
        assert again.status_code == 400 and again.json()["success"] is False
        assert again.json()["error_message"] == "Failed to load LoRA adapter legal because it is already loaded"
        assert set(again.json()["loaded_adapters"]) == {"poet", "legal", "extra"}
        # when a request names the evicted adapter, it is reloaded transparently (legal leaves)
        reloads_before = client.get("/sim/stats").json()["lora"]["reloads_total"]
        body = client.post("/generate", json={"text": "hi", "lora_path": "sql",
                                              "sampling_params": {"max_new_tokens": 2}})
        assert body.status_code == 200
        stats = client.get("/sim/stats").json()["lora"]
        assert stats["reloads_total"] == reloads_before + 1
        assert {entry["name"] for entry in stats["loaded"]} == {"poet", "extra", "sql"}
        # unload, and unload of something not loaded
        unloaded = client.post("/unload_lora_adapter", json={"lora_name": "sql"})
        assert unloaded.status_code == 200
        assert unloaded.json()["loaded_adapters"] == {"poet": str(adapters["poet"]), "extra": str(adapters["extra"])}
        missing = client.post("/unload_lora_adapter", json={"lora_name": "sql"})
        assert missing.status_code == 400
        assert missing.json() == {
            "rid": None, "http_worker_ipc": None, "success": False, "loaded_adapters": None,
            "error_message": "LoRA with name sql does not exist. Loaded LoRAs: odict_keys(['poet', 'extra'])"}
        listed = [card["id"] for card in client.get("/v1/models").json()["data"]]
        assert listed == ["demo-llm", "poet", "extra"]


def test_replies_follow_the_weights_and_a_reload_starts_cold(sim_factory, adapters):
    """As in SGLang: what an adapter answers comes from its weights, not its
    name; each load has its own id in the prefix cache's key, so an adapter
    unloaded and loaded again finds nothing of its earlier requests cached."""
    sim = sim_factory("--enable-cache-report", "--enable-lora", "--max-loras-per-batch", "2", "--max-lora-rank", "16",
                      "--lora-target-modules", "q_proj", "v_proj")
    prompt = {"input_ids": list(range(500, 700)), "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}

    def load(name: str, adapter: str) -> None:
        client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapters[adapter])}
                    ).raise_for_status()

    def generate(name: str) -> dict:
        return client.post("/generate", json={**prompt, "lora_path": name}).raise_for_status().json()

    with sim.client() as client:
        load("first", "sql")
        first = generate("first")
        assert generate("first")["meta_info"]["cached_tokens"] > 0
        client.post("/unload_lora_adapter", json={"lora_name": "first"}).raise_for_status()
        load("first", "sql")
        reloaded = generate("first")
        load("same_weights", "sql")
        same_weights = generate("same_weights")
        client.post("/unload_lora_adapter", json={"lora_name": "first"}).raise_for_status()
        load("first", "poet")
        other_weights = generate("first")
    assert reloaded["meta_info"]["cached_tokens"] == 0 and reloaded["text"] == first["text"]
    assert same_weights["text"] == first["text"] and same_weights["meta_info"]["cached_tokens"] == 0
    assert other_weights["text"] != first["text"]


def test_a_batchs_adapters_are_resolved_together(sim_factory, adapters):
    """A /generate batch names at most --max-loaded-loras distinct adapters
    (the base model counted); its loaded adapters count as used before the
    evicted ones are reloaded, so a reload evicts none the batch needs."""
    sim = sim_factory("--enable-lora", "--max-loaded-loras", "2", "--max-loras-per-batch", "2", "--max-lora-rank", "16",
                      "--lora-target-modules", "q_proj", "v_proj")
    with sim.client() as client:
        for name in ("sql", "poet", "legal"):  # sql evicted by legal: poet, legal loaded (poet least recent)
            client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapters[name])}
                        ).raise_for_status()
        too_many = client.post("/generate", json={"text": ["a", "b", "c"], "lora_path": ["sql", "poet", None],
                                                  "sampling_params": {"max_new_tokens": 1}})
        batch = client.post("/generate", json={"text": ["a", "b"], "lora_path": ["sql", "poet"],
                                               "sampling_params": {"max_new_tokens": 1}})
        stats = client.get("/sim/stats").json()["lora"]
    assert too_many.status_code == 400
    assert too_many.json()["error"]["message"] == "Received request with 3 unique loras requested but max loaded loras is 2"
    assert batch.status_code == 200
    # poet, in the batch and loaded, counted as used first: sql's reload evicted legal, not poet.
    assert {entry["name"] for entry in stats["loaded"]} == {"poet", "sql"} and stats["reloads_total"] == 1


def test_load_validates_the_adapter_directory(lora_sim, tmp_path):
    no_weights = adapter_dir_make(tmp_path, "no-weights", weights=False)
    bad_config = adapter_dir_make(tmp_path, "bad-config", config={"lora_alpha": 8, "target_modules": ["q_proj"]})
    with lora_sim.client() as client:
        missing_dir = client.post("/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "nope")})
        assert missing_dir.status_code == 400
        assert missing_dir.json()["error_message"] == (
            f"[Errno 2] No such file or directory: '{tmp_path / 'nope' / 'adapter_config.json'}'")
        weights = client.post("/load_lora_adapter", json={"lora_name": "x", "lora_path": str(no_weights)})
        assert weights.json()["error_message"] == f"Cannot find any model weights with `{no_weights}`"
        config = client.post("/load_lora_adapter", json={"lora_name": "x", "lora_path": str(bad_config)})
        assert config.status_code == 400 and config.json()["error_message"] == "'r'"
        no_name = client.post("/load_lora_adapter", json={"lora_path": str(no_weights)})
        assert no_name.status_code == 400


def test_pinning_every_slot_is_refused(sim_factory, adapters):
    sim = sim_factory("--enable-lora", "--max-lora-rank", "16", "--lora-target-modules", "q_proj", "v_proj",
                      "--max-loras-per-batch", "2")
    with sim.client() as client:
        first = client.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": str(adapters["sql"]),
                                                        "pinned": True})
        assert first.status_code == 200
        second = client.post("/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters["poet"]),
                                                         "pinned": True})
        assert second.status_code == 400
        assert second.json()["error_message"].startswith("Failed to load LoRA adapter b as a pinned adapter.")


def test_lora_disabled(sim):
    with sim.client() as client:
        response = client.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"})
        assert response.status_code == 400
        assert response.json() == {"rid": None, "http_worker_ipc": None, "success": False, "loaded_adapters": None,
                                   "error_message": "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."}
        generate = client.post("/generate", json={"text": "hi", "lora_path": "a"})
    assert generate.status_code == 400
    assert generate.json()["error"]["message"].startswith(
        "LoRA adapter 'a' was requested, but LoRA is not enabled.")


def test_max_loras_per_batch_makes_other_adapters_wait(sim_factory, adapters):
    # one slot (an adapter, or the base model, per running batch): an "sql"
    # request waits while a "poet" one runs
    sim = sim_factory("--lora-paths", f"sql={adapters['sql']}", f"poet={adapters['poet']}",
                      "--max-loras-per-batch", "1", "--itl-ms", "50")
    results = {}

    def generate(name: str) -> None:
        with sim.client() as client:
            started = time.monotonic()
            client.post("/generate", json={"text": "x", "lora_path": name, "sampling_params": {"max_new_tokens": 10}})
            results[name] = time.monotonic() - started

    def load_wait(predicate) -> dict:
        deadline = time.monotonic() + 2
        with sim.client() as client:
            while True:
                load = client.get("/v1/loads").json()["loads"][0]
                if predicate(load) or time.monotonic() > deadline:
                    return load
                time.sleep(0.01)

    poet = threading.Thread(target=generate, args=("poet",))
    poet.start()
    running = load_wait(lambda load: load["num_running_reqs"] == 1)
    sql = threading.Thread(target=generate, args=("sql",))
    sql.start()
    queued = load_wait(lambda load: load["num_waiting_reqs"] == 1)
    poet.join()
    sql.join()
    assert running["num_running_reqs"] == 1
    assert queued["num_waiting_reqs"] == 1 and queued["num_running_reqs"] == 1
    assert results["sql"] > 0.45  # queued behind poet's 9 × 50 ms, then its own


def test_the_gpu_pool_holds_adapters_the_batch_needs_and_evicts_by_policy(sim_factory, adapters):
    """Two slots (the base model takes one when it runs). a, b, a, then c: LRU
    evicts b (a was used since), FIFO a (first in); then the base model
    evicts the next in the policy's order."""
    paths = [f"{name}={adapters[name]}" for name in ("sql", "poet", "legal")]
    expected = {"lru": (["legal", "sql"], [None, "legal"]), "fifo": (["legal", "poet"], [None, "legal"])}
    for policy, (after_legal, after_base) in expected.items():
        sim = sim_factory("--lora-paths", *paths, "--max-loras-per-batch", "2", "--lora-eviction-policy", policy)
        with sim.client() as client:
            def run(adapter):
                body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
                response = client.post("/generate", json=body | ({"lora_path": adapter} if adapter else {}))
                assert response.status_code == 200
                return client.get("/sim/stats").json()["lora"]

            for adapter in ("sql", "poet", "sql"):
                stats = run(adapter)
            assert stats["in_gpu"] == ["poet", "sql"] and stats["gpu_evictions_total"] == 0
            stats = run("legal")
            assert stats["in_gpu"] == after_legal, policy
            assert stats["gpu_loads_total"] == 3 and stats["gpu_evictions_total"] == 1
            stats = run(None)
            assert stats["in_gpu"] == after_base, policy
            assert stats["gpu_loads_total"] == 3 and stats["gpu_evictions_total"] == 2
            assert client.get("/server_info").json()["lora_eviction_policy"] == policy


def test_adapters_must_fit_the_pools_rank_and_modules(sim_factory, adapters, tmp_path):
    """The pool takes its shape from the adapters loaded at start (rank 16;
    q/k/v) unless the flags give it; a later adapter outside it is refused."""
    wide = adapter_dir_make(tmp_path, "wide", config={"r": 64, "lora_alpha": 16, "target_modules": ["q_proj"]})
    mlp = adapter_dir_make(tmp_path, "mlp", config={"r": 8, "lora_alpha": 16, "target_modules": ["gate_proj"]})
    every = adapter_dir_make(tmp_path, "every", config={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
    inferred = sim_factory("--lora-paths", f"sql={adapters['sql']}")
    with inferred.client() as client:
        for name, path, rank in (("wide", wide, 64), ("mlp", mlp, 8)):
            refused = client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            assert refused.status_code == 400 and refused.json()["error_message"] == (
                f"LoRA adapter {name} with rank {rank} is incompatible with the current LoRA memory pool "
                "configuration. Please ensure that the LoRA adapter's rank is within the configured "
                "`--max-lora-rank` and that the target modules are included in `--lora-target-modules`.")
        # k_proj is stored with q and v (qkv_proj), so an adapter on it fits
        k_only = adapter_dir_make(tmp_path, "k-only", config={"r": 4, "lora_alpha": 8, "target_modules": ["k_proj"]})
        assert client.post("/load_lora_adapter", json={"lora_name": "k", "lora_path": str(k_only)}).status_code == 200
        shape = client.get("/sim/stats").json()["lora"]
        assert shape["max_lora_rank"] == 16 and shape["target_modules"] == ["qkv_proj"]
    flagged = sim_factory("--enable-lora", "--max-lora-rank", "64", "--lora-target-modules", "all")
    with flagged.client() as client:
        for name, path in (("wide", wide), ("mlp", mlp), ("every", every)):
            loaded = client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            assert loaded.status_code == 200, loaded.json()
        info = client.get("/server_info").json()
        assert info["max_lora_rank"] == 64 and info["lora_target_modules"] == ["all"]


@pytest.mark.parametrize("flags, message", [
    (["--enable-lora"], "When no initial --lora-paths is provided, you need to specify both --max-lora-rank and "
                        "--lora-target-modules for LoRA initialization."),
    (["--enable-lora", "--max-lora-rank", "8"], "When no initial --lora-paths is provided"),
    (["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "all", "q_proj"],
     "If 'all' is specified in --lora-target-modules, it should be the only module specified."),
    (["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "all", "--max-loaded-loras", "4"],
     "max_loaded_loras should be greater than or equal to max_loras_per_batch. "
     "max_loaded_loras=4, max_loras_per_batch=8"),
    (["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "all", "--max-lora-chunk-size", "48"],
     "--max-lora-chunk-size must be a power of 2 between 16 and 128."),
])
def test_lora_flags_are_checked_at_start_as_sglang_checks_them(flags, message):
    with pytest.raises(SystemExit) as exited:
        configs_from_args(build_argument_parser().parse_args(flags))
    assert str(exited.value).startswith(message)


async def test_copying_an_adapter_into_the_gpu_pool_takes_its_bytes_over_the_host_link(tmp_path):
    """h100-8b: 50.4 GB/s. An adapter of 504 MB (a sparse file) adds 10 ms
    to the prefill step that first needs it, and nothing once it is there."""
    path = adapter_dir_make(tmp_path, "big")
    with open(path / "adapter_model.safetensors", "r+b") as weights:
        weights.truncate(504_000_000)
    config, settings = configs_from_args(build_argument_parser().parse_args(
        ["--preset", "h100-8b", "--lora-paths", f"big={path}"]))  # real time: a wall delay is a simulated one
    engine = SimEngine(config=config, settings=settings)
    ttfts = []
    for seed in (1, 2):
        running = engine.admit(GenerationRequest(rid=f"r{seed}", prompt_ids=[seed * 1000 + i for i in range(64)],
                                                 max_new_tokens=1, lora_path="big"))
        async with contextlib.aclosing(engine.run(running)) as steps:
            async for _ in steps:
                pass
        ttfts.append(running.first_token_at - running.admitted_at)
        engine.finalize(running)
    assert ttfts[0] - ttfts[1] == pytest.approx(504e6 / 50.4e9, abs=0.003)
    assert engine.lora.gpu_loads_total == 1


def test_a_start_adapter_outside_the_flags_modules_is_named(tmp_path):
    """An adapter of --lora-paths whose modules --lora-target-modules leaves
    out stops the start with LoRAManager's message, not the pool's."""
    wide = adapter_dir_make(tmp_path, "wide", config={"r": 8, "lora_alpha": 16,
                                                       "target_modules": ["q_proj", "down_proj"]})
    config, settings = configs_from_args(build_argument_parser().parse_args(
        ["--lora-paths", f"wide={wide}", "--lora-target-modules", "q_proj", "v_proj", "--max-lora-rank", "8"]))
    with pytest.raises(LoraError) as refused:
        SimEngine(config=config, settings=settings)
    assert refused.value.message == (
        "LoRA adapter 'wide' contains target modules ['down_proj'] that are not included in the specified "
        "--lora-target-modules ['qkv_proj']. Please update --lora-target-modules to include all required modules: "
        "['down_proj', 'qkv_proj'], or use 'all' to enable all supported modules.")
