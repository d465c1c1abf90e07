"""pad_batch: the C++ op against the reference, its errors, and the backend dispatch.

Tests marked ``cpp`` need the compiled ops (prebuilt janus._C or built on first
use); they skip without them, and fail instead when JANUS_REQUIRE_EXT=1 (CI).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ext_helpers import require_extension
from hypothesis import given, settings
from hypothesis import strategies as st

from janus import _ext
from janus.ops import BackendUnavailable, pad_batch, pad_batch_ref
from janus.ops._dispatch import Backend, Op
from janus.ops.pad_batch import PAD_BATCH

REPO = Path(__file__).resolve().parents[1]
PAD, BOS, EOS = 0, 1, 2
SPECIALS = [(BOS, EOS), (-1, EOS), (BOS, -1), (-1, -1)]


@pytest.fixture
def cpp_op():
    """torch.ops.janus.pad_batch, after making sure it is loaded."""
    require_extension()
    return torch.ops.janus.pad_batch


def corpus(
    gen: torch.Generator, sentences: int, max_len: int, flat_dtype=torch.int32, offsets_dtype=torch.int64
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ragged corpus (flat [T], offsets [N + 1]) where about 1 sentence in 5 is empty."""
    lengths = torch.randint(1, max_len + 1, (sentences,), generator=gen)
    lengths[torch.rand(sentences, generator=gen) < 0.2] = 0
    offsets = torch.zeros(sentences + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    flat = torch.randint(5, 32003, (int(offsets[-1]),), generator=gen).to(flat_dtype)
    return flat, offsets.to(offsets_dtype)


# ---------------------------------------------------------------- cpp == reference


@pytest.mark.cpp
@pytest.mark.parametrize("rows", [1, 7, 123])
@pytest.mark.parametrize("bos,eos", SPECIALS)
def test_cpp_matches_reference(cpp_op, rows, bos, eos):
    gen = torch.Generator().manual_seed(rows * 10 + bos + 3 * eos)
    flat, offsets = corpus(gen, sentences=50, max_len=37)
    index = torch.randint(0, 50, (rows,), generator=gen)
    expected = pad_batch_ref(flat, offsets, index, PAD, bos, eos)
    torch.testing.assert_close(cpp_op(flat, offsets, index, PAD, bos, eos), expected, rtol=0, atol=0)


@pytest.mark.cpp
@pytest.mark.parametrize("flat_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cpp_index_dtypes(cpp_op, flat_dtype, offsets_dtype, index_dtype):
    gen = torch.Generator().manual_seed(0)
    flat, offsets = corpus(gen, sentences=20, max_len=9, flat_dtype=flat_dtype, offsets_dtype=offsets_dtype)
    index = torch.randint(0, 20, (7,), generator=gen)
    expected = pad_batch_ref(flat, offsets, index, PAD, BOS, EOS)
    out = cpp_op(flat, offsets, index.to(index_dtype), PAD, BOS, EOS)
    assert out.dtype == torch.int64
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.cpp
@pytest.mark.parametrize("bos,eos", SPECIALS)
def test_cpp_edge_cases(cpp_op, bos, eos):
    flat = torch.tensor([7, 8, 9], dtype=torch.int32)
    offsets = torch.tensor([0, 0, 3, 3])  # sentences: [], [7, 8, 9], []
    cases = [
        torch.tensor([], dtype=torch.int64),  # no rows: [0, specials]
        torch.tensor([0]),  # one empty sentence
        torch.tensor([0, 2, 0]),  # only empty sentences: width = number of specials (maybe 0)
        torch.tensor([1, 1, 0]),  # repeats
    ]
    for index in cases:
        expected = pad_batch_ref(flat, offsets, index, PAD, bos, eos)
        out = cpp_op(flat, offsets, index, PAD, bos, eos)
        assert out.shape == expected.shape, index
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.cpp
@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=12),
    picks=st.lists(st.integers(0, 10**6), max_size=9),
    bos=st.sampled_from([-1, BOS]),
    eos=st.sampled_from([-1, EOS]),
)
def test_cpp_matches_reference_property(lengths, picks, bos, eos):
    require_extension()
    offsets = torch.tensor([0] + lengths).cumsum(0)
    flat = torch.arange(10, 10 + int(offsets[-1]), dtype=torch.int32)
    index = torch.tensor([p % len(lengths) for p in picks], dtype=torch.int64)
    expected = pad_batch_ref(flat, offsets, index, PAD, bos, eos)
    out = torch.ops.janus.pad_batch(flat, offsets, index, PAD, bos, eos)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.cpp
def test_cpp_strided_inputs(cpp_op):
    gen = torch.Generator().manual_seed(1)
    flat, offsets = corpus(gen, sentences=30, max_len=11, flat_dtype=torch.int64)
    index = torch.randint(0, 30, (24,), generator=gen)[::3]  # a non-contiguous view
    assert not index.is_contiguous()
    expected = pad_batch_ref(flat, offsets, index, PAD, BOS, EOS)
    torch.testing.assert_close(cpp_op(flat, offsets, index, PAD, BOS, EOS), expected, rtol=0, atol=0)


