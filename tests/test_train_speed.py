"""benchmarks/train_speed.py (its variants' training steps) and benchmarks/profile_train.py (the profile
of real training updates), on tiny settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from data_helpers import prepare_corpus_slice
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import profile_train  # noqa: E402
import train_speed  # noqa: E402

from janus.model import Dropout  # noqa: E402


def test_variants_train_with_their_own_dropout_and_optimizer():
    exp = train_speed.Experiment("tiny", "janus", max_tokens=200, src_len=9, tgt_len=10)
    setup = train_speed.Setup(exp, vocab=300, device=torch.device("cpu"))
    slots = [(parent, name) for parent, name, _, _ in setup.dropouts]
    assert len(slots) == sum(isinstance(m, Dropout) for m in setup.model.modules()) > 0
    assert setup.opt.param_groups[0]["fused"] and not setup.legacy_opt.param_groups[0]["foreach"]
    for variant, legacy in (("fp32-ref", True), ("bf16", False), ("fp32", False)):
        before = [p.detach().clone() for p in setup.model.parameters()]
        setup.step(variant)
        kinds = {type(getattr(parent, name)) for parent, name in slots}
        assert kinds == ({nn.Dropout} if legacy else {Dropout}), variant
        opt = setup.legacy_opt if legacy else setup.opt
        assert opt.state and all(torch.isfinite(p).all() for p in setup.model.parameters())
        assert any(not torch.equal(a, p) for a, p in zip(before, setup.model.parameters())), variant


@pytest.fixture(scope="module")
def tiny_bin(test_corpus, tmp_path_factory) -> Path:
    return prepare_corpus_slice(test_corpus, tmp_path_factory.mktemp("profile_corpus"), {"train": 600, "valid": 20},
                                vocab_size=300, max_len=64)  # fmt: skip


def test_profile_of_training_updates_lists_the_top_ops_by_self_time(tiny_bin, tmp_path):
    out = tmp_path / "profile"
    payload = profile_train.main(["--data", str(tiny_bin), "--preset", "tiny", "--objective", "janus", "--amp",
                                  "none", "--max-tokens", "400", "--warmup", "1", "--steps", "2", "--top", "8",
                                  "--out", str(out)])  # fmt: skip
    assert json.loads((out / "profile_tiny_janus_none.json").read_text()) == payload
    ops = payload["top_ops"]
    assert len(ops) == 8 and len(payload["walls_s"]) == 2
    assert [r["self_ms"] for r in ops] == sorted((r["self_ms"] for r in ops), reverse=True)
    assert 0 < sum(r["self_pct"] for r in ops) <= 100.0 + 1e-6
    assert 0 < payload["gemm_ms_per_update"] < payload["self_ms_per_update"]
    # The forward and backward GEMMs of every update are among the top ops.
    assert "aten::mm" in {r["op"] for r in ops}
    text = (out / "profile_tiny_janus_none.txt").read_text()
    assert "2 profiled updates after 1 warm-up" in text and "aten::mm" in text
    with pytest.raises(SystemExit):
        profile_train.main(["--data", str(tiny_bin), "--steps", "0"])


def test_peak_rss_probe_measures_its_own_process_not_the_parent():
    """ru_maxrss would carry this process's RSS at the fork into the probe's figure."""
    held = torch.ones(800 * 2**20, dtype=torch.uint8)  # 800 MB resident in this (the parent) process
    parent = train_speed.own_peak_rss_mb()
    assert parent > 800
    args = type("Args", (), dict(vocab=300, device="cpu", threads=1))()
    exp = train_speed.Experiment("tiny", "janus", max_tokens=200, src_len=9, tgt_len=10)
    probe = train_speed.peak_rss_mb(exp, "fp32", args)
    assert 0 < probe < parent - 600, (probe, parent)
    del held
