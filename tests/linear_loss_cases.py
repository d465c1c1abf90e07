"""Cases shared by the tests of janus_linear_loss's chunked backends (CPU and Triton): random decoder
states, projection, targets and pairings; one run with gradients; the check of a backend against the
fp64 reference by the low-precision rule of tests/tolerances.py."""

from __future__ import annotations

import torch
from tolerances import assert_within_baseline

from janus.ops.janus_linear_loss import janus_linear_loss_ref
from janus.ops.janus_loss import LossScales

V, D = 1031, 24
EPS = 0.1
SCALES = LossScales(ar=0.3, nar=0.5, aux=0.7, skl_ar_nar=1.1, skl_ar_aux=1.3, skl_nar_aux=1.7)


def problem(
    N: int, M: int, seed: int, streams: str = "abc", shuffled: bool = True, ignored: float = 0.2, device: str = "cpu"
):
    """States of the streams in ``streams`` (a: N AR rows, b/c: M masked rows), a (V, D) projection,
    targets with a share ``ignored`` of ignored rows, and a pairing (sorted unless ``shuffled``), on
    ``device`` (drawn on the CPU: the same values on every device)."""
    g = torch.Generator().manual_seed(seed)
    hidden = {k: (torch.randn(n, D, generator=g) if k in streams else None) for k, n in zip("abc", (N, M, M))}
    weight = torch.randn(V, D, generator=g) * 0.6
    ya = torch.randint(0, V, (N,), generator=g)
    ya[torch.rand(N, generator=g) < ignored] = -100
    y = torch.randint(0, V, (M,), generator=g)
    y[torch.rand(M, generator=g) < ignored] = -100
    pair = torch.randperm(N, generator=g)[:M]
    if not shuffled:
        pair = pair.sort().values
    hidden = {k: (v.to(device) if v is not None else None) for k, v in hidden.items()}
    return hidden, weight.to(device), ya.to(device), y.to(device), pair.to(device)


def run(fn, hidden, weight, ya, y, pair, dtype, scales=SCALES, **kwargs):
    """(loss, sums, grads of the a/b/c states and of the weight) with inputs cast to dtype; loss x 1.5."""
    # Fresh leaves every run (``to`` alone would return the caller's tensor and pool the gradients).
    hs = {k: (v.to(dtype, copy=True).requires_grad_() if v is not None else None) for k, v in hidden.items()}
    w = weight.to(dtype, copy=True).requires_grad_()
    out = fn(hs["a"], hs["b"], hs["c"], w, ya, y, pair, EPS, scales, **kwargs)
    (out.loss * 1.5).backward()
    grads = {k: (h.grad if h is not None else None) for k, h in hs.items()} | {"w": w.grad}
    return out.loss.detach(), out.sums, grads


def check_backend(fn, atol_fp32, hidden, weight, ya, y, pair, dtype=torch.float32, scales=SCALES, **kwargs):
    """Backend ``fn`` vs an fp64 reference from the same rounded inputs, within 2x the fp32/low-precision
    reference's own error (plus a small atol: ``atol_fp32`` in fp32). Returns fn's run."""
    exact = run(janus_linear_loss_ref, {k: v.to(dtype).double() if v is not None else None for k, v in hidden.items()},
                weight.to(dtype).double(), ya, y, pair, torch.float64, scales)  # fmt: skip
    baseline = run(janus_linear_loss_ref, hidden, weight, ya, y, pair, dtype, scales)
    got = run(fn, hidden, weight, ya, y, pair, dtype, scales, **kwargs)
    atol = atol_fp32 if dtype == torch.float32 else 2e-3
    ulp = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    # The loss and the sums are sums over every row: a backend that adds them in another order may differ
    # from the reference by an ulp or two of the value itself, however close the rows are.
    assert_within_baseline(got[0], exact[0], baseline[0], atol=10 * atol, rtol=2.0**-22, name="loss")
    assert_within_baseline(got[1], exact[1], baseline[1], atol=10 * atol, rtol=2.0**-22, name="sums")
    for k, g in got[2].items():
        assert (g is None) == (exact[2][k] is None), k
        if g is None:
            continue
        assert g.dtype == dtype
        # Per chunk, d logits is rounded to the compute dtype before the two GEMMs: the relative slack.
        assert_within_baseline(g.float(), exact[2][k], baseline[2][k].float(), atol=atol, rtol=4 * ulp, name=k)
    return got
