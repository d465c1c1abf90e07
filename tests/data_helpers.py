"""Small synthetic parallel corpora for the vocabulary and data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_words(n: int, seed: int, min_len: int = 2, max_len: int = 6) -> list[str]:
    """``n`` distinct lowercase pseudo-words."""
    rng = np.random.default_rng(seed)
    words: set[str] = set()
    while len(words) < n:
        k = int(rng.integers(min_len, max_len + 1))
        words.add("".join(rng.choice(list(_LETTERS), size=k)))
    return sorted(words)


def make_pairs(n: int, seed: int = 0, min_words: int = 1, max_words: int = 10) -> list[tuple[str, str]]:
    """``n`` (source, target) sentence pairs; the target is a word-by-word 'translation' of the source."""
    src_words = make_words(60, seed=1000)
    tgt_words = make_words(60, seed=2000)
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        k = int(rng.integers(min_words, max_words + 1))
        w = rng.integers(0, len(src_words), size=k)
        pairs.append((" ".join(src_words[i] for i in w), " ".join(tgt_words[i] for i in w)))
    return pairs


def write_text(path: Path, lines: list[str], newline: str = "\n") -> Path:
    """Write ``lines`` as UTF-8 with ``newline`` after every line."""
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    return path


def write_corpus(folder: Path, splits: dict[str, list[tuple[str, str]]], src: str = "xx", tgt: str = "yy") -> Path:
    """Write ``{split}.{src}`` / ``{split}.{tgt}`` files into ``folder``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, pairs in splits.items():
        write_text(folder / f"{name}.{src}", [s for s, _ in pairs])
        write_text(folder / f"{name}.{tgt}", [t for _, t in pairs])
    return folder


CONSONANTS, VOWELS = "bdklmnprst", "aeiou"


def make_mapping_pairs(n: int, seed: int, words: int = 12, min_words: int = 2, max_words: int = 7):
    """``n`` pairs of a word-for-word code: ``words`` source words map to ``words`` other target
    words, in order. Words are two consonant-vowel syllables; ``mapping_vocab_size(words)`` is the
    vocabulary size at which sentencepiece keeps every word as one piece."""
    rng = np.random.default_rng(12345)
    found: list[str] = []
    while len(found) < 2 * words:
        w = "".join(str(rng.choice(list(CONSONANTS))) + str(rng.choice(list(VOWELS))) for _ in range(2))
        if w not in found:
            found.append(w)
    src_words, tgt_words = found[:words], found[words:]
    r = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        k = int(r.integers(min_words, max_words + 1))
        w = r.integers(0, words, size=k)
        pairs.append((" ".join(src_words[i] for i in w), " ".join(tgt_words[i] for i in w)))
    return pairs


def mapping_vocab_size(words: int = 12) -> int:
    """5 specials + the word-boundary piece + every letter + every word."""
    return 5 + 1 + len(CONSONANTS) + len(VOWELS) + 2 * words


def prepare_corpus_slice(corpus: Path, root: Path, sizes: dict[str, int], vocab_size: int, max_len: int) -> Path:
    """The first ``sizes[split]`` pairs of each split of ``corpus`` (``{split}.de`` / ``{split}.en``) copied
    to ``root`` and prepared into ``root / "bin"`` (train and valid splits; returns that folder)."""
    from janus.config import PrepareConfig
    from janus.data import prepare

    for split, n in sizes.items():
        for lang in ("de", "en"):
            lines = (corpus / f"{split}.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)[:n]
            (root / f"{split}.{lang}").write_text("".join(lines), encoding="utf-8")
    prepare(PrepareConfig(trainpref=str(root / "train"), validpref=str(root / "valid"), destdir=str(root / "bin"),
                          vocab_size=vocab_size, max_len=max_len), verbose=False)  # fmt: skip
    return root / "bin"
