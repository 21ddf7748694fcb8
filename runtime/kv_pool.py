"""Device KV pages and the host-side free-page allocator.

The KV cache is two device arrays (`k_pool`, `v_pool`) of fixed shape
`[num_layers, num_pages, page_size, num_kv_heads, head_dim]`; a token's KV sits
in slot `page * page_size + offset`. Which pages are free is host bookkeeping,
kept by `PageAllocator` and owned by the scheduler thread alone (no locks).
Page 0 is reserved: padding tokens write their KV there and padding page-table
entries point at it, so it is never handed to a request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.pool_storage import BFLOAT16_BITS
from runtime.host_memory import host_available_bytes

RESERVED_PAGE = 0


class PageAllocator:
    """Free pages 1..num_pages-1, handed out so that each sequence's pages stay contiguous.

    On CPU the decode attention gathers every row's pages each step, and that gather
    runs at the copy bandwidth only while the pages follow each other in memory (or
    in a regular stride): a batch whose pages lie in a random order took 86 ms per
    batch-32 decode step against 70 ms in order on the 2-core box. So a sequence asks
    for its next pages `after` its last one, and says how many more it expects
    (`room`); the free pages right after its last page are then kept as its room, and
    fresh allocations take the smallest free run that holds them plus their own room.
    Rooms are soft: when only reserved pages are left, the pages farthest into the
    rooms go first, so reservation never makes an allocation fail.

    A per-page in-use flag makes a double free or a stray page id fail loudly instead
    of silently handing the same page to two sequences (which would corrupt their KV
    without any error).
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self._num_pages = num_pages
        self._in_use = np.zeros(num_pages, dtype=np.bool_)
        self._num_free = 0
        # Holder page -> the last page of the free run after it kept for the holder's growth.
        self._room_end: dict[int, int] = {}
        self.reset()

    @property
    def num_free(self) -> int:
        """Pages that `alloc` can hand out now (rooms included: they are only kept while others remain)."""
        return self._num_free

    @property
    def num_total(self) -> int:
        """Usable pages: every page but the reserved page 0."""
        return self._num_pages - 1

    @property
    def num_pages(self) -> int:
        """Pages in the pool, the reserved page 0 included."""
        return self._num_pages

    def alloc(self, n: int, after: int | None = None, room: int = 0) -> list[int] | None:
        """Hand out `n` pages, or None (and nothing) when fewer than `n` are free.

        `after`: the caller's last page; the pages right after it come first while free
        (and not another holder's room). `room`: how many more pages the caller expects
        to need after these; that many free pages after the last one handed out are kept
        for it, as far as free pages allow.
        """
        if n < 0 or room < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n}, room {room})")
        if n > self._num_free:
            return None
        if n == 0:
            return []
        pages: list[int] = []
        own_end = None
        if after is not None:
            own_end = self._room_end.pop(after, None)
            pages = self._extend(after, n, own_end)
            self._in_use[pages] = True
        if len(pages) < n:
            own_end = None  # left the own room behind: the rest starts a new run
            fresh = self._take_fresh(n - len(pages), room)
            self._in_use[fresh] = True
            pages += fresh
        self._num_free -= n
        last = pages[-1]
        if own_end is not None and own_end > last:
            self._room_end[last] = own_end
        elif room:
            self._keep_room(last, room)
        return pages

    def release_room(self, page: int) -> None:
        """Stop keeping free pages after `page` (its holder is done growing)."""
        self._room_end.pop(page, None)

    def free(self, pages: Iterable[int]) -> None:
        """Return pages to the pool; all-or-nothing, `ValueError` on a bad id or a double free."""
        pages = [int(p) for p in pages]
        seen: set[int] = set()
        for page in pages:
            if not 0 < page < self._num_pages:
                raise ValueError(f"cannot free page {page}: valid pages are 1..{self._num_pages - 1}")
            if not self._in_use[page] or page in seen:
                raise ValueError(f"double free of page {page}")
            seen.add(page)
        for page in pages:
            self._room_end.pop(page, None)
        self._in_use[pages] = False
        self._num_free += len(pages)

    def is_free(self, page: int) -> bool:
        """Whether `page` can be handed out (for checks and tests)."""
        return 0 < page < self._num_pages and not self._in_use[page]

    def reset(self) -> None:
        """Mark every usable page free; the caller guarantees nobody holds one."""
        self._in_use[:] = False
        self._in_use[RESERVED_PAGE] = True
        self._num_free = self._num_pages - 1
        self._room_end.clear()

    # -- placement ---------------------------------------------------------------------------

    def _reserved(self) -> np.ndarray:
        """Pages inside some holder's room (all free)."""
        mask = np.zeros(self._num_pages, dtype=np.bool_)
        for holder, end in self._room_end.items():
            mask[holder + 1 : end + 1] = True
        return mask

    def _extend(self, after: int, n: int, own_end: int | None) -> list[int]:
        """Up to `n` free pages right after `after`: its own room, then free pages nobody keeps."""
        reserved = None
        pages: list[int] = []
        page = after + 1
        while len(pages) < n and page < self._num_pages and not self._in_use[page]:
            if own_end is None or page > own_end:
                reserved = self._reserved() if reserved is None else reserved
                if reserved[page]:
                    break
            pages.append(page)
            page += 1
        return pages

    def _take_fresh(self, n: int, room: int) -> list[int]:
        """`n` free pages outside every room: the smallest run that also holds `room` pages
        after them, else the longest runs; pages farthest into the rooms when nothing else is left."""
        open_pages = ~self._in_use & ~self._reserved()
        starts, lengths = _runs(open_pages)
        fits = np.flatnonzero(lengths >= n + room)
        if fits.size:
            best = fits[np.argmin(lengths[fits])]
            return list(range(int(starts[best]), int(starts[best]) + n))
        pages: list[int] = []
        for run in np.argsort(-lengths, kind="stable"):
            take = min(n - len(pages), int(lengths[run]))
            pages += range(int(starts[run]), int(starts[run]) + take)
            if len(pages) == n:
                return pages
        return pages + self._take_from_rooms(n - len(pages))

    def _take_from_rooms(self, n: int) -> list[int]:
        """The `n` reserved pages farthest from their holders; their rooms end before them."""
        holders = np.fromiter(self._room_end, dtype=np.int64)
        ends = np.fromiter(self._room_end.values(), dtype=np.int64)
        sizes = ends - holders
        owner = np.repeat(holders, sizes)
        pages = owner + 1 + np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        taken = np.argsort(owner - pages, kind="stable")[:n]  # farthest into its room first
        first_taken: dict[int, int] = {}
        for holder, page in zip(owner[taken].tolist(), pages[taken].tolist(), strict=True):
            first_taken[holder] = min(page, first_taken.get(holder, page))
        for holder, page in first_taken.items():  # each room keeps the pages before its first taken one
            if page == holder + 1:
                del self._room_end[holder]
            else:
                self._room_end[holder] = page - 1
        return sorted(pages[taken].tolist())

    def _keep_room(self, last: int, room: int) -> None:
        """Keep up to `room` free, unreserved pages right after `last` for its holder."""
        end = min(last + room, self._num_pages - 1)
        reserved = self._reserved()
        page = last + 1
        while page <= end and not self._in_use[page] and not reserved[page]:
            page += 1
        if page > last + 1:
            self._room_end[last] = page - 1


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the runs of True in a 1-D bool array."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    return starts, np.flatnonzero(edges == -1) - starts


