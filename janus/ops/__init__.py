"""Ops with several implementations: one file per op, dispatched by janus.ops._dispatch.

Each op module holds ``<op>_ref`` (the specification, the fallback and the test
oracle), the fake implementation of its compiled version if any, its dispatch
entry and the public function. Importing this package imports every op module so
that ``registry()`` is complete; no op module imports triton or the compiled
extension at import time.
"""

from janus.ops._dispatch import BackendUnavailable, registry

# Every op module that registers with the dispatch is imported here, so that
# registry() (and python -m janus.info) lists it. Add new ones to this list.
from janus.ops.ar_topk import ar_topk, ar_topk_ref
from janus.ops.cache_reorder import cache_reorder, cache_reorder_ref
from janus.ops.decoder_step import decoder_step, decoder_step_ref
from janus.ops.janus_linear_loss import janus_linear_loss, janus_linear_loss_ref
from janus.ops.janus_loss import janus_loss, janus_loss_ref
from janus.ops.length_beam_init import length_beam_init, length_beam_init_ref
from janus.ops.loss_terms import loss_terms, loss_terms_ref
from janus.ops.mask_predict_update import mask_predict_update, mask_predict_update_ref
from janus.ops.pad_batch import pad_batch, pad_batch_ref
from janus.ops.remask_lowest import remask_lowest, remask_lowest_ref
from janus.ops.skinny_linear import skinny_linear, skinny_linear_ref

__all__ = [
    "BackendUnavailable",
    "ar_topk",
    "ar_topk_ref",
    "cache_reorder",
    "cache_reorder_ref",
    "decoder_step",
    "decoder_step_ref",
    "janus_linear_loss",
    "janus_linear_loss_ref",
    "janus_loss",
    "janus_loss_ref",
    "length_beam_init",
    "length_beam_init_ref",
    "loss_terms",
    "loss_terms_ref",
    "mask_predict_update",
    "mask_predict_update_ref",
    "pad_batch",
    "pad_batch_ref",
    "registry",
    "remask_lowest",
    "remask_lowest_ref",
    "skinny_linear",
    "skinny_linear_ref",
]
