"""PageAllocator, pool sizing and KVPool: fast, pure host checks plus one small device pool."""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.pool_storage import from_pool, to_pool
from runtime.kv_pool import (
    KVPool,
    PageAllocator,
    available_memory_bytes,
    kv_bytes_per_token,
    pages_for_budget,
    pool_storage_dtype,
)


def test_allocator_never_hands_out_page_zero():
    allocator = PageAllocator(9)
    assert allocator.num_total == 8 and allocator.num_free == 8
    pages = allocator.alloc(8)
    assert pages is not None and sorted(pages) == list(range(1, 9))
    assert allocator.num_free == 0
    assert allocator.alloc(1) is None


def test_allocator_all_or_nothing():
    allocator = PageAllocator(6)
    first = allocator.alloc(3)
    assert first == [1, 2, 3]
    assert allocator.alloc(3) is None
    assert allocator.num_free == 2  # the failed request took nothing
    assert allocator.alloc(2) == [4, 5]
    assert allocator.alloc(0) == []
    with pytest.raises(ValueError):
        allocator.alloc(-1)


def test_allocator_free_detects_bugs_and_is_atomic():
    allocator = PageAllocator(5)
    pages = allocator.alloc(2)
    assert pages == [1, 2]
    allocator.free([1])
    with pytest.raises(ValueError, match="double free"):
        allocator.free([1])
    with pytest.raises(ValueError, match="double free"):
        allocator.free([2, 2])
    with pytest.raises(ValueError, match="valid pages"):
        allocator.free([0])
    with pytest.raises(ValueError, match="valid pages"):
        allocator.free([5])
    with pytest.raises(ValueError):
        allocator.free([2, 3])  # 3 was never allocated: 2 must stay allocated
    assert not allocator.is_free(2) and allocator.num_free == 3
    allocator.free([2])
    assert allocator.num_free == 4
    assert not allocator.is_free(0)


def test_allocator_reset_and_random_churn():
    rng = random.Random(0)
    allocator = PageAllocator(33)
    held: list[int] = []
    for _ in range(500):
        if held and rng.random() < 0.5:
            rng.shuffle(held)
            count = rng.randint(1, len(held))
            allocator.free(held[:count])
            del held[:count]
        else:
            got = allocator.alloc(rng.randint(0, 10))
            if got is not None:
                held.extend(got)
        assert len(set(held)) == len(held) and 0 not in held
        assert allocator.num_free + len(held) == allocator.num_total
        assert all(not allocator.is_free(p) for p in held)
    allocator.reset()
    assert allocator.num_free == 32
    assert allocator.alloc(2) == [1, 2]


def test_rows_growing_together_keep_contiguous_pages():
    # Eight sequences admitted at once, each expecting 6 more pages, then growing one page
    # at a time in turn (as decode rows do): every sequence's pages follow each other.
    allocator = PageAllocator(1 + 8 * 8 + 5)
    seqs = [allocator.alloc(2, room=6) for _ in range(8)]
    for _ in range(6):
        for pages in seqs:
            pages += allocator.alloc(1, after=pages[-1], room=0)
    for pages in seqs:
        assert pages == list(range(pages[0], pages[0] + 8))
    assert len({p for pages in seqs for p in pages}) == 64


def test_rooms_are_soft_and_give_their_farthest_pages_first():
    allocator = PageAllocator(1 + 20)
    a = allocator.alloc(2, room=8)  # pages 1-2, room 3-10
    b = allocator.alloc(2, room=8)  # a fresh run outside a's room: 11-12, room 13-20
    assert a == [1, 2] and b == [11, 12]
    assert allocator.num_free == 16  # rooms stay free pages
    # Nothing outside the rooms is left: the pages farthest into the rooms go first.
    other = allocator.alloc(4)
    assert other == [9, 10, 19, 20]
    assert allocator.alloc(1, after=a[-1]) == [3]  # a's room still starts right after it
    assert allocator.alloc(1, after=b[-1]) == [13]
    rest = allocator.alloc(allocator.num_free)
    assert rest is not None and sorted(rest) == [4, 5, 6, 7, 8, 14, 15, 16, 17, 18]
    assert allocator.alloc(1) is None


def test_a_room_is_kept_from_others_until_released():
    allocator = PageAllocator(1 + 12)
    mine = allocator.alloc(1, room=4)  # page 1, room 2-5
    neighbour = allocator.alloc(1, after=None)
    assert neighbour == [6]  # the smallest free run outside the room
    assert allocator.alloc(1, after=neighbour[-1]) == [7]
    allocator.release_room(mine[-1])
    assert allocator.alloc(4) == [2, 3, 4, 5]  # released: the smallest run that fits


def test_extension_stops_at_another_holders_room():
    allocator = PageAllocator(1 + 10)
    first = allocator.alloc(1)  # page 1
    second = allocator.alloc(1, room=3)  # smallest run holding 1 + 3 pages: 2-10 -> page 2, room 3-5
    assert first == [1] and second == [2]
    allocator.free(first)
    mine = allocator.alloc(1)  # page 1 again
    grown = allocator.alloc(2, after=mine[-1])  # page 2 is taken, so a fresh run after the room
    assert mine == [1] and grown == [6, 7]
    allocator.free(second)  # freeing the holder drops its room: 2-5 is one free run again
    assert allocator.alloc(3) == [8, 9, 10]  # the smallest run that fits
    assert allocator.alloc(4) == [2, 3, 4, 5]


