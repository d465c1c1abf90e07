"""Fused JANUS masked-token loss: every term of the objective and its gradient, one row at a time.

The objective (janus/ops/janus_loss.py, JANUS.md section 3) over AR rows a_n, masked
rows b_j (P_NAR) and c_j (P_AUX) paired with AR row a_pair(j):

    ls(z, y)  = (1 - eps) * (lse(z) - z_y) - eps * (mean_v z_v - lse(z))
    SKL(p, q) = (KL(p || q) + KL(q || p)) / 2
    loss = s_ar sum_n ls(a_n) + s_nar sum_j ls(b_j) + s_aux sum_j ls(c_j)
         + s_an sum_j SKL(a_pair(j), b_j) + s_ac sum_j SKL(a_pair(j), c_j) + s_nc sum_j SKL(b_j, c_j)

One program handles one "unit": an AR row together with the masked row paired with
it (``partner[n]``, -1 when none), or a masked row alone when there is no AR stream.

1. One streaming pass over the vocabulary, online in the style of a streaming
   softmax: per distribution X the running max m_X and s_X = sum_v exp(z_X,v - m_X),
   the sum of the logits (for the smoothing term), and for every ordered pair (X, Y)
   t_XY = sum_v exp(z_X,v - m_X) (z_X,v - z_Y,v), rescaled whenever m_X grows. Then
   lse_X = m_X + log s_X and KL(X || Y) = t_XY / s_X - lse_X + lse_Y.
2. The unit's nine term sums (and its weighted loss) go to its own row of a small
   (units, 10) fp32 buffer, summed afterwards: deterministic, no atomics.
3. Optionally a second pass writes d loss / d z for every row of the unit, with
   p = exp(z - lse) and D_XY = log p_X - log p_Y:
       d ls(X) / d z_X      = p_X - (1 - eps) onehot(y) - eps / V
       d SKL(X, Y) / d z_X  = (p_X (D_XY - KL(X || Y)) + p_X - p_Y) / 2
   into gradient buffers of the logits' dtype (which may be the logits themselves). The
   SKL terms' share of d / d z_a is multiplied by g_a (1: both sides, the objective as
   published; 0: a stop-gradient into P_AR).

All arithmetic is fp32 whatever the logits' dtype; row offsets are 64-bit. Rows whose
target is ``ignore_index`` contribute nothing and get a zero gradient (an ignored AR
row still takes part in the SKL terms of its masked partner, as in the reference).
Requires every pair_index entry to be distinct (each AR row pairs with at most one
masked row), which the training rows guarantee; the launcher checks it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from janus.kernels import interpreting

TERMS = 9  # ar, nar, aux, skl_ar_nar, skl_ar_aux, skl_nar_aux, ar_nll, nar_nll, aux_nll; column 9: the loss
_FAR = tl.constexpr(
    -1.0e30
)  # start of a running max: finite, so that an empty (masked-out) row never computes inf - inf


@triton.jit
def _online(m, s, z):
    """One block of a streaming softmax: new max, rescale of the old sum, exp(z - max), new sum."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    scale = tl.exp(m - m_new)
    e = tl.exp(z - m_new)
    return m_new, scale, e, s * scale + tl.sum(e, axis=0)


@triton.jit
def _smoothed(lse, z_y, z_sum, V, eps):
    """(label-smoothed CE, NLL) of one row from its log-sum-exp, target logit and logit sum."""
    nll = lse - z_y
    return (1.0 - eps) * nll - eps * (z_sum / V - lse), nll


@triton.jit
def _skl_grad(p, lp, kl_pq, q, lq):
    """d SKL(p, q) / d z_p (per vocabulary entry)."""
    return 0.5 * (p * (lp - lq - kl_pq) + p - q)


