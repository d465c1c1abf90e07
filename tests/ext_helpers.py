"""Helpers for tests of the compiled ops (janus._C or its on-first-use build)."""

from __future__ import annotations

import os

import pytest
import torch

from janus import _ext


def require_extension() -> None:
    """Skip without the compiled ops, or fail when JANUS_REQUIRE_EXT=1 (CI)."""
    ok, why = _ext.status()
    if ok:
        return
    if os.environ.get("JANUS_REQUIRE_EXT") == "1":
        pytest.fail(f"JANUS_REQUIRE_EXT=1 but the compiled ops are unavailable: {why}")
    pytest.skip(f"compiled ops unavailable: {why}")


def require_kernel(op_name: str, device: str) -> None:
    """Skip unless ``torch.ops.janus.<op_name>`` can run on ``device`` ("cpu" or "cuda").

    A missing CUDA device skips; a missing kernel fails under JANUS_REQUIRE_EXT=1.
    """
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    require_extension()
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"janus::{op_name}", key):
        message = f"the compiled ops have no {key} kernel for {op_name}"
        if os.environ.get("JANUS_REQUIRE_EXT") == "1":
            pytest.fail(f"JANUS_REQUIRE_EXT=1: {message}")
        pytest.skip(message)
