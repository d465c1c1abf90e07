"""ar_topk: the next-token choice of an AR search step from its logits.

For every row r of logits (R, V) (a query row of greedy search, beam search or a speculative
verification pass):

    logp    = log_softmax(logits[r])                       (fp32, over the whole vocabulary)
    allowed = ids not in ``banned``; without eos when rules[r] & NO_EOS (too few tokens yet),
              eos alone when rules[r] & ONLY_EOS (the length limit, or a repetition that must end)
    key[v]  = logits[r, v] where allowed, else -inf
    ids     = the k ids of largest key (ties: the smaller id), best first
    scores  = logp[ids] where key[ids] > -inf, else -inf

Ranking by the logits is ranking by the exact log-probabilities (log_softmax is increasing); the
rounded ones tie where two logits are closer than their rounding.

So the ids that are not allowed still count in the normalisation (the log-probabilities stay
those of the model), and when fewer than k ids are allowed the list goes on with the smallest
other ids at -inf. Rows holding a NaN or +inf (or only -inf) have no log-softmax: every score
of such a row is NaN and its ids are 0 .. k-1.

``ar_topk_ref`` is the specification, the fallback and the test oracle; ``ar_topk`` dispatches
(janus.ops._dispatch) between:

- "cpp": ``torch.ops.janus.ar_topk`` (csrc/cpu/ar_topk.cpp), CPU tensors with the compiled ops:
  three passes over each row while it is in cache (its maximum, the sum of exp, a selection that
  skips the 16-column blocks holding nothing above the k-th best so far); the reference's ids,
  scores (logit - max) - log(sum), ``best_token``'s rounding, equal to log_softmax's to rounding;
- "torch": ``ar_topk_torch``, any tensors: the reference with torch's ``max`` (k = 1, the reference's
  ties) or ``topk`` (k > 1, equal keys in topk's order) in place of a sort of every row;
- "reference": ``ar_topk_ref``.

Every AR search calls this op, so greedy search, beam search and a speculative verification choose alike
on any one backend. Force one with ``JANUS_BACKEND_AR_TOPK=cpp|torch|reference``.

Measured on a 2-core AVX-512 CPU, 2 threads, V = 8000 (the small preset's vocabulary): the kernel takes
26 us for a beam-5 step's 5 rows and k = 10 (log_softmax, the banned ids and a top-10 in torch: 60 us,
the rules besides), 10 us for greedy's one row and k = 1. Its selection used to test each block of 16 logits
against the k-th best by 16 lane extractions (half the kernel's time, seen with ``perf``); spans of 256 logits
tested by their maximum in four lane folds took those to 20 and 7.5 us (one thread, 100 rows: 7.2 -> 3.3 us a
row at k = 1, 10.8 -> 6.6 at k = 10).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from janus import _ext
from janus.ops._dispatch import Backend, all_on_cpu, compiled, register_op

# Bits of ``rules``.
NO_EOS = 1
ONLY_EOS = 2


def ar_rules(words: Tensor, min_lens: Tensor, max_lens: Tensor, stop: Tensor | None = None) -> Tensor:
    """The rules of ``ar_topk`` from a search's counts: eos is not allowed while fewer than ``min_lens`` tokens
    were generated; once ``max_lens`` were, or where ``stop`` is set (and ``min_lens`` allows eos), eos alone
    is. uint8 of the broadcast shape (``mask_disallowed`` applies them).

    Args:
        words, min_lens, max_lens: int64, broadcastable: tokens generated before the chosen one, and the
            limits.
        stop: bool, broadcastable likewise, or None.
    """
    too_short = words < min_lens
    at_max = words >= max_lens
    if stop is not None:
        at_max = at_max | (stop & ~too_short)
    return too_short.to(torch.uint8) * NO_EOS + at_max.to(torch.uint8) * ONLY_EOS


def rule_bits(words: int, min_len: int, max_len: int) -> int:
    """``ar_rules`` of one query from host ints, without a repetition stop (a few sentences' bookkeeping on
    the host builds its rules with this)."""
    return (NO_EOS if words < min_len else 0) | (ONLY_EOS if words >= max_len else 0)


def mask_disallowed(key: Tensor, banned: Sequence[int], eos: int, rules: Tensor) -> Tensor:
    """The AR rules, in place: -inf at every id a row may not choose (``banned``; eos where rules & NO_EOS;
    all but eos where rules & ONLY_EOS). The specification of the rules the "cpp" kernel applies.

    Args:
        key: float (R, V) logits or log-probabilities.
        rules: uint8 (R,) (``ar_rules``).
    Returns:
        ``key``.
    """
    neg = float("-inf")
    if len(banned):
        key[:, list(banned)] = neg
    eos_key = torch.where((rules & NO_EOS) != 0, neg, key[:, eos])
    key.masked_fill_(((rules & ONLY_EOS) != 0)[:, None], neg)
    key[:, eos] = eos_key
    return key


def _keys(logits: Tensor, k: int, banned: Sequence[int], eos: int, rules: Tensor) -> tuple[Tensor, Tensor]:
    """(log_softmax of the fp32 logits, the logits with the ids not allowed at -inf), k checked."""
    V = logits.shape[1]
    if not 1 <= k <= V:
        raise ValueError(f"ar_topk: k={k} must be in [1, V={V}]")
    logits = logits.float()
    return F.log_softmax(logits, dim=-1), mask_disallowed(logits.clone(), banned, eos, rules)


def _scored(top: Tensor, ids: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    """(scores, ids) of the chosen ids (their keys ``top``): the log-probability, -inf past the allowed ids; a row
    without a log-softmax (NaN throughout: a NaN or +inf in it, or only -inf) scores NaN with ids 0 .. k-1."""
    scores = torch.where(top > float("-inf"), logp.gather(1, ids), float("-inf"))
    broken = torch.isnan(logp[:, :1])  # no host sync
    k = ids.shape[1]
    return torch.where(broken, float("nan"), scores), torch.where(broken, torch.arange(k, device=ids.device), ids)


def ar_topk_ref(logits: Tensor, k: int, banned: Sequence[int], eos: int, rules: Tensor) -> tuple[Tensor, Tensor]:
    """Reference implementation.

    Args:
        logits: (R, V) next-token logits (any float dtype; computed in fp32).
        k: how many ids per row, 1 <= k <= V.
        banned: ids never chosen (pad, bos, <mask>), each in [0, V).
        eos: the eos id.
        rules: uint8 (R,), bits NO_EOS and ONLY_EOS (``ar_rules``).
    Returns:
        (scores float32 (R, k), ids int64 (R, k)), best first.
    """
    logp, key = _keys(logits, k, banned, eos, rules)
    # Stable: equal keys keep the order of their ids.
    top, ids = key.sort(dim=-1, descending=True, stable=True)
    return _scored(top[:, :k], ids[:, :k], logp)


def ar_topk_torch(logits: Tensor, k: int, banned: Sequence[int], eos: int, rules: Tensor) -> tuple[Tensor, Tensor]:
    """``ar_topk_ref`` with torch's ``max`` (k = 1: ties to the smaller id, as the reference) or ``topk`` (k > 1:
    equal keys in topk's order) in place of a sort of every row; the backend of CUDA tensors, and of CPU
    tensors without the compiled ops."""
    logp, key = _keys(logits, k, banned, eos, rules)
    top, ids = key.max(dim=-1, keepdim=True) if k == 1 else key.topk(k, dim=-1)
    return _scored(top, ids, logp)


def _ar_topk_fake(logits: Tensor, k: int, banned: list[int], eos: int, rules: Tensor) -> tuple[Tensor, Tensor]:
    R = logits.shape[0]
    return logits.new_empty(R, k), logits.new_empty(R, k, dtype=torch.long)


@_ext.when_loaded  # registering a fake needs the C++ schema (csrc/ops.cpp) to exist
def _register_fake() -> None:
    torch.library.register_fake("janus::ar_topk", _ar_topk_fake)


def _ar_topk_cpp(logits: Tensor, k: int, banned: Sequence[int], eos: int, rules: Tensor) -> tuple[Tensor, Tensor]:
    return torch.ops.janus.ar_topk(logits.float(), k, list(banned), eos, rules)


AR_TOPK = register_op(
    "ar_topk",
    [
        Backend("cpp", _ar_topk_cpp, available=compiled("ar_topk", "cpu"), supports=all_on_cpu),
        Backend("torch", ar_topk_torch),
        Backend("reference", ar_topk_ref),
    ],
)


def ar_topk(logits: Tensor, k: int, banned: Sequence[int], eos: int, rules: Tensor) -> tuple[Tensor, Tensor]:
    """The k best allowed next tokens of each row and their log-probabilities (see the module docstring).

    Same contract as ``ar_topk_ref``, on the fastest available backend.
    """
    return AR_TOPK(logits, k, banned, eos, rules)
