"""The Python API: load a model once, then decode raw text or ids in any mode.

    import janus

    hyps = janus.fast_generate("run/averaged", ["Ein kleiner Test."], mode="nar")
    print(hyps[0].text, hyps[0].score, hyps[0].passes)

    gen = janus.Generator.from_checkpoint("run/averaged", device="cuda")
    ar = gen.generate(sentences, janus.DecodeConfig(mode="ar", beam_size=5))

Sources are sorted by length into batches (``DecodeConfig.max_batch_size``,
``max_batch_tokens``) and the results come back in input order. ``generate_iter`` yields
them one by one as soon as every earlier one is ready (``generate`` collects it):

    for i, hyp in enumerate(gen.generate_iter(sentences, mode="spec")):
        print(hyp.text, flush=True)

Order of work: the input is cut into windows of ``DecodeConfig.window`` sentences, taken in
input order. Within a window, sentences are sorted by length into batches (little padding),
and the batches run in the order of their earliest sentence, so the first lines come out
after one batch and a window's lines are all out when the window ends. A larger window
gives fuller batches of closer lengths (throughput) but holds finished lines longer before
the ones ahead of them are done (latency); ``window=0`` sorts the whole input at once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from janus.checkpoint import MODEL_FILE, load_model_state, resolve_model_path
from janus.config import DecodeConfig, ModelConfig
from janus.decoding import Hypothesis, decode_batch
from janus.model import JanusModel, quantize_dynamic_int8
from janus.vocab import Vocab

log = logging.getLogger(__name__)

Sources = Union[Sequence[str], Sequence[Sequence[int]], Sequence[Tensor], Tensor]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.qint8}


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: Union[str, torch.dtype], device: torch.device) -> torch.dtype:
    """ "auto" -> bfloat16 on a CUDA device that has it (else float16), float32 on the CPU.

    "int8" (or torch.qint8) -> torch.qint8: dynamic int8 linear layers (``quantize_dynamic_int8``),
    CPU only. bfloat16 is refused where it would be emulated: a CPU without AVX512_BF16 / AMX
    (``janus.info.cpu_bf16_support``) or a CUDA device without bf16.
    """
    if isinstance(dtype, str) and dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose auto, {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype == torch.qint8 and device.type != "cpu":
        raise ValueError(f"dtype=int8 (dynamic int8 linear layers) runs on the CPU only, not on {device}; use bfloat16")
    if dtype == torch.bfloat16 and device.type == "cpu":
        from janus.info import cpu_bf16_support

        ok, why = cpu_bf16_support()
        if not ok:
            raise ValueError(f"dtype=bfloat16 on this CPU: {why}; use float32 or int8")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype=bfloat16: {torch.cuda.get_device_name(device)} has no bf16; use float16")
    return dtype


class Generator:
    """A model (and its vocabulary) placed on a device, ready to decode.

    Args:
        model: a JanusModel; it is moved to ``device``/``dtype`` and put in eval mode.
        vocab: the joint vocabulary; needed for text input and for ``Hypothesis.text``.
        device: "auto" (cuda if available), "cpu", "cuda", "cuda:N" or a torch.device.
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16", "float16", or "int8"
            (CPU: linear layers with int8 weights, ``janus.model.quantize_dynamic_int8``; the model given
            is left as it is and ``self.model`` is a quantized copy). See ``resolve_dtype`` for what is
            refused where.
    """

    def __init__(
        self,
        model: JanusModel,
        vocab: Optional[Vocab] = None,
        *,
        device: Union[str, torch.device] = "auto",
        dtype: Union[str, torch.dtype] = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.dtype == torch.qint8:
            self.model = quantize_dynamic_int8(model.to(device=self.device))
        else:
            self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.vocab = vocab
        if vocab is not None and len(vocab) != model.cfg.vocab_size:
            raise ValueError(f"the vocabulary has {len(vocab)} ids but the model {model.cfg.vocab_size}")

    @classmethod
    def from_checkpoint(
        cls,
        path: Union[str, os.PathLike],
        *,
        device: Union[str, torch.device] = "auto",
        dtype: Union[str, torch.dtype] = "auto",
    ) -> "Generator":
        """Load a checkpoint folder, an averaged folder (``janus average``), a .safetensors file,
        or a training folder (its latest checkpoint), with the vocabulary saved beside it."""
        path = resolve_model_path(Path(path))
        state, config = load_model_state(path)
        if "model" not in config:
            raise ValueError(f"{path}: its config has no 'model' entry; was it written by janus train?")
        model = JanusModel(ModelConfig.from_dict(config["model"]))
        model.load_state_dict(state)
        folder = path if path.is_dir() else path.parent
        spm = folder / config.get("vocab", "spm.model")
        vocab = Vocab(spm) if spm.is_file() else None
        if vocab is None:
            log.warning("%s has no vocabulary (%s): only id input, no text output", path, spm.name)
        return cls(model, vocab, device=device, dtype=dtype)

    # -- input ----------------------------------------------------------------------------------
    def encode(self, sources: Sources) -> list[list[int]]:
        """Source ids without eos: strings go through the vocabulary; ids are checked.

        Args:
            sources: B strings; or B id sequences (lists, 1-D tensors); or an int (B, S)
                tensor right-padded with pad. A trailing eos in given ids is dropped (one is
                always appended when decoding).
        Raises:
            ValueError: text without a vocabulary, or an id outside the vocabulary (names
                the source and the id).
        """
        sp, V = self.model.cfg.specials, self.model.cfg.vocab_size
        if isinstance(sources, Tensor):
            if sources.dim() != 2:
                raise ValueError(f"a source tensor must be (B, S) ids, got shape {tuple(sources.shape)}")
            sources = [row[row != sp.pad] for row in sources]
        sources = list(sources)
        if any(isinstance(s, str) for s in sources):
            if not all(isinstance(s, str) for s in sources):
                raise ValueError("mixed sources: give all strings or all id sequences")
            if self.vocab is None:
                raise ValueError("text sources need a vocabulary: load with Generator.from_checkpoint or pass vocab=")
            return self.vocab.encode(sources)
        out = []
        for i, s in enumerate(sources):
            ids = s.tolist() if isinstance(s, Tensor) else [int(x) for x in s]
            if ids and ids[-1] == sp.eos:
                ids = ids[:-1]
            bad = [x for x in ids if x < 0 or x >= V]
            if bad:
                raise ValueError(f"source {i}: id {bad[0]} is outside the vocabulary [0, {V})")
            out.append(ids)
        return out

    def source_limit(self, options: DecodeConfig) -> int:
        """Most source tokens (without eos) a sentence may have under ``options``."""
        model_limit = self.model.cfg.max_source_positions - 1
        return min(options.max_source_len, model_limit) if options.max_source_len else model_limit

    def truncate(
        self, ids: list[list[int]], options: DecodeConfig, report: Callable[[int, int, int], None]
    ) -> list[list[int]]:
        """Cut every id list longer than ``source_limit(options)`` (in place) and call
        ``report(index, tokens, limit)`` for each one cut. Returns ``ids``."""
        limit = self.source_limit(options)
        for i, s in enumerate(ids):
            if len(s) > limit:
                report(i, len(s), limit)
                ids[i] = s[:limit]
        return ids

    # -- decoding -------------------------------------------------------------------------------
    def generate(
        self,
        sources: Sources,
        options: Optional[DecodeConfig] = None,
        *,
        target_lengths: Optional[Sequence[int]] = None,
        progress: bool = False,
        **overrides,
    ) -> list[Hypothesis]:
        """Decode ``sources`` (see ``encode``) with ``options`` (fields replaced by ``overrides``).

        Args:
            target_lengths: per source, the target token count to force (benchmarks with random
                weights), or None.
            progress: show a tqdm bar over sentences (and generated tokens per second).
        Returns:
            One Hypothesis per source, in input order; an empty source gives an empty hypothesis
            without running the model. Sources longer than the limit are truncated with a warning.
        """
        ids, options = self._prepare(sources, options, target_lengths, overrides)
        return list(self._decode(ids, options, target_lengths, progress))

    def generate_iter(
        self,
        sources: Sources,
        options: Optional[DecodeConfig] = None,
        *,
        target_lengths: Optional[Sequence[int]] = None,
        progress: bool = False,
        **overrides,
    ) -> Iterator[Hypothesis]:
        """Like ``generate``, but an iterator: hypothesis i comes as soon as hypotheses 0 .. i are
        decoded (see the module docstring for the order of work).

        The input is encoded, checked and truncated (with warnings) when this is called, so bad
        input raises here, not at the first ``next``.
        """
        ids, options = self._prepare(sources, options, target_lengths, overrides)
        return self._decode(ids, options, target_lengths, progress)

    def _prepare(
        self, sources: Sources, options: Optional[DecodeConfig], target_lengths: Optional[Sequence[int]], overrides
    ) -> tuple[list[list[int]], DecodeConfig]:
        options = dataclasses.replace(options or DecodeConfig(), **overrides)

        def report(i: int, n: int, limit: int) -> None:
            # report <- truncate <- _prepare <- generate(_iter) <- the caller
            warnings.warn(f"source {i} has {n} tokens; truncated to the first {limit}", stacklevel=5)

        ids = self.truncate(self.encode(sources), options, report)
        if target_lengths is not None and len(target_lengths) != len(ids):
            raise ValueError(f"{len(target_lengths)} target_lengths for {len(ids)} sources")
        return ids, options

    def _decode(
        self, ids: list[list[int]], options: DecodeConfig, target_lengths: Optional[Sequence[int]], progress: bool
    ) -> Iterator[Hypothesis]:
        """Hypotheses of ``ids`` (already checked and truncated) in input order, window by window."""
        sp = self.model.cfg.specials
        empty_text = "" if self.vocab is not None else None
        step = options.window or max(len(ids), 1)
        tokens, start = 0, time.perf_counter()
        with tqdm(total=len(ids), disable=not progress, unit="sent", desc=f"decode {options.mode}") as bar:
            for first in range(0, len(ids), step):
                last = min(first + step, len(ids))
                ready: dict[int, Hypothesis] = {}
                todo = [i for i in range(first, last) if ids[i]]
                batches = [[todo[j] for j in b] for b in make_decode_batches([len(ids[i]) + 1 for i in todo], options)]
                batches.sort(key=min)  # the batch holding the earliest sentence first: output starts sooner
                done = first  # sentences before this one were yielded
                for index in [None, *batches]:
                    if index is not None:
                        width = max(len(ids[i]) for i in index) + 1
                        src = torch.full((len(index), width), sp.pad, dtype=torch.long)
                        for row, i in enumerate(index):
                            src[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                            src[row, len(ids[i])] = sp.eos
                        forced = None
                        if target_lengths is not None:
                            forced = torch.tensor([int(target_lengths[i]) for i in index], device=self.device)
                        hyps = decode_batch(self.model, src.to(self.device), options, forced)
                        for i, h in zip(index, hyps, strict=True):
                            if self.vocab is not None:
                                h.text = self.vocab.decode(h.ids)
                            ready[i] = h
                            tokens += len(h.ids)
                    while done < last and (done in ready or not ids[done]):
                        h = ready.pop(done, None)
                        bar.update(1)
                        done += 1
                        yield h if h is not None else Hypothesis(ids=[], score=0.0, passes=0, text=empty_text)
                    if progress:
                        rate = tokens / max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)


# A sentence joins a batch whose widest sentence is longer than _SPLIT_WIDTH tokens only if it is at
# least 1 / _SPLIT_RATIO as long: a pathological line (thousands of tokens, truncated to the model's
# limit) is decoded with its peers, not with 63 short lines that would wait for it and share its
# padded width (mask-predict canvases, cross-attention). Ordinary lines never reach the width.
_SPLIT_WIDTH = 64
_SPLIT_RATIO = 2


def make_decode_batches(lengths: Sequence[int], options: DecodeConfig) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches, longest sentences first.

    A batch holds at most ``max_batch_size`` sentences and, when ``max_batch_tokens`` > 0, at
    most that many padded source tokens (a single longer sentence still gets its own batch).
    Sentences under half the length of a batch's widest one, when that is over 64 tokens, start
    a new batch, so that long sentences do not hold short ones up.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        widest = lengths[current[0]] if current else lengths[i]
        too_many = len(current) >= options.max_batch_size
        too_wide = options.max_batch_tokens > 0 and (len(current) + 1) * widest > options.max_batch_tokens
        too_uneven = widest > _SPLIT_WIDTH and lengths[i] * _SPLIT_RATIO < widest
        if current and (too_many or too_wide or too_uneven):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@functools.lru_cache(maxsize=4)
def _cached_generator(path: str, stamp: int, device: str, dtype: str) -> Generator:
    del stamp  # part of the cache key only: a rewritten checkpoint is loaded again
    return Generator.from_checkpoint(path, device=device, dtype=dtype)


def fast_generate(
    model_or_checkpoint: Union[str, os.PathLike, JanusModel, Generator],
    sources: Sources,
    mode: Optional[str] = None,
    options: Optional[DecodeConfig] = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    vocab: Optional[Vocab] = None,
    progress: bool = False,
    **overrides,
) -> list[Hypothesis]:
    """Decode ``sources`` with a model in one call.

    Args:
        model_or_checkpoint: a checkpoint path (loaded once and kept for later calls), a
            JanusModel (used on its current device and dtype), or a Generator.
        sources: B strings (sentencepiece is applied inside), B id sequences, or an int
            (B, S) tensor right-padded with pad; ids without eos.
        mode: "nar" (mask-predict), "ar" (beam search; beam_size=1 is greedy) or "spec"
            (self-speculative, equals AR greedy); overrides ``options.mode``. Default "nar".
        options: a DecodeConfig; keyword ``overrides`` replace its fields
            (e.g. ``iterations=4, length_beam=1``).
        device, dtype: where a checkpoint is loaded (see ``Generator``).
        vocab: the vocabulary for a bare JanusModel with text sources.
        progress: show a tqdm bar.
    Returns:
        One ``Hypothesis`` (text, ids, score, passes) per source, in input order.
    """
    if mode is not None:
        overrides["mode"] = mode
    if isinstance(model_or_checkpoint, Generator):
        gen = model_or_checkpoint
    elif isinstance(model_or_checkpoint, JanusModel):
        m = model_or_checkpoint
        param = next(m.parameters())
        gen = Generator(m, vocab, device=param.device, dtype=param.dtype)
    else:
        path = resolve_model_path(Path(model_or_checkpoint)).resolve()
        stamp = (path / MODEL_FILE if path.is_dir() else path).stat().st_mtime_ns
        gen = _cached_generator(str(path), stamp, str(device), str(dtype))
    return gen.generate(sources, options, progress=progress, **overrides)
