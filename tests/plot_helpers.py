"""Plot checks of the benchmark tests: matplotlib is an extra (`plot`), not a dependency."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness import PLOT_MISSING  # noqa: E402


def check_plots(*paths: Path, min_bytes: int = 10_000) -> None:
    """Each path is a PNG of at least ``min_bytes``; without matplotlib none was written and the
    calling test, whose other checks ran first, skips with the reason. Call it last."""
    if importlib.util.find_spec("matplotlib") is None:
        assert not any(p.exists() for p in paths), paths
        pytest.skip(f"plots not checked: {PLOT_MISSING}")
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
        assert p.stat().st_size >= min_bytes, (p, p.stat().st_size)
