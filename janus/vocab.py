"""The joint sentencepiece vocabulary and its special ids.

One sentencepiece model covers source and target text. Its first five ids are
fixed (``janus.config.SpecialIds``):

    0 <pad>   1 <s> (bos)   2 </s> (eos)   3 <unk>   4 <mask>

``<mask>`` is a sentencepiece *control* symbol: it has an id but no surface
form, so the literal text "<mask>" in a sentence is split into ordinary pieces
and can never be confused with the mask id.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from janus.config import SpecialIds

SPECIALS = SpecialIds()
MASK_PIECE = "<mask>"
# Piece name expected at each special id; sentencepiece's defaults for the first four.
_PIECES = {
    SPECIALS.pad: "<pad>",
    SPECIALS.bos: "<s>",
    SPECIALS.eos: "</s>",
    SPECIALS.unk: "<unk>",
    SPECIALS.mask: MASK_PIECE,
}

Ids = Sequence[int] | np.ndarray


def _num_threads(threads: int) -> int:
    """0 means every core."""
    return threads if threads > 0 else (os.cpu_count() or 1)


class Vocab:
    """A sentencepiece model whose special ids are ``SpecialIds``.

    Build one with ``Vocab.train`` (a new model), ``Vocab(path)`` (a ``.model``
    file) or ``Vocab.from_bytes`` (a serialized model, e.g. from a checkpoint).
    """

    def __init__(self, path: str | Path | None = None, *, threads: int = 0, _proto: bytes | None = None):
        """Load the model at ``path`` and check its special ids.

        Args:
            path: a sentencepiece ``.model`` file.
            threads: threads used by ``encode`` (0 = all cores).
        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the model's special ids differ from ``SpecialIds``.
        """
        self.threads = _num_threads(threads)
        self.specials = SPECIALS
        self.path: Path | None = None
        if _proto is not None:
            self.sp = spm.SentencePieceProcessor(model_proto=_proto)
            origin = "<serialized model>"
        else:
            if path is None:
                raise ValueError("Vocab needs a model path (or use Vocab.from_bytes / Vocab.train)")
            self.path = Path(path)
            if not self.path.is_file():
                raise FileNotFoundError(f"sentencepiece model not found: {self.path}")
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
            origin = str(self.path)
        self._check_specials(origin)
        self._special_set = np.array(sorted({SPECIALS.pad, SPECIALS.bos, SPECIALS.eos, SPECIALS.mask}))

    def _check_specials(self, origin: str) -> None:
        size = self.sp.get_piece_size()
        wrong = []
        for i, piece in _PIECES.items():
            got = self.sp.id_to_piece(i) if i < size else None
            if got != piece:
                wrong.append(f"id {i}: expected {piece!r}, found {got!r}")
        if size > SPECIALS.mask and not self.sp.is_control(SPECIALS.mask):
            wrong.append(f"id {SPECIALS.mask}: {MASK_PIECE!r} must be a control symbol")
        if wrong:
            raise ValueError(
                f"sentencepiece model {origin} does not have the special ids janus needs "
                f"({'; '.join(wrong)}); train it with Vocab.train (or `janus prepare`)"
            )

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(
        cls,
        text_files: Sequence[str | Path],
        model_prefix: str | Path,
        vocab_size: int,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        input_sentence_size: int = 2_000_000,
        threads: int = 0,
        seed_sentencepiece_size: int = 1_000_000,
        cap_vocab_size: bool = True,
    ) -> Vocab:
        """Train a joint sentencepiece model over ``text_files`` (one sentence per line).

        Writes ``{model_prefix}.model`` and ``{model_prefix}.vocab`` and returns the loaded Vocab.

        Args:
            text_files: plain-text files, source and target together.
            model_prefix: output path without suffix.
            vocab_size: size of the vocabulary, the five specials included.
            model_type: "unigram" or "bpe".
            character_coverage: share of characters covered by the vocabulary (1.0 = all).
            input_sentence_size: train on at most this many sentences, a random sample (0 = all).
            threads: training threads (0 = all cores).
            seed_sentencepiece_size: seed pieces of the unigram trainer.
            cap_vocab_size: when the text is too small for ``vocab_size`` pieces, train the largest
                vocabulary sentencepiece accepts for it, with a warning (False: raise).
        Raises:
            ValueError: sentencepiece refused the settings or the text (its message is included).
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type={model_type!r}; choose unigram or bpe")
        if vocab_size <= SPECIALS.mask + 1:
            raise ValueError(f"vocab_size={vocab_size} must exceed the {SPECIALS.mask + 1} special symbols")
        files = [str(f) for f in text_files]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"training text not found: {missing}")
        prefix = Path(model_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        args = (files, prefix)
        rest = (model_type, character_coverage, input_sentence_size, threads, seed_sentencepiece_size)
        try:
            _train_spm(*args, vocab_size, *rest)
        except RuntimeError as e:
            # sentencepiece: "Vocabulary size is too large. Please set it to a value <= N." (its unigram
            # seeding) or "Vocabulary size too high (V). Please set it to a value <= N." (its final check)
            fits = re.search(r"Vocabulary size (?:is )?too (?:large|high).*<= *(\d+)", str(e))
            if not cap_vocab_size or fits is None or int(fits.group(1)) <= SPECIALS.mask + 1:
                raise ValueError(f"sentencepiece training on {files} failed: {e}") from e
            capped = int(fits.group(1))
            warnings.warn(
                f"vocab_size={vocab_size} is more than the training text supports; using {capped} "
                f"(the largest sentencepiece accepts for this text)",
                stacklevel=2,
            )
            try:
                _train_spm(*args, capped, *rest)
            except RuntimeError as e2:
                raise ValueError(f"sentencepiece training on {files} failed: {e2}") from e2
        return cls(prefix.with_suffix(prefix.suffix + ".model"), threads=threads)

    @classmethod
    def from_bytes(cls, proto: bytes, threads: int = 0) -> Vocab:
        """Load a serialized model (the bytes of a ``.model`` file, see ``to_bytes``)."""
        return cls(None, threads=threads, _proto=bytes(proto))

    def to_bytes(self) -> bytes:
        """The serialized model proto; ``Vocab.from_bytes(v.to_bytes())`` is the same vocabulary."""
        return self.sp.serialized_model_proto()

    # ------------------------------------------------------------------ use

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, path={str(self.path) if self.path else None!r})"

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode a batch of sentences (multithreaded). No bos/eos is added.

        Args:
            texts: B strings.
        Returns:
            B lists of int ids.
        """
        if isinstance(texts, str):
            raise TypeError("Vocab.encode takes a list of strings; wrap a single sentence in a list")
        return self.sp.encode(list(texts), out_type=int, num_threads=self.threads)

    def decode(self, ids: Ids | Sequence[Ids]) -> str | list[str]:
        """Decode ids to text, dropping pad, bos, eos and ``<mask>`` (unk stays as sentencepiece renders it).

        Args:
            ids: one sentence (a sequence of ints, 1-D array or tensor) -> str, or a
                batch (a sequence of those, or a 2-D array/tensor [B, T]) -> list of B str.
        Raises:
            ValueError: an id outside [0, len(vocab)).
        """
        if hasattr(ids, "tolist"):  # numpy array or torch tensor
            ids = ids.tolist()
        ids = list(ids)
        if ids and not isinstance(ids[0], (int, np.integer)):
            return [self._decode_one(x) for x in ids]
        return self._decode_one(ids)

    def _decode_one(self, ids: Iterable[int]) -> str:
        arr = np.asarray(ids.tolist() if hasattr(ids, "tolist") else list(ids), dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= len(self)):
            bad = arr[(arr < 0) | (arr >= len(self))][0]
            raise ValueError(f"id {int(bad)} is outside the vocabulary [0, {len(self)})")
        keep = arr[~np.isin(arr, self._special_set)]
        return self.sp.decode(keep.tolist())

    def piece(self, i: int) -> str:
        """The piece of id ``i``."""
        return self.sp.id_to_piece(int(i))


def _train_spm(
    files: list[str],
    prefix: Path,
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    input_sentence_size: int,
    threads: int,
    seed_sentencepiece_size: int,
) -> None:
    """One sentencepiece training run with the janus special symbols; raises sentencepiece's RuntimeError."""
    spm.SentencePieceTrainer.train(
        input=files,
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=_num_threads(threads),
        pad_id=SPECIALS.pad,
        bos_id=SPECIALS.bos,
        eos_id=SPECIALS.eos,
        unk_id=SPECIALS.unk,
        pad_piece=_PIECES[SPECIALS.pad],
        bos_piece=_PIECES[SPECIALS.bos],
        eos_piece=_PIECES[SPECIALS.eos],
        unk_piece=_PIECES[SPECIALS.unk],
        # The first free id after the four reserved ones: 4.
        control_symbols=[MASK_PIECE],
        # Quiet on success; failures still raise with sentencepiece's message.
        minloglevel=2,
    )
