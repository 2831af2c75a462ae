"""The routing policies' choices."""
import time

import pytest

from inference.registry import BackendState, ModelEntry
from inference.routing import (
    POLICY_NAMES, CacheAware, LeastOutstanding, RoundRobin, policy_for, routing_key_build,
)

from .conftest import by_url, model_build

SYSTEM = "You are the support assistant of ACME. Follow the policy below.\n" + "Policy line. " * 200


def chat_key(*messages: str, system: str = SYSTEM, namespace: str = "") -> str:
    """A conversation: system prompt, then alternating user / assistant turns."""
    rendered = [{"role": "system", "content": system}]
    for index, content in enumerate(messages):
        rendered.append({"role": "user" if index % 2 == 0 else "assistant", "content": content})
    return routing_key_build(endpoint="chat.completions", body={"model": "m", "messages": rendered}, namespace=namespace)


def send(policy, model: ModelEntry, key: str, **kwargs) -> BackendState:
    """What the streaming service does: pick, observe, count the request in flight."""
    backend = policy.pick(model, key, **kwargs)
    assert backend is not None
    policy.observe(model, backend, key)
    backend.outstanding += 1
    return backend


def finish(backend: BackendState) -> None:
    backend.outstanding -= 1


# ---------------------------------------------------------------- round robin

def test_round_robin_cycles(pool):
    policy = RoundRobin()
    picked = [policy.pick(pool, "").url for _ in range(6)]
    assert picked == ["http://a", "http://b", "http://c", "http://d", "http://a", "http://b"]


def test_round_robin_skips_unavailable_and_excluded(pool):
    backends = by_url(pool)
    backends["http://b"].status = "draining"
    backends["http://c"].cooldown_until = time.monotonic() + 60
    policy = RoundRobin()
    picked = [policy.pick(pool, "", exclude={"http://d"}).url for _ in range(3)]
    assert picked == ["http://a", "http://a", "http://a"]
    assert policy.pick(pool, "", exclude={"http://a", "http://d"}) is None
    assert RoundRobin().pick(model_build(), "") is None


def test_round_robin_ignores_load(pool):
    by_url(pool)["http://a"].outstanding = 50
    assert RoundRobin().pick(pool, "").url == "http://a"


# ---------------------------------------------------------- least outstanding

def test_least_outstanding_picks_the_least_loaded(pool):
    loads = {"http://a": 3, "http://b": 1, "http://c": 2, "http://d": 1}
    for url, load in loads.items():
        by_url(pool)[url].outstanding = load
    policy = LeastOutstanding()
    assert policy.pick(pool, "").url == "http://b"
    # ties rotate: each pick starts the scan one backend further
    assert [policy.pick(pool, "").url for _ in range(3)] == ["http://b", "http://d", "http://d"]
    assert policy.pick(pool, "", exclude={"http://b", "http://d"}).url == "http://c"
    by_url(pool)["http://b"].cooldown_until = time.monotonic() + 60
    assert policy.pick(pool, "", exclude={"http://d"}).url == "http://c"


def test_a_request_with_n_choices_counts_as_n_sequences_in_flight(pool):
    """A backend runs each of a request's n choices as a sequence of its own:
    load-aware policies see n, and the backend is idle again once it ends."""
    backends = by_url(pool)
    backends["http://a"].enter(100, 4)
    for url in ("http://b", "http://c", "http://d"):
        backends[url].enter(100)
        backends[url].enter(100)
    policy = LeastOutstanding()
    assert {policy.pick(pool, "").url for _ in range(4)} == {"http://b", "http://c", "http://d"}
    backends["http://a"].leave(100, 4)
    assert (backends["http://a"].outstanding, backends["http://a"].outstanding_chars) == (0, 0)
    assert policy.pick(pool, "").url == "http://a"


# ---------------------------------------------------------------- cache aware

@pytest.mark.parametrize("affinity", [False, True])
def test_cache_aware_sticks_a_conversation_to_its_backend(pool, affinity):
    # given a policy that has routed many conversations sharing one system prompt
    policy = CacheAware(conversation_affinity=affinity)
    turns = {index: [f"Question {index}: " + "details " * 30] for index in range(8)}
    home: dict[int, str] = {}
    for index, messages in turns.items():
        backend = send(policy, pool, chat_key(*messages))
        home[index] = backend.url
        finish(backend)

    # when each conversation continues for three more turns, interleaved
    for turn in range(3):
        for index, messages in turns.items():
            messages += [f"Answer {turn} " + "words " * 40, f"Follow-up {turn} " + "more " * 20]
            backend = send(policy, pool, chat_key(*messages))
            # then every turn goes where the conversation's earlier turns went
            assert backend.url == home[index]
            finish(backend)


