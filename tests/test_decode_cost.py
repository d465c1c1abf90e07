"""benchmarks/decode_cost.py: kernels against host work per method, and the ratios by both."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import decode_cost  # noqa: E402


def test_kernel_time_counts_a_nested_product_once():
    x, w, b = torch.randn(64, 256), torch.randn(512, 256), torch.randn(512)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = F.linear(x, w, b)  # aten::linear, and aten::addmm inside it
        y.add_(1.0)  # not a kernel
    events = prof.events()
    linear = [e for e in events if e.name == "aten::linear"]
    inner = [e for e in events if e.name == "aten::addmm"]
    assert len(linear) == 1 and len(inner) == 1 and inner[0].cpu_parent is not None
    assert decode_cost.kernel_ms(prof) == pytest.approx(linear[0].cpu_time_total / 1e3)
    assert decode_cost.kernel_ms(prof) < sum(e.cpu_time_total for e in linear + inner) / 1e3


def test_rows_ratios_and_files(synthetic_model, tmp_path):
    out = tmp_path / "out"
    rows = decode_cost.main(["--checkpoint", str(synthetic_model.checkpoint), "--methods", "greedy,beam5,spec",
                             "--batch-sizes", "1,2", "--sentences", "4", "--rounds", "3", "--threads", "1",
                             "--out", str(out)])  # fmt: skip
    assert [(r["method"], r["batch"]) for r in rows] == [(m, b) for b in (1, 2) for m in ("greedy", "beam5", "spec")]
    for r in rows:
        assert r["sentences"] == 4 and r["passes"] >= 1
        assert r["wall_ms"] > 0 and r["kernel_ms"] > 0
        assert r["host_ms"] == pytest.approx(r["wall_ms"] - r["kernel_ms"])
        assert r["kernel_share"] == pytest.approx(r["kernel_ms"] / r["wall_ms"])
        assert r["kernel_us_pass"] == pytest.approx(1e3 * r["kernel_ms"] / r["passes"])
    saved = json.loads((out / "decode_cost.json").read_text())
    assert saved["results"] == rows
    by = {(r["method"], r["batch"]): r for r in rows}
    found = {x["ratio"]: x for x in saved["ratios"]}
    assert set(found) == {"beam 5 / greedy, batch 1", "spec / greedy, batch 1"}  # the others' rows were not run
    spec = found["spec / greedy, batch 1"]
    assert spec["wall"] == pytest.approx(by[("spec", 1)]["wall_ms"] / by[("greedy", 1)]["wall_ms"])
    assert spec["kernels"] == pytest.approx(by[("spec", 1)]["kernel_ms"] / by[("greedy", 1)]["kernel_ms"])
    assert spec["target"] == 0.6
    assert "spec / greedy, batch 1" in (out / "decode_cost.md").read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "greedy,beam7"], r"unknown methods \['beam7'\]"),
    (["--rounds", "2"], "at least 3"),
])  # fmt: skip
def test_bad_arguments_are_named(argv, message):
    with pytest.raises(SystemExit, match=message):
        decode_cost.main(argv)
