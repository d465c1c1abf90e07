"""Tolerance rules shared by the kernel tests.

Low precision (after flash-attention's tests): a kernel fed fp16/bf16 inputs is compared
with an fp64 computation from the same (rounded) inputs, and its error may be at most
``factor`` times the error of plain PyTorch in that same precision, plus a small ``atol``
for results that PyTorch happens to get almost exactly right. ``rtol`` adds a share of each
exact value, for outputs stored in the low precision twice where PyTorch rounds once (a
gradient written by a kernel's forward and scaled in its backward).
"""

from __future__ import annotations

import torch


def max_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x.double() - exact.double()).abs().max()) if x.numel() else 0.0


def assert_within_baseline(
    kernel: torch.Tensor, exact: torch.Tensor, baseline: torch.Tensor, *, factor: float = 2.0, atol: float = 1e-5,
    rtol: float = 0.0, name: str = "",
) -> None:  # fmt: skip
    """|kernel - exact| - rtol |exact| <= factor * max |baseline - exact| + atol everywhere
    (exact: fp64 from the same inputs)."""
    assert kernel.shape == exact.shape == baseline.shape, (name, kernel.shape, exact.shape, baseline.shape)
    if not kernel.numel():
        return
    excess = float(((kernel.double() - exact.double()).abs() - rtol * exact.double().abs()).max())
    base = max_error(baseline, exact)
    assert excess <= factor * base + atol, (
        f"{name}: kernel error {max_error(kernel, exact):.3g} (beyond rtol {rtol:g}: {excess:.3g}) "
        f"> {factor} x PyTorch's {base:.3g} + {atol:g}"
    )
