"""Checkpoints: exact resume, crash safety, pruning, corruption errors, averaging."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from janus import checkpoint as ck
from janus.checkpoint import (
    average_checkpoints,
    capture_rng,
    last_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)


class Tied(nn.Module):
    """Embedding tied to the output projection, plus an integer buffer."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("counter", torch.tensor([3, 1, 4], dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.out(torch.tanh(self.hidden(self.embed(ids))))


def make(seed: int = 0) -> tuple[Tied, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()


def save(save_dir: Path, step: int, model: nn.Module | None = None, opt=None, **kw) -> Path:
    if model is None:
        model, opt = make(step)
    kw.setdefault("state", {"epoch": 1})
    kw.setdefault("config", {"model": {"d_model": 6}})
    return save_checkpoint(save_dir, step, model_state=model.state_dict(), optimizer=opt, **kw)


def test_round_trip_tied_adamw_resume_is_bit_identical(tmp_path: Path) -> None:
    model, opt = make()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for s in range(2):
        train_step(model, opt, s)
        sched.step()
    state = {
        "epoch": 2,
        "update_in_epoch": 7,
        "scheduler": sched.state_dict(),
        "best_valid": float("inf"),
        "extra": {"pair": (1, 2), 5: "int key", "nested": [(3.5, None)]},
    }
    path = save(tmp_path, 2, model, opt, state=state, files={"spm.model": b"\x00spm\xff"})
    assert path == tmp_path / "checkpoint_00000002"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "optimizer.safetensors", "state.json", "config.json", "spm.model"]
    )

    ckpt = load_checkpoint(path)
    assert ckpt.step == 2 and ckpt.files == ["spm.model"]
    assert ckpt.config == {"model": {"d_model": 6}}
    assert {k: v for k, v in ckpt.state.items() if k != "rng"} == state  # tuples and int keys survive
    # Tied names come back as one tensor, and both names are present.
    assert ckpt.model_state["out.weight"] is ckpt.model_state["embed.weight"]
    assert ckpt.model_state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model_state[k], v) and ckpt.model_state[k].dtype == v.dtype

    # The trainer's resume order: build model, optimizer, scheduler; then load their states.
    model2, opt2 = make(seed=123)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    model2.load_state_dict(ckpt.model_state)
    assert model2.out.weight is model2.embed.weight
    restore_optimizer(opt2, ckpt)
    sched2.load_state_dict(ckpt.state["scheduler"])
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == sd2["param_groups"]
    assert sd["state"].keys() == sd2["state"].keys()
    for i in sd["state"]:
        assert sd["state"][i].keys() == sd2["state"][i].keys()
        for name, v in sd["state"][i].items():
            assert torch.equal(v, sd2["state"][i][name]) and v.dtype == sd2["state"][i][name].dtype

    # The resume property: one more update from the restored copy == from the original.
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        train_step(m, o, 99)
        s.step()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_rng_restore_reproduces_every_generator(tmp_path: Path) -> None:
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    torch.randn(3), np.random.randn(), random.gauss(0, 1)  # leave cached gaussians around
    path = save(tmp_path, 1, state={"epoch": 0})  # captures RNG since state has no "rng"

    def draw() -> tuple:
        py = [random.random() for _ in range(4)]
        return torch.rand(4), np.random.rand(4), py, np.random.randn(), random.gauss(0, 1)

    expected = draw()
    torch.rand(10), np.random.rand(10), random.random()
    rng = load_checkpoint(path).state["rng"]
    json.dumps(rng)  # JSON-able
    restore_rng(rng)
    got = draw()
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]
    # capture/restore directly, too
    d = capture_rng()
    a = torch.rand(2)
    restore_rng(d)
    assert torch.equal(torch.rand(2), a)


def test_keep_last_prunes_but_keeps_best_and_latest(tmp_path: Path) -> None:
    for step in range(1, 8):
        save(tmp_path, step * 100, keep_last=3, is_best=step == 2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint_"))
    assert names == ["checkpoint_00000200", "checkpoint_00000500", "checkpoint_00000600", "checkpoint_00000700"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {"checkpoint": "checkpoint_00000700", "step": 700}
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == "checkpoint_00000200"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_00000700"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left

    # Resuming from an older checkpoint and saving: latest is never pruned, even if not among the newest.
    save(tmp_path, 150, keep_last=1)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint_"))
    assert left == ["checkpoint_00000150", "checkpoint_00000200", "checkpoint_00000700"]


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 10, state={"epoch": 1})
    save(tmp_path, 10, state={"epoch": 9})
    assert load_checkpoint(tmp_path / "checkpoint_00000010").state["epoch"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_00000010", "latest.json"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_latest_ignores_tmp_and_incomplete_dirs(tmp_path: Path) -> None:
    save(tmp_path, 100)
    save(tmp_path, 200)
    broken = save(tmp_path, 300)
    (broken / "model.safetensors").unlink()  # a newer folder missing its weights
    # A complete-looking leftover of a dead writer.
    stale = tmp_path / f".tmp-checkpoint_00000400-{dead_pid()}"
    shutil.copytree(tmp_path / "checkpoint_00000200", stale)

    (tmp_path / "latest.json").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_00000200"
    # latest.json naming a missing folder falls back the same way.
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "checkpoint_00000900", "step": 900}))
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_00000200"
    assert ck.list_checkpoints(tmp_path) == [tmp_path / "checkpoint_00000100", tmp_path / "checkpoint_00000200"]

    # The next save removes the dead writer's leftover, but not a live writer's.
    live = tmp_path / f".tmp-checkpoint_00000500-{os.getppid()}"
    live.mkdir()
    save(tmp_path, 600)
    assert not stale.exists() and live.exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_00000600"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_truncated_or_corrupt_files_name_the_file(tmp_path: Path) -> None:
    path = save(tmp_path, 1)
    weights = path / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated.*delete"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model_state(weights)  # no manifest here: safetensors itself notices

    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"model\.safetensors.*sha256"):
        load_checkpoint(path)

    weights.write_bytes(data)
    (path / "state.json").write_text('{"format": 1, "step"')
    with pytest.raises(ValueError, match=r"state\.json.*not valid JSON"):
        load_checkpoint(path)


