"""Training end to end on the slice of the real corpus in tests/data: loss goes down, resume after a kill
continues the same trajectory, data parallelism gives the same update, averaging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_helpers import prepare_corpus_slice
from safetensors.torch import load_file

from janus.config import TrainConfig
from janus.train import inverse_sqrt_lr

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_bin(test_corpus, tmp_path_factory) -> Path:
    """The first 2,500 pairs of the corpus (train) + 150 pairs (valid), prepared with a 1k vocabulary."""
    return prepare_corpus_slice(test_corpus, tmp_path_factory.mktemp("corpus"), {"train": 2500, "valid": 150},
                                vocab_size=1000, max_len=64)  # fmt: skip


def env(threads: int = 1) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = str(threads)
    return e


def train_args(data: Path, save: Path, **kw) -> list[str]:
    base = dict(
        data=data,
        save_dir=save,
        preset="tiny",
        max_tokens=600,
        warmup_steps=10,
        lr=1e-3,
        seed=3,
        threads=1,
        log_interval=5,
        validate_interval=10,
        max_valid_batches=3,
        keep_last=3,
    )
    base.update(kw)
    args = ["train", "--no-progress"]
    for k, v in base.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def janus(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "janus", *args], env=env(), capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def final_weights(save: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(save / f"checkpoint_{step:08d}" / "model.safetensors"))


def latest_step(save: Path) -> int:
    """Step of the checkpoint latest.json points to (-1 while there is none)."""
    try:
        return int(json.loads((save / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def log_events(save: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (save / "train.jsonl").read_text().splitlines()) if r["event"] == event]


def test_inverse_sqrt_schedule():
    cfg = TrainConfig(lr=5e-4, warmup_steps=100, warmup_init_lr=1e-7)
    assert inverse_sqrt_lr(0, cfg) == pytest.approx(1e-7)
    assert inverse_sqrt_lr(50, cfg) == pytest.approx(1e-7 + (5e-4 - 1e-7) / 2)
    assert inverse_sqrt_lr(100, cfg) == pytest.approx(5e-4)
    assert inverse_sqrt_lr(400, cfg) == pytest.approx(2.5e-4)


def test_training_lowers_validation_loss_of_all_three_distributions(data_bin, tmp_path):
    save = tmp_path / "run"
    janus(*train_args(data_bin, save, max_steps=60, validate_interval=20, max_valid_batches=0, dropout=0.0))
    valid = log_events(save, "valid")
    assert [v["step"] for v in valid] == [20, 40, 60]
    for key in ("ar_nll", "nar_nll", "aux_nll", "length", "loss"):
        assert valid[-1][key] < valid[0][key] - 0.05, (key, [v[key] for v in valid])
    train = log_events(save, "train")
    assert train and all(r["tokens_per_s"] > 0 for r in train)
    assert (save / "best.json").is_file() and (save / "latest.json").is_file()


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_resume_after_kill_continues_the_same_trajectory(data_bin, tmp_path, amp):
    """fp32 and bf16 autocast (native on CPUs with AVX512_BF16 or AMX, emulated elsewhere) alike."""
    steps = 30
    kw = dict(max_steps=steps, save_interval=1, dropout=0.2, amp=amp)
    ref = tmp_path / "ref"
    first = janus(*train_args(data_bin, ref, **kw))
    assert first.stdout.startswith("janus train: objective janus, preset tiny")
    assert "starting from scratch" in first.stdout
    assert log_events(ref, "start")[0]["precision"] == {"none": "fp32", "bf16": "bf16"}[amp]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "janus", *train_args(data_bin, killed, **kw)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and latest_step(killed) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert 3 <= latest_step(killed) < steps
    again = janus(*train_args(data_bin, killed, **kw))
    resumes = log_events(killed, "resume")
    assert len(resumes) == 1 and 3 <= resumes[0]["step"] < steps
    step = resumes[0]["step"]
    assert f"resuming from step {step} (checkpoint {killed / f'checkpoint_{step:08d}'})" in again.stdout
    assert "starting from scratch" not in again.stdout
    done = janus(*train_args(data_bin, killed, **kw))
    assert f"already finished at step {steps}" in done.stdout and len(log_events(killed, "resume")) == 2
    a, b = final_weights(ref, steps), final_weights(killed, steps)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoints_by_wall_time(data_bin, tmp_path):
    # Updates are far apart in minutes here: every update passes the clock, none the update interval.
    save = tmp_path / "clock"
    r = janus(*train_args(data_bin, save, max_steps=4, save_interval=1000, save_interval_minutes=1e-5,
                          validate_interval=0, keep_last=0))  # fmt: skip
    assert sorted(p.name for p in save.glob("checkpoint_*")) == [f"checkpoint_{i:08d}" for i in (1, 2, 3, 4)]
    assert "every 1000 updates or 1e-05 min" in r.stdout
    off = tmp_path / "off"
    janus(*train_args(data_bin, off, max_steps=4, save_interval=1000, save_interval_minutes=0, validate_interval=0))
    assert [p.name for p in off.glob("checkpoint_*")] == ["checkpoint_00000004"]  # the end of training only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("objective", ["janus", "ar"])
def test_two_process_gloo_update_equals_one_process(data_bin, tmp_path, objective):
    """2 processes x 1 batch == 1 process x 2 accumulated batches (the same two batches)."""
    kw = dict(max_steps=2, dropout=0.0, lr=1e-4, warmup_steps=0, objective=objective)
    one = tmp_path / "one"
    janus(*train_args(data_bin, one, update_freq=2, **kw))
    two = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "janus",
        *train_args(data_bin, two, update_freq=1, **kw),
    ]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    start = log_events(two, "start")[0]
    assert start["world_size"] == 2
    a, b = final_weights(one, 2), final_weights(two, 2)
    for k in a:
        # lr 1e-4: a sign flip in Adam's first steps would show as an error of ~1e-4.
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=2e-6, msg=k)
    # Adam hides a uniform gradient scale; the logged gradient norm (after the all-reduce) does not.
    for key in ("loss", "gnorm", "ar_nll"):
        la = [r[key] for r in log_events(one, "train")]
        lb = [r[key] for r in log_events(two, "train")]
        assert la == pytest.approx(lb, rel=1e-4), key


def test_baseline_objective_cmlm_learns_the_masked_tokens(data_bin, tmp_path):
    save = tmp_path / "cmlm"
    janus(*train_args(data_bin, save, objective="cmlm", max_steps=30, validate_interval=15, dropout=0.0))
    valid = log_events(save, "valid")
    assert valid[-1]["nar_nll"] < valid[0]["nar_nll"] - 0.05
    assert valid[-1]["ar_nll"] == 0 and valid[-1]["aux_nll"] == 0  # those streams are not run
    assert log_events(save, "start")[0]["train"]["objective"] == "cmlm"


def test_average_cli_and_resume_guard(data_bin, tmp_path):
    save = tmp_path / "avg"
    janus(*train_args(data_bin, save, max_steps=6, save_interval=2, validate_interval=0))
    wrong = subprocess.run(
        [sys.executable, "-m", "janus", *train_args(data_bin, save, max_steps=8, objective="cmlm")],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert wrong.returncode != 0 and "was trained with --objective janus" in wrong.stderr
    out = tmp_path / "averaged"
    janus("average", "--save-dir", str(save), "--last", "3", "--output", str(out))
    ws = [final_weights(save, s) for s in (2, 4, 6)]
    avg = load_file(str(out / "model.safetensors"))
    for k in ("embed.weight", "decoder.0.ffn.ff1.weight"):
        torch.testing.assert_close(avg[k], (ws[0][k] + ws[1][k] + ws[2][k]) / 3)
    # --inputs instead of --save-dir, written in float16 (to ship); neither: a one-line error
    half = tmp_path / "half"
    janus("average", "--inputs", *[str(save / f"checkpoint_{s:08d}") for s in (4, 6)], "--output", str(half),
          "--dtype", "float16")  # fmt: skip
    small = load_file(str(half / "model.safetensors"))
    assert small["embed.weight"].dtype == torch.float16
    torch.testing.assert_close(small["embed.weight"], ((ws[1]["embed.weight"] + ws[2]["embed.weight"]) / 2).half())
    neither = subprocess.run([sys.executable, "-m", "janus", "average", "--output", str(tmp_path / "x")], env=env(),
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert neither.returncode == 2 and "needs --save-dir" in neither.stderr


def test_cli_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "t.de").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "t.en").write_text("a\nb\n", encoding="utf-8")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "janus",
            "prepare",
            "--trainpref",
            str(tmp_path / "t"),
            "--destdir",
            str(tmp_path / "b"),
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("janus prepare: error: ") and "Traceback" not in r.stderr
    assert "t.de" in r.stderr and "t.en" in r.stderr and "3" in r.stderr and "2" in r.stderr
    r = subprocess.run([sys.executable, "-m", "janus", "train", "--data", str(tmp_path / "none")],
                       env=env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "janus prepare" in r.stderr and "manifest.json" in r.stderr


def test_amp_auto_on_cpu_follows_native_bf16_and_keeps_a_resumed_runs_precision():
    from janus.info import cpu_bf16_support
    from janus.train import amp_context, precision_name

    cpu = torch.device("cpu")
    _, dtype = amp_context(TrainConfig(amp="auto"), cpu)
    assert precision_name(dtype) == ("bf16" if cpu_bf16_support()[0] else "fp32")
    assert amp_context(TrainConfig(amp="bf16"), cpu)[1] == torch.bfloat16
    assert amp_context(TrainConfig(amp="none"), cpu)[1] is None
    assert amp_context(TrainConfig(amp="auto"), cpu, resumed="fp32")[1] is None
    assert amp_context(TrainConfig(amp="auto"), cpu, resumed="bf16")[1] == torch.bfloat16
    assert amp_context(TrainConfig(amp="none"), cpu, resumed="bf16")[1] is None  # an explicit choice wins
    with pytest.raises(ValueError, match="amp=fp16 needs a CUDA device"):
        amp_context(TrainConfig(amp="fp16"), cpu)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_validation_during_training_equals_validation_of_the_saved_checkpoint(data_bin, tmp_path, amp):
    """Inference paths cache weights keyed on the parameters' version counters (the fused q/k/v
    projection); the fused AdamW updates parameters in place without bumping them, so the trainer must,
    or every validation after the first reads stale weights. benchmarks/validate_checkpoints.py
    validates the saved checkpoints after the fact."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import validate_checkpoints

    save = tmp_path / "run"
    janus(*train_args(data_bin, save, max_steps=20, validate_interval=10, save_interval=10, dropout=0.0,
                      amp=amp))  # fmt: skip
    logged = {v["step"]: v for v in log_events(save, "valid")}
    assert sorted(logged) == [10, 20]
    torch.set_num_threads(1)
    rows = validate_checkpoints.main(["--save-dir", str(save), "--out", str(tmp_path / "curve.json")])
    assert [r["step"] for r in rows] == [10, 20]
    for r in rows:
        for key in ("ar_nll", "nar_nll", "aux_nll", "length"):
            assert logged[r["step"]][key] == pytest.approx(r[key], abs=2e-5), (r["step"], key)
        assert r["logged_ar_nll"] == logged[r["step"]]["ar_nll"]
    assert abs(rows[1]["ar_nll"] - rows[0]["ar_nll"]) > 0.01  # the two validations saw other weights
    assert json.loads((tmp_path / "curve.json").read_text())["checkpoints"] == rows