def test_cache_aware_spreads_distinct_prefixes(pool):
    policy = CacheAware(conversation_affinity=False)
    picked = set()
    for index in range(4):
        backend = send(policy, pool, chat_key("hello", system=f"System prompt {index}. " + "x" * 2000))
        picked.add(backend.url)
        finish(backend)
    # distinct prefixes on an idle pool: each goes to the backend with the most free cache
    assert picked == {"http://a", "http://b", "http://c", "http://d"}


def test_cache_aware_affinity_spreads_conversations_without_a_shared_prefix(pool):
    policy = CacheAware(conversation_affinity=True)
    counts: dict[str, int] = {}
    for index in range(200):
        backend = send(policy, pool, chat_key("q " * 200, system=f"System prompt of app {index}. " + "x" * 600))
        counts[backend.url] = counts.get(backend.url, 0) + 1
        finish(backend)
    assert set(counts) == {"http://a", "http://b", "http://c", "http://d"}
    assert max(counts.values()) < 200 * 0.4


def test_cache_aware_new_conversations_join_their_system_prompt_while_load_allows(pool):
    # given a policy that has seen the system prompt on one backend
    policy = CacheAware(conversation_affinity=True, bounded_load_epsilon=0.5, bounded_load_slack=2)
    holder = send(policy, pool, chat_key("an earlier conversation " + "q " * 40))
    finish(holder)
    # when new conversations sharing it arrive on an idle pool and finish one by one
    for index in range(20):
        backend = send(policy, pool, chat_key(f"conversation {index} " + "q " * 40))
        # then they all go where the system prompt is cached
        assert backend is holder
        finish(backend)
    # when they pile up instead (none finishes)
    placed = [send(policy, pool, chat_key(f"busy conversation {index} " + "q " * 40)) for index in range(40)]
    # then holders take them only while within 1 + max(slack, ε × mean) of the least
    # loaded backend (mean 10: 6), the least loaded holder first: no backend idles
    # while another queues
    loads = sorted(backend.outstanding for backend in pool.backends)
    assert loads[0] >= 5 and loads[-1] - loads[0] <= 6
    assert placed[:3] == [holder] * 3
    # and once a conversation spilled to another backend, that one holds the
    # system prompt too and takes new conversations in turn (least loaded first)
    assert sum(1 for backend in pool.backends if policy.tree(pool.name).match(chat_key())[1].get(backend.url)) == 4


def test_cache_aware_new_conversation_takes_the_least_loaded_holder_within_the_bound(pool):
    policy = CacheAware(conversation_affinity=True, bounded_load_epsilon=0.5, bounded_load_slack=2)
    backends = by_url(pool)
    # given the system prompt held by a and b (and not by c or d)
    for url in ("http://a", "http://b"):
        policy.observe(pool, backends[url], chat_key(f"earlier on {url} " + "q " * 30))
    # when a is busier than b: the new conversation joins b, within the new-placement
    # bound (mean 3.5: min(1.5 × 3.5 + 2, 2 + 1 + max(2, 0.5 × 3.5)) = 5)
    for url, load in (("http://a", 5), ("http://b", 4), ("http://c", 2), ("http://d", 2)):
        backends[url].outstanding = load
    assert policy.pick(pool, chat_key("new " + "q " * 30)) is backends["http://b"]
    # both at 5 are past it (mean 3.75: 5), holders as much as the others: c or d
    # copies the prompt rather than a holder running ahead of the rest
    backends["http://b"].outstanding = 5
    assert policy.pick(pool, chat_key("new " + "q " * 30)) in (backends["http://c"], backends["http://d"])


