"""janus.data: prepare, shards, masking, token-budget batching, update dealing."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from janus.config import PrepareConfig, SpecialIds, TrainConfig
from janus.data import (
    MANIFEST,
    Batch,
    Dataset,
    Masking,
    atomic_write,
    collate,
    iterate_batches,
    iterate_updates,
    make_batches,
    mask_rng,
    num_updates,
    prepare,
    read_lines,
    span_mask,
    uniform_mask,
)
from janus.vocab import Vocab

try:
    from data_helpers import make_pairs, write_corpus, write_text
except ImportError:  # tests/ imported as a package
    from tests.data_helpers import make_pairs, write_corpus, write_text

SP = SpecialIds()
MAX_LEN = 80  # synthetic sentences have <= 10 words of <= 6 letters: at most 70 pieces
EMPTY_SRC_LINE, EMPTY_TGT_LINE, LONG_LINE = 3, 7, 10  # 1-based lines of the training text


def _corpus_pairs():
    train = make_pairs(400, seed=1)
    train[EMPTY_SRC_LINE - 1] = ("   ", train[EMPTY_SRC_LINE - 1][1])
    train[EMPTY_TGT_LINE - 1] = (train[EMPTY_TGT_LINE - 1][0], "")
    long_src, long_tgt = zip(*make_pairs(12, seed=99, min_words=10, max_words=10), strict=True)
    train[LONG_LINE - 1] = (" ".join(long_src), " ".join(long_tgt))  # 120 words > MAX_LEN tokens
    return {"train": train, "valid": make_pairs(40, seed=2), "test": make_pairs(30, seed=3)}


def _config(corpus: Path, dest: Path, **kw) -> PrepareConfig:
    base = dict(
        src="xx",
        tgt="yy",
        trainpref=str(corpus / "train"),
        validpref=str(corpus / "valid"),
        testpref=str(corpus / "test"),
        destdir=str(dest),
        vocab_size=100,
        max_len=MAX_LEN,
        threads=1,
    )
    base.update(kw)
    return PrepareConfig(**base)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A prepared synthetic corpus: (corpus folder, destdir, raw pairs, manifest)."""
    root = tmp_path_factory.mktemp("small")
    pairs = _corpus_pairs()
    corpus = write_corpus(root / "raw", pairs)
    # CRLF terminators on one file: only the terminator may be stripped.
    write_text(corpus / "valid.yy", [t for _, t in pairs["valid"]], newline="\r\n")
    manifest = prepare(_config(corpus, root / "bin"), verbose=False)
    return corpus, root / "bin", pairs, manifest


@pytest.fixture(scope="module")
def train(small):
    return Dataset(small[1], "train")


# ====================================================================== prepare