@triton.jit
def janus_loss_kernel(
    a_ptr, a_stride, ga_ptr, ga_stride, ya_ptr,
    b_ptr, b_stride, gb_ptr, gb_stride,
    c_ptr, c_stride, gc_ptr, gc_stride,
    y_ptr, partner_ptr, part_ptr,
    V, eps, s_ar, s_nar, s_aux, s_an, s_ac, s_nc, g_a, ignore_index,
    HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    unit = tl.program_id(0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_V)
    HAS_M: tl.constexpr = HAS_B or HAS_C

    # The unit's rows: AR row n = unit and its partner j (-1: none), or masked row j = unit.
    if HAS_A:
        y_a = tl.load(ya_ptr + unit)
        keep_a = y_a != ignore_index
        a_row = a_ptr + unit * a_stride
        if HAS_M:
            j = tl.load(partner_ptr + unit).to(tl.int64)
        else:
            j = unit * 0 - 1
    else:
        j = unit
    has_m = j >= 0
    has_m_block = (cols0 * 0 + j) >= 0  # the same as a block mask (a scalar one trips the interpreter)
    j_safe = tl.maximum(j, 0)  # row 0 exists: the launcher drops empty masked streams
    if HAS_M:
        y_m = tl.load(y_ptr + j_safe)
        keep_m = has_m & (y_m != ignore_index)
    if HAS_B:
        b_row = b_ptr + j_safe * b_stride
    if HAS_C:
        c_row = c_ptr + j_safe * c_stride

    # 1. One streaming pass: running maxima and sums, logit sums, cross terms.
    m_a = _FAR
    m_b = _FAR
    m_c = _FAR
    s_a = 0.0
    s_b = 0.0
    s_c = 0.0
    sum_a = 0.0
    sum_b = 0.0
    sum_c = 0.0
    t_ab = 0.0
    t_ba = 0.0
    t_ac = 0.0
    t_ca = 0.0
    t_bc = 0.0
    t_cb = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        in_v = cols < V
        in_m = in_v & has_m_block
        if HAS_A:
            za = tl.load(a_row + cols, mask=in_v, other=float("-inf")).to(tl.float32)
            m_a, scale_a, ea, s_a = _online(m_a, s_a, za)
            sum_a += tl.sum(tl.where(in_v, za, 0.0), axis=0)
            t_ab *= scale_a
            t_ac *= scale_a
        if HAS_B:
            zb = tl.load(b_row + cols, mask=in_m, other=float("-inf")).to(tl.float32)
            m_b, scale_b, eb, s_b = _online(m_b, s_b, zb)
            sum_b += tl.sum(tl.where(in_m, zb, 0.0), axis=0)
            t_ba *= scale_b
            t_bc *= scale_b
        if HAS_C:
            zc = tl.load(c_row + cols, mask=in_m, other=float("-inf")).to(tl.float32)
            m_c, scale_c, ec, s_c = _online(m_c, s_c, zc)
            sum_c += tl.sum(tl.where(in_m, zc, 0.0), axis=0)
            t_ca *= scale_c
            t_cb *= scale_c
        if HAS_A and HAS_B:
            d = tl.where(in_m, za - zb, 0.0)
            t_ab += tl.sum(ea * d, axis=0)
            t_ba -= tl.sum(eb * d, axis=0)
        if HAS_A and HAS_C:
            d = tl.where(in_m, za - zc, 0.0)
            t_ac += tl.sum(ea * d, axis=0)
            t_ca -= tl.sum(ec * d, axis=0)
        if HAS_B and HAS_C:
            d = tl.where(in_m, zb - zc, 0.0)
            t_bc += tl.sum(eb * d, axis=0)
            t_cb -= tl.sum(ec * d, axis=0)

    # 2. The unit's terms (tl.where, not a product: an absent row's values are not finite).
    ar = 0.0
    ar_nll = 0.0
    nar = 0.0
    nar_nll = 0.0
    aux = 0.0
    aux_nll = 0.0
    skl_ab = 0.0
    skl_ac = 0.0
    skl_bc = 0.0
    if HAS_A:
        lse_a = m_a + tl.log(s_a)
        za_y = tl.load(a_row + tl.where(keep_a, y_a, 0)).to(tl.float32)
        ls, nll = _smoothed(lse_a, za_y, sum_a, V, eps)
        ar = tl.where(keep_a, ls, 0.0)
        ar_nll = tl.where(keep_a, nll, 0.0)
    if HAS_B:
        lse_b = m_b + tl.log(s_b)
        zb_y = tl.load(b_row + tl.where(keep_m, y_m, 0)).to(tl.float32)
        ls, nll = _smoothed(lse_b, zb_y, sum_b, V, eps)
        nar = tl.where(keep_m, ls, 0.0)
        nar_nll = tl.where(keep_m, nll, 0.0)
    if HAS_C:
        lse_c = m_c + tl.log(s_c)
        zc_y = tl.load(c_row + tl.where(keep_m, y_m, 0)).to(tl.float32)
        ls, nll = _smoothed(lse_c, zc_y, sum_c, V, eps)
        aux = tl.where(keep_m, ls, 0.0)
        aux_nll = tl.where(keep_m, nll, 0.0)
    if HAS_A and HAS_B:
        kl_ab = t_ab / s_a - lse_a + lse_b
        kl_ba = t_ba / s_b - lse_b + lse_a
        skl_ab = tl.where(keep_m, 0.5 * (kl_ab + kl_ba), 0.0)
    if HAS_A and HAS_C:
        kl_ac = t_ac / s_a - lse_a + lse_c
        kl_ca = t_ca / s_c - lse_c + lse_a
        skl_ac = tl.where(keep_m, 0.5 * (kl_ac + kl_ca), 0.0)
    if HAS_B and HAS_C:
        kl_bc = t_bc / s_b - lse_b + lse_c
        kl_cb = t_cb / s_c - lse_c + lse_b
        skl_bc = tl.where(keep_m, 0.5 * (kl_bc + kl_cb), 0.0)
    out = part_ptr + unit * 10
    tl.store(out + 0, ar)
    tl.store(out + 1, nar)
    tl.store(out + 2, aux)
    tl.store(out + 3, skl_ab)
    tl.store(out + 4, skl_ac)
    tl.store(out + 5, skl_bc)
    tl.store(out + 6, ar_nll)
    tl.store(out + 7, nar_nll)
    tl.store(out + 8, aux_nll)
    tl.store(out + 9, s_ar * ar + s_nar * nar + s_aux * aux + s_an * skl_ab + s_ac * skl_ac + s_nc * skl_bc)

    # 3. Gradients, one more pass (every entry of every row of the unit is written).
    if WRITE_GRAD:
        smooth = eps / V
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            in_v = cols < V
            in_m = in_v & has_m_block
            if HAS_A:
                lpa = tl.load(a_row + cols, mask=in_v, other=0.0).to(tl.float32) - lse_a
                pa = tl.exp(lpa)
            if HAS_B:
                lpb = tl.load(b_row + cols, mask=in_m, other=0.0).to(tl.float32) - lse_b
                pb = tl.exp(lpb)
            if HAS_C:
                lpc = tl.load(c_row + cols, mask=in_m, other=0.0).to(tl.float32) - lse_c
                pc = tl.exp(lpc)
            if HAS_A:
                ga = tl.where(keep_a, s_ar, 0.0) * (pa - smooth - tl.where(cols == y_a, 1.0 - eps, 0.0))
                if HAS_B:
                    ga += tl.where(keep_m, g_a * s_an * _skl_grad(pa, lpa, kl_ab, pb, lpb), 0.0)
                if HAS_C:
                    ga += tl.where(keep_m, g_a * s_ac * _skl_grad(pa, lpa, kl_ac, pc, lpc), 0.0)
                ga = tl.where(in_v, ga, 0.0)
                tl.store(ga_ptr + unit * ga_stride + cols, ga.to(ga_ptr.dtype.element_ty), mask=in_v)
            if HAS_B:
                gb = tl.where(keep_m, s_nar, 0.0) * (pb - smooth - tl.where(cols == y_m, 1.0 - eps, 0.0))
                if HAS_A:
                    gb += tl.where(keep_m, s_an * _skl_grad(pb, lpb, kl_ba, pa, lpa), 0.0)
                if HAS_C:
                    gb += tl.where(keep_m, s_nc * _skl_grad(pb, lpb, kl_bc, pc, lpc), 0.0)
                tl.store(gb_ptr + j_safe * gb_stride + cols, gb.to(gb_ptr.dtype.element_ty), mask=in_m)
            if HAS_C:
                gc = tl.where(keep_m, s_aux, 0.0) * (pc - smooth - tl.where(cols == y_m, 1.0 - eps, 0.0))
                if HAS_A:
                    gc += tl.where(keep_m, s_ac * _skl_grad(pc, lpc, kl_ca, pa, lpa), 0.0)
                if HAS_B:
                    gc += tl.where(keep_m, s_nc * _skl_grad(pc, lpc, kl_cb, pb, lpb), 0.0)
                tl.store(gc_ptr + j_safe * gc_stride + cols, gc.to(gc_ptr.dtype.element_ty), mask=in_m)


class RepeatedPairsError(ValueError):
    """pair_index pairs an AR row with two masked rows: a layout the kernel does not take."""


def partners(pair_index: Tensor, num_ar: int) -> Optional[Tensor]:
    """partner[n] = the masked row paired with AR row n, or -1: int32 (num_ar,); None when some AR
    row is paired twice (the kernel cannot take that layout). One device-to-host sync."""
    masked = torch.arange(pair_index.numel(), device=pair_index.device, dtype=torch.int32)
    partner = torch.full((num_ar,), -1, dtype=torch.int32, device=pair_index.device)
    partner.index_put_((pair_index,), masked)
    if not bool((partner.index_select(0, pair_index) == masked).all()):
        return None
    return partner


def janus_loss_forward(
    ar_logits: Optional[Tensor],
    ar_targets: Optional[Tensor],
    nar_logits: Optional[Tensor],
    aux_logits: Optional[Tensor],
    masked_targets: Optional[Tensor],
    pair_index: Optional[Tensor],
    eps: float,
    scales: tuple[float, ...],
    ignore_index: int,
    grads: Optional[tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]] = None,
    partner: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Launch the fused kernel. Returns (loss () fp32, sums (9,) fp32 in TERMS order of janus.ops.janus_loss).

    Args:
        ar_logits: (N, V) or None; nar_logits, aux_logits: (M, V) or None (at least one of the three);
            fp32, fp16 or bf16, unit stride along V.
        ar_targets: int64 (N,); masked_targets: int64 (M,); pair_index: int64 (M,), distinct entries,
            required when AR and a masked stream are both given.
        partner: ``partners(pair_index, N)`` when already computed.
        scales: (ar, nar, aux, skl_ar_nar, skl_ar_aux, skl_nar_aux) multipliers of the summed terms, then
            skl_grad_ar, the factor on the gradient the SKL terms send into the AR logits
            (``janus.ops.janus_loss.LossScales``).
        grads: when given, (d_ar, d_nar, d_aux) buffers shaped like the logits (None for absent ones;
            a logits tensor itself for in place) that receive d loss / d logits.
    """
    # A masked stream without rows contributes nothing: drop it (the kernel then never reads its row 0).
    a = ar_logits
    b = nar_logits if nar_logits is not None and nar_logits.shape[0] > 0 else None
    c = aux_logits if aux_logits is not None and aux_logits.shape[0] > 0 else None
    if a is None and b is None and c is None:
        a = next((x for x in (nar_logits, aux_logits) if x is not None), None)
        if a is not None:  # only empty masked streams: nothing to compute
            zero = torch.zeros((), dtype=torch.float32, device=a.device)
            return zero, torch.zeros(TERMS, dtype=torch.float32, device=a.device)
    present = [x for x in (a, b, c) if x is not None]
    if not present:
        raise ValueError("janus_loss (triton): no logits given")
    V = present[0].shape[-1]
    for x in present:
        if x.dim() != 2 or x.shape[1] != V or x.stride(1) != 1:
            raise ValueError(f"janus_loss (triton): logits must be (rows, {V}) with unit stride along V, got "
                             f"shape {tuple(x.shape)} stride {x.stride()}")  # fmt: skip
    device = present[0].device
    has_m = b is not None or c is not None
    if a is not None:
        units = a.shape[0]
        if has_m and partner is None:
            partner = partners(pair_index, units)
            if partner is None:
                raise RepeatedPairsError("janus_loss (triton): pair_index pairs an AR row with two masked rows")
        elif not has_m:
            partner = torch.empty(0, dtype=torch.int32, device=device)
    else:
        units = (b if b is not None else c).shape[0]
        partner = torch.empty(0, dtype=torch.int32, device=device)
    part = torch.empty((units, 10), dtype=torch.float32, device=device)
    if units == 0:
        return part.sum(0)[9], part.sum(0)[:TERMS]
    g = grads if grads is not None else (None, None, None)
    if grads is not None and any(x is not None and gx is None for x, gx in zip((a, b, c), g)):
        raise ValueError("janus_loss (triton): grads needs a buffer for every logits tensor given")
    dummy = present[0]

    def ptr(x: Optional[Tensor]) -> Tensor:
        return x if x is not None else dummy

    def stride(x: Optional[Tensor]) -> int:
        return x.stride(0) if x is not None else 0

    targets_m = masked_targets if has_m else ar_targets
    block = min(2048 if not interpreting() else 4096, triton.next_power_of_2(V))
    janus_loss_kernel[(units,)](
        ptr(a), stride(a), ptr(g[0] if a is not None else None), stride(g[0]), ptr(ar_targets),
        ptr(b), stride(b), ptr(g[1] if b is not None else None), stride(g[1]),
        ptr(c), stride(c), ptr(g[2] if c is not None else None), stride(g[2]),
        ptr(targets_m), partner if partner.numel() else part, part,
        V, float(eps), *(float(s) for s in scales), int(ignore_index),
        HAS_A=a is not None, HAS_B=b is not None, HAS_C=c is not None,
        WRITE_GRAD=grads is not None, BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip
    totals = part.sum(0)
    return totals[9], totals[:TERMS]


def chunk_rows_for(vocab: int, streams: int, budget: int = 1 << 24) -> int:
    """AR rows per chunk of the fused linear + loss: about ``budget`` logits in flight over all streams."""
    return max(16, budget // max(1, vocab * streams))


def janus_linear_loss_forward(
    hidden_ar: Optional[Tensor],
    hidden_nar: Optional[Tensor],
    hidden_aux: Optional[Tensor],
    weight: Tensor,
    ar_targets: Optional[Tensor],
    masked_targets: Optional[Tensor],
    pair_index: Optional[Tensor],
    eps: float,
    scales: tuple[float, ...],
    ignore_index: int,
    *,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    compute_dtype: torch.dtype,
    chunk_rows: Optional[int] = None,
) -> tuple[Tensor, Tensor, tuple[Optional[Tensor], ...], Optional[Tensor]]:
    """The loss from decoder states and the shared projection, chunk by chunk, with its gradients.

    Per chunk of AR rows (or of masked rows when there is no AR stream) and the masked rows paired
    with them: logits = h @ weight.T in ``compute_dtype`` for that chunk only, the fused kernel writes
    d loss / d logits over them in place, then d h = g @ weight and d weight += g.T @ h (fp32
    accumulator). The full (rows, V) logits never exist.

    Returns:
        (loss () fp32, sums (9,) fp32, (d hidden_ar, d hidden_nar, d hidden_aux) in the hidden
        states' dtypes or None, d weight fp32 or None), gradients for a loss gradient of 1.
    """
    hs = (hidden_ar, hidden_nar, hidden_aux)
    present = [h for h in hs if h is not None]
    device = weight.device
    w = weight.to(compute_dtype)
    grads_h = tuple(torch.zeros_like(h) if h is not None and need_hidden_grad else None for h in hs)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_weight_grad else None
    need_grad = need_hidden_grad or need_weight_grad
    has_a = hidden_ar is not None
    has_m = any(h is not None and h.shape[0] > 0 for h in (hidden_nar, hidden_aux))
    streams = len(present)
    V = weight.shape[0]

    # The masked rows of each chunk: those whose AR partner falls in the chunk (sorted by partner).
    if has_a and has_m:
        order = torch.argsort(pair_index, stable=True)
        sorted_pairs = pair_index.index_select(0, order)
        if partners(pair_index, hidden_ar.shape[0]) is None:
            raise RepeatedPairsError("janus_linear_loss (triton): pair_index pairs an AR row with two masked rows")
        lead = hidden_ar
    else:
        lead = next(h for h in hs if h is not None)
    rows = lead.shape[0]
    step = chunk_rows or chunk_rows_for(V, streams)
    total = torch.zeros((), dtype=torch.float32, device=device)
    sums = torch.zeros(TERMS, dtype=torch.float32, device=device)
    bounds = torch.arange(0, rows + step, step, device=device).clamp_max(rows)
    if has_a and has_m:
        edges = torch.searchsorted(sorted_pairs, bounds).tolist()  # one sync for every chunk's range
    for i, start in enumerate(range(0, rows, step)):
        end = min(start + step, rows)
        chunk_h: list[Optional[Tensor]] = [None, None, None]
        index: Optional[Tensor] = None  # masked rows of this chunk
        if has_a:
            chunk_h[0] = hidden_ar[start:end]
            if has_m:
                index = order[edges[i] : edges[i + 1]]
                local_pairs = sorted_pairs[edges[i] : edges[i + 1]] - start
        else:
            index = torch.arange(start, end, device=device)
        if index is not None:
            for k in (1, 2):
                if hs[k] is not None and hs[k].shape[0] > 0:
                    chunk_h[k] = hs[k].index_select(0, index)
        hc = [h.to(compute_dtype) if h is not None else None for h in chunk_h]
        logits = [h @ w.T if h is not None else None for h in hc]
        targets_m = masked_targets.index_select(0, index) if index is not None else None
        partner = None
        if has_a and has_m:
            partner = torch.full((end - start,), -1, dtype=torch.int32, device=device)
            partner[local_pairs] = torch.arange(index.numel(), dtype=torch.int32, device=device)
        loss, part = janus_loss_forward(
            logits[0], ar_targets[start:end] if has_a else None, logits[1], logits[2], targets_m,
            local_pairs if has_a and has_m else None, eps, scales, ignore_index,
            grads=tuple(logits) if need_grad else None, partner=partner,
        )  # fmt: skip
        total += loss
        sums += part
        if not need_grad:
            continue
        for k, (g, h) in enumerate(zip(logits, hc)):
            if g is None:
                continue
            if grads_h[k] is not None:
                dh = (g @ w).to(grads_h[k].dtype)
                if k == 0:  # AR rows: the chunk itself
                    grads_h[0][start:end] = dh
                else:
                    grads_h[k].index_copy_(0, index, dh)
            if grad_w is not None:
                grad_w += (g.T @ h).float()
    return total, sums, grads_h, grad_w