def pool_storage_dtype(dtype: Any, platform: str) -> jnp.dtype:
    """The pool arrays' dtype for K/V values of `dtype`: their own, except bfloat16 on a CPU,
    kept as its bits in uint16 (`kernels_pallas/pool_storage.py`: XLA's CPU backend
    copies a whole bfloat16 array to scatter into it)."""
    dtype = jnp.dtype(dtype)
    return BFLOAT16_BITS if dtype == jnp.bfloat16 and platform == "cpu" else dtype


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: Any) -> int:
    """Bytes of K plus V that one token occupies across all layers."""
    itemsize = np.dtype(dtype).itemsize
    return 2 * num_layers * num_kv_heads * head_dim * itemsize


def available_memory_bytes(device: jax.Device | None = None) -> int:
    """Memory free for the KV pool on `device`, read after the weights are loaded.

    CPU devices share the host's memory, so their figure is the host's MemAvailable;
    accelerators report `bytes_limit - bytes_in_use` of their allocator. A backend
    without memory stats falls back to the host figure.
    """
    device = device if device is not None else jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats()
        if stats and "bytes_limit" in stats:
            return max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return host_available_bytes()


def pages_for_budget(
    *,
    page_size: int,
    bytes_per_token: int,
    max_total_tokens: int | None = None,
    mem_fraction_static: float = 0.88,
    device: jax.Device | None = None,
    available_bytes: int | None = None,
) -> int:
    """Number of pages to allocate for the KV pool, the reserved page 0 included.

    With `max_total_tokens` the pool holds exactly that many tokens rounded up to
    whole pages. Otherwise it takes `mem_fraction_static` of the memory available
    now (`available_bytes`, or `available_memory_bytes(device)`), rounded down to
    whole pages. `bytes_per_token` is per device: divide by the tensor-parallel
    degree when KV heads are sharded.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if bytes_per_token < 1:
        raise ValueError(f"bytes_per_token must be >= 1, got {bytes_per_token}")
    if max_total_tokens is not None:
        if max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be >= 1, got {max_total_tokens}")
        return math.ceil(max_total_tokens / page_size) + 1
    if not 0.0 < mem_fraction_static <= 1.0:
        raise ValueError(f"mem_fraction_static must be in (0, 1], got {mem_fraction_static}")
    if available_bytes is None:
        available_bytes = available_memory_bytes(device)
    budget = int(available_bytes * mem_fraction_static)
    usable_pages = budget // (bytes_per_token * page_size)
    if usable_pages < 1:
        raise ValueError(
            f"KV budget of {budget} bytes ({mem_fraction_static} of {available_bytes}) holds no page of "
            f"{page_size} tokens at {bytes_per_token} bytes per token; lower the model size or set "
            "max_total_tokens"
        )
    return usable_pages + 1


class KVPool:
    """The device KV arrays plus the allocator over their pages.

    `k_pool` and `v_pool` are plain attributes because the model runner donates
    them to every step and stores the step's outputs back (`pool.k_pool = new_k`).
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: Any,
        sharding: jax.sharding.Sharding | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = jnp.dtype(dtype)  # of the K/V values
        self.allocator = PageAllocator(num_pages)
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        platform = next(iter(sharding.device_set)).platform if sharding is not None else jax.default_backend()
        storage = pool_storage_dtype(self.dtype, platform)
        self.k_pool: jax.Array = jnp.zeros(shape, storage, device=sharding)
        self.v_pool: jax.Array = jnp.zeros(shape, storage, device=sharding)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Shape of each of `k_pool` and `v_pool`."""
        return (self.num_layers, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def max_total_tokens(self) -> int:
        """Tokens the usable pages can hold (page 0 excluded)."""
        return self.allocator.num_total * self.page_size

    @property
    def nbytes(self) -> int:
        """Device bytes of both arrays together (all shards)."""
        return 2 * math.prod(self.shape) * self.dtype.itemsize
