"""benchmarks/spec_passes.py: passes of spec variants against greedy's, output checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import spec_passes  # noqa: E402


def test_counts_passes_and_checks_output(synthetic_model, tmp_path):
    src = tmp_path / "test.src"
    src.write_text("\n".join(synthetic_model.test_src[:24]) + "\n")
    out = tmp_path / "passes.json"
    rows = spec_passes.main(["--checkpoint", str(synthetic_model.checkpoint), "--src", str(src), "--batch-size", "8",
                             "--variants", "exhausted:1:position,always:2:lookup", "--out", str(out)])  # fmt: skip
    assert [(r["draft_policy"], r["draft_iterations"], r["draft_align"]) for r in rows] == [
        ("exhausted", 1, "position"),
        ("always", 2, "lookup"),
    ]
    for r in rows:
        assert r["sentences"] == 24 and r["identical"] == 24 and r["more_passes_than_greedy"] == 0
        assert 0 < r["passes_vs_greedy"] < 1
        ratio = r["passes_per_sentence"] / r["greedy_passes_per_sentence"]
        assert abs(ratio - r["passes_vs_greedy"]) < 1e-2
    assert json.loads(out.read_text())["results"] == rows


def test_block_variant(synthetic_model, tmp_path):
    src = tmp_path / "test.src"
    src.write_text("\n".join(synthetic_model.test_src[:24]) + "\n")
    rows = spec_passes.main(["--checkpoint", str(synthetic_model.checkpoint), "--src", str(src), "--batch-size", "8",
                             "--variants", "exhausted:1:lookup:0,exhausted:1:lookup:1"])  # fmt: skip
    assert [r["draft_block"] for r in rows] == [0, 1]
    for r in rows:
        assert r["identical"] == 24 and r["more_passes_than_greedy"] == 0
    # a pass checking one draft token accepts at most two: at least half of greedy's passes (one a token and eos)
    assert rows[1]["passes_vs_greedy"] >= 0.5
    assert rows[0]["passes_vs_greedy"] < rows[1]["passes_vs_greedy"]


@pytest.mark.parametrize("variant", ["exhausted:one:lookup", "exhausted:1:lookup:all", "exhausted:1:lookup:0:x"])
def test_bad_variant_is_named(variant):
    with pytest.raises(SystemExit, match=variant):
        spec_passes.main(["--checkpoint", "x", "--src", "y", "--variants", variant])


def test_bad_source_bytes_name_the_line(tmp_path):
    src = tmp_path / "test.src"
    src.write_bytes(b"Klicken Sie auf OK.\n\xff Fehler\n")
    with pytest.raises(ValueError, match=r"test\.src: line 2 is not valid UTF-8"):
        spec_passes.main(["--checkpoint", "unused", "--src", str(src)])
