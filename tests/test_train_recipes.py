"""The training recipes beyond the published objective (TrainConfig.joint_start / joint_ramp,
skl_stop_grad, init_from, nar_exposure): each an option, each off by default, each doing exactly what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_helpers import prepare_corpus_slice

from janus.checkpoint import latest_checkpoint, load_model_state
from janus.config import LossWeights, PrepareConfig, TrainConfig
from janus.data import prepare
from janus.train import Trainer, train


@pytest.fixture(scope="module")
def data_bin(test_corpus, tmp_path_factory) -> Path:
    """The first 600 pairs of the shipped slice (train) and 60 (valid), a 500-piece vocabulary."""
    return prepare_corpus_slice(test_corpus, tmp_path_factory.mktemp("recipes"), {"train": 600, "valid": 60},
                                vocab_size=500, max_len=48)  # fmt: skip


def config(data: Path, save: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), save_dir=str(save), preset="tiny", max_tokens=500, warmup_steps=4, lr=1e-3, seed=5,
                threads=1, amp="none", log_interval=1, validate_interval=0, save_interval=0, keep_last=0,
                max_valid_batches=2, progress=False, save_interval_minutes=0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def events(save: Path, kind: str) -> list[dict]:
    lines = (save / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == kind]


def weights_of(save: Path) -> dict[str, torch.Tensor]:
    return load_model_state(latest_checkpoint(save))[0]


def test_defaults_are_the_published_objective():
    cfg = TrainConfig()
    assert (cfg.joint_start, cfg.joint_ramp, cfg.skl_stop_grad, cfg.init_from, cfg.nar_exposure) == (0, 0, "", "", 0)
    assert cfg.loss_weights(1) == cfg.loss_weights() == LossWeights()
    assert [cfg.joint_factor(s) for s in (1, 2, 1000)] == [1.0, 1.0, 1.0]


def test_joint_schedule_factors_and_weights():
    cfg = TrainConfig(joint_start=10, joint_ramp=4)
    assert [cfg.joint_factor(s) for s in (1, 10, 11, 12, 14, 15, 99)] == [0, 0, 0.25, 0.5, 1, 1, 1]
    w = cfg.loss_weights(12)
    assert w.ar == 1.0 and w.nar == 0.25 and w.skl_ar_aux == 1.5 and w.length == pytest.approx(0.05)
    assert TrainConfig(joint_start=3).joint_factor(4) == 1.0  # no ramp: all at once


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(skl_stop_grad="nar"), "skl_stop_grad='nar'"),
        (dict(joint_start=-1), "joint_start=-1"),
        (dict(objective="ar", joint_start=5), "objective is ar"),
        (dict(objective="cmlm", joint_ramp=5), "objective is cmlm"),
        (dict(nar_exposure=-0.1), "nar_exposure=-0.1"),
        (dict(nar_exposure=1.5), "nar_exposure=1.5"),
        (dict(nar_exposure=float("nan")), "nar_exposure=nan"),
        (dict(objective="ar", nar_exposure=0.5), "objective ar has none"),
        (dict(nar_exposure_mask="lowest"), "nar_exposure_mask='lowest'"),
    ],
)
def test_bad_recipe_options_are_refused_with_the_value(kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        TrainConfig(**kw)


def test_ar_only_updates_equal_an_ar_run_then_the_terms_ramp_in(data_bin, tmp_path):
    """For the first joint_start updates a janus run is an `ar` run (same rows, same weights, same
    result); then the other terms come in along the ramp, logged with their factor."""
    ar = tmp_path / "ar"
    train(config(data_bin, ar, objective="ar", max_steps=3))
    sched = tmp_path / "sched"
    train(config(data_bin, sched, objective="janus", max_steps=3, joint_start=3, joint_ramp=2))
    a, s = weights_of(ar), weights_of(sched)
    assert a.keys() == s.keys()
    for k in a:
        torch.testing.assert_close(s[k], a[k], rtol=1e-6, atol=1e-7, msg=k)

    # Resumed to 6 updates: the factor climbs 0.5, 1, 1 and the masked-token terms appear.
    train(config(data_bin, sched, objective="janus", max_steps=6, joint_start=3, joint_ramp=2))
    logged = [e for e in events(sched, "train")]
    assert [e["joint_factor"] for e in logged] == [0, 0, 0, 0.5, 1, 1]
    assert all(e["nar_nll"] == 0 and e["skl_ar_aux"] == 0 and e["ar_nll"] > 0 for e in logged[:3])
    assert all(e["nar_nll"] > 0 and e["aux_nll"] > 0 and e["skl_ar_aux"] > 0 for e in logged[3:])


def test_skl_stop_grad_reaches_the_criterion_and_changes_the_update(data_bin, tmp_path):
    assert Trainer(config(data_bin, tmp_path / "x", skl_stop_grad="ar")).loss_module.skl_grad_ar == 0.0
    assert Trainer(config(data_bin, tmp_path / "y")).loss_module.skl_grad_ar == 1.0
    train(config(data_bin, tmp_path / "both", max_steps=2))
    train(config(data_bin, tmp_path / "stop", max_steps=2, skl_stop_grad="ar"))
    both, stop = weights_of(tmp_path / "both"), weights_of(tmp_path / "stop")
    assert any(not torch.equal(both[k], stop[k]) for k in both)
    # The first update's logged terms (computed before it) are the same: only the gradient differs.
    first = [events(tmp_path / d, "train")[0] for d in ("both", "stop")]
    assert first[0]["skl_ar_nar"] == pytest.approx(first[1]["skl_ar_nar"], rel=1e-6)


def test_nar_exposure_reaches_the_criterion_changes_the_update_and_resumes_exactly(data_bin, tmp_path, capsys):
    assert Trainer(config(data_bin, tmp_path / "x", nar_exposure=0.5)).loss_module.exposure == 0.5
    assert Trainer(config(data_bin, tmp_path / "y")).loss_module.exposure == 0.0
    lc = Trainer(config(data_bin, tmp_path / "z", nar_exposure=0.5, nar_exposure_mask="least-confident"))
    assert lc.loss_module.exposure_mask == "least-confident"
    # Without dropout, so that the draws of the exposure leave every other random choice the same.
    train(config(data_bin, tmp_path / "plain", max_steps=2, dropout=0.0))
    train(config(data_bin, tmp_path / "exposed", max_steps=4, nar_exposure=1.0, dropout=0.0))
    assert "NAR error exposure: the observed tokens of 100% of the sentences" in capsys.readouterr().out
    assert events(tmp_path / "exposed", "start")[0]["train"]["nar_exposure"] == 1.0
    # The first update's logged terms: the AR ones equal (AR rows keep the references), P_NAR's differ.
    first = [events(tmp_path / d, "train")[0] for d in ("plain", "exposed")]
    assert first[0]["ar_nll"] == pytest.approx(first[1]["ar_nll"], rel=1e-6)
    assert first[0]["nar_nll"] != pytest.approx(first[1]["nar_nll"], rel=1e-6)
    # Interrupted after 2 updates and resumed, a run exposing half of the sentences (with dropout) draws the
    # same sentences and dropout masks as one that ran through: the same weights.
    train(config(data_bin, tmp_path / "whole", max_steps=4, nar_exposure=0.5))
    train(config(data_bin, tmp_path / "twice", max_steps=2, nar_exposure=0.5))
    train(config(data_bin, tmp_path / "twice", max_steps=4, nar_exposure=0.5))
    whole, twice = weights_of(tmp_path / "whole"), weights_of(tmp_path / "twice")
    for k in whole:
        torch.testing.assert_close(twice[k], whole[k], rtol=0, atol=0, msg=k)


def test_init_from_loads_the_weights_with_a_fresh_optimizer_and_schedule(data_bin, tmp_path, capsys):
    src = tmp_path / "ar"
    train(config(data_bin, src, objective="ar", max_steps=3))
    ckpt = latest_checkpoint(src)
    run = tmp_path / "janus"
    trainer = Trainer(config(data_bin, run, objective="janus", max_steps=2, init_from=str(src)))
    want = load_model_state(ckpt)[0]
    got = trainer.model.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert trainer.step == 0 and not trainer.optimizer.state  # fresh optimizer, fresh schedule
    trainer.run()
    out = capsys.readouterr().out
    assert f"starting from the weights of {ckpt} of objective ar after 3 updates" in out
    start = events(run, "start")[0]
    assert start["init_from"] == dict(path=str(ckpt), step=3, objective="ar")
    assert events(run, "end")[-1]["step"] == 2

    # Resuming ignores init_from (and says so): the run's own checkpoint wins.
    resumed = Trainer(config(data_bin, run, objective="janus", max_steps=4, init_from=str(src)))
    assert resumed.step == 2 and resumed.init_source is None
    resumed.banner()
    assert "applies to fresh runs only" in capsys.readouterr().out


def test_init_from_refuses_other_shapes_and_vocabularies(data_bin, tmp_path, test_corpus):
    src = tmp_path / "ar"
    train(config(data_bin, src, objective="ar", max_steps=1))
    with pytest.raises(ValueError, match=r"d_model 64 \(checkpoint\) vs 128 \(this run\).*--preset"):
        Trainer(config(data_bin, tmp_path / "small", preset="small", init_from=str(src)))
    other = tmp_path / "other"
    prepare(PrepareConfig(trainpref=str(test_corpus / "valid"), destdir=str(other), vocab_size=300, max_len=48),
            verbose=False)  # fmt: skip
    with pytest.raises(ValueError, match="another vocabulary"):
        Trainer(config(other, tmp_path / "v", init_from=str(src)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(config(data_bin, tmp_path / "n", init_from=str(tmp_path / "missing")))