@pytest.mark.cpp
def test_cpp_many_rows_parallel(cpp_op):
    # Enough rows for at::parallel_for to split the work across threads.
    gen = torch.Generator().manual_seed(2)
    flat, offsets = corpus(gen, sentences=5000, max_len=60)
    index = torch.randperm(5000, generator=gen)[:4001]
    expected = pad_batch_ref(flat, offsets, index, PAD, BOS, EOS)
    torch.testing.assert_close(cpp_op(flat, offsets, index, PAD, BOS, EOS), expected, rtol=0, atol=0)


@pytest.mark.cpp
@pytest.mark.parametrize("bos,eos", [(BOS, EOS), (-1, -1)])
def test_opcheck(cpp_op, bos, eos):
    gen = torch.Generator().manual_seed(3)
    flat, offsets = corpus(gen, sentences=12, max_len=8)
    index = torch.randint(0, 12, (5,), generator=gen)
    torch.library.opcheck(torch.ops.janus.pad_batch.default, (flat, offsets, index, PAD, bos, eos))


# ---------------------------------------------------------------- bad inputs


def _bad_inputs():
    flat = torch.tensor([5, 6, 7, 8, 9], dtype=torch.int32)
    offsets = torch.tensor([0, 2, 2, 5])
    return [
        ("index out of range", (flat, offsets, torch.tensor([0, 3])), r"index\[1\] = 3 is out of range"),
        ("negative index", (flat, offsets, torch.tensor([-1])), r"index\[0\] = -1 is out of range"),
        ("float flat", (flat.float(), offsets, torch.tensor([0])), r"flat must be int32 or int64, got Float"),
        ("float index", (flat, offsets, torch.tensor([0.0])), r"index must be int32 or int64"),
        (
            "decreasing offsets",
            (flat, torch.tensor([0, 3, 2, 5]), torch.tensor([1])),
            r"non-decreasing.*offsets\[1\] = 3",
        ),
        ("offsets past flat", (flat, torch.tensor([0, 2, 2, 6]), torch.tensor([2])), r"outside flat of length 5"),
        ("2-D flat", (flat.view(1, 5), offsets, torch.tensor([0])), r"flat must be 1-D"),
        ("empty offsets", (flat, torch.tensor([], dtype=torch.int64), torch.tensor([0])), r"offsets must hold"),
    ]


@pytest.mark.cpp
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_cpp_bad_inputs_raise_clear_errors(cpp_op, case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        cpp_op(*args, PAD, BOS, EOS)


@pytest.mark.cpp
def test_public_function_raises_through_dispatch(cpp_op, monkeypatch):
    monkeypatch.delenv("JANUS_BACKEND", raising=False)
    monkeypatch.delenv("JANUS_BACKEND_PAD_BATCH", raising=False)
    flat, offsets = torch.tensor([5, 6], dtype=torch.int32), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="out of range"):
        pad_batch(flat, offsets, torch.tensor([2]), PAD, BOS, EOS)


# ---------------------------------------------------------------- dispatch of pad_batch


@pytest.fixture
def no_forcing(monkeypatch):
    monkeypatch.delenv("JANUS_BACKEND", raising=False)
    monkeypatch.delenv("JANUS_BACKEND_PAD_BATCH", raising=False)
    return monkeypatch


def _small():
    return torch.tensor([5, 6, 7], dtype=torch.int32), torch.tensor([0, 1, 3]), torch.tensor([1, 0])


@pytest.mark.cpp
def test_dispatch_prefers_cpp(no_forcing):
    require_extension()
    assert PAD_BATCH.select(*_small(), PAD, BOS, EOS).name == "cpp"
    torch.testing.assert_close(pad_batch(*_small(), PAD, BOS, EOS), pad_batch_ref(*_small(), PAD, BOS, EOS))


def test_dispatch_forced_reference(no_forcing):
    no_forcing.setenv("JANUS_BACKEND_PAD_BATCH", "reference")
    assert PAD_BATCH.select(*_small(), PAD, BOS, EOS).name == "reference"
    torch.testing.assert_close(pad_batch(*_small(), PAD, BOS, EOS), pad_batch_ref(*_small(), PAD, BOS, EOS))


def test_dispatch_global_force_reference(no_forcing):
    no_forcing.setenv("JANUS_BACKEND", "reference")
    assert PAD_BATCH.select(*_small(), PAD, BOS, EOS).name == "reference"


def test_dispatch_forced_unavailable_raises_with_reason(no_forcing):
    no_forcing.setattr(_ext, "_state", (None, "compiled ops switched off by this test"))
    no_forcing.setenv("JANUS_BACKEND_PAD_BATCH", "cpp")
    with pytest.raises(BackendUnavailable, match="'cpp' forced by JANUS_BACKEND_PAD_BATCH.*switched off by this test"):
        pad_batch(*_small(), PAD, BOS, EOS)