def test_backend_load_counts_other_processes_as_last_reported():
    backend = BackendState("http://a")
    backend.outstanding = 3
    assert backend.load == 3  # no report yet: this process's own
    backend.load_report(waiting=2, kv_usage=0.5, running=10)  # 12 in all, 3 of them ours
    assert backend.load == 12
    backend.outstanding = 5  # this process sent 2 more since
    assert backend.load == 14
    backend.outstanding = 0  # ours ended, and the others' count is not known to have changed
    assert backend.load == 9
    backend.load_report(waiting=0, kv_usage=0.1, running=0)
    backend.outstanding = 4  # never less than what this process has there
    assert backend.load == 4
    backend.load_report(waiting=-1, kv_usage=-1.0, running=-1)  # the backend could not say
    assert backend.load == 4


def test_cache_aware_sees_the_load_other_processes_put_on_a_holder(pool):
    """Another gateway process's requests count: a holder that this process
    leaves idle but the backend reports busy is past a holder's bound."""
    policy = CacheAware(conversation_affinity=True, bounded_load_epsilon=0.5, bounded_load_slack=2)
    backends = by_url(pool)
    policy.observe(pool, backends["http://a"], chat_key("earlier " + "q " * 30))
    for backend in pool.backends:
        backend.load_report(waiting=0, kv_usage=0.2, running=4)
    assert policy.pick(pool, chat_key("new " + "q " * 30)) is backends["http://a"]
    backends["http://a"].load_report(waiting=6, kv_usage=0.6, running=20)
    assert policy.pick(pool, chat_key("new " + "q " * 30)) is not backends["http://a"]


def test_cache_aware_a_conversation_stays_beyond_the_new_placement_bound(pool):
    policy = CacheAware(conversation_affinity=True, bounded_load_epsilon=0.5, bounded_load_slack=2)
    history = ["Question: " + "details " * 30]
    home = send(policy, pool, chat_key(*history))
    finish(home)
    history += ["Answer " + "words " * 40, "Follow-up " + "more " * 20]
    # given its backend busier than a new conversation may find it: 14 against 6 elsewhere
    # (mean 8.25: the new-placement bound min(1.5 × 8.25 + 2, 6 + 1 + 4.125) = 11.125; a conversation's own
    # 2 × 8.25 + 2 = 18.5)
    for backend in pool.backends:
        backend.outstanding = 6
    home.outstanding = 14
    # then a new conversation avoids it, but the conversation's next turn stays
    assert policy.pick(pool, chat_key("a new conversation " + "q " * 30)) is not home
    assert policy.pick(pool, chat_key(*history)) is home
    # until its backend is past the conversation's own bound (mean 12.25: 26.5)
    home.outstanding = 30
    assert policy.pick(pool, chat_key(*history)) is not home


def test_cache_aware_home_lookup_and_placement_report(pool):
    policy = CacheAware(conversation_affinity=True)
    first_turn = chat_key("Where is my parcel? " + "q " * 30)
    second_turn = chat_key("Where is my parcel? " + "q " * 30, "It left the depot.", "When does it arrive?")
    conversation = CacheAware.conversation_id(first_turn)
    assert CacheAware.conversation_id(second_turn) == conversation
    # a first turn needs no lookup: nobody can have placed it
    assert policy.home_lookup(pool, first_turn) is None
    # a later turn this process never routed does
    assert policy.home_lookup(pool, second_turn) == conversation
    # and a home given for it wins over the policy's own choice
    home = by_url(pool)["http://c"]
    assert policy.pick(pool, second_turn, home="http://c") is home
    # placing a conversation reports its id, once: following it again does not
    backend = policy.pick(pool, first_turn)
    assert policy.observe(pool, backend, first_turn) == conversation
    assert policy.pick(pool, second_turn) is backend
    assert policy.home_lookup(pool, second_turn) is None
    assert policy.observe(pool, backend, second_turn) is None
    # moving it (its backend gone) reports it again
    moved = policy.pick(pool, second_turn, exclude={backend.url})
    assert policy.observe(pool, moved, second_turn) == conversation
    # the other policies neither ask nor tell
    for other in (RoundRobin(), LeastOutstanding()):
        assert other.home_lookup(pool, second_turn) is None
        assert other.observe(pool, other.pick(pool, second_turn), second_turn) is None