def test_allocator_churn_with_placement_hints():
    rng = random.Random(1)
    allocator = PageAllocator(65)
    held: list[list[int]] = []
    for _ in range(2000):
        roll = rng.random()
        if held and roll < 0.3:
            seq = held.pop(rng.randrange(len(held)))
            if rng.random() < 0.5:
                allocator.release_room(seq[-1])
            allocator.free(seq)
        elif held and roll < 0.7:
            seq = rng.choice(held)
            got = allocator.alloc(rng.randint(0, 3), after=seq[-1], room=rng.randint(0, 8))
            if got is not None:
                seq += got
        else:
            got = allocator.alloc(rng.randint(1, 6), room=rng.randint(0, 12))
            if got is not None:
                held.append(got)
        flat = [p for seq in held for p in seq]
        assert len(set(flat)) == len(flat) and 0 not in flat
        assert allocator.num_free + len(flat) == allocator.num_total
        assert all(not allocator.is_free(p) for p in flat)
        assert allocator.alloc(allocator.num_free + 1) is None
    rest = allocator.alloc(allocator.num_free)  # rooms never keep a page from a caller who needs it
    assert rest is not None and allocator.num_free == 0


def test_kv_bytes_per_token():
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64: about 46 KB per token in float32.
    assert kv_bytes_per_token(30, 3, 64, jnp.float32) == 2 * 30 * 3 * 64 * 4 == 46080
    assert kv_bytes_per_token(30, 3, 64, jnp.bfloat16) == 23040
    assert kv_bytes_per_token(2, 1, 8, np.float16) == 64


def test_pages_for_budget_max_total_tokens_rounds_up():
    assert pages_for_budget(page_size=16, bytes_per_token=100, max_total_tokens=500) == 32 + 1
    assert pages_for_budget(page_size=16, bytes_per_token=100, max_total_tokens=512) == 32 + 1
    assert pages_for_budget(page_size=1, bytes_per_token=100, max_total_tokens=7) == 8
    with pytest.raises(ValueError):
        pages_for_budget(page_size=16, bytes_per_token=100, max_total_tokens=0)


def test_pages_for_budget_from_memory_fraction():
    # 0.5 of 1 MiB at 64 bytes per token in pages of 16 tokens: 512 usable pages.
    pages = pages_for_budget(
        page_size=16, bytes_per_token=64, mem_fraction_static=0.5, available_bytes=1 << 20
    )
    assert pages == 512 + 1
    with pytest.raises(ValueError, match="holds no page"):
        pages_for_budget(page_size=16, bytes_per_token=64, mem_fraction_static=0.5, available_bytes=1000)
    with pytest.raises(ValueError):
        pages_for_budget(page_size=16, bytes_per_token=64, mem_fraction_static=1.5, available_bytes=1 << 20)


def test_available_memory_on_cpu_reads_meminfo():
    available = available_memory_bytes(jax.devices("cpu")[0])
    assert available > 0
    pages = pages_for_budget(page_size=16, bytes_per_token=46080, mem_fraction_static=0.01)
    assert pages >= 2


def test_kv_pool_arrays():
    pool = KVPool(num_layers=2, num_pages=5, page_size=4, num_kv_heads=2, head_dim=8, dtype=jnp.bfloat16)
    assert pool.k_pool.shape == pool.v_pool.shape == (2, 5, 4, 2, 8) == pool.shape
    assert pool.dtype == jnp.bfloat16
    # on a CPU the bfloat16 values are kept as their bits (XLA's CPU scatter copies a bfloat16 array)
    assert pool.k_pool.dtype == pool_storage_dtype(jnp.bfloat16, jax.default_backend())
    assert pool_storage_dtype(jnp.bfloat16, "cpu") == jnp.uint16
    assert pool_storage_dtype(jnp.bfloat16, "gpu") == jnp.bfloat16
    assert pool_storage_dtype(jnp.float32, "cpu") == jnp.float32
    assert not bool(jnp.any(pool.k_pool)) and not bool(jnp.any(pool.v_pool))
    assert pool.max_total_tokens == 4 * 4
    assert pool.allocator.num_total == 4
    assert pool.nbytes == 2 * 2 * 5 * 4 * 2 * 8 * 2
    # The runner swaps the arrays after each donated step.
    pool.k_pool = pool.k_pool.at[0, 1].set(to_pool(jnp.full((4, 2, 8), 1.5), pool.k_pool.dtype))
    assert from_pool(pool.k_pool[0, 1]).dtype == jnp.bfloat16
    assert float(from_pool(pool.k_pool[0, 1]).astype(jnp.float32).sum()) == 1.5 * 4 * 2 * 8


def test_kv_pool_with_sharding():
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    pool = KVPool(1, 3, 2, 1, 4, jnp.float32, sharding=sharding)
    assert pool.k_pool.sharding == sharding and pool.v_pool.sharding == sharding
