"""cache_reorder (csrc/cpu/cache_reorder.cpp) against its reference: random reorders with repeated and swapped
rows, every length, bf16, the columns past the length and the rows that stay untouched; named errors;
dispatch; and beam search through it equal to beam search through torch's index ops."""

from __future__ import annotations

import pytest
import torch
from ext_helpers import require_kernel

from janus.config import preset
from janus.decoding import beam_search
from janus.model import JanusModel, KVCache
from janus.ops.cache_reorder import CACHE_REORDER, _fits_cpp, cache_reorder, cache_reorder_ref


@pytest.fixture(autouse=True)
def _kernel():
    require_kernel("cache_reorder", "cpu")


def oracle(cache, order, length):
    """Row by row, from a copy of the cache before the move."""
    out, old = cache.clone(), cache.clone()
    for n, h in enumerate(order):
        out[:, n, :, :length] = old[:, h, :, :length]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(6))
def test_matches_the_oracle_and_the_reference(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    N = 1 + seed % 6
    cache = torch.randn(3, N, 4, 9, 8, generator=g).to(dtype)
    for order in ([int(i) for i in torch.randint(0, N, (N,), generator=g)], list(range(N))[::-1], list(range(N))):
        for length in (0, 1, 5, 9):
            want = oracle(cache, order, length)
            kernel, ref = cache.clone(), cache.clone()
            torch.ops.janus.cache_reorder(kernel, order, length)
            cache_reorder_ref(ref, order, length)
            assert torch.equal(kernel, want) and torch.equal(ref, want), (order, length)


def test_a_view_of_a_joint_buffer():
    """KVCache's joint buffer (layers, 2, N, H, capacity, dk) viewed as (layers * 2, N, H, capacity, dk)."""
    joint = torch.randn(2, 2, 5, 3, 12, 4)
    order = [0, 0, 1, 2, 2]
    want = oracle(joint.view(4, 5, 3, 12, 4), order, 7)
    cache_reorder(joint.view(4, 5, 3, 12, 4), order, 7)
    assert torch.equal(joint.view(4, 5, 3, 12, 4), want)


def test_bad_arguments_are_named():
    cache = torch.randn(2, 3, 2, 5, 4)
    with pytest.raises(ValueError, match=r"order has 2 entries for the cache's 3 rows"):
        torch.ops.janus.cache_reorder(cache, [0, 1], 2)
    with pytest.raises(ValueError, match=r"order\[1\]=3 is not a row of the cache's 3"):
        torch.ops.janus.cache_reorder(cache, [0, 3, 1], 2)
    with pytest.raises(ValueError, match=r"length=6 is outside \[0, 5\]"):
        torch.ops.janus.cache_reorder(cache, [0, 1, 2], 6)
    with pytest.raises(ValueError, match="5-dim"):
        torch.ops.janus.cache_reorder(torch.randn(3, 5, 4), [0, 1, 2], 2)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.janus.cache_reorder(cache.transpose(3, 4), [0, 1, 2], 2)
    with pytest.raises(ValueError, match=r"length=6 is outside \[0, 5\]"):
        cache_reorder_ref(cache, [0, 1, 2], 6)


def test_dispatch():
    cache = torch.randn(2, 3, 2, 5, 4)
    assert _fits_cpp(cache, [0, 1, 2], 2)[0] is True
    assert CACHE_REORDER.select(cache, [0, 1, 2], 2).name == "cpp"
    assert _fits_cpp(cache.transpose(3, 4), [0, 1, 2], 2)[0] is False
    assert CACHE_REORDER.select(cache.transpose(3, 4), [0, 1, 2], 2).name == "reference"
    strided = cache.transpose(3, 4)
    want = oracle(strided, [2, 2, 0], 3)
    cache_reorder(strided, [2, 2, 0], 3)
    assert torch.equal(strided, want)


def test_opcheck():
    torch.library.opcheck(torch.ops.janus.cache_reorder.default, (torch.randn(2, 3, 2, 5, 4), [1, 1, 0], 3))


def test_kv_cache_select_takes_host_ints():
    cache = KVCache(capacity=6)
    cache.prepare(2, 4, 2, 3, torch.zeros(1))
    cache.joint.normal_()
    cache.length = 4
    before = cache.joint.clone()
    cache.select([1, 1, 3, 2])
    for n, h in enumerate([1, 1, 3, 2]):
        assert torch.equal(cache.joint[:, :, n, :, :4], before[:, :, h, :, :4])
    assert torch.equal(cache.joint[..., 4:, :], before[..., 4:, :])
    cache.select([3, 0])  # fewer rows: a new buffer
    assert cache.joint.shape[2] == 2 and torch.equal(cache.joint[:, :, 1, :, :4], before[:, :, 1, :, :4])


@pytest.mark.parametrize("seed", [0, 1])
def test_beam_search_through_the_kernel_equals_the_index_ops(monkeypatch, seed):
    torch.manual_seed(seed)
    model = JanusModel(preset("tiny", vocab_size=60)).eval()
    src = torch.randint(5, 60, (3, 7))
    calls = []
    real = torch.ops.janus.cache_reorder
    monkeypatch.setattr(torch.ops.janus, "cache_reorder", lambda *a: calls.append(1) or real(*a), raising=False)
    runs = {}
    for force in ("cpp", "reference"):
        monkeypatch.setenv("JANUS_BACKEND_CACHE_REORDER", force)
        runs[force] = [beam_search(model, src[i : i + 1], beam=4, max_len_a=1.0, max_len_b=6)[0] for i in range(3)]
        if force == "cpp":
            used = len(calls)
    assert used > 0 and len(calls) == used
    assert [h.ids for h in runs["cpp"]] == [h.ids for h in runs["reference"]]
    assert [h.score for h in runs["cpp"]] == [h.score for h in runs["reference"]]