def test_cache_aware_tree_is_sized_by_the_backends_kv_capacity(pool):
    policy = CacheAware(max_tree_chars=1_000_000, conversation_affinity=False)
    backend = by_url(pool)["http://a"]
    # unknown capacity: max_tree_chars
    assert policy.tree_chars_limit(pool.name, backend) == 1_000_000
    # a reported capacity, at 4 characters per token until usage says otherwise
    backend.kv_tokens = 5_000
    assert policy.tree_chars_limit(pool.name, backend) == 20_000
    policy.usage_observe(pool.name, key_chars=6_000, prompt_tokens=1_000)
    assert policy.tree_chars_limit(pool.name, backend) == 30_000
    policy.usage_observe(pool.name, key_chars=40, prompt_tokens=10)  # too short to count
    assert policy.tree_chars_limit(pool.name, backend) == 30_000
    # a hierarchical cache's host tier widens the picture, not the KV the in-flight requests fill
    backend.cache_tokens = 15_000
    assert policy.tree_chars_limit(pool.name, backend) == 90_000
    assert policy.kv_chars_limit(pool.name, backend) == 30_000
    backend.cache_tokens = 0
    # and the tree evicts down to it
    for index in range(30):
        key = chat_key(f"conversation {index} " + "words " * 300)
        policy.pick(pool, key)
        policy.observe(pool, backend, key)
    assert 20_000 < policy.tree(pool.name).chars(backend.url) <= 30_000


def test_cache_aware_affinity_agrees_across_processes(pool):
    # given two gateway processes that share nothing
    process_1, process_2 = CacheAware(conversation_affinity=True), CacheAware(conversation_affinity=True)
    pool_2 = model_build(*(backend.url for backend in pool.backends))
    warm = send(process_2, pool_2, chat_key("an unrelated conversation"))  # process 2 knows the system prompt
    finish(warm)
    for index in range(20):
        # when turn 1 goes through process 1 and turn 2 through process 2
        first = send(process_1, pool, chat_key(f"user {index} asks " + "a " * 40))
        second = send(process_2, pool_2, chat_key(f"user {index} asks " + "a " * 40, "reply " * 30, "and then?"))
        # then both turns reach the same backend
        assert first.url == second.url
        finish(first)
        finish(second)


@pytest.mark.parametrize("affinity", [False, True])
def test_cache_aware_bounded_load_spills_a_hot_prefix(pool, affinity):
    # given a hot prefix whose requests never finish during the burst
    policy = CacheAware(bounded_load_epsilon=0.5, bounded_load_slack=2, conversation_affinity=affinity)
    hot = "Hot shared prompt. " * 300
    for index in range(40):
        send(policy, pool, routing_key_build(endpoint="completions",
                                             body={"model": "m", "prompt": hot + f" q{index}"}, namespace=""))
        loads = [backend.outstanding for backend in pool.backends]
        # then no backend exceeds (1 + ε) × mean + slack (+1 for the request just placed)
        assert max(loads) <= 1.5 * sum(loads) / 4 + 3
    # and the hot prefix spilled onto further backends instead of queueing on one
    assert sum(1 for backend in pool.backends if backend.outstanding >= 5) >= 3


def test_cache_aware_imbalance_guard_without_bounded_load(pool):
    # given only sgl-router's guard: imbalanced if max - min > 4 and max > 1.5 × min
    policy = CacheAware(bounded_load_epsilon=None, balance_abs_threshold=4, balance_rel_threshold=1.5,
                        conversation_affinity=False)
    hot = "Hot shared prompt. " * 300
    for index in range(40):
        send(policy, pool, routing_key_build(endpoint="completions",
                                             body={"model": "m", "prompt": hot + f" q{index}"}, namespace=""))
        loads = [backend.outstanding for backend in pool.backends]
        assert max(loads) - min(loads) <= 5
    # without any guard the hot prefix would stay on one backend
    unguarded = CacheAware(bounded_load_epsilon=None, balance_abs_threshold=10**9, conversation_affinity=False)
    other = model_build("http://a", "http://b")
    for index in range(20):
        send(unguarded, other, routing_key_build(endpoint="completions",
                                                 body={"model": "m", "prompt": hot + f" q{index}"}, namespace=""))
    assert sorted(backend.outstanding for backend in other.backends) == [0, 20]


