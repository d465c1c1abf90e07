"""Training throughput: target tokens per second of one full update (forward, backward, AdamW),
for every precision and loss path side by side in one run.

    python benchmarks/train_speed.py                          # small and iwslt, all three objectives, CPU
    python benchmarks/train_speed.py --preset tiny --objective janus --device cuda --variants fp32,bf16

Random weights and synthetic batches: every sentence has ``--tgt-len`` target tokens
(n, incl. bos/eos) and ``--src-len`` source tokens, as many sentences as fit
``--max-tokens`` (fairseq-style padded budget), span masking at ratio 0.7 (uniform for
cmlm). Variants (``--variants``):

- ``fp32-ref``: the training path before CPU autocast, the chunked CPU backend and the cheaper
  CPU step existed: fp32, the linear + loss through its pure-PyTorch reference, torch's
  ``nn.Dropout`` (per-element Bernoulli) and the per-parameter AdamW loop;
- ``fp32``: fp32, the dispatched linear + loss (on a CPU: the chunked "cpu" backend), and the
  step ``janus train`` takes now: ``janus.model.Dropout`` and the fused AdamW;
- ``bf16``: as ``fp32`` under bf16 autocast (what ``--amp auto`` picks on CPUs with AVX512_BF16
  or AMX);
- ``bf16-ref``: as ``bf16`` with the reference linear + loss.

Per preset and objective, one model and one batch; the variants take turns for ``--rounds``
rounds (harness.interleaved: order reversed every other round), so a shared machine's
drift spreads over all of them. Seconds per update p50/p90, target tokens/s at the p50,
the speedup over the first variant, and the peak RSS of a fresh process that runs two
updates of that variant alone (``--no-rss`` skips it). JSON rows carry device, versions
and git commit.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from harness import environment, interleaved, percentile, print_table, write_json
from torch import nn

from janus.config import LossWeights, preset
from janus.data import span_mask, uniform_mask
from janus.losses import Criterion, Streams
from janus.memory import keep_freed_memory
from janus.model import Dropout, JanusModel
from janus.streams import RowKind, build_training_rows

PAD, BOS, EOS = 0, 1, 2
# name -> (autocast dtype or None, forced linear + loss backend or None for the dispatch, legacy step:
# torch's nn.Dropout and the per-parameter AdamW loop instead of janus.model.Dropout and the fused AdamW)
VARIANTS = {
    "fp32-ref": (None, "reference", True),
    "fp32": (None, None, False),
    "bf16": (torch.bfloat16, None, False),
    "bf16-ref": (torch.bfloat16, "reference", False),
}
BACKEND_VAR = "JANUS_BACKEND_JANUS_LINEAR_LOSS"


@dataclass(frozen=True)
class Experiment:
    preset: str
    objective: str
    max_tokens: int
    src_len: int
    tgt_len: int


def make_batch(exp: Experiment, vocab: int, mask_id: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    B = exp.max_tokens // max(exp.src_len, exp.tgt_len)
    src = torch.from_numpy(rng.integers(5, vocab, (B, exp.src_len)))
    src[:, -1] = EOS
    tgt = torch.from_numpy(rng.integers(5, vocab, (B, exp.tgt_len)))
    tgt[:, 0], tgt[:, -1] = BOS, EOS
    fn = uniform_mask if exp.objective == "cmlm" else (lambda n, r: span_mask(n, 0.7, 2.0, r))
    masked = torch.from_numpy(np.stack([fn(exp.tgt_len, rng) for _ in range(B)]))
    return src, tgt, masked


class Setup:
    """One model, optimizers and batch of an experiment; ``step(variant)`` runs one update."""

    def __init__(self, exp: Experiment, vocab: int, device: torch.device) -> None:
        torch.manual_seed(0)
        self.device = device
        self.model = JanusModel(preset(exp.preset, vocab_size=vocab)).to(device)
        self.crit = Criterion(self.model, exp.objective, LossWeights.for_objective(exp.objective), 0.1)
        adamw = dict(lr=1e-4, betas=(0.9, 0.98), weight_decay=1e-4)
        fused = device.type in ("cpu", "cuda")  # as janus.train.Trainer chooses
        self.opt = torch.optim.AdamW(self.model.parameters(), fused=fused or None, foreach=None if fused else True,
                                     **adamw)  # fmt: skip
        self.legacy_opt = torch.optim.AdamW(self.model.parameters(), foreach=False, **adamw)
        # (parent module, attribute, janus Dropout, torch nn.Dropout of the same p) of every dropout
        self.dropouts = [(parent, name, m, nn.Dropout(m.p)) for parent in self.model.modules()
                         for name, m in parent.named_children() if isinstance(m, Dropout)]  # fmt: skip
        self.batch = tuple(t.to(device) for t in make_batch(exp, vocab, self.model.cfg.specials.mask))

    def use_legacy_dropout(self, legacy: bool) -> None:
        """Swap torch's nn.Dropout (legacy) or janus.model.Dropout into the model's dropout slots."""
        for parent, name, ours, torchs in self.dropouts:
            setattr(parent, name, torchs if legacy else ours)

    def step(self, variant: str) -> None:
        dtype, backend, legacy = VARIANTS[variant]
        self.use_legacy_dropout(legacy)
        opt = self.legacy_opt if legacy else self.opt
        before = os.environ.get(BACKEND_VAR)
        if backend:
            os.environ[BACKEND_VAR] = backend
        else:
            os.environ.pop(BACKEND_VAR, None)
        try:
            opt.zero_grad(set_to_none=True)
            ctx = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with ctx:
                loss, _ = self.crit(*self.batch)
            loss.backward()
            opt.step()
        finally:
            if before is None:
                os.environ.pop(BACKEND_VAR, None)
            else:
                os.environ[BACKEND_VAR] = before


def peak_rss_mb(exp: Experiment, variant: str, args: argparse.Namespace) -> float:
    """Peak RSS (MB) of a fresh process that builds this experiment and runs two updates of ``variant``."""
    cmd = [sys.executable, __file__, "--probe", json.dumps(asdict(exp)), variant, "--vocab", str(args.vocab),
           "--device", args.device, "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def own_peak_rss_mb() -> float:
    """Peak RSS (MB) of this process's own memory: /proc/self/status VmHWM where there is one.

    Not getrusage's ru_maxrss on Linux: a child keeps the RSS its parent had when it forked in that
    figure across exec, so every probe of this benchmark reported the parent's RSS (the same for
    every variant). VmHWM belongs to the address space, which exec replaces.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB (macOS: bytes)


