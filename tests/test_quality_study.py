"""benchmarks/quality.py: three objectives at an equal budget, averaged, scored, and resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402
from plot_helpers import check_plots  # noqa: E402


@pytest.mark.slow
def test_study_trains_averages_scores_and_resumes(tmp_path, synthetic_model, monkeypatch):
    out = tmp_path / "study"
    args = ["--data", str(synthetic_model.data), "--out", str(out), "--preset", "tiny", "--steps", "20",
            "--max-tokens", "1024", "--warmup", "5", "--lr", "5e-3", "--save-interval", "10", "--average", "2",
            "--device", "cpu", "--test-prefix", str(synthetic_model.raw / "test"), "--src", "src", "--tgt", "tgt",
            "--test-sentences", "20", "--timing-sentences", "3", "--timing-rounds", "2", "--no-progress"]  # fmt: skip
    rows = quality.main(args)
    assert [(r["objective"], r["decode"]) for r in rows] == [
        ("ar", "AR beam 5"), ("ar", "AR greedy"), ("cmlm", "NAR T=10 l=3"), ("janus", "AR beam 5"),
        ("janus", "AR greedy"), ("janus", "NAR T=10 l=3"), ("janus", "NAR T=10 l=3 rerank"), ("janus", "spec"),
    ]  # fmt: skip
    spec = rows[-1]
    assert spec["equals_ar_greedy"] == 1.0  # spec decoding is AR greedy search, sentence for sentence
    ms = {(r["objective"], r["decode"]): r["ms_b1_p50"] for r in rows}
    assert spec["speedup_vs_beam5"] == pytest.approx(ms["janus", "AR beam 5"] / ms["janus", "spec"])
    assert rows[2]["speedup_vs_beam5"] == pytest.approx(ms["ar", "AR beam 5"] / ms["cmlm", "NAR T=10 l=3"])
    for r in rows:
        assert 0 <= r["bleu"] <= 100 and r["sentences"] == 20 and r["timing_sentences"] == 3 and r["timing_rounds"] == 2
        assert 0 < r["ms_b1_p50"] <= r["ms_b1_p90"]
        assert r["bleu_signature"].startswith("nrefs:1") and r["chrf_signature"].startswith("nrefs:1")
    nar = next(r for r in rows if r["decode"] == "NAR T=10 l=3")
    assert nar["passes"] == 10
    for objective in ("ar", "cmlm", "janus"):
        averaged = json.loads((out / objective / "averaged" / "average.json").read_text())
        assert [Path(p).name for p in averaged["averaged"]] == ["checkpoint_00000010", "checkpoint_00000020"]
    saved = json.loads((out / "quality.json").read_text())
    assert saved["settings"]["steps"] == 20 and len(saved["results"]) == 8
    assert (out / "quality.md").read_text().count("janus") == 5

    # A second run finds every objective trained: nothing is trained again, the scores are the same.
    monkeypatch.setattr(quality, "train", lambda cfg: pytest.fail(f"trained {cfg.objective} again"))
    again = quality.main(args)
    assert [r["bleu"] for r in again] == [r["bleu"] for r in rows]
    assert saved["budget"]["janus"]["train_seconds"] > 0  # read back from the log, not re-timed
    check_plots(out / "bleu_vs_speed.png", min_bytes=1_000)


@pytest.mark.slow
def test_train_only_trains_and_averages_without_scoring(tmp_path, synthetic_model, monkeypatch):
    out = tmp_path / "study"
    monkeypatch.setattr(quality, "score", lambda *a, **k: pytest.fail("scored with --train-only"))
    rows = quality.main(["--data", str(synthetic_model.data), "--out", str(out), "--objectives", "cmlm",
                         "--preset", "tiny", "--steps", "4", "--max-tokens", "512", "--warmup", "2",
                         "--save-interval", "2", "--average", "2", "--device", "cpu", "--train-only",
                         "--no-progress"])  # fmt: skip
    assert rows == [] and not (out / "quality.json").exists()
    assert (out / "cmlm" / "averaged" / "average.json").is_file()


def test_training_record_sums_runs_and_skips_the_downtime(tmp_path):
    assert quality.training_record(tmp_path) == {}
    events = [dict(time=100.0, event="start", device="cpu", train=dict(threads=1)), dict(time=130.0, event="train"),
              dict(time=160.0, event="valid"), dict(time=5000.0, event="resume"), dict(time=5001.0, event="start"),
              dict(time=5011.0, event="end"), dict(event="note")]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    record = quality.training_record(tmp_path)
    assert record["train_seconds"] == pytest.approx(60.0 + 10.0) and record["runs"] == 2
    assert record["threads"] is None and record["device"] is None  # the last run's start event says nothing
