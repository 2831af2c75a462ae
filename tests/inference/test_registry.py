"""The per-process registry: reloads keep backend state and the policies' rotation."""
from inference.registry import ModelRow, Prices, Registry
from inference.routing import RoundRobin

URLS = ("http://a", "http://b")


def rows(*names: str) -> list[ModelRow]:
    return [ModelRow(name, name, 4096, "platform", 0, Prices(), "round_robin",
                     tuple((url, "", "active") for url in URLS)) for name in names]


def test_a_request_that_waited_across_a_reload_picks_from_the_current_entry():
    registry = Registry()
    registry.replace(rows("m"))
    policy = RoundRobin()
    assert policy.pick(registry.resolve("m").model).url == "http://a"
    # A request resolved its model, then waited (admission) while the registry reloaded.
    waited = registry.resolve("m").model
    registry.replace(rows("m"))
    fresh = registry.current(waited)
    assert fresh is not waited and fresh is registry.resolve("m").model
    assert fresh.backends[0] is waited.backends[0]  # backend state survives the reload
    # Picking from the current entry advances the rotation the next request sees.
    assert policy.pick(fresh).url == "http://b"
    assert policy.pick(registry.resolve("m").model).url == "http://a"
    # Picking from the replaced entry would not have: the next pick repeats it.
    stale = registry.resolve("m").model
    registry.replace(rows("m"))
    assert policy.pick(stale).url == "http://b"
    assert policy.pick(registry.resolve("m").model).url == "http://b"


def test_current_of_a_removed_model_is_the_entry_itself():
    registry = Registry()
    registry.replace(rows("m", "n"))
    entry = registry.resolve("n").model
    registry.replace(rows("m"))
    assert registry.current(entry) is entry


def test_a_data_parallel_server_becomes_one_backend_per_rank_and_back():
    """A server whose /server_info says `dp_size` 2 is routed to as two
    backends, "<url>@0" and "<url>@1", that name their rank; the pools of
    every model it serves change, the other servers' states survive, and so
    do the rank states across reloads."""
    registry = Registry()
    registry.replace(rows("m", "n"))
    other = registry.resolve("m").model.backends[1]
    assert registry.dp_size_set("http://a", 2) is True
    assert registry.dp_size_set("http://a", 2) is False  # nothing new
    for name in ("m", "n"):
        backends = registry.resolve(name).model.backends
        assert [(b.url, b.base_url, b.dp_rank) for b in backends] == [
            ("http://a@0", "http://a", 0), ("http://a@1", "http://a", 1), ("http://b", "http://b", None)]
    assert registry.resolve("m").model.backends[2] is other
    rank = registry.resolve("m").model.backends[1]
    rank.enter(10)
    registry.replace(rows("m", "n"))
    assert registry.resolve("n").model.backends[1] is rank and rank.outstanding == 1
    assert len(registry.backends()) == 3
    # the server restarted without data parallelism
    assert registry.dp_size_set("http://a", 1) is True
    assert [b.url for b in registry.resolve("m").model.backends] == ["http://a", "http://b"]
    assert registry.resolve("m").model.backends[0].dp_rank is None


def test_a_ranks_requests_name_their_rank():
    from inference.sglang import _with_dp_rank
    assert _with_dp_rank(b'{"model":"m","stream":true}', 1) == b'{"model":"m","stream":true,"data_parallel_rank":1}'
    assert _with_dp_rank(b'{}', 0) == b'{"data_parallel_rank":0}'
    assert _with_dp_rank(b'{"a": {"b": 1}}\n', 3) == b'{"a": {"b": 1},"data_parallel_rank":3}\n'


def test_a_ranks_server_backends_are_its_siblings():
    registry = Registry()
    registry.replace(rows("m"))
    registry.dp_size_set("http://a", 3)
    rank = registry.resolve("m").model.backends[1]
    assert [b.url for b in registry.server_backends(rank)] == ["http://a@0", "http://a@1", "http://a@2"]
    plain = registry.resolve("m").model.backends[3]
    assert registry.server_backends(plain) == [plain]