def test_prepare_writes_shards_and_manifest(small):
    _, dest, pairs, manifest = small
    for split in ("train", "valid", "test"):
        for name in (f"{split}.xx.bin", f"{split}.xx.idx", f"{split}.yy.bin", f"{split}.yy.idx", f"{split}.lines"):
            assert (dest / name).is_file(), name
    assert (dest / "spm.model").is_file()
    on_disk = json.loads((dest / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["vocab"] == "spm.model" and manifest["vocab_size"] == 100
    assert manifest["specials"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "mask": 4}
    assert manifest["config"]["max_len"] == MAX_LEN
    assert manifest["splits"]["valid"]["kept"] == len(pairs["valid"])
    assert manifest["splits"]["test"]["pairs"] == len(pairs["test"])
    assert len(manifest["inputs_sha256"]) == 6
    assert all(len(h) == 64 for h in manifest["inputs_sha256"].values())
    # nothing temporary is left behind
    assert not [p.name for p in dest.iterdir() if p.name.startswith(".")]


def test_shards_hold_the_encoding_of_the_raw_lines(small):
    corpus, dest, _, _ = small
    vocab = Vocab(dest / "spm.model")
    for split in ("train", "valid"):
        ds = Dataset(dest, split)
        raw_src, _ = read_lines(corpus / f"{split}.xx")
        raw_tgt, _ = read_lines(corpus / f"{split}.yy")
        src_ids = vocab.encode([raw_src[ln - 1] for ln in ds.lines])
        tgt_ids = vocab.encode([raw_tgt[ln - 1] for ln in ds.lines])
        for i in range(len(ds)):
            assert ds.src(i).tolist() == src_ids[i]
            assert ds.tgt(i).tolist() == tgt_ids[i]
        assert ds.src(0).dtype == np.int32
        assert vocab.decode(ds.tgt(5)) == raw_tgt[ds.lines[5] - 1]
        assert ds.src_lengths.dtype == np.int64
        assert ds.src_lengths.tolist() == [len(x) for x in src_ids]
        assert int(ds.tgt_lengths.sum()) == ds.info["tgt_tokens"]


def test_crlf_terminators_are_stripped(small):
    corpus, dest, pairs, _ = small
    assert (corpus / "valid.yy").read_bytes().count(b"\r\n") == len(pairs["valid"])
    lines, _ = read_lines(corpus / "valid.yy")
    assert lines == [t for _, t in pairs["valid"]]
    vocab = Vocab(dest / "spm.model")
    ds = Dataset(dest, "valid")
    assert vocab.decode(ds.tgt(0)) == pairs["valid"][0][1]


def test_empty_and_long_pairs_are_filtered_and_counted(small, train):
    _, _, pairs, manifest = small
    info = manifest["splits"]["train"]
    assert info["pairs"] == len(pairs["train"]) == 400
    assert info["filtered"] == {"empty": 2, "too_long": 1}
    assert info["kept"] == 400 - 3 == len(train)
    assert info["src_max_len"] <= MAX_LEN and info["tgt_max_len"] <= MAX_LEN
    # .lines maps kept pairs to their original line numbers, skipping the filtered ones
    expected = [ln for ln in range(1, 401) if ln not in (EMPTY_SRC_LINE, EMPTY_TGT_LINE, LONG_LINE)]
    assert train.lines.tolist() == expected
    assert manifest["splits"]["valid"]["filtered"] == {"empty": 0, "too_long": 0}


def test_summary_lines(tmp_path, small, capsys):
    corpus = small[0]
    manifest = prepare(_config(corpus, tmp_path / "bin", validpref="", testpref=""), verbose=True)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith("train: 400 pairs read, 397 kept, 3 filtered")
    assert out[1].startswith("prepared ") and out[1].endswith(" s")
    assert "empty 2" in out[0] and "too long 1" in out[0]
    assert set(manifest["splits"]) == {"train"}
    assert not (tmp_path / "bin" / "valid.lines").exists()


def test_mismatched_line_counts(tmp_path):
    pairs = make_pairs(10)
    write_corpus(tmp_path, {"train": pairs})
    write_text(tmp_path / "train.yy", [t for _, t in pairs[:8]])
    cfg = _config(tmp_path, tmp_path / "bin", validpref="", testpref="")
    with pytest.raises(ValueError) as err:
        prepare(cfg, verbose=False)
    msg = str(err.value)
    assert str(tmp_path / "train.xx") in msg and str(tmp_path / "train.yy") in msg
    assert "10" in msg and "8" in msg


def test_non_utf8_names_file_and_line(tmp_path):
    pairs = make_pairs(6)
    write_corpus(tmp_path, {"train": pairs})
    raw = (tmp_path / "train.yy").read_bytes().split(b"\n")
    raw[2] = raw[2][:2] + b"\xff" + raw[2][2:]
    (tmp_path / "train.yy").write_bytes(b"\n".join(raw))
    with pytest.raises(ValueError) as err:
        prepare(_config(tmp_path, tmp_path / "bin", validpref="", testpref=""), verbose=False)
    msg = str(err.value)
    assert str(tmp_path / "train.yy") in msg
    assert "line 3" in msg
    offset = len(raw[0]) + len(raw[1]) + 2 + 2
    assert f"byte offset {offset}" in msg


def test_failed_prepare_leaves_no_manifest(tmp_path, small):
    corpus = small[0]
    dest = tmp_path / "bin"
    prepare(_config(corpus, dest, validpref="", testpref=""), verbose=False)
    assert (dest / MANIFEST).is_file()
    # Bad input is found before the folder is touched: the finished folder stays usable.
    with pytest.raises(FileNotFoundError):
        prepare(_config(corpus, dest, validpref=str(corpus / "missing")), verbose=False)
    assert (dest / MANIFEST).is_file() and len(Dataset(dest, "train")) > 0
    # A failure once the folder is being rewritten leaves it without a manifest: not a finished folder.
    write_corpus(tmp_path / "empty", {"train": [(" ", "x")] * 5})
    with pytest.raises(ValueError, match="no training pair is left"):
        prepare(_config(tmp_path / "empty", dest, validpref="", testpref=""), verbose=False)
    assert not (dest / MANIFEST).exists()
    with pytest.raises(FileNotFoundError, match="janus prepare"):
        Dataset(dest, "train")


def test_failed_prepare_leaves_no_half_made_folder(tmp_path):
    write_corpus(tmp_path / "raw", {"train": [(" ", "x")] * 5})  # no training pair survives
    cfg = _config(tmp_path / "raw", tmp_path / "new" / "bin", validpref="", testpref="")
    with pytest.raises(ValueError, match="no training pair is left"):
        prepare(cfg, verbose=False)
    assert not (tmp_path / "new" / "bin").exists()
    given = tmp_path / "given"
    given.mkdir()
    with pytest.raises(ValueError, match="no training pair is left"):
        prepare(dataclasses.replace(cfg, destdir=str(given)), verbose=False)
    assert given.is_dir() and not any(given.iterdir())  # the empty folder it was given, as it was


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write(target, np.arange(5, dtype=np.int64))
    assert np.fromfile(target, dtype=np.int64).tolist() == [0, 1, 2, 3, 4]
    atomic_write(target, "text ü")
    assert target.read_text(encoding="utf-8") == "text ü"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"

    with pytest.raises(TypeError):
        atomic_write(target, object())  # type: ignore[arg-type]
    # the failed write neither left a temp file nor touched the old content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    assert target.read_bytes() == b"\x00\x01"


def test_corrupt_shard_is_named(tmp_path, small):
    dest = tmp_path / "bin"
    shutil.copytree(small[1], dest)
    bin_path = dest / "train.yy.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"train\.yy\.bin.*corrupt or short"):
        Dataset(dest, "train")
    (dest / "valid.xx.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"valid\.xx\.idx"):
        Dataset(dest, "valid")
    with pytest.raises(KeyError, match="nosuch"):
        Dataset(dest, "nosuch")


def test_dataset_tensors(train):
    assert train.src_flat.dtype == torch.int32 and train.src_offsets.dtype == torch.int64
    assert train.src_offsets.numel() == len(train) + 1
    assert int(train.tgt_offsets[-1]) == train.tgt_flat.numel()
    i = 17
    a, b = int(train.tgt_offsets[i]), int(train.tgt_offsets[i + 1])
    assert train.tgt_flat[a:b].tolist() == train.tgt(i).tolist()


# ====================================================================== real corpus


@pytest.fixture(scope="module")
def real(shared_data, tmp_path_factory):
    corpus = shared_data / "libreoffice-de-en"
    dest = tmp_path_factory.mktemp("real")
    cfg = PrepareConfig(
        src="de",
        tgt="en",
        trainpref=str(corpus / "train"),
        validpref=str(corpus / "valid"),
        testpref=str(corpus / "test"),
        destdir=str(dest),
        vocab_size=8000,
    )
    manifest = prepare(cfg, verbose=False)
    return corpus, dest, manifest


@pytest.mark.corpus
def test_real_corpus(real):
    corpus, dest, manifest = real
    for split, n in (("train", 34355), ("valid", 1000), ("test", 1000)):
        info = manifest["splits"][split]
        assert info["pairs"] == n
        assert info["kept"] + sum(info["filtered"].values()) == n
    assert manifest["vocab_size"] == 8000
    vocab = Vocab(dest / "spm.model")
    ds = Dataset(dest, "train")
    raw_en, digest = read_lines(corpus / "train.en")
    assert manifest["inputs_sha256"][str(corpus / "train.en")] == digest
    for i in (0, 1, 100, 20000, len(ds) - 1):
        line = raw_en[ds.lines[i] - 1]
        assert ds.tgt(i).tolist() == vocab.encode([line])[0]
        assert vocab.decode(ds.tgt(i)) == " ".join(line.split())
    batches = make_batches(ds, 4096, seed=1, epoch=1)
    assert sum(len(b) for b in batches) == len(ds)


# ====================================================================== masking


@pytest.mark.parametrize("kind", ["span", "uniform"])
def test_masks_never_touch_bos_eos(kind):
    masking = Masking(kind=kind)
    for n in range(2, 40):
        for i in range(30):
            m = masking(n, mask_rng(0, 0, i))
            assert m.shape == (n,) and m.dtype == bool
            assert not m[0] and not m[-1]
            k = n - 2
            if k == 0:
                assert not m.any()
            else:
                assert 1 <= m.sum() <= k


def test_span_mask_count_within_budget():
    for n in range(3, 80):
        budget = min(math.ceil(0.7 * n - 1e-9), n - 2)
        counts = [span_mask(n, 0.7, 2.0, mask_rng(3, 1, i)).sum() for i in range(40)]
        assert max(counts) <= budget and min(counts) >= 1
    assert span_mask(10, 0.7, 2.0, mask_rng(0, 0, 0)).sum() <= 7  # ceil(0.7 * 10) is 7, not 8
    assert span_mask(2, 0.7, 2.0, mask_rng(0, 0, 0)).tolist() == [False, False]


def test_span_mask_realised_ratio():
    n, trials = 30, 4000
    total = sum(int(span_mask(n, 0.7, 2.0, mask_rng(7, 0, i)).sum()) for i in range(trials))
    ratio = total / (n * trials)
    # measured 0.507 for n = 30: overlaps eat about a quarter of the 0.7 budget
    assert 0.45 <= ratio <= 0.6, ratio


def test_span_mask_forms_spans():
    # Poisson(2) lengths give runs longer than 1 far more often than scattered positions would.
    runs = []
    for i in range(500):
        m = span_mask(100, 0.15, 2.0, mask_rng(0, 0, i)).astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], m, [0]])))
        runs.extend((edges[1::2] - edges[::2]).tolist())
    assert np.mean(runs) > 1.8


