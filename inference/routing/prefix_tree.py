"""An approximate picture of which backend's KV cache holds which prefix.

One tree per model pool, shared by all its backends (sgl-router's design, with
backend URLs as the tree's "tenants"). The key is cut into fixed blocks of
`block_chars` characters and the tree is a trie over the blocks' hashes: node =
one block, path from the root = a key prefix of whole blocks. `match` and
`insert` cost one regex split and one dict lookup per block (an 8 KB key is 64
lookups with the default 128-char blocks). A trailing partial block is ignored:
matching is block-aligned, like SGLang's paged RadixAttention.

Approximations, all harmless for routing: block identity is equality of
Python's 64-bit `hash` of the block (salted per process, so the tree is
per-process state; a shared tree would need a stable hash such as BLAKE2b), and
sizes are counted in characters, not tokens.

Memory (measured with tracemalloc): about 400 bytes per node (block hash,
node, its parent's dict entry, one LRU entry per holding backend), ~3 bytes per
covered character with 128-char blocks: 4 backends × 2 M characters ≈ 25 MB
per model when they share nothing.

Invariants:
- every non-root node is held by at least one backend (`mask` ≠ 0); a node
  nobody holds is detached from its parent;
- the backends holding a node also hold all its ancestors (insert marks the
  whole path; eviction removes a backend from its deepest nodes first);
- `chars(b)` is `block_chars` times the number of nodes `b` holds;
- per backend, `_lru[b]` orders b's nodes least recently used first, and a
  node always comes after all of its descendants held by b (insert touches the
  path deepest first). Hence the first entry is always one of b's leaves and
  LRU eviction never cuts a path in the middle. Each entry's value is the
  monotonic time of the node's last insert for b.

Not thread-safe: it lives on one event loop, like the rest of the routing state.
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Iterable

DEFAULT_BLOCK_CHARS = 128


class _Node:
    __slots__ = ("block", "parent", "children", "mask")

    def __init__(self, block: int, parent: _Node | None) -> None:
        self.block = block  # hash of the block's text; the key in parent.children
        self.parent = parent
        self.children: dict[int, _Node] | None = None  # created on the first child
        self.mask = 0  # bit i set: held by the backend with bit index i


class PrefixTree:
    def __init__(self, *, block_chars: int = DEFAULT_BLOCK_CHARS) -> None:
        if block_chars < 1:
            raise ValueError("block_chars must be at least 1")
        self.block_chars = block_chars
        # findall over a fixed-width pattern splits ~2.5x faster than slicing in a loop.
        self._block_pattern = re.compile(".{%d}" % block_chars, re.DOTALL)
        self._root = _Node(0, None)
        self._bits: dict[str, int] = {}  # backend URL → its bit (a power of two)
        self._free_bits: list[int] = []
        self._lru: dict[str, OrderedDict[_Node, None]] = {}
        self._chars: dict[str, int] = {}

    def blocks(self, key: str) -> list[int]:
        """Hashes of the whole blocks of `key`; the tail shorter than a block is dropped."""
        return list(map(hash, self._block_pattern.findall(key)))

    def match(self, key: str | list[int]) -> tuple[int, dict[str, int]]:
        """(characters of the longest prefix any backend holds, {backend: its
        matched characters}) for the backends holding at least one block.
        Read-only: matching does not refresh LRU order (`insert` does)."""
        blocks = self.blocks(key) if isinstance(key, str) else key
        node = self._root
        depth = 0
        # Backend masks only lose bits going down a path: remember the last
        # node of each run of equal masks; the backends leaving after it end there.
        mask = -1
        run_ends: list[tuple[int, _Node]] = []
        for block in blocks:
            children = node.children
            if children is None:
                break
            child = children.get(block)
            if child is None:
                break
            if child.mask != mask:
                run_ends.append((depth, node))
                mask = child.mask
            node = child
            depth += 1
        run_ends.append((depth, node))
        matched: dict[str, int] = {}
        size = self.block_chars
        for end_depth, end in reversed(run_ends):
            if end_depth == 0:
                break
            for backend, bit in self._bits.items():
                if end.mask & bit and backend not in matched:
                    matched[backend] = end_depth * size
        return depth * size, matched

    def insert(self, key: str | list[int], backend: str, now: float | None = None) -> int:
        """Marks the key's blocks as cached on `backend`, most recently used
        (at monotonic time `now`, default the current one). Returns the
        characters newly attributed to it."""
        blocks = self.blocks(key) if isinstance(key, str) else key
        if now is None:
            now = time.monotonic()
        bit = self._bits.get(backend)
        if bit is None:
            bit = self._free_bits.pop() if self._free_bits else 1 << len(self._bits)
            self._bits[backend] = bit
            self._lru[backend] = OrderedDict()
            self._chars[backend] = 0
        lru = self._lru[backend]
        node = self._root
        path: list[_Node] = []
        for block in blocks:
            children = node.children
            if children is None:
                children = node.children = {}
            child = children.get(block)
            if child is None:
                child = children[block] = _Node(block, node)
            path.append(child)
            node = child
        added = 0
        # Deepest first, so ancestors end up more recent than their descendants.
        for node in reversed(path):
            if node.mask & bit:
                lru.move_to_end(node)
            else:
                node.mask |= bit
                added += 1
            lru[node] = now
        added *= self.block_chars
        self._chars[backend] += added
        return added

    def evict(self, backend: str, max_chars: int) -> int:
        """Drops `backend`'s least recently used leaves until it holds at most
        `max_chars`. Returns the characters dropped."""
        lru = self._lru.get(backend)
        if lru is None:
            return 0
        bit = self._bits[backend]
        total = before = self._chars[backend]
        while total > max_chars and lru:
            node, _ = lru.popitem(last=False)
            self._release(node, bit)
            total -= self.block_chars
        self._chars[backend] = total
        return before - total

    def remove_backend(self, backend: str) -> None:
        """Forgets everything `backend` holds."""
        lru = self._lru.pop(backend, None)
        self._chars.pop(backend, None)
        bit = self._bits.pop(backend, None)
        if lru is None or bit is None:
            return
        # Front to back is leaves before their ancestors (see invariants).
        for node in lru:
            self._release(node, bit)
        self._free_bits.append(bit)

    def last_use(self, key: str | list[int], backend: str) -> float | None:
        """When `backend` was last pictured using the whole of `key`'s blocks
        (the monotonic time of their deepest node's last insert), or None when
        it does not hold them all."""
        blocks = self.blocks(key) if isinstance(key, str) else key
        bit = self._bits.get(backend)
        if bit is None or not blocks:
            return None
        node = self._root
        for block in blocks:
            children = node.children
            node = children.get(block) if children is not None else None
            if node is None or not node.mask & bit:
                return None
        return self._lru[backend].get(node)

    def oldest_use(self, backend: str) -> float | None:
        """The time of `backend`'s least recently used node: what it would evict next."""
        lru = self._lru.get(backend)
        if not lru:
            return None
        return next(iter(lru.values()))

    def chars(self, backend: str) -> int:
        return self._chars.get(backend, 0)

    def backends(self) -> Iterable[str]:
        return self._chars.keys()

    def node_count(self) -> int:
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                count += len(node.children)
                stack.extend(node.children.values())
        return count

    def _release(self, node: _Node, bit: int) -> None:
        node.mask &= ~bit
        if not node.mask:
            # No descendant can be held by anyone (invariant): detach the subtree.
            parent = node.parent
            if parent is not None and parent.children is not None and parent.children.get(node.block) is node:
                del parent.children[node.block]
