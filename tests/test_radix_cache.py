"""RadixCache: prefix sharing, page alignment, locks, LRU eviction, and a randomized model check."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from runtime.kv_pool import PageAllocator
from runtime.radix_cache import RadixCache, TreeNode


def walk(cache: RadixCache) -> list[TreeNode]:
    """Every node below the root."""
    nodes, stack = [], list(cache.root.children.values())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children.values())
    return nodes


def tree_pages(cache: RadixCache) -> list[int]:
    return [p for node in walk(cache) for p in node.pages]


def check_structure(cache: RadixCache) -> None:
    """Shape invariants and the O(1) counters against a full traversal."""
    ps = cache.page_size
    protected = 0
    for node in walk(cache):
        assert node.key and len(node.key) % ps == 0
        assert len(node.pages) == len(node.key) // ps
        assert node.parent is not None and node.parent.children[node.key[:ps]] is node
        assert node.lock_ref >= 0
        assert all(node.lock_ref >= child.lock_ref for child in node.children.values())
        if node.lock_ref:
            protected += len(node.pages)
    assert cache.protected_pages() == protected
    assert cache.total_cached_pages() == len(tree_pages(cache))
    assert cache.evictable_pages() == cache.total_cached_pages() - protected


def cache_with(num_pages: int, page_size: int) -> tuple[PageAllocator, RadixCache]:
    allocator = PageAllocator(num_pages)
    return allocator, RadixCache(allocator, page_size)


def put(allocator: PageAllocator, cache: RadixCache, tokens: list[int]) -> list[int]:
    """Allocate the full pages of `tokens` and insert them, like a request finishing with no prefix hit."""
    pages = allocator.alloc(len(tokens) // cache.page_size)
    assert pages is not None
    cache.insert(tokens, pages)
    return pages


def test_shared_prefix_is_stored_once():
    allocator, cache = cache_with(64, 1)
    first = put(allocator, cache, [1, 2, 3, 4, 5])
    second = allocator.alloc(5)
    assert cache.insert([1, 2, 3, 9, 9], second) == 3
    # The three duplicate pages came back to the allocator; the tree holds 5 + 2.
    assert cache.total_cached_pages() == 7
    assert allocator.num_free + 7 == allocator.num_total
    match = cache.match_prefix([1, 2, 3, 9, 9, 7])
    assert match.num_tokens == 5 and match.pages == first[:3] + second[3:]
    check_structure(cache)


def test_match_splits_node_and_returns_exact_end():
    allocator, cache = cache_with(64, 2)
    pages = put(allocator, cache, list(range(10)))
    assert len(walk(cache)) == 1
    match = cache.match_prefix([0, 1, 2, 3, 99, 99])
    assert match.num_tokens == 4 and match.pages == pages[:2]
    assert len(walk(cache)) == 2
    assert match.node.key == (0, 1, 2, 3) and match.node.pages == pages[:2]
    (lower,) = match.node.children.values()
    assert lower.key == (4, 5, 6, 7, 8, 9) and lower.pages == pages[2:]
    # A mismatch inside a page does not share that page.
    assert cache.match_prefix([0, 1, 2, 3, 4, 77, 6]).num_tokens == 4
    check_structure(cache)


def test_page_alignment():
    allocator, cache = cache_with(128, 16)
    tokens = list(range(1000, 1500))
    pages = allocator.alloc(32)  # 31 full pages + the partial one
    node = cache.match_prefix(tokens[:-1]).node
    cache.inc_lock(node)
    cache.cache_finished(tokens, pages, node)
    assert cache.total_cached_pages() == 31
    assert allocator.num_free == allocator.num_total - 31
    match = cache.match_prefix(tokens)
    assert match.num_tokens == 496 and match.pages == pages[:31]
    assert cache.match_prefix(tokens[:20]).num_tokens == 16
    assert cache.match_prefix(tokens[:15]).num_tokens == 0
    check_structure(cache)


def test_match_accepts_numpy_and_disable():
    allocator, cache = cache_with(16, 1)
    put(allocator, cache, [5, 6, 7])
    assert cache.match_prefix(np.array([5, 6, 7, 8], dtype=np.int32)).num_tokens == 3
    off = RadixCache(allocator, 1, disable=True)
    free_before = allocator.num_free
    assert off.match_prefix([5, 6]).num_tokens == 0
    pages = allocator.alloc(3)
    assert off.insert([1, 2, 3], pages) == 0
    assert allocator.num_free == free_before and off.total_cached_pages() == 0


def test_insert_duplicate_frees_duplicates_but_keeps_shared_pages():
    allocator, cache = cache_with(32, 4)
    tokens = list(range(12))
    pages = put(allocator, cache, tokens)
    free_before = allocator.num_free
    # The same pages (a request whose whole prompt was a cache hit) are shared, not freed.
    assert cache.insert(tokens, pages) == 12
    assert allocator.num_free == free_before
    # Fresh pages for the same tokens are duplicates: all freed.
    again = allocator.alloc(3)
    assert cache.insert(tokens, again) == 12
    assert allocator.num_free == free_before
    assert all(allocator.is_free(p) for p in again)
    # Partly shared: the first page from the tree, the rest computed again, plus one new page.
    mixed = [pages[0]] + allocator.alloc(3)
    assert cache.insert(tokens + [12, 13, 14, 15], mixed) == 12
    assert allocator.is_free(mixed[1]) and allocator.is_free(mixed[2])
    assert not allocator.is_free(mixed[3])
    assert cache.match_prefix(tokens + [12, 13, 14, 15]).pages == pages + [mixed[3]]
    with pytest.raises(ValueError):
        cache.insert(tokens, pages[:2])
    check_structure(cache)


def test_insert_ending_inside_a_node():
    allocator, cache = cache_with(32, 1)
    pages = put(allocator, cache, [1, 2, 3, 4])
    shorter = allocator.alloc(2)
    assert cache.insert([1, 2], shorter) == 2
    assert all(allocator.is_free(p) for p in shorter)
    assert cache.match_prefix([1, 2, 3, 4]).pages == pages
    check_structure(cache)


def test_lock_prevents_eviction():
    allocator, cache = cache_with(32, 1)
    put(allocator, cache, [1, 2, 3])
    put(allocator, cache, [7, 8])
    match = cache.match_prefix([1, 2, 3])
    cache.inc_lock(match.node)
    assert cache.protected_pages() == 3 and cache.evictable_pages() == 2
    assert cache.evict(10) == 2
    assert cache.total_cached_pages() == 3 and cache.evict(1) == 0
    cache.dec_lock(match.node)
    assert cache.evictable_pages() == 3
    assert cache.evict(10) == 3
    assert allocator.num_free == allocator.num_total
    with pytest.raises(ValueError):
        cache.dec_lock(match.node)  # evicted: no longer in the tree
    check_structure(cache)


def test_lock_inside_split_path_protects_upper_half():
    allocator, cache = cache_with(32, 1)
    put(allocator, cache, [1, 2, 3, 4, 5])
    whole = cache.match_prefix([1, 2, 3, 4, 5])
    cache.inc_lock(whole.node)
    cache.match_prefix([1, 2, 9])  # splits the locked node after two tokens
    check_structure(cache)
    assert cache.protected_pages() == 5 and cache.evict(5) == 0
    cache.dec_lock(whole.node)
    assert cache.protected_pages() == 0
    with pytest.raises(ValueError, match="unlocked"):
        cache.dec_lock(whole.node)
    check_structure(cache)


def test_lru_order_and_partial_trim():
    allocator, cache = cache_with(32, 1)
    a = put(allocator, cache, [1, 1, 1])
    b = put(allocator, cache, [2, 2, 2])
    c = put(allocator, cache, [3, 3, 3])
    cache.match_prefix([1, 1, 1])  # a is now the most recent, b the least
    assert cache.evict(3) == 3
    assert all(allocator.is_free(p) for p in b)
    assert cache.match_prefix([2, 2, 2]).num_tokens == 0
    # Two pages from c (next in LRU order): its tail goes, its head stays cached.
    assert cache.evict(2) == 2
    assert cache.match_prefix([3, 3, 3]).pages == c[:1]
    assert allocator.is_free(c[1]) and allocator.is_free(c[2])
    assert cache.match_prefix([1, 1, 1]).pages == a
    check_structure(cache)


def test_cached_len_neither_splits_nor_refreshes():
    """What the waiting queue asks of the tree (the lpm ranking) changes nothing in it: a prefix
    ranked is not made recent, and a match ending inside a node does not split it."""
    allocator, cache = cache_with(32, 1)
    b = put(allocator, cache, [2, 2, 2])
    put(allocator, cache, [1, 1, 1])
    nodes = len(walk(cache))
    assert cache.cached_len([2, 2, 9]) == 2 and cache.cached_len([2, 2, 2, 5]) == 3
    assert cache.cached_len([7]) == 0 and cache.cached_len([]) == 0
    assert len(walk(cache)) == nodes  # no split
    assert cache.evict(3) == 3  # b, ranked last, is still the least recently used
    assert all(allocator.is_free(p) for p in b)
    check_structure(cache)
    assert RadixCache(allocator, 1, disable=True).cached_len([1, 1, 1]) == 0


def test_evict_cascades_to_parents():
    allocator, cache = cache_with(32, 1)
    put(allocator, cache, [1, 2, 3, 4])
    put(allocator, cache, [1, 2, 5, 6])
    put(allocator, cache, [9])  # most recent: evicted last
    assert len(walk(cache)) == 4
    # Both leaves, then their shared parent [1, 2] once it is a leaf (older than [9]).
    assert cache.evict(6) == 6
    assert cache.match_prefix([1, 2]).num_tokens == 0
    assert cache.match_prefix([9]).num_tokens == 1
    assert cache.total_cached_pages() == 1
    check_structure(cache)


def test_flush_and_reset():
    allocator, cache = cache_with(32, 2)
    put(allocator, cache, list(range(8)))
    put(allocator, cache, list(range(4)) + [50, 51])
    match = cache.match_prefix(list(range(8)))
    cache.inc_lock(match.node)
    with pytest.raises(RuntimeError):
        cache.flush()
    cache.dec_lock(match.node)
    cache.flush()
    assert cache.total_cached_pages() == 0 and allocator.num_free == allocator.num_total
    assert cache.match_prefix(list(range(8))).num_tokens == 0
    with pytest.raises(ValueError):
        cache.inc_lock(match.node)
    put(allocator, cache, [1, 2])
    cache.reset()
    allocator.reset()
    assert cache.total_cached_pages() == 0 and allocator.num_free == allocator.num_total


def test_cache_unfinished_moves_lock_and_shares_chunk():
    allocator, cache = cache_with(64, 2)
    prompt = list(range(20))
    pages = allocator.alloc(10)
    root_match = cache.match_prefix(prompt[:-1])
    cache.inc_lock(root_match.node)
    chunk = cache.cache_unfinished(prompt[:9], pages, root_match.node)  # 4 full pages shared
    assert chunk.num_tokens == 8 and chunk.pages == pages[:4]
    assert cache.protected_pages() == 4
    # Another request now hits the shared chunk.
    assert cache.match_prefix(prompt).num_tokens == 8
    cache.cache_finished(prompt[:19], pages, chunk.node)
    assert cache.protected_pages() == 0 and cache.total_cached_pages() == 9
    assert allocator.num_free + 9 == allocator.num_total
    check_structure(cache)


def test_cache_finished_refuses_to_free_tree_pages():
    allocator, cache = cache_with(64, 2)
    tokens = list(range(8))
    put(allocator, cache, tokens)
    match = cache.match_prefix(tokens)
    cache.inc_lock(match.node)
    own = allocator.alloc(1)
    # Claiming fewer written tokens than the locked prefix would free the tree's pages.
    with pytest.raises(ValueError, match="locked prefix"):
        cache.cache_finished(tokens[:5], match.pages + own, match.node)
    cache.cache_finished(tokens + [8], match.pages + own, match.node)
    assert cache.protected_pages() == 0 and cache.total_cached_pages() == 4
    assert allocator.num_free + 4 == allocator.num_total
    check_structure(cache)


# --------------------------------------------------------------------- model check


@dataclasses.dataclass
class LiveRequest:
    tokens: list[int]
    pages: list[int]  # all pages, prefix pages first
    num_prefix_pages: int
    node: TreeNode


def check_model(
    allocator: PageAllocator, cache: RadixCache, live: list[LiveRequest], content: dict[int, tuple[int, ...]]
) -> None:
    """Every page is in exactly one place, and cached pages hold the KV of their prefix."""
    check_structure(cache)
    cached = tree_pages(cache)
    private = [p for req in live for p in req.pages[req.num_prefix_pages :]]
    everything = cached + private
    assert len(set(everything)) == len(everything), "a page is owned twice"
    assert not any(allocator.is_free(p) for p in everything), "an owned page is in the free list"
    assert allocator.num_free + cache.total_cached_pages() + len(private) == allocator.num_total
    # Lock counts equal the number of live requests whose path runs through each node.
    expected: dict[int, int] = {}
    for req in live:
        node = req.node
        while node is not cache.root:
            expected[id(node)] = expected.get(id(node), 0) + 1
            node = node.parent
    for node in walk(cache):
        assert node.lock_ref == expected.get(id(node), 0)
    # Each page's KV content: the whole prefix through that page.
    ps = cache.page_size
    stack = [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            full = prefix + child.key
            for i, page in enumerate(child.pages):
                assert content[page] == full[: len(prefix) + (i + 1) * ps]
            stack.append((child, full))


@pytest.mark.parametrize("page_size,seed", [(1, 0), (1, 1), (4, 2), (4, 3), (16, 4)])
def test_randomized_model_check(page_size: int, seed: int) -> None:
    rng = random.Random(seed)
    allocator = PageAllocator(1 + 48 * 16 // page_size)
    cache = RadixCache(allocator, page_size)
    ps = page_size
    families = [[rng.randrange(6) for _ in range(rng.randint(0, 6 * ps))] for _ in range(4)]
    live: list[LiveRequest] = []
    content: dict[int, tuple[int, ...]] = {}

    def new_request() -> None:
        base = rng.choice(families)
        cut = rng.randint(0, len(base))
        tokens = base[:cut] + [rng.randrange(3) for _ in range(rng.randint(1, 5 * ps))]
        cached = cache.cached_len(tokens[:-1])
        match = cache.match_prefix(tokens[:-1])
        assert cached == match.num_tokens
        for i, page in enumerate(match.pages):
            assert content[page] == tuple(tokens[: (i + 1) * ps])
        assert match.num_tokens == len(match.pages) * ps <= len(tokens) - 1
        cache.inc_lock(match.node)
        need = -(-len(tokens) // ps) - len(match.pages)
        if allocator.num_free < need:
            cache.evict(need - allocator.num_free)
        own = allocator.alloc(need)
        if own is None:
            cache.dec_lock(match.node)
            return
        pages = match.pages + own
        for i in range(len(match.pages), len(pages)):
            content[pages[i]] = tuple(tokens[: (i + 1) * ps])  # "compute" the KV
        live.append(LiveRequest(tokens, pages, len(match.pages), match.node))

    def finish_request() -> None:
        req = live.pop(rng.randrange(len(live)))
        # Tokens whose KV was written: never fewer than a chunk already shared.
        written = max(len(req.tokens) - rng.randint(0, 1), req.num_prefix_pages * ps)
        cache.cache_finished(req.tokens[:written], req.pages, req.node)

    def share_chunk() -> None:
        req = rng.choice(live)
        done = rng.randint(req.num_prefix_pages * ps, len(req.tokens))
        match = cache.cache_unfinished(req.tokens[:done], req.pages, req.node)
        req.pages = match.pages + req.pages[len(match.pages) :]
        req.num_prefix_pages = len(match.pages)
        req.node = match.node

    for _ in range(1500):
        roll = rng.random()
        if roll < 0.4:
            new_request()
        elif roll < 0.7 and live:
            finish_request()
        elif roll < 0.8 and live:
            share_chunk()
        elif roll < 0.95:
            before = cache.evictable_pages()
            freed = cache.evict(rng.randint(0, 8))
            assert freed <= before
        elif not live:
            cache.flush()
            assert allocator.num_free == allocator.num_total
        check_model(allocator, cache, live, content)

    while live:
        finish_request()
    check_model(allocator, cache, live, content)
    assert cache.protected_pages() == 0
    cached = cache.total_cached_pages()
    assert cached == allocator.num_total - allocator.num_free
    assert cache.evict(allocator.num_total) == cached
    assert allocator.num_free == allocator.num_total and cache.total_cached_pages() == 0


def test_heap_stays_bounded_under_repeated_touches():
    allocator, cache = cache_with(64, 1)
    for i in range(10):
        put(allocator, cache, [i, i + 100])
    for step in range(5000):
        cache.match_prefix([step % 10, step % 10 + 100])
    assert len(cache._heap) <= 2 * 10 + 64
    # LRU still right after many compactions: 0..4 were touched before 5..9 in the last round.
    assert cache.evict(2) == 2
    assert cache.match_prefix([0, 100]).num_tokens == 0