def test_uniform_mask_distribution():
    n, k, trials = 12, 10, 6000
    counts = np.zeros(k + 1)
    positions = np.zeros(n)
    for i in range(trials):
        m = uniform_mask(n, mask_rng(11, 0, i))
        counts[m.sum()] += 1
        positions += m
    assert counts[0] == 0
    freq = counts[1:] / trials
    assert np.all(np.abs(freq - 1 / k) < 0.025), freq
    assert positions[0] == positions[-1] == 0
    inner = positions[1:-1] / positions[1:-1].sum()
    assert np.all(np.abs(inner - 1 / k) < 0.02), inner


def test_masking_config():
    with pytest.raises(ValueError, match="masking kind"):
        Masking(kind="random")
    with pytest.raises(ValueError, match="ratio"):
        Masking(ratio=0.0)
    assert Masking.from_config(TrainConfig(objective="cmlm")).kind == "uniform"
    assert Masking.from_config(TrainConfig(objective="janus", mask_ratio=0.5)) == Masking("span", 0.5, 2.0)
    assert Masking.from_config(TrainConfig(objective="ar")).kind == "none"
    assert not Masking("none")(10, mask_rng(0, 0, 0)).any()


def test_mask_depends_only_on_seed_epoch_id(train):
    masking = Masking()
    alone = collate(train, [42], masking, seed=5, epoch=2)
    crowd = collate(train, [3, 42, 100, 7], masking, seed=5, epoch=2)
    n = int(alone.tgt_lengths[0])
    assert torch.equal(alone.masked[0, :n], crowd.masked[1, :n])
    assert not crowd.masked[1, n:].any()
    other_epoch = collate(train, [42], masking, seed=5, epoch=3)
    other_seed = collate(train, [42], masking, seed=6, epoch=2)
    # with ~10 tokens a clash of both is vanishingly unlikely
    assert not (torch.equal(alone.masked, other_epoch.masked) and torch.equal(alone.masked, other_seed.masked))


