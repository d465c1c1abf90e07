"""Where a training update spends its time: torch.profiler over real ``janus train`` updates.

    janus prepare --trainpref tests/data/libreoffice-de-en/train --validpref tests/data/libreoffice-de-en/valid \\
        --src de --tgt en --destdir /tmp/bin --vocab-size 4000
    python benchmarks/profile_train.py --data /tmp/bin --preset small --objective janus --amp bf16 --threads 1

The updates are those of ``janus train`` itself (``janus.train.Trainer``: its batches, decoder rows,
autocast, optimizer), on the prepared folder ``--data``. ``--warmup`` updates run first unprofiled
(first-touch of buffers, autocast and oneDNN caches), then ``--steps`` updates under torch.profiler
(CPU activities; CUDA too on a GPU). The batches and rows of the profiled updates are built before
profiling starts, so the table holds the update alone: forward, backward, clipping norm and AdamW.
With the same seed the same updates are profiled, so two runs (before and after a change) compare.

Writes ``--out/profile_<preset>_<objective>_<amp>.txt`` (the top ``--top`` ops by self CPU time, the
share of the GEMMs and the wall time per update) and ``.json`` (the same rows, settings, environment).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from harness import environment, print_table, write_json

from janus.config import TrainConfig
from janus.train import Trainer

# Ops whose self time is matrix products (forward and backward of linear layers, attention scores).
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv"})


def profile_updates(trainer: Trainer, warmup: int, steps: int) -> tuple[torch.profiler.profile, list[float]]:
    """Run ``warmup`` updates, then profile ``steps`` updates of ``trainer``.

    Returns (the finished profiler, wall seconds of each profiled update).
    """
    updates = trainer._updates()
    items = [trainer._with_rows(next(updates)) for _ in range(warmup + steps)]
    for batch in items[:warmup]:
        trainer.train_update(batch)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.env.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    walls = []
    with torch.profiler.profile(activities=activities) as prof:
        for batch in items[warmup:]:
            t0 = time.perf_counter()
            trainer.train_update(batch)
            if trainer.env.device.type == "cuda":
                torch.cuda.synchronize(trainer.env.device)
            walls.append(time.perf_counter() - t0)
    return prof, walls


def top_ops(prof: torch.profiler.profile, steps: int, top: int) -> tuple[list[dict], float]:
    """The ``top`` ops by self CPU time, per update (ms), and the total self CPU ms per update."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = []
    for e in events[:top]:
        rows.append(dict(
            op=e.key, calls_per_update=e.count / steps, self_ms=e.self_cpu_time_total / 1e3 / steps,
            self_pct=100 * e.self_cpu_time_total / total_us, total_ms=e.cpu_time_total / 1e3 / steps,
        ))  # fmt: skip
    return rows, total_us / 1e3 / steps


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the profile (command-line arguments ``argv``); returns the JSON payload it wrote."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder written by `janus prepare`")
    p.add_argument("--preset", default="small")
    p.add_argument("--objective", default="janus", choices=["janus", "ar", "cmlm"])
    p.add_argument("--amp", default="bf16", help="auto, bf16, fp16 (GPU) or none, as `janus train --amp`")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=10, help="unprofiled updates first")
    p.add_argument("--steps", type=int, default=10, help="profiled updates")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--top", type=int, default=25, help="rows of the table")
    p.add_argument("--out", default="benchmarks/results/profile_cpu", help="output folder")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        p.error(f"--steps {a.steps} must be >= 1 and --warmup {a.warmup} >= 0")

    with tempfile.TemporaryDirectory() as save_dir:
        cfg = TrainConfig(
            data=a.data, save_dir=save_dir, preset=a.preset, objective=a.objective, amp=a.amp,
            max_tokens=a.max_tokens, threads=a.threads, device=a.device, seed=a.seed, progress=False,
        )  # fmt: skip
        trainer = Trainer(cfg)
        prof, walls = profile_updates(trainer, a.warmup, a.steps)
    rows, self_ms = top_ops(prof, a.steps, a.top)
    gemm_ms = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e3 / a.steps
    wall_ms = 1e3 * sum(walls) / len(walls)

    name = f"profile_{a.preset}_{a.objective}_{a.amp}"
    title = (
        f"{name}: {a.steps} profiled updates after {a.warmup} warm-up, {torch.get_num_threads()} thread(s), "
        f"max_tokens {a.max_tokens}, seed {a.seed}\n"
        f"wall {wall_ms:,.0f} ms per update (profiled); self CPU {self_ms:,.0f} ms per update, "
        f"of which GEMMs ({', '.join(sorted(GEMM_OPS))}) {gemm_ms:,.0f} ms ({100 * gemm_ms / self_ms:.0f}%)\n"
    )
    print(title)
    formats = {"self_ms": ",.1f", "self_pct": ".1f", "total_ms": ",.1f", "calls_per_update": ".0f"}
    table = print_table(rows, ["op", "calls_per_update", "self_ms", "self_pct", "total_ms"], formats)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.txt").write_text(title + "\n" + table + "\n")
    settings = dict(vars(a), threads=torch.get_num_threads(), precision=str(trainer.amp_dtype or "fp32"))
    payload = dict(
        benchmark="profile_train", environment=environment(trainer.env.device), settings=settings,
        wall_ms_per_update=wall_ms, walls_s=walls, self_ms_per_update=self_ms, gemm_ms_per_update=gemm_ms,
        top_ops=rows,
    )  # fmt: skip
    write_json(out / f"{name}.json", payload)
    print(f"wrote {out / (name + '.txt')}")
    return payload


if __name__ == "__main__":
    main()
