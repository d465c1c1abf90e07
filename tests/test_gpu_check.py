"""benchmarks/gpu_check.py: the dry run of every step on the CPU, resuming, the deadline, the figures.

The GPU run itself needs a GPU machine; the dry run keeps its code paths working between visits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def dry_run(out: Path, work: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu-dry-run", "--out", str(out), "--work", str(work), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / gpu_check.STATE).read_text())


@pytest.mark.slow
def test_dry_run_runs_every_step_then_resumes(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    t0 = time.monotonic()
    state = dry_run(out, work)
    seconds = time.monotonic() - t0
    steps = state["steps"]
    assert steps["decode_trained"]["status"] == "skipped" and "no --checkpoint" in steps["decode_trained"]["reason"]
    for name in gpu_check.STEP_NAMES:
        if name != "decode_trained":
            assert steps[name]["status"] == "done", (name, steps[name])
    assert seconds < 120, f"the dry run took {seconds:.0f} s; it must stay under 2 minutes"

    tests = steps["tests"]["figures"]
    assert tests["tests"] >= 5 and tests["failed"] == tests["errors"] == 0, tests
    kernels = steps["kernels"]["figures"]
    assert {t["case"] for t in kernels["targets"]} == {c for c, _, _ in gpu_check.TARGETS}
    assert {r["case"] for r in kernels["rows"]} >= {"janus_loss fwd+bwd", "mask_predict_update"}
    profiled = steps["profile"]["figures"]
    assert set(profiled) == {"greedy", "nar-T10-l3"} and profiled["nar-T10-l3"]["passes"] == 10
    assert all(f["top_host"] and f["ms_per_sentence"] > 0 for f in profiled.values())
    assert {r["batch"] for r in steps["decode"]["figures"]["rows"]} == {1, 4, 8}
    compare = steps["train_compare"]["figures"]
    assert compare["runs"]["reference"]["backend"] == "reference"
    assert compare["loss_agrees"], compare  # fp32 on the CPU: the two paths agree closely
    assert steps["train"]["figures"]["steps"] == gpu_check.DRY_RUN.train_updates_max
    bleu = steps["evaluate"]["figures"]["modes"]
    assert set(bleu) == {"ar", "nar"} and bleu["ar"]["settings"] == "beam 5" and bleu["nar"]["settings"] == "T=10 l=3"
    assert state["environment"]["git_commit"]

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= gpu_check.MAX_FILES and {"gpu_check.json", "gpu_check.md", "gpu_check.log"} <= set(files)
    summary = (out / "gpu_check.md").read_text()
    assert "CPU dry run" in summary and "## BLEU on the test split" in summary and "## Kernels" in summary

    # A rerun skips what is done; with --checkpoint the skipped step runs now.
    finished = {n: steps[n].get("finished") for n in gpu_check.STEP_NAMES}
    again = dry_run(out, work, "--checkpoint", str(work / "train-fused"))
    assert again["steps"]["decode_trained"]["status"] == "done"
    assert any(r["bleu"] is not None for r in again["steps"]["decode_trained"]["figures"]["rows"])
    for name in gpu_check.STEP_NAMES:
        if name != "decode_trained":
            assert again["steps"][name]["finished"] == finished[name], name
    assert len(again["runs"]) == 2
    assert len(list(out.iterdir())) <= gpu_check.MAX_FILES


def test_no_time_left_skips_every_step_and_says_so(tmp_path):
    state = gpu_check.main(["--cpu-dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                            "--total-minutes", "0"])  # fmt: skip
    for name in gpu_check.STEP_NAMES:
        step = state["steps"][name]
        assert step["status"] == "skipped", name
        assert any(why in step["reason"] for why in ("no time left", "no --checkpoint", "not done")), step["reason"]
    assert "no time left" in state["steps"]["build"]["reason"]
    assert "| build | skipped |" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_a_state_of_another_mode_is_not_mixed_in(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / gpu_check.STATE).write_text(json.dumps({"settings": {"mode": "gpu", "corpus": "x"}, "steps": {}}))
    with pytest.raises(SystemExit, match="mode='gpu'"):
        gpu_check.main(["--cpu-dry-run", "--out", str(out), "--work", str(tmp_path / "work")])


def test_unknown_steps_are_named():
    with pytest.raises(SystemExit, match="unknown steps \\['kernel'\\]"):
        gpu_check.main(["--cpu-dry-run", "--steps", "kernel"])


def test_a_command_past_its_time_is_killed_with_its_children(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), work=str(tmp_path / "work"), corpus=str(tmp_path), checkpoint="",
                              total_minutes=None, fresh=False)  # fmt: skip
    check = gpu_check.Check(args, gpu_check.DRY_RUN, time.monotonic())
    check.step_deadline = time.monotonic() + 1.0
    marker = tmp_path / "child-survived"
    t0 = time.monotonic()
    with pytest.raises(gpu_check.StepTimeout, match="killed") as caught:
        check.run(["bash", "-c", f"echo started; (sleep 1; touch {marker}) & sleep 30"])
    assert time.monotonic() - t0 < 10
    assert caught.value.lines == ["started"]
    time.sleep(1.5)
    assert not marker.exists()  # the background child went with the group


def test_targets_read_the_triton_rows():
    rows = [
        dict(case="janus_loss fwd+bwd", size="N=8192", backend="triton", speedup_vs_reference=2.5,
             memory_vs_reference=2.0),
        dict(case="janus_loss fwd+bwd", size="N=8192", backend="reference", speedup_vs_reference=1.0,
             memory_vs_reference=1.0),
        dict(case="mask_predict_update", size="R=192", backend="triton", speedup_vs_reference=4.0),
    ]  # fmt: skip
    got = {(t["case"], t["figure"]): t for t in gpu_check.kernel_targets(rows)}
    assert got[("janus_loss fwd+bwd", "speedup_vs_reference")]["met"] is True
    assert got[("janus_loss fwd+bwd", "memory_vs_reference")]["met"] is False
    assert got[("mask_predict_update", "speedup_vs_reference")]["measured"] == 4.0
    missing = got[("janus_linear_loss fwd+bwd", "memory_vs_reference")]
    assert missing["met"] is None and "did not run" in missing["why"]


def test_loss_agreement_and_ratios():
    def run(losses, tokens, peak):
        return dict(losses=losses, tokens_per_s=tokens, cuda_peak_allocated_mib=peak)

    close = gpu_check.compare_runs(run([(1, 10.0), (2, 9.0)], 300.0, 100.0), run([(1, 10.01), (2, 9.1)], 100.0, 400.0))
    assert close["loss_agrees"] and close["tokens_per_s_ratio"] == 3.0 and close["memory_ratio"] == 4.0
    assert close["loss_rel_diff_first_update"] == pytest.approx(0.01 / 10.01)
    apart = gpu_check.compare_runs(run([(1, 10.0), (2, 9.0)], 1.0, 1.0), run([(1, 10.0), (2, 8.0)], 1.0, 1.0))
    assert not apart["loss_agrees"] and apart["loss_rel_diff_max"] == pytest.approx(1 / 8)


def test_train_figures_leave_out_the_first_updates():
    records = [{"time": 100.0, "event": "start", "step": 0}]
    records += [{"time": 110.0 + s + (5.0 if s >= 2 else 0.0), "event": "train", "step": s, "tokens_per_s": 1000.0,
                 "loss": 10.0 - s} for s in range(1, 21)]  # fmt: skip
    records.append({"time": 140.0, "event": "valid", "step": 20, "loss": 9.5, "ar_nll": 4.0})
    figures = gpu_check.train_figures(records, wall_s=45.0)
    assert figures["s_per_update"] == pytest.approx(1.0)  # the slow first update is not in the rate
    assert figures["steps"] == 20 and figures["valid"] == {"loss": 9.5, "ar_nll": 4.0}
    assert figures["overhead_s"] == pytest.approx(45.0 - (135.0 - 100.0))
