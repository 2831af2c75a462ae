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