@pytest.mark.parametrize("affinity", [False, True])
@pytest.mark.parametrize("how", ["excluded", "cooldown", "draining"])
def test_cache_aware_falls_back_when_the_best_backend_cannot_take_it(pool, affinity, how):
    # given a conversation on one backend and its system prompt on another
    policy = CacheAware(conversation_affinity=affinity)
    conversation = ["Question: " + "details " * 30]
    home = send(policy, pool, chat_key(*conversation))
    finish(home)
    conversation += ["Answer " + "words " * 40, "Follow-up " + "more " * 20]
    others = [backend for backend in pool.backends if backend is not home]
    second = others[0]
    policy.observe(pool, second, chat_key())  # only the system prompt

    # when the conversation's backend is unavailable
    exclude: set[str] = set()
    if how == "excluded":
        exclude = {home.url}
    elif how == "cooldown":
        home.cooldown_until = time.monotonic() + 30
    else:
        home.status = "draining"
    backend = policy.pick(pool, chat_key(*conversation), exclude=exclude)

    # then another backend takes it; without affinity, the one with the longest prefix
    assert backend is not None and backend is not home
    if not affinity:
        assert backend is second
    # and with every backend out, there is none
    assert policy.pick(pool, chat_key(*conversation), exclude={b.url for b in pool.backends}) is None


def test_cache_aware_follows_a_match_only_above_the_threshold(pool):
    policy = CacheAware(cache_threshold=0.5, conversation_affinity=False)
    short_system = "Short shared prompt. " * 10
    holder = send(policy, pool, chat_key("x", system=short_system))
    finish(holder)
    # a request sharing less than half its key with the holder goes to the smallest tree instead
    long_question = "A long question " * 100
    assert policy.pick(pool, chat_key(long_question, system=short_system)) is not holder
    # sharing most of it follows the cache
    assert policy.pick(pool, chat_key("x", "y", system=short_system)) is holder


def test_cache_aware_namespaces_do_not_share(pool):
    policy = CacheAware(conversation_affinity=False)
    first = send(policy, pool, chat_key("hello", namespace="tenant-1"))
    finish(first)
    # the same conversation of another isolated tenant is new: it goes to another (emptier) backend
    assert policy.pick(pool, chat_key("hello", namespace="tenant-2")) is not first
    assert policy.pick(pool, chat_key("hello", namespace="tenant-1")) is first


def test_cache_aware_survives_registry_reload_and_forgets_removed_backends(pool):
    policy = CacheAware(conversation_affinity=False)
    key = chat_key("hello")
    home = send(policy, pool, key)
    finish(home)
    # a reload builds new ModelEntry objects with the same name and BackendStates
    reloaded = ModelEntry(pool.name, pool.name, 8192, "tests", 0, backends=list(pool.backends))
    assert policy.pick(reloaded, key) is home
    # once the backend is forgotten (left the pool, restarted), nothing sticks to it
    policy.forget_backend(home.url)
    assert policy.tree(pool.name).chars(home.url) == 0
    home.outstanding = 1  # so the least-loaded fallback avoids it deterministically
    assert policy.pick(reloaded, key) is not home


def test_cache_aware_tree_is_bounded_per_backend(pool):
    policy = CacheAware(max_tree_chars=10_000, conversation_affinity=False)
    for index in range(50):
        finish(send(policy, pool, chat_key(f"conversation {index} " + "words " * 300)))
    tree = policy.tree(pool.name)
    assert all(tree.chars(backend.url) <= 10_000 for backend in pool.backends)


def test_cache_aware_with_empty_key_or_single_backend():
    policy = CacheAware()
    model = model_build("http://a", "http://b")
    by_url(model)["http://a"].outstanding = 2
    assert policy.pick(model, "").url == "http://b"
    single = model_build("http://only")
    assert policy.pick(single, chat_key("x")).url == "http://only"
    assert policy.pick(model_build(), chat_key("x")) is None


# -------------------------------------------------------------------- factory

def test_policy_for_names():
    assert [policy_for(name).name for name in POLICY_NAMES] == list(POLICY_NAMES)
    assert isinstance(policy_for("cache_aware", cache_threshold=0.5), CacheAware)
    assert policy_for("cache_aware", cache_threshold=0.5).cache_threshold == 0.5
    with pytest.raises(ValueError):
        policy_for("random")
    with pytest.raises(TypeError):
        policy_for("round_robin", cache_threshold=0.5)


# ---------------------------------------------------------------- KV room