# ====================================================================== batching


def _widths(ds, ids):
    return np.maximum(ds.src_lengths[ids] + 1, ds.tgt_lengths[ids] + 2)


def test_make_batches_covers_every_example_once_within_budget(train):
    max_tokens = 200
    batches = make_batches(train, max_tokens, seed=1, epoch=1)
    ids = np.concatenate(batches)
    assert sorted(ids.tolist()) == list(range(len(train)))
    for b in batches:
        assert len(b) * _widths(train, b).max() <= max_tokens
    # length bucketing: batches are far tighter than a random grouping
    padded = sum(len(b) * _widths(train, b).max() for b in batches)
    assert padded < 1.3 * _widths(train, ids).sum()


def test_max_sentences(train):
    batches = make_batches(train, 10_000, max_sentences=16, seed=0, epoch=0)
    assert max(len(b) for b in batches) == 16
    assert sum(len(b) for b in batches) == len(train)


def test_make_batches_is_seeded(small):
    dest = small[1]
    a = make_batches(Dataset(dest, "train"), 200, seed=1, epoch=1)
    b = make_batches(Dataset(dest, "train"), 200, seed=1, epoch=1)  # fresh object: no shared cache
    c = make_batches(Dataset(dest, "train"), 200, seed=1, epoch=2)
    d = make_batches(Dataset(dest, "train"), 200, seed=2, epoch=1)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    assert [x.tolist() for x in a] != [x.tolist() for x in d]
    assert sorted(np.concatenate(c).tolist()) == sorted(np.concatenate(a).tolist())