def test_crash_during_save_keeps_previous_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = make()
    train_step(model, opt, 0)
    save(tmp_path, 100, model, opt)
    train_step(model, opt, 1)

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save(tmp_path, 200, model, opt)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_00000100"
    assert not (tmp_path / "checkpoint_00000200").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_00000100", "latest.json"]
    assert load_checkpoint(latest_checkpoint(tmp_path)).step == 100

    # Crash after the folder rename but before latest.json moves: the old pointer still holds.
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save(tmp_path, 200, model, opt)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_00000100"
    load_checkpoint(tmp_path / "checkpoint_00000200")  # complete nonetheless

    # Crash between moving an existing step aside and renaming its replacement in.
    ck._remove_dir(tmp_path / "checkpoint_00000200")
    real_rename = os.rename
    calls = []

    def crash_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_second)
    monkeypatch.setattr(ck, "_replace_dir", _replace_dir_without_rollback)
    with pytest.raises(OSError):
        save(tmp_path, 100, model, opt)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint_00000100").exists()
    found = latest_checkpoint(tmp_path)
    assert found is not None and found.name.startswith(".old-checkpoint_00000100-")
    assert load_checkpoint(found).step == 100
    save(tmp_path, 300, model, opt)  # the next save puts the old folder back
    assert (tmp_path / "checkpoint_00000100").is_dir() and not found.exists()


def _replace_dir_without_rollback(tmp: Path, final: Path) -> None:
    """ck._replace_dir as if the process died right after moving the old folder aside."""
    aside = final.parent / f".old-{final.name}-{dead_pid()}"
    os.rename(final, aside)
    os.rename(tmp, final)


def test_average_checkpoints(tmp_path: Path) -> None:
    models = []
    for step in (1, 2, 3):
        model, _ = make(step)
        models.append(model)
        save(tmp_path, step, model, None, files={"spm.model": b"vocab"}, config={"model": {"step": step}})
    paths = last_checkpoints(tmp_path, 3)
    assert [p.name for p in paths] == ["checkpoint_00000001", "checkpoint_00000002", "checkpoint_00000003"]
    assert last_checkpoints(tmp_path, 2) == paths[1:]
    with pytest.raises(ValueError, match="only 3"):
        last_checkpoints(tmp_path, 4)

    out = average_checkpoints(paths, tmp_path / "avg")
    sd, config = load_model_state(out)
    assert config == {"model": {"step": 3}}  # from the last one
    assert (out / "spm.model").read_bytes() == b"vocab"
    assert json.loads((out / "average.json").read_text())["averaged"] == [str(p) for p in paths]
    for k, v in models[0].state_dict().items():
        if v.is_floating_point():
            mean = sum(m.state_dict()[k].double() for m in models) / 3
            assert torch.equal(sd[k], mean.float()), k
        else:
            assert torch.equal(sd[k], v)
    assert sd["out.weight"] is sd["embed.weight"]
    assert torch.equal(load_model_state(out / "model.safetensors")[0]["hidden.bias"], sd["hidden.bias"])
    with pytest.raises(ValueError, match="averaged weights"):
        load_checkpoint(out)

    # Written in half precision (a model to ship): the same means, rounded once; integers kept; ties kept.
    half = average_checkpoints(paths, tmp_path / "avg16", dtype=torch.float16)
    sd16, _ = load_model_state(half)
    assert (half / "model.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size
    for k, v in sd.items():
        if v.is_floating_point():
            mean = sum(m.state_dict()[k].double() for m in models) / 3
            assert sd16[k].dtype == torch.float16 and torch.equal(sd16[k], mean.half()), k
        else:
            assert torch.equal(sd16[k], v)
    assert sd16["out.weight"] is sd16["embed.weight"]
    with pytest.raises(ValueError, match="floating dtype"):
        average_checkpoints(paths, tmp_path / "avg8", dtype=torch.int8)

    # Mismatched names, and integer buffers that differ.
    other = nn.Linear(2, 2)
    save_checkpoint(tmp_path / "o", 1, model_state=other.state_dict(), optimizer=None, state={}, config={})
    with pytest.raises(ValueError, match="names differ.*missing from it"):
        average_checkpoints([paths[0], tmp_path / "o" / "checkpoint_00000001"], tmp_path / "bad")
    models[2].counter += 1
    save(tmp_path, 4, models[2], None)
    with pytest.raises(ValueError, match="'counter'.*differs"):
        average_checkpoints([paths[0], tmp_path / "checkpoint_00000004"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_bad_inputs_fail_before_writing(tmp_path: Path) -> None:
    model, _ = make()
    with pytest.raises(TypeError, match=r"state\.sched is a torch\.Tensor"):
        save(tmp_path, 1, model, None, state={"sched": torch.ones(1)})
    with pytest.raises(ValueError, match="extra file name"):
        save(tmp_path, 1, model, None, files={"model.safetensors": b""})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