def test_key_footprint_leaves_out_the_shared_first_message():
    from inference.routing import key_footprint
    from inference.routing.policies import conversation_head

    key = chat_key("a question " * 20)
    # the system prompt is held once for every conversation of the tenant: not counted
    assert key_footprint(key) == len(key) - len(conversation_head(key)) > 0
    assert key_footprint(key) < len(key) - len(SYSTEM)
    # a key of one message (or a completion prompt) is all its own
    prompt = routing_key_build(endpoint="completions", body={"model": "m", "prompt": "once upon a time " * 30})
    assert key_footprint(prompt) == len(prompt)


def _capacity(pool: ModelEntry, tokens: int) -> None:
    for backend in pool.backends:
        backend.kv_tokens = tokens


def test_cache_aware_new_conversation_skips_a_holder_without_kv_room(pool):
    from inference.routing import key_footprint

    policy = CacheAware(conversation_affinity=True, bounded_load_epsilon=0.5, bounded_load_slack=2)
    backends = by_url(pool)
    # given the system prompt held by a, every backend with 1,000 tokens of KV
    # (4,000 characters at the default 4 characters per token)
    policy.observe(pool, backends["http://a"], chat_key("earlier " + "q " * 30))
    _capacity(pool, 1_000)
    new = chat_key("new " + "q " * 30)
    room = policy.kv_chars_limit(pool.name, backends["http://a"]) - key_footprint(new)
    # when a's requests in flight leave just enough room: the new conversation joins a
    backends["http://a"].outstanding_chars = room
    assert policy.pick(pool, new) is backends["http://a"]
    # when they leave one character too few: it goes to a backend with room
    backends["http://a"].outstanding_chars = room + 1
    assert policy.pick(pool, new) in (backends["http://b"], backends["http://c"], backends["http://d"])
    # when no backend has room, the holder takes it again (counts alone decide)
    for backend in pool.backends:
        backend.outstanding_chars = room + 1
    assert policy.pick(pool, new) is backends["http://a"]


def test_cache_aware_kv_room_is_ignored_when_unknown_or_disabled(pool):
    backends = by_url(pool)
    new = chat_key("new " + "q " * 30)
    for policy in (CacheAware(), CacheAware(kv_fill=None, kv_balance_epsilon=None)):
        policy.observe(pool, backends["http://a"], chat_key("earlier " + "q " * 30))
        backends["http://a"].outstanding_chars = 10**9
        # capacities unknown (no /server_info yet): the holder
        _capacity(pool, 0)
        assert policy.pick(pool, new) is backends["http://a"]
        # known, and the check disabled: the holder
        _capacity(pool, 1_000)
        if policy.kv_fill is None:
            assert policy.pick(pool, new) is backends["http://a"]
        else:
            assert policy.pick(pool, new) is not backends["http://a"]


def test_cache_aware_kv_room_does_not_move_a_conversation_from_its_home(pool):
    policy = CacheAware(conversation_affinity=True, bounded_load_epsilon=0.5, bounded_load_slack=2)
    _capacity(pool, 1_000)
    first = chat_key("my question " + "q " * 30)
    home = send(policy, pool, first)
    finish(home)
    # its home is full of other requests' footprints; its next turn still goes
    # there: elsewhere its whole history would be prefilled again
    home.outstanding_chars = 10**9
    later = chat_key("my question " + "q " * 30, "an answer", "a follow-up")
    assert policy.pick(pool, later) is home


def test_cache_aware_a_conversation_leaves_a_saturated_home_for_a_backend_with_room(pool):
    """A home that reports a queue with its KV full of running requests loses
    its queued turns' histories anyway: a later turn goes elsewhere, if some
    backend reports room, and is homed there from then on."""
    policy = CacheAware(conversation_affinity=True, bounded_load_epsilon=0.5, bounded_load_slack=2)
    first = chat_key("my question " + "q " * 30)
    home = send(policy, pool, first)
    finish(home)
    later = chat_key("my question " + "q " * 30, "an answer", "a follow-up")
    for backend in pool.backends:
        backend.load_report(waiting=0, kv_usage=0.5, running=3)
    home.load_report(waiting=1, kv_usage=0.95, running=3)  # a short queue: stays
    assert policy.pick(pool, later) is home
    home.load_report(waiting=2, kv_usage=0.8, running=3)  # KV not full: stays
    assert policy.pick(pool, later) is home
    home.load_report(waiting=2, kv_usage=0.9, running=3)
    moved = send(policy, pool, later)
    assert moved is not home
    finish(moved)
    # the conversation now lives where it went, even once the old home recovers
    home.load_report(waiting=0, kv_usage=0.2, running=0)
    assert policy.pick(pool, chat_key("my question " + "q " * 30, "an answer", "a follow-up", "x", "more")) is moved


