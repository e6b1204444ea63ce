"""The CPU buffer pool: a block is reused only when no tensor refers to it any more."""
import pytest
import torch

from einc.runtime import buffers

BIG = (512, 1024)  # 2 MiB of float32, above buffers.MIN_BYTES


@pytest.fixture(autouse=True)
def fresh_pool():
    buffers.empty_cache()
    yield
    buffers.empty_cache()


def test_idle_block_is_reused_and_aligned():
    t = buffers.empty(BIG, torch.float32, "cpu")
    assert t.shape == BIG and t.is_contiguous() and t.data_ptr() % 64 == 0
    ptr = t.data_ptr()
    del t
    u = buffers.empty(BIG, torch.float32, "cpu")
    assert u.data_ptr() == ptr


def test_block_referenced_by_a_view_is_not_reused():
    t = buffers.empty(BIG, torch.float32, "cpu")
    view = t[3:, 5:].T
    ptr = t.data_ptr()
    del t
    u = buffers.empty(BIG, torch.float32, "cpu")
    assert u.data_ptr() != ptr
    u.fill_(1.0)
    view.fill_(2.0)
    assert (u == 1.0).all()


def test_small_requests_and_other_dtypes():
    small = buffers.empty((4, 4), torch.float32, "cpu")
    assert small.shape == (4, 4)
    held = buffers.held()
    assert buffers.empty((8,), torch.float64, "cpu").numel() == 8
    assert buffers.held() == held  # small requests bypass the pool
    b16 = buffers.empty(BIG, torch.bfloat16, "cpu")
    assert b16.dtype == torch.bfloat16 and b16.shape == BIG


def test_limit_and_empty_cache():
    old = buffers.limit()
    try:
        buffers.limit(3 << 20)
        a = buffers.empty(BIG, torch.float32, "cpu")
        b = buffers.empty(BIG, torch.float32, "cpu")  # over the limit: an ordinary tensor
        assert buffers.held() <= 3 << 20
        assert a.shape == b.shape == BIG
        del b
        assert buffers.empty_cache() == 0  # a is still in use
        del a
        assert buffers.empty_cache() > 0 and buffers.held() == 0
        with pytest.raises(ValueError, match=">= 0"):
            buffers.limit(-1)
    finally:
        buffers.limit(old)


def test_threads_never_share_a_live_block():
    import threading
    held, errors = [], []

    def worker(k):
        for _ in range(50):
            t = buffers.empty(BIG, torch.float32, "cpu")
            t.fill_(k)
            if not bool((t == k).all()):
                errors.append(k)
            held.append(t) if len(held) < 8 else None
            del t

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    ptrs = [t.data_ptr() for t in held]
    assert len(set(ptrs)) == len(ptrs)


def test_sizes_share_a_class_and_the_limit_evicts_idle_blocks():
    old = buffers.limit()
    try:
        t = buffers.empty((500, 1024), torch.float32, "cpu")
        ptr = t.data_ptr()
        del t
        u = buffers.empty((510, 1024), torch.float32, "cpu")  # same size class: reused
        assert u.data_ptr() == ptr
        del u
        need = buffers._size_class(900 * 1024 * 4 + 64)
        buffers.limit(need + 1024)  # room for the new block only once the idle one is gone
        assert buffers.held() + need > buffers.limit()
        v = buffers.empty((900, 1024), torch.float32, "cpu")
        assert buffers.held() == need  # the idle block was dropped, v came from the pool
        assert [len(b) for b in buffers._blocks.values() if b] == [1]
        buffers.limit(0)
        w = buffers.empty((900, 1024), torch.float32, "cpu")  # v is busy: an ordinary tensor
        assert w.data_ptr() != v.data_ptr() and buffers.held() == need
    finally:
        buffers.limit(old)


def test_varying_sizes_do_not_grow_the_pool_without_bound():
    def steps():
        for step in range(200):
            n = 300 + (step * 37) % 500  # rows vary every call, like MoE chunk lengths
            a = buffers.empty((n, 1024), torch.float32, "cpu")
            b = buffers.empty((n, 512), torch.float32, "cpu")
            del a, b
    steps()
    first = buffers.held()
    steps()
    assert buffers.held() == first < 32 << 20  # one block per size class, reused


def test_pooled_tensors_are_not_views_so_autograd_sums_into_them():
    """A gradient returned in a pooled tensor is the buffer autograd adds the other
    gradients of the same input into, in place (a view's storage has two owners, which
    makes autograd add out of place into fresh memory)."""
    x = torch.randn(256, 512, requires_grad=True)
    ours = []

    class Pooled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            out = buffers.empty(list(g.shape), g.dtype, g.device).copy_(g)
            ours.append(out.data_ptr())
            return out

    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(g.data_ptr())
            return g

    h = Probe.apply(x)
    assert not buffers.empty([256, 512], torch.float32, "cpu")._is_view()
    (h * 2 + Pooled.apply(h)).sum().backward()  # Pooled's gradient reaches h first
    assert seen == ours
