"""benchmarks/decode_speed.py, the main job: its table, JSON and plots, on small settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import decode_speed  # noqa: E402
from plot_helpers import check_plots  # noqa: E402

from janus.samples import libreoffice_sample  # noqa: E402
from janus.vocab import Vocab  # noqa: E402


def test_shipped_sample_is_aligned_and_licensed():
    sample = libreoffice_sample()
    assert len(sample.source) == len(sample.target) == 500 and all(sample.source) and all(sample.target)
    vocab = Vocab(sample.spm_model)
    assert len(vocab) == 8000
    folder = sample.spm_model.parent.parent
    assert "Mozilla Public License" in (folder / "LICENSE.MPL-2.0").read_text()
    assert "LibreOffice" in (folder / "NOTICE").read_text()


@pytest.mark.slow
def test_random_weights_default_workload_forced_lengths(tmp_path, capsys):
    out = tmp_path / "out"
    rows = decode_speed.main(["--preset", "tiny", "--methods", "greedy,beam5,nar-T1-l1,nar-T4-l3,spec",
                              "--random-weights", "--sentences", "6", "--b1-sentences", "2", "--batch-sizes", "1,4",
                              "--rounds", "3", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "forced to the reference target lengths" in printed
    assert "batch 1: the first 2 sentences, one at a time; batch 4: 6 sentences; 3 rounds" in printed
    for column in ("passes", "ms_step", "ms_p50/90", "sent_s", "tok_s", "vs_beam5", "vs_greedy"):  # the legend
        assert f"\n{column} " in printed, column
    assert len(rows) == 10
    by = {(r["method"], r["batch"]): r for r in rows}
    assert by[("greedy", 1)]["sentences"] == 2 and by[("greedy", 4)]["sentences"] == 6
    assert by[("beam5", 4)]["vs_beam5"] == pytest.approx(1.0)
    assert by[("nar-T4-l3", 4)]["passes"] == 4 and by[("nar-T1-l1", 1)]["passes"] == 1
    # ms_step: the median run over the passes made one after another (batch 1: every sentence's; batch 4:
    # two batches of 4 passes each for T = 4)
    assert by[("greedy", 1)]["ms_step"] * by[("greedy", 1)]["passes"] == pytest.approx(by[("greedy", 1)]["ms_p50"])
    assert by[("nar-T4-l3", 4)]["ms_step"] * 8 == pytest.approx(by[("nar-T4-l3", 4)]["ms_p50"] * 6)
    # Forced lengths: the reference lengths (+ eos) exactly, but for a length beam of 3, which also tries
    # the neighbouring lengths (one token off at most per sentence).
    vocab = Vocab(libreoffice_sample().spm_model)
    for batch, n in ((1, 2), (4, 6)):
        want = sum(len(t) + 1 for t in vocab.encode(libreoffice_sample().target[:n]))
        for r in rows:
            if r["batch"] == batch:
                slack = n if r["method"].endswith("-l3") else 0
                assert abs(r["tokens"] - want) <= slack, (r["method"], batch, r["tokens"], want)
                assert r["tok_s"] == pytest.approx(r["tokens"] * r["sent_s"] / n)
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["forced_lengths"] is True and saved["environment"]["git_commit"]
    assert len(saved["results"]) == 10 and all(r["runs"] == 3 for r in saved["results"])
    assert saved["complete"] is True
    assert not (out / "bleu_vs_speed.png").exists()
    check_plots(out / "speedup.png")


def test_results_are_saved_after_each_batch_size(tmp_path, monkeypatch):
    """A run stopped during its last batch size keeps the rows of the ones before (complete: false)."""
    out = tmp_path / "out"
    real = decode_speed.interleaved_pieces
    calls = []

    def stop_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a run killed at its time cap
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_speed, "interleaved_pieces", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        decode_speed.main(["--preset", "tiny", "--methods", "greedy,beam5", "--sentences", "4", "--b1-sentences", "2",
                           "--random-weights",
                           "--batch-sizes", "1,4", "--rounds", "3", "--out", str(out)])  # fmt: skip
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is False
    assert {(r["method"], r["batch"]) for r in saved["results"]} == {("greedy", 1), ("beam5", 1)}
    assert all(r["vs_greedy"] > 0 for r in saved["results"])


@pytest.mark.slow
def test_checkpoint_reports_bleu_and_its_plot(tmp_path, synthetic_model):
    out = tmp_path / "out"
    args = ["--checkpoint", str(synthetic_model.checkpoint), "--data", str(synthetic_model.data), "--methods",
            "greedy,beam5,nar-T10-l3,spec", "--sentences", "12", "--b1-sentences", "3", "--batch-sizes", "1,12",
            "--rounds", "3", "--dtype", "float32", "--out", str(out)]  # fmt: skip
    rows = decode_speed.main(args)
    assert all(r["bleu"] is not None for r in rows)
    assert all(r["same"] == 1.0 for r in rows)  # fp32 decoding is batch-invariant
    for r in rows:
        if r["method"] in ("greedy", "spec"):
            assert r["bleu"] == pytest.approx(100.0)  # the learned code, exactly
    assert json.loads((out / "results.json").read_text())["settings"]["forced_lengths"] is False
    check_plots(out / "bleu_vs_speed.png", out / "speedup.png")


def test_several_precisions_give_rows_of_each_from_one_run(tmp_path, capsys):
    """--dtype float32,int8: every method in both precisions, taking turns; speedups within a precision."""
    out = tmp_path / "out"
    rows = decode_speed.main(["--preset", "tiny", "--dtype", "float32,int8", "--methods", "greedy,beam5",
                              "--random-weights", "--sentences", "3", "--b1-sentences", "2", "--batch-sizes", "1,3",
                              "--rounds", "3", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "float32, int8" in printed.splitlines()[0]
    assert sorted((r["method"], r["dtype"], r["batch"]) for r in rows) == sorted(
        (m, d, b) for m in ("greedy", "beam5") for d in ("float32", "int8") for b in (1, 3)
    )
    for r in rows:
        same = {x["method"]: x for x in rows if x["batch"] == r["batch"] and x["dtype"] == r["dtype"]}
        assert r["vs_greedy"] == pytest.approx(same["greedy"]["ms_p50"] / r["ms_p50"])
        assert r["runs"] >= 3 and r["ms_step"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["dtype"] == "float32, int8"
    assert {r["dtype"] for r in saved["results"]} == {"float32", "int8"}


@pytest.mark.slow
def test_the_default_decodes_the_builtin_model_with_bleu_and_the_pareto_front(tmp_path, capsys):
    """No --random-weights: the shipped model on the shipped sample, its own lengths, BLEU over every
    decoded sentence beside the speed of each method and precision, and the BLEU-vs-latency plot."""
    out = tmp_path / "out"
    rows = decode_speed.main(["--methods", "greedy,nar-T4-l1,spec", "--dtype", "float32,int8", "--dtype-methods",
                              "greedy", "--sentences", "10", "--b1-sentences", "2", "--timed-sentences", "4",
                              "--batch-sizes", "1,4", "--rounds", "3", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "builtin:de-en" in printed.splitlines()[0] and "forced" not in printed
    assert "BLEU over all 10 sentences at batch 4" in printed and "\nsame " in printed
    assert sorted((r["method"], r["dtype"], r["batch"]) for r in rows) == sorted(
        [(m, "float32", b) for m in ("greedy", "nar-T4-l1", "spec") for b in (1, 4)]
        + [("greedy", "int8", 1), ("greedy", "int8", 4)]
    )
    by = {(r["method"], r["dtype"], r["batch"]): r for r in rows}
    for r in rows:
        assert 0 <= r["bleu"] <= 100 and r["sentences"] == (2 if r["batch"] == 1 else 4)
        if r["dtype"] == "float32":
            assert r["same"] == 1.0, r
    assert by[("spec", "float32", 1)]["bleu"] == by[("greedy", "float32", 1)]["bleu"]  # greedy's output
    assert by[("greedy", "float32", 1)]["bleu"] > 10  # a trained model, not random weights
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["forced_lengths"] is False and saved["settings"]["bleu_sentences"] == 10
    assert saved["settings"]["bleu_signature"].startswith("nrefs:1")
    check_plots(out / "bleu_vs_speed.png", out / "speedup.png")


def test_pareto_front_keeps_the_points_nothing_beats():
    import harness

    points = [("a", 10.0, 30.0), ("b", 5.0, 20.0), ("c", 20.0, 25.0), ("d", 5.0, 10.0), ("e", 40.0, 31.0)]
    assert [p[0] for p in harness.pareto_front(points)] == ["b", "a", "e"]
    assert harness.pareto_front([]) == []


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown methods"):
        decode_speed.main(["--random-weights", "--preset", "tiny", "--methods", "greedy,beam7", "--out", str(tmp_path)])


def test_a_missing_matplotlib_is_said_once_and_json_still_written(tmp_path, capsys, monkeypatch):
    import harness

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    harness.pyplot.cache_clear()
    try:
        assert harness.pyplot() is None and harness.pyplot() is None
        assert harness.plot_bleu_vs_speed({"": [("a", 1.0, 2.0)]}, tmp_path / "p.png", "t", "ms") is None
        harness.write_json(tmp_path / "r.json", {"ok": 1})
    finally:
        harness.pyplot.cache_clear()
    printed = capsys.readouterr().out
    assert printed.count(harness.PLOT_MISSING) == 1 and "pip install" in harness.PLOT_MISSING
    assert json.loads((tmp_path / "r.json").read_text()) == {"ok": 1} and not (tmp_path / "p.png").exists()


def test_interleaved_rounds_take_turns_and_keep_three_runs():
    import harness

    calls: list[str] = []
    fns = [lambda k=k: calls.append(k) for k in "abc"]
    times = harness.interleaved(fns, torch.device("cpu"), rounds=4, budget_s=0.0)
    assert calls == list("abccbaabc")  # the budget ends it after the three rounds it cannot skip
    assert [len(t) for t in times] == [3, 3, 3] and all(x >= 0 for t in times for x in t)
    assert len(harness.interleaved(fns, torch.device("cpu"), rounds=4)[0]) == 4
    with pytest.raises(ValueError, match="rounds=2"):
        harness.interleaved(fns, torch.device("cpu"), rounds=2)


def test_interleaved_pieces_take_turns_piece_by_piece():
    """Every fn runs piece j before any runs piece j + 1, the order reversed every other piece; a run is a round's
    sum over its pieces."""
    import harness

    calls: list[str] = []
    fns = [lambda j, k=k: calls.append(f"{k}{j}") for k in "ab"]
    times = harness.interleaved_pieces(fns, 3, torch.device("cpu"), rounds=3)
    one_round = ["a0", "b0", "b1", "a1", "a2", "b2"]
    assert calls == one_round + ["b0", "a0", "a1", "b1", "b2", "a2"] + one_round
    assert [len(t) for t in times] == [3, 3] and all(x >= 0 for t in times for x in t)