def test_cache_aware_a_saturated_home_is_kept_when_no_backend_has_room_or_when_disabled(pool):
    later = chat_key("my question " + "q " * 30, "an answer", "a follow-up")
    for saturated_waiting, others in ((2, (3, 0.5)), (2, (0, 0.75)), (None, (0, 0.1))):
        policy = CacheAware(conversation_affinity=True, bounded_load_epsilon=0.5, bounded_load_slack=2,
                            saturated_waiting=saturated_waiting)
        home = send(policy, pool, chat_key("my question " + "q " * 30))
        finish(home)
        for backend in pool.backends:
            backend.load_report(waiting=others[0], kv_usage=others[1], running=3)
        home.load_report(waiting=4, kv_usage=0.97, running=3)
        assert policy.pick(pool, later) is home, (saturated_waiting, others)


def test_cache_aware_a_saturated_home_with_a_host_tier_keeps_its_conversations(pool):
    """A home with a hierarchical cache (HiCache) keeps the histories its KV
    pool evicts in host memory and loads them back: its later turns stay,
    however full its KV, while it is within the load bound."""
    policy = CacheAware(conversation_affinity=True, bounded_load_epsilon=0.5, bounded_load_slack=2)
    home = send(policy, pool, chat_key("my question " + "q " * 30))
    finish(home)
    later = chat_key("my question " + "q " * 30, "an answer", "a follow-up")
    for backend in pool.backends:
        backend.kv_tokens = backend.cache_tokens = 64_000
        backend.load_report(waiting=0, kv_usage=0.5, running=3)
    home.load_report(waiting=4, kv_usage=0.97, running=3)
    assert policy.pick(pool, later) is not home  # device pool only: it leaves
    home.cache_tokens = 96_000
    assert policy.pick(pool, later) is home
    # a backend that came back healthy is read again: until then it has no host tier
    home.capacity_forget()
    assert not home.host_tier and (home.kv_tokens, home.cache_tokens) == (0, 0)


def test_backend_state_counts_requests_and_footprints_together():
    backend = BackendState("http://a")
    backend.enter(120)
    backend.enter(30)
    backend.leave(120)
    assert (backend.outstanding, backend.outstanding_chars) == (1, 30)
    backend.leave(30)
    assert (backend.outstanding, backend.outstanding_chars) == (0, 0)


def test_cache_aware_new_conversation_avoids_a_backend_whose_footprints_outgrow_the_others(pool):
    from inference.routing import key_footprint

    policy = CacheAware(conversation_affinity=True, bounded_load_epsilon=0.5, bounded_load_slack=2,
                        kv_balance_epsilon=0.25, kv_balance_floor=0.6, kv_balance_reported_floor=0.7)
    _capacity(pool, 1_000)  # 4,000 characters each at 4 characters per token
    # given a conversation in flight on its home, which now holds the system prompt
    mine = chat_key("my question " + "q " * 30)
    home = send(policy, pool, mine)
    new = chat_key("new " + "q " * 30)
    footprint = key_footprint(new)
    # every backend with 2 requests in flight, the home's the long conversations:
    # 2,800 characters of footprints (0.7 of its capacity) against 200
    for backend in pool.backends:
        backend.outstanding, backend.outstanding_chars = 2, 200
    home.outstanding_chars = 2_800
    total = 2_800 + 3 * 200 + footprint
    holder_bound = 1.5 * total / 4 + 2 * total / 9  # (1 + 2 × 0.25) × mean + slack × per request
    assert 2_800 + footprint > max(holder_bound, 0.6 * 4_000)
    # then a new conversation goes to another backend, though the home holds its system prompt
    assert policy.pick(pool, new) is not home
    # and the conversation stays home: elsewhere its history would be prefilled again
    assert policy.pick(pool, chat_key("my question " + "q " * 30, "an answer", "a follow-up")) is home
    # below the floor (0.6 of the capacity) counts alone decide: the holder takes it
    home.outstanding_chars = 2_000
    assert 2_000 + footprint <= 0.6 * 4_000
    assert policy.pick(pool, new) is home
    # unless the backend itself reports its KV fuller than 0.7 (other gateway
    # processes' requests, system prompts and replies count there too)
    home.kv_usage = 0.8
    assert policy.pick(pool, new) is not home
    home.kv_usage = 0.7
    assert policy.pick(pool, new) is not home
    home.kv_usage = 0.69
    assert policy.pick(pool, new) is home
    # a full backend whose footprints are no more than the others' still takes it
    home.kv_usage = 0.95
    home.outstanding_chars = 200
    assert policy.pick(pool, new) is home
    # backends with a hierarchical cache keep their conversations' histories in
    # host memory whatever their KV holds: the holder takes it, within the load bound
    home.kv_usage, home.outstanding_chars = 0.8, 2_800
    assert policy.pick(pool, new) is not home
    for backend in pool.backends:
        backend.cache_tokens = 2 * backend.kv_tokens
    assert policy.pick(pool, new) is home