def test_example_too_long_for_budget(train):
    widest = int(np.argmax(train.widths()))
    with pytest.raises(ValueError) as err:
        make_batches(train, int(train.widths().max()) - 1, seed=0, epoch=0)
    msg = str(err.value)
    assert f"line {int(train.lines[widest])}" in msg
    assert "max_tokens" in msg and "max_len" in msg


def test_batch_contents(train):
    ids = [4, 0, 33]
    batch = collate(train, ids, Masking(), seed=0, epoch=0)
    assert batch.ids.tolist() == ids and batch.ids.dtype == torch.int64
    assert batch.src.dtype == torch.int64 and batch.tgt.dtype == torch.int64 and batch.masked.dtype == torch.bool
    assert batch.src.shape == (3, int(train.src_lengths[ids].max()) + 1)
    assert batch.tgt.shape == batch.masked.shape == (3, int(train.tgt_lengths[ids].max()) + 2)
    for b, i in enumerate(ids):
        s, t = train.src(i).tolist(), train.tgt(i).tolist()
        src_row = batch.src[b].tolist()
        tgt_row = batch.tgt[b].tolist()
        assert src_row == s + [SP.eos] + [SP.pad] * (len(src_row) - len(s) - 1)
        assert tgt_row == [SP.bos] + t + [SP.eos] + [SP.pad] * (len(tgt_row) - len(t) - 2)
        assert int(batch.src_lengths[b]) == len(s) + 1
        assert int(batch.tgt_lengths[b]) == len(t) + 2
    assert batch.num_sentences == 3
    assert batch.num_src_tokens == int((batch.src != SP.pad).sum())
    assert batch.num_tgt_tokens == int((batch.tgt != SP.pad).sum())
    assert batch.num_masked == int(batch.masked.sum()) >= 3
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.tgt, batch.tgt) and moved.num_masked == batch.num_masked
    fresh = Batch(batch.src, batch.tgt, batch.masked, batch.ids, batch.src_lengths, batch.tgt_lengths)
    assert (fresh.num_src_tokens, fresh.num_tgt_tokens, fresh.num_masked) == (
        batch.num_src_tokens,
        batch.num_tgt_tokens,
        batch.num_masked,
    )


