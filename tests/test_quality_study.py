"""benchmarks/quality.py: variants at an equal budget, averaged, scored, with curves, and resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

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
            "--test-sentences", "20", "--timing-sentences", "3", "--timing-rounds", "2", "--no-progress",
            "--curve-every", "10", "--curve-sentences", "8"]  # fmt: skip
    rows = quality.main(args)
    assert [(r["variant"], r["decode"]) for r in rows] == [
        ("ar", "AR beam 5"), ("ar", "AR greedy"), ("cmlm", "NAR T=10 l=3"), ("cmlm", "NAR T=10 l=3 lw1 dedup"),
        ("cmlm", "NAR T=4 l=1"), ("janus", "AR beam 5"), ("janus", "AR greedy"), ("janus", "NAR T=10 l=3"),
        ("janus", "NAR T=10 l=3 rerank"), ("janus", "NAR T=10 l=3 lw1 dedup"), ("janus", "NAR T=10 l=3 rerank dedup"),
        ("janus", "NAR T=4 l=1"),
        ("janus", "spec"),
    ]  # fmt: skip
    spec = rows[-1]
    assert spec["equals_ar_greedy"] == 1.0  # spec decoding is AR greedy search, sentence for sentence
    assert spec["passes_vs_greedy"] == pytest.approx(spec["passes"] / rows[6]["passes"])
    ms = {(r["variant"], r["decode"]): r["ms_b1_p50"] for r in rows}
    assert spec["speedup_vs_beam5"] == pytest.approx(ms["janus", "AR beam 5"] / ms["janus", "spec"])
    assert rows[2]["speedup_vs_beam5"] == pytest.approx(ms["ar", "AR beam 5"] / ms["cmlm", "NAR T=10 l=3"])
    for r in rows:
        assert 0 <= r["bleu"] <= 100 and r["sentences"] == 20 and r["timing_sentences"] == 3 and r["timing_rounds"] == 2
        assert 0 < r["ms_b1_p50"] <= r["ms_b1_p90"]
        assert r["bleu_signature"].startswith("nrefs:1") and r["chrf_signature"].startswith("nrefs:1")
    nar = next(r for r in rows if r["decode"] == "NAR T=10 l=3")
    tuned = next(r for r in rows if r["decode"] == "NAR T=10 l=3 lw1 dedup")
    assert tuned["passes"] == 10 and tuned["settings"]["length_weight"] == 1.0 and tuned["settings"]["dedup"] is True
    reranked = next(r for r in rows if r["decode"] == "NAR T=10 l=3 rerank dedup")
    assert reranked["passes"] == 11 and reranked["settings"]["rerank"] is True and reranked["settings"]["dedup"] is True
    assert nar["passes"] == 10 and next(r for r in rows if r["decode"] == "NAR T=4 l=1")["passes"] == 4
    for objective in ("ar", "cmlm", "janus"):
        averaged = json.loads((out / objective / "averaged" / "average.json").read_text())
        assert [Path(p).name for p in averaged["averaged"]] == ["checkpoint_00000010", "checkpoint_00000020"]
    saved = json.loads((out / "quality.json").read_text())
    assert saved["settings"]["steps"] == 20 and len(saved["results"]) == 13
    assert (out / "quality.md").read_text().count("janus") == 8 + 1  # its rows, and its recipe row
    # Curves: the cheap decode of each head at updates 10 and 20, cached beside the run.
    assert sorted(saved["curves"]["janus"]) == ["10", "20"]
    assert set(saved["curves"]["janus"]["20"]) == {"AR greedy", "NAR T=4 l=1"}
    assert set(saved["curves"]["cmlm"]["10"]) == {"NAR T=4 l=1"} and set(saved["curves"]["ar"]["10"]) == {"AR greedy"}
    assert (out / "janus" / "curve.json").is_file() and (out / "logs" / "cmlm.train.jsonl").is_file()

    # A second run finds every objective trained: nothing is trained again, the scores are the same.
    monkeypatch.setattr(quality, "train", lambda cfg: pytest.fail(f"trained {cfg.objective} again"))
    monkeypatch.setattr(quality.Generator, "generate", _no_curve_decodes(quality.Generator.generate))
    again = quality.main(args)
    assert [r["bleu"] for r in again] == [r["bleu"] for r in rows]
    assert saved["budget"]["janus"]["train_seconds"] > 0  # read back from the log, not re-timed
    check_plots(out / "bleu_vs_speed.png", out / "bleu_vs_updates.png", min_bytes=1_000)


def _no_curve_decodes(generate):
    """Generator.generate that fails when a curve point is decoded again (8 valid sentences)."""

    def wrapped(self, sources, *a, **k):
        assert len(sources) != 8, "a cached curve point was decoded again"
        return generate(self, sources, *a, **k)

    return wrapped


def test_variants_run_after_their_source_and_take_the_rest_of_the_budget(tmp_path):
    assert [v.name for v in quality.variants_of("janus-ar-init,cmlm")] == ["ar", "janus-ar-init", "cmlm"]
    every = [v.name for v in quality.variants_of("all")]
    assert every[:3] == ["ar", "cmlm", "janus"] and "cmlm-kd" not in every
    assert "cmlm-kd" in [v.name for v in quality.variants_of("all", distilled=True)]
    with pytest.raises(SystemExit, match="--distilled-data"):
        quality.train_config(quality.VARIANTS["cmlm-kd"], _args(tmp_path, distilled_data=""), tmp_path)
    kd = quality.train_config(quality.VARIANTS["cmlm-kd"], _args(tmp_path, distilled_data="kd-bin"), tmp_path)
    assert kd.data == "kd-bin" and kd.objective == "cmlm"
    with pytest.raises(SystemExit, match="unknown variants"):
        quality.variants_of("janus,nope")
    ns = _args(tmp_path, steps=3000)
    sched = quality.train_config(quality.VARIANTS["janus-sched"], ns, tmp_path)
    assert (sched.joint_start, sched.joint_ramp, sched.max_steps, sched.keep_last) == (1500, 300, 3000, 0)
    stop = quality.train_config(quality.VARIANTS["janus-stopgrad"], ns, tmp_path)
    assert stop.skl_stop_grad == "ar" and stop.objective == "janus"
    noaux = quality.train_config(quality.VARIANTS["janus-noaux"], ns, tmp_path).loss_weights()
    assert noaux.aux == noaux.skl_ar_aux == noaux.skl_nar_aux == 0 and noaux.skl_ar_nar == 1.0
    light = quality.train_config(quality.VARIANTS["janus-light"], ns, tmp_path).loss_weights()
    published = noaux.__class__()
    for name in ("nar", "aux", "length", "skl_ar_nar", "skl_ar_aux", "skl_nar_aux"):
        assert getattr(light, name) == pytest.approx(getattr(published, name) / 10), name
    assert light.ar == 1.0
    init = quality.VARIANTS["janus-ar-init"]
    with pytest.raises(SystemExit, match="checkpoint_00001500, which is missing: train ar first"):
        quality.train_config(init, ns, tmp_path)
    (tmp_path / "ar" / "checkpoint_00001500").mkdir(parents=True)
    cfg = quality.train_config(init, ns, tmp_path)
    assert cfg.init_from == str(tmp_path / "ar" / "checkpoint_00001500") and cfg.max_steps == 1500


def _args(tmp_path, **kw):
    import argparse

    base = dict(data="bin", preset="small", steps=3000, max_tokens=2048, warmup=400, lr=1e-3, dropout=0.1, seed=1,
                save_interval=250, device="cpu", threads=1, progress=False, distilled_data="")  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


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
    # Up to an update: the time until the first event at that update.
    steps = [dict(time=0.0, event="start"), dict(time=5.0, event="train", step=10),
             dict(time=9.0, event="valid", step=20), dict(time=30.0, event="train", step=30)]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in steps))
    assert quality.training_record(tmp_path, until_step=20)["train_seconds"] == pytest.approx(9.0)


def test_interval_checkpoints_leave_out_the_ones_saved_by_wall_time(monkeypatch, tmp_path):
    saved = [tmp_path / f"checkpoint_{s:08d}" for s in (250, 311, 500, 622, 750)]
    monkeypatch.setattr(quality, "list_checkpoints", lambda d: saved)
    assert [p.name for p in quality.interval_checkpoints(tmp_path, 250)] == [
        "checkpoint_00000250", "checkpoint_00000500", "checkpoint_00000750"
    ]  # fmt: skip


def _study(path: Path, updates: int, scores: dict[str, dict[str, float]], passes: Optional[dict] = None) -> Path:
    """A quality.py result file holding ``scores`` (variant -> decode -> BLEU) at ``updates``."""
    results = [dict(variant=v, objective=v.split("-")[0], decode=d, bleu=b, train_min=10.0)
               for v, decodes in scores.items() for d, b in decodes.items()]  # fmt: skip
    results += [dict(variant=v, objective="janus", decode="spec", bleu=0.0, passes_vs_greedy=p, equals_ar_greedy=1.0)
                for v, p in (passes or {}).items()]  # fmt: skip
    budget = {v: dict(updates=updates, about=f"recipe {v}") for v in scores}
    path.write_text(json.dumps(dict(settings=dict(steps=updates), budget=budget, results=results)))
    return path


def test_summary_merges_studies_and_judges_each_recipe_against_its_budgets_baselines(tmp_path):
    import quality_summary

    x = {"AR beam 5": 23.0, "NAR T=10 l=3": 10.0, "AR greedy": 21.0}
    a = _study(tmp_path / "a.json", 3000, {"ar": {"AR beam 5": 24.0}, "cmlm": {"NAR T=10 l=3": 7.5}, "janus-x": x})
    b = _study(tmp_path / "b.json", 3000, {"janus-y": {"AR beam 5": 24.5, "NAR T=10 l=3": 9.6, "AR greedy": 22.0}},
               passes={"janus-y": 0.7})  # fmt: skip
    c = _study(tmp_path / "c.json", 6000, {"ar": {"AR beam 5": 27.0}, "cmlm": {"NAR T=10 l=3": 9.0},
                                          "janus-x": {"AR beam 5": 27.5, "NAR T=10 l=3": 11.5}})  # fmt: skip
    again = _study(tmp_path / "again.json", 3000, {"janus-x": {"AR beam 5": 23.5, "NAR T=10 l=3": 10.0}})
    rows = quality_summary.main([str(a), str(b), str(c), str(again), "--out", str(tmp_path / "out" / "summary")])
    by = {(r["variant"], r["updates"]): r for r in rows}
    assert set(by) == {("ar", 3000), ("cmlm", 3000), ("janus-x", 3000), ("janus-y", 3000), ("ar", 6000),
                       ("cmlm", 6000), ("janus-x", 6000)}  # fmt: skip
    x3, y3, x6 = by["janus-x", 3000], by["janus-y", 3000], by["janus-x", 6000]
    assert x3["ar_beam5"] == 23.5 and x3["file"] == str(again)  # the later file's scores replace the earlier's
    assert "ar_greedy" not in x3  # all of them: none of the earlier file's is left under the later file's name
    assert x3["ar_vs_ar"] == pytest.approx(-0.5) and x3["nar_vs_cmlm"] == pytest.approx(2.5) and not x3["pays"]
    assert y3["ar_vs_ar"] == pytest.approx(0.5) and y3["nar_vs_cmlm"] == pytest.approx(2.1) and y3["pays"]
    assert y3["spec_passes_vs_greedy"] == 0.7 and y3["ar_greedy"] == 22.0
    assert x6["ar_vs_ar"] == pytest.approx(0.5) and x6["nar_vs_cmlm"] == pytest.approx(2.5) and x6["pays"]
    assert "pays" not in by["ar", 3000] and "ar_vs_ar" not in by["cmlm", 6000]
    out = tmp_path / "out"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    table = (out / "summary.md").read_text()
    assert "janus-y" in table and "+0.50" in table and "+2.10" in table
    check_plots(out / "summary_tradeoff.png")


def test_summary_names_a_file_that_is_not_a_study(tmp_path):
    import quality_summary

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": [{"bleu": 3.0}]}))
    with pytest.raises(SystemExit, match="bad.json"):
        quality_summary.main([str(bad), "--out", str(tmp_path / "s")])
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json"):
        quality_summary.main([str(bad), "--out", str(tmp_path / "s")])
