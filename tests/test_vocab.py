"""janus.vocab: the joint sentencepiece vocabulary and its special ids."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import sentencepiece as spm
import torch

from janus.config import SpecialIds
from janus.vocab import Vocab

try:
    from data_helpers import make_pairs, write_text
except ImportError:  # tests/ imported as a package
    from tests.data_helpers import make_pairs, write_text

VOCAB_SIZE = 100


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    pairs = make_pairs(300, seed=0)
    src = write_text(folder / "train.xx", [s for s, _ in pairs])
    tgt = write_text(folder / "train.yy", [t for _, t in pairs])
    return folder, pairs, [src, tgt]


@pytest.fixture(scope="module")
def vocab(corpus):
    folder, _, files = corpus
    return Vocab.train(files, folder / "spm", vocab_size=VOCAB_SIZE, threads=1)


def test_train_writes_model_with_requested_size(vocab, corpus):
    folder, _, _ = corpus
    assert (folder / "spm.model").is_file()
    assert vocab.path == folder / "spm.model"
    assert len(vocab) == VOCAB_SIZE


def test_special_ids_match_config(vocab):
    sp = vocab.sp
    want = SpecialIds()
    assert vocab.specials == want
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (want.pad, want.bos, want.eos, want.unk)
    assert sp.piece_to_id("<mask>") == want.mask
    assert [vocab.piece(i) for i in range(5)] == ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]


def test_mask_text_is_not_the_mask_id(vocab):
    (ids,) = vocab.encode(["<mask>"])
    assert ids, "the literal text must still produce pieces"
    assert SpecialIds().mask not in ids
    (ids,) = vocab.encode(["<s> </s> <pad>"])
    assert not set(ids) & {0, 1, 2}


def test_encode_decode_round_trip(vocab, corpus):
    _, pairs, _ = corpus
    texts = [s for s, _ in pairs[:20]] + [t for _, t in pairs[:20]]
    ids = vocab.encode(texts)
    assert len(ids) == len(texts)
    assert all(isinstance(i, int) for row in ids for i in row)
    # encode adds no bos/eos
    assert all(row[0] != 1 and row[-1] != 2 for row in ids)
    assert vocab.decode(ids) == texts
    assert vocab.decode(ids[0]) == texts[0]


def test_decode_strips_specials_and_accepts_arrays(vocab):
    (ids,) = vocab.encode(["abc de"])
    s = SpecialIds()
    padded = [s.bos, *ids, s.mask, s.eos, s.pad, s.pad]
    assert vocab.decode(padded) == vocab.decode(ids)
    assert vocab.decode(torch.tensor([padded, padded])) == [vocab.decode(ids)] * 2
    assert vocab.decode(np.array(padded)) == vocab.decode(ids)
    assert vocab.decode([]) == ""
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([5, len(vocab)])
    with pytest.raises(TypeError):
        vocab.encode("not a list")


def test_bytes_round_trip(vocab, corpus):
    _, pairs, _ = corpus
    blob = vocab.to_bytes()
    assert isinstance(blob, bytes) and blob == (vocab.path).read_bytes()
    other = Vocab.from_bytes(blob)
    assert other.path is None
    assert len(other) == len(vocab)
    texts = [s for s, _ in pairs[:10]]
    assert other.encode(texts) == vocab.encode(texts)


def test_wrong_specials_rejected(tmp_path, corpus):
    _, _, files = corpus
    # sentencepiece's own defaults: unk=0, bos=1, eos=2, no pad, no <mask>.
    spm.SentencePieceTrainer.train(
        input=[str(f) for f in files], model_prefix=str(tmp_path / "plain"), vocab_size=60, minloglevel=2
    )
    with pytest.raises(ValueError, match=r"special ids.*id 0: expected '<pad>'"):
        Vocab(tmp_path / "plain.model")
    with pytest.raises(ValueError, match="special ids"):
        Vocab.from_bytes((tmp_path / "plain.model").read_bytes())


def test_missing_model_and_bad_settings(tmp_path, corpus):
    _, _, files = corpus
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Vocab(tmp_path / "nope.model")
    with pytest.raises(ValueError, match="model_type"):
        Vocab.train(files, tmp_path / "m", vocab_size=50, model_type="word-ish")
    # sentencepiece's own complaint surfaces (a vocabulary far larger than the text allows) ...
    with pytest.raises(ValueError, match="sentencepiece training.*Vocabulary size.* too"):
        Vocab.train(files, tmp_path / "m", vocab_size=100_000, threads=1, cap_vocab_size=False)


def test_too_large_a_vocabulary_is_capped_with_a_warning(tmp_path, corpus):
    # ... or, by default, the largest size sentencepiece accepts for the text is used, and said.
    _, _, files = corpus
    with pytest.warns(UserWarning, match=r"vocab_size=100000 is more than the training text supports") as caught:
        v = Vocab.train(files, tmp_path / "m", vocab_size=100_000, threads=1)
    capped = int(re.search(r"using (\d+)", str(caught[0].message)).group(1))
    assert len(v) == capped and 5 < capped < 100_000
    assert v.encode(["hello"])[0] and v.specials == SpecialIds()


def test_specials_is_frozen(vocab):
    with pytest.raises(dataclasses.FrozenInstanceError):
        vocab.specials.pad = 7  # type: ignore[misc]
