"""benchmarks/nar_gap.py: a trained model's NAR against its AR, with given lengths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from janus.api import Generator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import nar_gap  # noqa: E402


def test_rows_scores_and_given_lengths(synthetic_model, tmp_path):
    src, ref = tmp_path / "test.src", tmp_path / "test.ref"
    src.write_text("\n".join(synthetic_model.test_src[:24]) + "\n")
    ref.write_text("\n".join(synthetic_model.test_ref[:24]) + "\n")
    rows = nar_gap.main(["--checkpoint", str(synthetic_model.checkpoint), "--src", str(src), "--ref", str(ref),
                         "--batch-size", "8", "--out", str(tmp_path / "out")])  # fmt: skip
    by = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == [name for name, _, _ in nar_gap.ROWS]
    assert by["AR beam 5"]["vs_ar_beam5"] == 0
    for r in rows:
        assert 0 <= r["bleu"] <= 100 and r["vs_ar_beam5"] == round(r["bleu"] - by["AR beam 5"]["bleu"], 2)
    # Forced lengths are the lengths the output has (l=1: exactly those token counts).
    vocab = Generator.from_checkpoint(synthetic_model.checkpoint, device="cpu").vocab
    counts = [len(ids) for ids in vocab.encode(synthetic_model.test_ref[:24])]
    assert by["NAR T=10 l=1, AR beam's lengths"]["tokens"] == by["AR beam 5"]["tokens"]
    for name in ("NAR T=10 l=1, reference lengths", "NAR T=20 l=1, reference lengths"):
        assert by[name]["lengths"] == "the references'" and by[name]["tokens"] == round(sum(counts) / 24, 2)
    # Collapsing repeats leaves none.
    assert by["NAR T=10 l=3, repeats collapsed"]["repeats"] == 0
    assert by["NAR T=10 l=3, length-weighted, repeats collapsed"]["repeats"] == 0
    saved = json.loads((tmp_path / "out" / "nar_gap.json").read_text())
    assert saved["results"] == rows and saved["settings"]["sentences"] == 24
    table = (tmp_path / "out" / "nar_gap.md").read_text()
    assert table.count("\n| NAR") == len(rows) - 2 and "BLEU" in table


def test_repeats_counts_adjacent_equal_tokens():
    assert nar_gap.repeats([]) == 0
    assert nar_gap.repeats([5, 5, 5, 6, 5]) == 2


def test_line_count_mismatch_is_named(tmp_path):
    (tmp_path / "a").write_text("x\ny\n")
    (tmp_path / "b").write_text("x\n")
    with pytest.raises(SystemExit, match="2 lines but .* 1"):
        nar_gap.main(["--checkpoint", "x", "--src", str(tmp_path / "a"), "--ref", str(tmp_path / "b")])
