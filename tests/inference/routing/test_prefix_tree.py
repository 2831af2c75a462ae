"""PrefixTree: match, insert, LRU eviction, backend removal."""
import random

import pytest

from inference.routing import PrefixTree

B = 8  # block size used by these tests


def text(seed: int, chars: int) -> str:
    return random.Random(seed).randbytes(chars).hex()[:chars]


def assert_invariants(tree: PrefixTree) -> None:
    """Recount from the tree: every node held by someone, holders of a node hold
    its parent, per-backend char counts, LRU lists exactly the held nodes with
    descendants before ancestors."""
    held: dict[str, int] = {backend: 0 for backend in tree.backends()}
    bits = tree._bits
    stack = [tree._root]
    while stack:
        node = stack.pop()
        for child in (node.children or {}).values():
            assert child.mask, "a node nobody holds is detached"
            if node is not tree._root:
                assert child.mask & ~node.mask == 0, "holders of a node hold its parent"
            for backend, bit in bits.items():
                if child.mask & bit:
                    held[backend] += 1
            stack.append(child)
    for backend, count in held.items():
        assert tree.chars(backend) == count * tree.block_chars
        lru = tree._lru[backend]
        assert len(lru) == count
        position = {node: index for index, node in enumerate(lru)}
        for node in lru:
            parent = node.parent
            if parent is not tree._root:
                assert position[parent] > position[node], "ancestors are more recent than descendants"


def test_blocks_drop_the_partial_tail():
    tree = PrefixTree(block_chars=B)
    assert len(tree.blocks("x" * 23)) == 2
    assert tree.blocks("") == []
    assert tree.blocks("abcdefgh\n\n\n\n\n\n\n\n") == [hash("abcdefgh"), hash("\n" * 8)]


def test_match_reports_longest_prefix_per_backend():
    # given a shared system prompt on two backends and a conversation on one
    tree = PrefixTree(block_chars=B)
    system = text(1, 64)
    conversation = system + text(2, 80)
    tree.insert(system, "a")
    tree.insert(conversation, "b")

    # when the conversation's next turn is matched
    matched, per_backend = tree.match(conversation + text(3, 40))

    # then b holds all of it, a only the system prompt
    assert matched == 144
    assert per_backend == {"a": 64, "b": 144}
    assert tree.match(text(9, 64)) == (0, {})
    assert tree.match("") == (0, {})
    # a key diverging inside a block matches up to the previous block boundary
    assert tree.match(system[:20] + "Z" + system[21:])[0] == 16
    assert_invariants(tree)


def test_insert_reports_new_characters_and_shares_nodes():
    tree = PrefixTree(block_chars=B)
    assert tree.insert("a" * 32, "x") == 32
    assert tree.insert("a" * 48, "x") == 16
    assert tree.insert("a" * 48, "y") == 48
    assert tree.chars("x") == 48 and tree.chars("y") == 48
    assert tree.node_count() == 6
    assert_invariants(tree)


def test_evict_drops_least_recently_used_leaves_first():
    # given three keys on one backend, the oldest touched again
    tree = PrefixTree(block_chars=B)
    common = text(1, 32)
    old, middle, new = common + text(2, 32), common + text(3, 32), common + text(4, 32)
    for key in (old, middle, new):
        tree.insert(key, "a")
    tree.insert(old, "a")
    assert tree.chars("a") == 32 + 3 * 32

    # when the backend must shrink by one key's tail
    evicted = tree.evict("a", 32 + 2 * 32)

    # then the least recently used tail went, the common prefix stayed
    assert evicted == 32
    assert tree.match(middle)[1] == {"a": 32}
    assert tree.match(old)[1] == {"a": 64}
    assert tree.match(new)[1] == {"a": 64}
    assert_invariants(tree)

    # and shrinking to nothing empties the tree
    tree.evict("a", 0)
    assert tree.chars("a") == 0 and tree.node_count() == 0
    assert_invariants(tree)


def test_evict_of_one_backend_keeps_the_others_nodes():
    tree = PrefixTree(block_chars=B)
    key = text(1, 64)
    tree.insert(key, "a")
    tree.insert(key, "b")
    tree.evict("a", 0)
    assert tree.match(key) == (64, {"b": 64})
    assert tree.evict("unknown", 0) == 0
    assert_invariants(tree)


def test_remove_backend_forgets_it_and_frees_its_bit():
    tree = PrefixTree(block_chars=B)
    shared, only_a = text(1, 32), text(2, 64)
    tree.insert(shared, "a")
    tree.insert(shared, "b")
    tree.insert(only_a, "a")
    tree.remove_backend("a")
    assert tree.match(shared) == (32, {"b": 32})
    assert tree.match(only_a) == (0, {})
    assert "a" not in tree.backends()
    assert_invariants(tree)
    # a new backend reuses the bit without inheriting anything
    tree.insert(text(3, 16), "c")
    assert tree.match(shared)[1] == {"b": 32}
    assert_invariants(tree)
    tree.remove_backend("never-seen")


def test_random_operations_keep_the_invariants():
    rng = random.Random(7)
    tree = PrefixTree(block_chars=B)
    prefixes = [text(seed, 48) for seed in range(5)]
    for step in range(600):
        backend = rng.choice("abcd")
        action = rng.random()
        if action < 0.7:
            key = rng.choice(prefixes) + text(rng.randrange(40), rng.randrange(0, 80))
            tree.insert(key, backend)
            tree.evict(backend, 400)
            assert tree.chars(backend) <= 400
            assert tree.match(key)[1][backend] == len(key) // B * B
        elif action < 0.95:
            tree.evict(backend, rng.randrange(0, 400))
        else:
            tree.remove_backend(backend)
        if step % 50 == 0:
            assert_invariants(tree)
    assert_invariants(tree)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError):
        PrefixTree(block_chars=0)