def test_epoch_masks_avoid_specials(train):
    for (batch,) in iterate_updates(train, 300, seed=3, epoch=1, masking=Masking()):
        special = (batch.tgt == SP.bos) | (batch.tgt == SP.eos) | (batch.tgt == SP.pad)
        assert not (batch.masked & special).any()
        assert (batch.masked.sum(1) >= 1).all()  # every synthetic target has k >= 1


def test_single_process_epoch_sees_every_example_once(train):
    updates = list(iterate_updates(train, 250, seed=1, epoch=0, masking=Masking()))
    assert len(updates) == num_updates(train, 250, seed=1, epoch=0) == len(make_batches(train, 250, seed=1, epoch=0))
    ids = torch.cat([u[0].ids for u in updates]).tolist()
    assert sorted(ids) == list(range(len(train)))
    for (batch,) in updates:
        assert batch.src.numel() <= 250 and batch.tgt.numel() <= 250


def test_ranks_and_accumulation_partition_updates(train):
    W, A, max_tokens = 2, 3, 200
    batches = make_batches(train, max_tokens, seed=4, epoch=2)
    total = num_updates(train, max_tokens, seed=4, epoch=2, update_freq=A, world_size=W)
    assert total == len(batches) // (W * A) > 0
    per_rank = [
        list(iterate_updates(train, max_tokens, 4, 2, Masking(), update_freq=A, world_size=W, rank=r)) for r in range(W)
    ]
    seen = []
    for u in range(total):
        ids = [per_rank[r][u][a].ids.tolist() for r in range(W) for a in range(A)]
        for r in range(W):
            for a in range(A):
                assert per_rank[r][u][a].ids.tolist() == batches[u * W * A + a * W + r].tolist()
        flat = [i for x in ids for i in x]
        assert len(flat) == len(set(flat))  # ranks and steps of one update never share an example
        seen.extend(flat)
    skipped = np.concatenate(batches[total * W * A :]).tolist() if len(batches) % (W * A) else []
    assert sorted(seen + skipped) == list(range(len(train)))


def test_resume_matches_uninterrupted_run(small):
    dest = small[1]
    kw = dict(max_tokens=200, seed=9, epoch=3, masking=Masking(), update_freq=2)
    full = list(iterate_updates(Dataset(dest, "train"), **kw))
    start = len(full) // 2
    tail = list(iterate_updates(Dataset(dest, "train"), start_update=start, **kw))
    assert len(tail) == len(full) - start
    for a, b in zip(full[start:], tail, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.ids, y.ids)
            assert torch.equal(x.masked, y.masked)
            assert torch.equal(x.tgt, y.tgt) and torch.equal(x.src, y.src)
    assert list(iterate_updates(Dataset(dest, "train"), start_update=len(full), **kw)) == []
    with pytest.raises(ValueError, match="start_update"):
        list(iterate_updates(Dataset(dest, "train"), start_update=len(full) + 1, **kw))


def test_too_few_batches_for_an_update(train):
    with pytest.raises(ValueError, match="lower max_tokens"):
        list(iterate_updates(train, 10**6, seed=0, epoch=0, masking=Masking(), world_size=4))


def test_iterate_batches_fixed_order(small):
    dest = small[1]
    valid = Dataset(dest, "valid")
    first = list(iterate_batches(valid, 150, Masking("uniform"), seed=1))
    again = list(iterate_batches(valid, 150, Masking("uniform"), seed=1))
    other_seed = list(iterate_batches(valid, 150, Masking("uniform"), seed=2))
    ids = [b.ids.tolist() for b in first]
    assert ids == [b.ids.tolist() for b in again] == [b.ids.tolist() for b in other_seed]
    assert sorted(i for x in ids for i in x) == list(range(len(valid)))
    assert all(torch.equal(a.masked, b.masked) for a, b in zip(first, again, strict=True))
    # length-sorted: target lengths never decrease from one batch to the next
    maxima = [int(b.tgt_lengths.max()) for b in first]
    minima = [int(b.tgt_lengths.min()) for b in first]
    assert all(hi <= lo for hi, lo in zip(maxima[:-1], minima[1:], strict=True))
