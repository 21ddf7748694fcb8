"""Radix tree from token-id prefixes to the KV pages that hold them.

Requests that share a prompt prefix (a system prompt, a few-shot header, the
turns of a chat) reuse its KV instead of recomputing it. The tree stores only
whole pages: a key is always a multiple of `page_size` tokens, so a page in the
tree is full and immutable, and a request's partial last page stays private.

Ownership: a page is at any time either free (in the allocator), owned by the
tree, or held privately by one request. Pages a request got from
`match_prefix` stay owned by the tree; `lock_ref` on the path root..node keeps
them from eviction while the request runs. Every operation costs O(tokens or
pages it touches) plus O(log) heap work; nothing scans the pool. Owned by the
scheduler thread alone: no locks.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Sequence

from runtime.kv_pool import PageAllocator


class TreeNode:
    """One edge of the radix tree: a run of whole pages of tokens and their KV pages.

    `children` is keyed by the child's first page of token ids, which is unique
    among siblings because siblings diverge somewhere inside their first page at
    the latest. `lock_ref` counts the running requests whose matched path passes
    through this node; `parent` is None only for the root and for removed nodes.
    """

    __slots__ = ("children", "parent", "key", "pages", "lock_ref", "last_access")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: TreeNode | None, last_access: int):
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.parent = parent
        self.key = key
        self.pages = pages
        self.lock_ref = 0
        self.last_access = last_access

    def __repr__(self) -> str:
        return f"TreeNode(tokens={len(self.key)}, pages={self.pages}, lock_ref={self.lock_ref})"


@dataclasses.dataclass(frozen=True)
class MatchResult:
    """A cached prefix: its pages in order, its length in tokens, and the node where it ends.

    `num_tokens == len(pages) * page_size`. Lock `node` with `inc_lock` to keep the
    pages alive while a request uses them; `node` is the root when nothing matched.
    """

    pages: list[int]
    num_tokens: int
    node: TreeNode


def _as_tokens(token_ids: Sequence[int], length: int) -> tuple[int, ...]:
    """The first `length` ids as a tuple of Python ints (numpy arrays included)."""
    head = token_ids[:length]
    if hasattr(head, "tolist"):
        return tuple(head.tolist())
    return tuple(int(t) for t in head)


class RadixCache:
    """Page-aligned prefix cache over a `PageAllocator`, with LRU eviction of unlocked leaves.

    With `disable=True` nothing is cached: matches are empty and every page handed
    to `insert` / `cache_finished` goes straight back to the allocator.
    """

    def __init__(self, allocator: PageAllocator, page_size: int, disable: bool = False) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self.disable = disable
        self.reset()

    # ----------------------------------------------------------------- state

    def reset(self) -> None:
        """Forget the whole tree without returning its pages to the allocator.

        For use together with `allocator.reset()`; `flush` is the variant that frees.
        """
        self._clock = 0
        self.root = TreeNode((), [], None, 0)
        self._total_pages = 0
        self._protected_pages = 0
        # Lazy min-heap of (last_access, tiebreak, node) for leaves that may be evictable;
        # entries go stale when a node is touched, locked, gains a child or is removed,
        # and are dropped when popped or when the heap is compacted.
        self._heap: list[tuple[int, int, TreeNode]] = []
        self._heap_limit = 64
        self._tiebreak = itertools.count()

    def total_cached_pages(self) -> int:
        """Pages owned by the tree."""
        return self._total_pages

    def protected_pages(self) -> int:
        """Pages of the tree on some running request's locked path."""
        return self._protected_pages

    def evictable_pages(self) -> int:
        """Pages `evict` could free now: every unlocked page (an unlocked node's subtree is unlocked)."""
        return self._total_pages - self._protected_pages

    # ----------------------------------------------------------------- lookup

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _common_len(self, key: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
        """Tokens shared by `key` and `tokens[start:]`, rounded down to whole pages.

        Bisects over pages with slice comparisons, so the Python loop runs
        O(log pages) times while the token comparisons (O(tokens) in all) run in C.
        """
        ps = self.page_size
        limit = min(len(key), len(tokens) - start)
        limit -= limit % ps
        if key[:limit] == tokens[start : start + limit]:
            return limit
        equal_pages, unequal_pages = 0, limit // ps  # pages [0, equal) match; [0, unequal) do not
        while unequal_pages - equal_pages > 1:
            mid = (equal_pages + unequal_pages) // 2
            lo, hi = equal_pages * ps, mid * ps
            if key[lo:hi] == tokens[start + lo : start + hi]:
                equal_pages = mid
            else:
                unequal_pages = mid
        return equal_pages * ps

    def _split(self, node: TreeNode, num_tokens: int) -> TreeNode:
        """Cut `node` after `num_tokens` (a page multiple inside it); return the new upper half.

        The upper half inherits the lock count (every lock through the lower half
        passes through it) and the access time; the lower half keeps its identity,
        so heap entries and callers' references to it stay valid.
        """
        parent = node.parent
        assert parent is not None
        num_pages = num_tokens // self.page_size
        upper = TreeNode(node.key[:num_tokens], node.pages[:num_pages], parent, node.last_access)
        upper.lock_ref = node.lock_ref
        parent.children[upper.key[: self.page_size]] = upper
        node.key = node.key[num_tokens:]
        node.pages = node.pages[num_pages:]
        node.parent = upper
        upper.children[node.key[: self.page_size]] = node
        return upper

    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        """The longest cached page-aligned prefix of `token_ids`.

        Splits a node when the match ends inside it, so that the returned node ends
        exactly at the match and locking it protects just the matched pages.
        Refreshes the access time of the path. Callers usually pass
        `token_ids[:-1]` so that at least one token is left to compute, and must
        `inc_lock(result.node)` before anything can call `evict`: an unlocked
        match's pages may be evicted and handed out again.
        """
        if self.disable:
            return MatchResult([], 0, self.root)
        ps = self.page_size
        aligned = len(token_ids) - len(token_ids) % ps
        tokens = _as_tokens(token_ids, aligned)
        now = self._tick()
        node = self.root
        pages: list[int] = []
        pos = 0
        while pos < aligned:
            child = node.children.get(tokens[pos : pos + ps])
            if child is None:
                break
            shared = self._common_len(child.key, tokens, pos)
            if shared < len(child.key):
                child = self._split(child, shared)
            child.last_access = now
            pages.extend(child.pages)
            pos += shared
            node = child
        self._push_if_evictable(node)
        return MatchResult(pages, pos, node)

    def cached_len(self, token_ids: Sequence[int]) -> int:
        """`match_prefix(token_ids).num_tokens`, without its side effects: no node is split and no
        access time refreshed. For decisions about waiting requests (the `lpm` ranking, waiting for
        a prefix in progress), which must not make their prefixes look recently used to eviction."""
        if self.disable:
            return 0
        ps = self.page_size
        aligned = len(token_ids) - len(token_ids) % ps
        tokens = _as_tokens(token_ids, aligned)
        node, pos = self.root, 0
        while pos < aligned:
            child = node.children.get(tokens[pos : pos + ps])
            if child is None:
                break
            shared = self._common_len(child.key, tokens, pos)
            pos += shared
            if shared < len(child.key):
                break
            node = child
        return pos

    # ----------------------------------------------------------------- locks

    def _path_in_tree(self, node: TreeNode) -> bool:
        while node.parent is not None:
            node = node.parent
        return node is self.root

    def inc_lock(self, node: TreeNode) -> None:
        """Protect the path root..node from eviction (one count per running request)."""
        if not self._path_in_tree(node):
            raise ValueError(f"{node!r} is not in this tree (evicted, flushed or reset)")
        while node is not self.root:
            if node.lock_ref == 0:
                self._protected_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def dec_lock(self, node: TreeNode) -> None:
        """Undo one `inc_lock(node)`; leaves that drop to zero become evictable."""
        if not self._path_in_tree(node):
            raise ValueError(f"{node!r} is not in this tree (evicted, flushed or reset)")
        if node is not self.root and node.lock_ref <= 0:
            raise ValueError(f"dec_lock of unlocked {node!r}")
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected_pages -= len(node.pages)
                self._push_if_evictable(node)
            node = node.parent

    # ----------------------------------------------------------------- insert

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> int:
        """Hand the full pages of `token_ids` to the tree; return how many tokens were already cached.

        `pages[i]` holds tokens `[i * page_size, (i + 1) * page_size)`, and
        `len(pages) == len(token_ids) // page_size` (the caller keeps or frees a
        trailing partial page). For the part the tree already holds, a passed page
        equal to the tree's own page is shared (a prefix from `match_prefix`) and
        stays; a different one is a duplicate computed twice and is freed here.
        The new part's pages belong to the tree from now on.
        """
        ps = self.page_size
        aligned = len(token_ids) - len(token_ids) % ps
        if len(pages) != aligned // ps:
            raise ValueError(
                f"insert of {len(token_ids)} tokens needs {aligned // ps} pages of {ps}, got {len(pages)}"
            )
        if self.disable:
            self.allocator.free(pages)
            return 0
        tokens = _as_tokens(token_ids, aligned)
        pages = [int(p) for p in pages]
        now = self._tick()
        node = self.root
        pos = 0
        duplicates: list[int] = []
        while pos < aligned:
            child = node.children.get(tokens[pos : pos + ps])
            if child is None:
                break
            shared = self._common_len(child.key, tokens, pos)
            if shared < len(child.key) and pos + shared < aligned:
                child = self._split(child, shared)
            first = pos // ps
            for offset, cached_page in enumerate(child.pages[: shared // ps]):
                if pages[first + offset] != cached_page:
                    duplicates.append(pages[first + offset])
            child.last_access = now
            pos += shared
            node = child
        present = pos
        if pos < aligned:
            leaf = TreeNode(tokens[pos:], pages[pos // ps :], node, now)
            node.children[leaf.key[:ps]] = leaf
            self._total_pages += len(leaf.pages)
            node = leaf
        self._push_if_evictable(node)
        if duplicates:
            self.allocator.free(duplicates)
        return present

    def _check_prefix_fits(self, node: TreeNode, num_full: int) -> None:
        """Refuse to free tree pages: the locked prefix must lie within the full pages being cached."""
        prefix_pages = 0
        while node.parent is not None:
            prefix_pages += len(node.pages)
            node = node.parent
        if node is not self.root:
            raise ValueError("the locked node is not in this tree (evicted, flushed or reset)")
        if prefix_pages > num_full:
            raise ValueError(
                f"the locked prefix spans {prefix_pages} pages but only {num_full} full pages are cached"
            )

    def cache_finished(
        self, token_ids: Sequence[int], pages: Sequence[int], last_locked_node: TreeNode
    ) -> int:
        """End a request (finished or aborted): cache its full pages, free the rest, unlock its prefix.

        `token_ids` are the tokens whose KV was written (prompt plus output, less
        the last sampled token, which never went through the model). `pages` is
        every page the request holds, in sequence order: the prefix pages it got
        from `match_prefix` first (they are the tree's, so `insert` keeps them),
        then its own. Pages past the last full page (the partial page and any
        allocated ahead) are freed. `last_locked_node` is the node locked at
        admission (or by `cache_unfinished`). Returns tokens already cached.
        """
        num_full = len(token_ids) // self.page_size
        if len(pages) < num_full:
            raise ValueError(f"{len(token_ids)} tokens need at least {num_full} pages, got {len(pages)}")
        self._check_prefix_fits(last_locked_node, num_full)
        present = self.insert(token_ids[: num_full * self.page_size], pages[:num_full])
        if len(pages) > num_full:
            self.allocator.free(pages[num_full:])
        self.dec_lock(last_locked_node)
        return present

    def cache_unfinished(
        self, token_ids: Sequence[int], pages: Sequence[int], last_locked_node: TreeNode
    ) -> MatchResult:
        """Share a running request's finished chunk (chunked prefill) and move its lock onto it.

        Same `token_ids`/`pages` meaning as `cache_finished`. The full pages go into
        the tree (duplicates freed), the lock moves from `last_locked_node` to the
        new end node, and the returned `pages` replace the request's first
        `num_tokens // page_size` pages; its later pages stay its own.
        """
        ps = self.page_size
        num_full = len(token_ids) // ps
        if len(pages) < num_full:
            raise ValueError(f"{len(token_ids)} tokens need at least {num_full} pages, got {len(pages)}")
        if self.disable:
            return MatchResult([int(p) for p in pages[:num_full]], num_full * ps, self.root)
        self._check_prefix_fits(last_locked_node, num_full)
        prefix = token_ids[: num_full * ps]
        self.insert(prefix, pages[:num_full])
        match = self.match_prefix(prefix)
        assert match.num_tokens == num_full * ps
        self.inc_lock(match.node)
        self.dec_lock(last_locked_node)
        return match

    # ----------------------------------------------------------------- eviction

    @staticmethod
    def _evictable(node: TreeNode) -> bool:
        return node.parent is not None and not node.children and node.lock_ref == 0

    def _push_if_evictable(self, node: TreeNode) -> None:
        if not self._evictable(node):
            return
        heapq.heappush(self._heap, (node.last_access, next(self._tiebreak), node))
        if len(self._heap) > self._heap_limit:
            self._compact_heap()

    def _compact_heap(self) -> None:
        """Drop stale and repeated entries; amortized O(1) per push since the limit doubles live entries."""
        seen: set[int] = set()
        live = []
        for entry in self._heap:
            node = entry[2]
            if self._evictable(node) and node.last_access == entry[0] and id(node) not in seen:
                seen.add(id(node))
                live.append(entry)
        heapq.heapify(live)
        self._heap = live
        self._heap_limit = max(64, 2 * len(live))

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` pages from unlocked leaves, least recently used first.

        A leaf is trimmed from its tail when only part of it is needed (its prefix
        stays useful); a parent left as an unlocked leaf joins the queue at its own
        access time. Returns the pages freed (less than asked when too few are unlocked).
        """
        freed: list[int] = []
        ps = self.page_size
        while len(freed) < num_pages and self._heap:
            last_access, _, node = heapq.heappop(self._heap)
            if not self._evictable(node) or node.last_access != last_access:
                continue
            need = num_pages - len(freed)
            if need < len(node.pages):
                keep = len(node.pages) - need
                freed.extend(node.pages[keep:])
                node.pages = node.pages[:keep]
                node.key = node.key[: keep * ps]
                heapq.heappush(self._heap, (node.last_access, next(self._tiebreak), node))
                break
            freed.extend(node.pages)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[:ps]]
            node.parent = None
            self._push_if_evictable(parent)
        self._total_pages -= len(freed)
        if freed:
            self.allocator.free(freed)
        return len(freed)

    def flush(self) -> None:
        """Drop every cached prefix and free its pages; only valid while nothing is locked."""
        if self._protected_pages:
            raise RuntimeError(f"flush with {self._protected_pages} pages locked by running requests")
        pages: list[int] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            pages.extend(node.pages)
            stack.extend(node.children.values())
            node.parent = None
        self.reset()
        if pages:
            self.allocator.free(pages)