def probe(spec: str, variant: str, vocab: int, device: torch.device) -> None:
    """Build the experiment ``spec`` (JSON), run two updates of ``variant``, print the peak RSS (MB)."""
    setup = Setup(Experiment(**json.loads(spec)), vocab, device)
    for _ in range(2):
        setup.step(variant)
    print(own_peak_rss_mb())


def run(exp: Experiment, variants: list[str], args: argparse.Namespace, device: torch.device) -> list[dict]:
    setup = Setup(exp, args.vocab, device)
    for v in variants:  # warm-up: first-touch of every buffer, autocast caches, lazy inits
        setup.step(v)
    times = interleaved([lambda v=v: setup.step(v) for v in variants], device, rounds=args.rounds)
    src, tgt, masked = setup.batch
    tokens = int((tgt != PAD).sum())
    st = Streams.of(exp.objective)
    rows = build_training_rows(tgt, masked, pad=PAD, mask=setup.model.cfg.specials.mask, ar=st.ar, nar=st.nar,
                               aux=st.aux)  # fmt: skip
    real_rows = int((rows.kinds != RowKind.PAD).sum())
    used = sum(r.numel() for r in (rows.ar_rows, rows.p_rows, rows.q_rows) if r is not None)
    out = []
    base = percentile(times[0], 0.5)
    for v, t in zip(variants, times):
        p50 = percentile(t, 0.5) / 1e3
        out.append(dict(
            **asdict(exp), variant=v, sentences=src.shape[0], tgt_tokens=tokens, rounds=len(t),
            update_s_p50=p50, update_s_p90=percentile(t, 0.9) / 1e3, tokens_per_s=tokens / p50,
            speedup=base / 1e3 / p50, peak_rss_mb=None if args.no_rss else peak_rss_mb(exp, v, args),
            decoder_rows=real_rows, projected_rows=used, params=setup.model.num_parameters(),
            times_ms=[round(x, 1) for x in t],
        ))  # fmt: skip
        print(f"{exp.preset} {exp.objective} {v}: {p50:.3f} s/update p50, {tokens / p50:,.0f} tokens/s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["small", "iwslt"])
    p.add_argument("--objective", nargs="+", default=["janus", "ar", "cmlm"])
    p.add_argument("--variants", default="fp32-ref,fp32,bf16", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--src-len", type=int, default=26)
    p.add_argument("--tgt-len", type=int, default=26)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS probe processes")
    p.add_argument("--probe", nargs=2, metavar=("EXPERIMENT", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/train_speed.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cpu":
        keep_freed_memory()  # as `janus train` does: no per-step page faults on the large buffers
    if a.probe:
        probe(*a.probe, a.vocab, device)
        return
    variants = a.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    rows = []
    for pr, ob in itertools.product(a.preset, a.objective):
        rows += run(Experiment(pr, ob, a.max_tokens, a.src_len, a.tgt_len), variants, a, device)
    print_table(rows, ["preset", "objective", "variant", "sentences", "tgt_tokens", "update_s_p50", "update_s_p90",
                       "tokens_per_s", "speedup", "peak_rss_mb", "decoder_rows", "projected_rows"])  # fmt: skip
    settings = dict(variants=variants, rounds=a.rounds, threads=torch.get_num_threads(), max_tokens=a.max_tokens,
                    src_len=a.src_len, tgt_len=a.tgt_len, vocab=a.vocab)  # fmt: skip
    write_json(Path(a.out), {"benchmark": "train_speed", "environment": environment(device), "settings": settings,
                             "results": rows})  # fmt: skip


if __name__ == "__main__":
    main()