def test_dispatch_falls_back_quietly_and_logs_once(no_forcing, caplog):
    no_forcing.setattr(_ext, "_state", (None, "compiled ops switched off by this test"))
    no_forcing.setattr(PAD_BATCH, "_logged", set())
    with caplog.at_level(logging.INFO, logger="janus.ops._dispatch"):
        for _ in range(3):
            out = pad_batch(*_small(), PAD, BOS, EOS)
    torch.testing.assert_close(out, pad_batch_ref(*_small(), PAD, BOS, EOS))
    messages = [r.getMessage() for r in caplog.records if "pad_batch" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "switched off by this test" in messages[0]


def test_dispatch_unknown_forced_name(no_forcing):
    no_forcing.setenv("JANUS_BACKEND_PAD_BATCH", "cuda")
    with pytest.raises(ValueError, match="has no backend 'cuda'.*'cpp', 'reference'"):
        pad_batch(*_small(), PAD, BOS, EOS)


# ---------------------------------------------------------------- the dispatch machinery itself


def _toy_op(name="toy"):
    def fast(x):
        return ("fast", x)

    def gpu_only(x):
        return ("gpu", x)

    def ref(x):
        return ("reference", x)

    return Op(
        name,
        [
            Backend("gpu", gpu_only, supports=lambda x: (x.device.type == "cuda", f"x is on {x.device}")),
            Backend("fast", fast, available=lambda: (False, "not built")),
            Backend("reference", ref),
        ],
    )


def test_op_walks_priority_list(monkeypatch):
    monkeypatch.delenv("JANUS_BACKEND", raising=False)
    op = _toy_op()
    assert op(torch.zeros(1))[0] == "reference"
    assert op.status() == [("gpu", True, ""), ("fast", False, "not built"), ("reference", True, "")]


def test_op_forced_reasons(monkeypatch):
    op = _toy_op()
    monkeypatch.setenv("JANUS_BACKEND_TOY", "gpu")
    with pytest.raises(BackendUnavailable, match="'gpu'.*unsupported: x is on cpu"):
        op(torch.zeros(1))
    monkeypatch.setenv("JANUS_BACKEND_TOY", "fast")
    with pytest.raises(BackendUnavailable, match="'fast'.*unavailable: not built"):
        op(torch.zeros(1))


def test_op_global_force_skips_ops_without_that_backend(monkeypatch):
    monkeypatch.setenv("JANUS_BACKEND", "triton")
    assert _toy_op()(torch.zeros(1))[0] == "reference"


def test_op_no_backend_fits_lists_every_reason(monkeypatch):
    monkeypatch.delenv("JANUS_BACKEND", raising=False)
    op = Op(
        "picky",
        [
            Backend("fast", lambda x: x, available=lambda: (False, "not built")),
            Backend("reference", lambda x: x, supports=lambda x: (False, "no meta tensors")),
        ],
    )
    with pytest.raises(BackendUnavailable, match="fast: unavailable: not built; reference: unsupported: no meta"):
        op(torch.zeros(1))


def test_triton_available_looks_triton_up_once(monkeypatch):
    """Every dispatch asks its backends' availability: the module search (a walk of sys.path) runs once a
    process; TRITON_INTERPRET is read at every call."""
    import importlib.util

    from janus.ops import _dispatch

    _dispatch._triton_installed.cache_clear()
    calls = []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: calls.append(name) or real(name, *a))
    try:
        first = _dispatch.triton_available()
        for _ in range(3):
            assert _dispatch.triton_available() == first
        assert calls == ["triton"]
        if first[1] != "triton is not installed":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            assert _dispatch.triton_available() == (True, "")
    finally:
        _dispatch._triton_installed.cache_clear()


def test_op_needs_reference_last():
    with pytest.raises(ValueError, match="last backend must be 'reference'"):
        Op("bad", [Backend("reference", print), Backend("fast", print)])


# ---------------------------------------------------------------- on-first-use build


@pytest.mark.cpp
@pytest.mark.slow
def test_build_on_first_use_two_processes(tmp_path):
    """Two processes build into one empty cache: one compiles, the other waits and loads."""
    require_extension()  # a machine that cannot build at all has nothing to test here
    script = textwrap.dedent(
        """
        import torch
        from janus import _ext
        path, how = _ext._build_or_find()
        torch.ops.load_library(str(path))
        f = torch.tensor([4, 5, 6], dtype=torch.int32)
        out = torch.ops.janus.pad_batch(f, torch.tensor([0, 1, 3]), torch.tensor([1, 0]), 0, 1, 2)
        assert out.tolist() == [[1, 5, 6, 2], [1, 4, 2, 0]], out
        print(how)
        """
    )
    env = dict(os.environ, JANUS_CACHE_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    for _, err, rc in results:
        assert rc == 0, err
    hows = sorted(out.strip() for out, _, _ in results)
    assert sum(h.startswith("built on first use in") for h in hows) == 1, hows
    assert len(list(tmp_path.glob("ext/*/janus_ops.so"))) == 1