def test_cache_aware_kv_balance_gives_way_when_no_backend_is_within_it_or_when_disabled(pool):
    backends = by_url(pool)
    _capacity(pool, 1_000)
    new = chat_key("new " + "q " * 30)
    for policy in (CacheAware(kv_balance_epsilon=0.25), CacheAware(kv_balance_epsilon=0.25, kv_fill=None),
                   CacheAware(kv_balance_epsilon=None)):
        policy.observe(pool, backends["http://a"], chat_key("earlier " + "q " * 30))
        for backend in pool.backends:
            backend.outstanding, backend.outstanding_chars = 2, 200
        backends["http://a"].outstanding_chars = 2_800
        if policy.kv_balance_epsilon is None:
            # disabled: the holder, which still has room in its KV
            assert policy.pick(pool, new) is backends["http://a"]
        else:
            assert policy.pick(pool, new) is not backends["http://a"]
        # the others unavailable: a, the only candidate, whatever its footprints
        for url in ("http://b", "http://c", "http://d"):
            backends[url].status = "draining"
        assert policy.pick(pool, new) is backends["http://a"]
        for url in ("http://b", "http://c", "http://d"):
            backends[url].status = "active"


def test_cache_aware_kv_balance_gives_a_holder_twice_the_room(pool):
    """Sending a conversation away from the backends holding its system prompt
    copies the prompt; sending it to another non-holder costs nothing."""
    from inference.routing import key_footprint
    from inference.routing.policies import _rendezvous_order, conversation_head

    policy = CacheAware(kv_balance_epsilon=0.25, kv_balance_floor=0.6)
    _capacity(pool, 1_000)  # 4,000 characters
    new = chat_key("new " + "q " * 30)
    footprint = key_footprint(new)
    for backend in pool.backends:
        backend.outstanding, backend.outstanding_chars = 2, 800
    # one backend with footprints between the two bounds, past the floor
    first = _rendezvous_order(conversation_head(new), pool.backends)[0]
    chars = 3_000
    first.outstanding_chars = chars
    total = chars + 3 * 800 + footprint
    new_bound = 1.25 * total / 4 + 2 * total / 9
    holder_bound = 1.5 * total / 4 + 2 * total / 9
    assert new_bound < chars + footprint <= holder_bound and chars + footprint > 0.6 * 4_000
    # holding nothing of the prompt, it is passed over for the next in rendezvous order
    assert policy.pick(pool, new) is not first
    # holding the system prompt, it takes the conversation
    policy.observe(pool, first, chat_key("earlier " + "q " * 30))
    assert policy.pick(pool, new) is first


def test_cache_aware_balances_backends_that_cache_no_prefix(pool):
    """Backends launched with --disable-radix-cache reuse nothing: a
    conversation's turns go to the least loaded backend, not back to its home."""
    policy = CacheAware()
    for backend in pool.backends:
        backend.prefix_cache = False
    key = routing_key_build(endpoint="chat", body={"messages": [
        {"role": "system", "content": "A long system prompt. " * 40}, {"role": "user", "content": "hi"}]})
    first = policy.pick(pool, key)
    policy.observe(pool, first, key)
    first.enter(10)
    again = policy.pick(pool, key)
    assert again is not first and again.load == 0
    # backends with a prefix cache: the conversation goes home again
    first.leave(10)
    for backend in pool.backends:
        backend.prefix_cache = True
    assert policy.pick(pool, key) is first
