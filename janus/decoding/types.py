"""Typed decoding results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class CanvasStep:
    """The chosen candidate's canvas after one mask-predict pass (``DecodeConfig.history``).

    Attributes:
        tokens: the canvas after this pass's predictions, [bos, ..., eos].
        scores: log-probability of each token when it was last predicted (0 at bos, eos).
        remasked: positions re-masked after this pass for the next one (empty after the last).
    """

    tokens: list[int]
    scores: list[float]
    remasked: list[int]


@dataclass
class Hypothesis:
    """One decoded sentence.

    Attributes:
        ids: target ids without bos and eos.
        score: ar and spec: sum of log P_AR over the tokens and eos, divided by
            (tokens + 1) ** length_penalty; nar: mean log P_NAR of the tokens (mean log P_AR
            of tokens and eos with ``rerank``).
        passes: sequential decoder passes spent on this sentence (ar: one per generated
            token; nar: T, +1 with rerank; spec: decoder passes, each one verification with a NAR
            draft in it or not, so never more than greedy's).
        text: the detokenized text when a vocabulary is known, else None.
        history: mask-predict canvases, one per pass, when asked for.
    """

    ids: list[int]
    score: float
    passes: int
    text: Optional[str] = None
    history: Optional[list[CanvasStep]] = field(default=None, repr=False)
