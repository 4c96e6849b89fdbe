"""The page pool's refcounts and free list."""

from __future__ import annotations

import time

import pytest
import torch

from symphony.engine.errors import OutOfPagesError
from symphony.engine.page_pool import PagePool


def make_pool(num_pages: int = 8) -> PagePool:
    return PagePool(2, num_pages, 4, 2, 8, torch.float32, "cpu")


def test_allocate_incref_decref_frees_at_zero():
    pool = make_pool()
    pages = pool.allocate(3)
    assert pool.num_used == 3 and pool.num_free == 5
    pool.incref(pages[:1])
    assert pool.decref(pages) == pages[1:]
    assert pool.decref(pages[:1]) == pages[:1]
    assert pool.num_used == 0
    pool.check_invariants()


def test_out_of_pages_takes_nothing():
    pool = make_pool(4)
    pool.allocate(3)
    with pytest.raises(OutOfPagesError):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.check_invariants()


def test_double_free_is_refused():
    pool = make_pool()
    page = pool.allocate(1)
    pool.decref(page)
    with pytest.raises(ValueError):
        pool.decref(page)
    with pytest.raises(ValueError):
        pool.incref(page)
    pool.check_invariants()


def test_copy_page_copies_the_leading_slots_of_every_layer():
    pool = make_pool()
    src, dst = pool.allocate(2)
    for cache in (*pool.k_cache, *pool.v_cache):
        cache[src] = torch.randn_like(cache[src])
    pool.copy_page(src, dst, num_tokens=3)
    for cache in (*pool.k_cache, *pool.v_cache):
        assert torch.equal(cache[dst, :3], cache[src, :3])
        assert not cache[dst, 3].any()


def test_bytes_per_page():
    # 2 layers x (K and V) x 4 slots x 2 heads x 8 dims x 4 bytes
    assert make_pool().bytes_per_page == 2 * 2 * 4 * 2 * 8 * 4


def test_a_reused_page_holds_nothing_of_its_last_user(tiny_engine):
    """Pages holding NaN (however they got there) go back to the pool; whoever takes
    one next must not read the NaN in its slots no token has filled yet, which batched
    decode attention reads, masked."""
    import math

    import torch

    from symphony.engine.batch import SeqChunk

    engine = tiny_engine
    pool = engine.pool
    poisoned = pool.allocate(2)
    for cache in (*pool.k_cache, *pool.v_cache):
        cache[poisoned] = math.nan
    pool.decref(poisoned)
    short = pool.allocate(1)  # a poisoned page again, most likely: the free list is a stack
    assert short[0] in poisoned
    long = pool.allocate(3)
    engine.step([SeqChunk([1], 0, short, num_logits=0), SeqChunk(list(range(1, 11)), 0, long, 0)])
    logits = engine.step([SeqChunk([2], 1, short), SeqChunk([3], 10, long)])
    assert bool(torch.isfinite(logits).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_page_read_waits_for_its_writer_and_nothing_else():
    """A page written before a long-running kernel reads back at once; one written
    after it reads back what was written, once the kernel is done."""
    pool = PagePool(2, 8, 16, 2, 64, torch.bfloat16, "cuda")
    early, late = pool.allocate(2)
    pool.k_cache[0][early].fill_(1.0)
    pool.mark_written([early])
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued on the compute stream
    pool.k_cache[0][late].fill_(2.0)
    pool.mark_written([late])
    t0 = time.perf_counter()
    data = pool.page_bytes(early)
    assert time.perf_counter() - t0 < 0.2  # not behind the queued kernel
    one, two = (torch.tensor([v], dtype=torch.bfloat16).view(torch.uint8) for v in (1.0, 2.0))
    assert data[:2] == one.numpy().tobytes()
    assert pool.page_bytes(late)[:2] == two.numpy().tobytes()
