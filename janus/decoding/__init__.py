"""Decoding strategies over the shared decoder, one module each (JANUS.md section 4).

- ``beam_search``: AR greedy and beam search over P_AR with a key/value cache;
- ``mask_predict``: NAR mask-predict over P_NAR with a length beam (T = decoder passes);
- ``speculative``: NAR and Jacobi drafts verified by the AR head; equals greedy search exactly.

``decode_batch`` runs the strategy a ``DecodeConfig`` names on a batch of source ids;
``janus.fast_generate`` adds text, batching and ordering on top.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from janus.config import DecodeConfig
from janus.decoding.beam_search import beam_search, greedy_search
from janus.decoding.mask_predict import mask_predict
from janus.decoding.speculative import speculative_decode
from janus.decoding.types import CanvasStep, Hypothesis
from janus.model import JanusModel


def decode_batch(
    model: JanusModel, src: Tensor, options: DecodeConfig, target_lengths: Optional[Tensor] = None
) -> list[Hypothesis]:
    """Decode one batch with the mode and options of ``options``.

    Args:
        model: the model (run in eval mode under torch.inference_mode).
        src: int64 (B, S) source ids + eos, right-padded, on the model's device.
        options: the decoding options (``options.mode`` picks the strategy).
        target_lengths: int64 (B,) target token counts to force (benchmarks with random
            weights), or None to let the model decide.
    Returns:
        B hypotheses in batch order (``text`` is not filled in).
    """
    o = options
    limits = dict(max_len_a=o.max_len_a, max_len_b=o.max_len_b, min_len=o.min_len, target_lengths=target_lengths)
    guard = dict(repeat_ngram=o.repeat_ngram, repeat_times=o.repeat_times)
    if o.mode == "ar":
        if o.beam_size == 1:
            return greedy_search(model, src, length_penalty=o.length_penalty, **limits, **guard)
        return beam_search(model, src, beam=o.beam_size, length_penalty=o.length_penalty, **limits, **guard)
    if o.mode == "nar":
        return mask_predict(
            model,
            src,
            iterations=o.iterations,
            length_beam=o.length_beam,
            rerank=o.rerank,
            length_weight=o.length_weight,
            dedup=o.dedup,
            history=o.history,
            **limits,
        )
    spec = dict(
        draft_iterations=o.draft_iterations,
        policy=o.draft_policy,
        block=o.draft_block,
        keep_draft=o.draft_keep,
        align=o.draft_align,
        top_beta=o.verify_top_beta,
        tolerance=o.verify_tolerance,
        length_penalty=o.length_penalty,
    )
    return speculative_decode(model, src, **spec, **limits, **guard)


__all__ = [
    "CanvasStep",
    "Hypothesis",
    "beam_search",
    "decode_batch",
    "greedy_search",
    "mask_predict",
    "speculative_decode",
]
