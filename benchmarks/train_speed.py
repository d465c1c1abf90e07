"""Training throughput: target tokens per second of one full update (forward, backward, AdamW).

    python benchmarks/train_speed.py                          # iwslt preset, all three objectives, CPU
    python benchmarks/train_speed.py --preset tiny --objective janus --device cuda

Random weights and synthetic batches: every sentence has ``--tgt-len`` target tokens
(n, incl. bos/eos) and ``--src-len`` source tokens, as many sentences as fit
``--max-tokens`` (fairseq-style padded budget), span masking at ratio 0.7. The table also
shows how many decoder rows exist and how many of them reach the vocabulary projection,
and times that projection (forward + backward) for the used rows against all rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from harness import environment, measure, print_table, write_json

from janus.config import LossWeights, preset
from janus.data import span_mask, uniform_mask
from janus.losses import Criterion, Streams
from janus.model import JanusModel
from janus.streams import RowKind, build_training_rows

PAD, BOS, EOS = 0, 1, 2


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


def run(exp: Experiment, vocab: int, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    model = JanusModel(preset(exp.preset, vocab_size=vocab)).to(device)
    crit = Criterion(model, exp.objective, LossWeights.for_objective(exp.objective), 0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=1e-4)
    src, tgt, masked = (t.to(device) for t in make_batch(exp, vocab, model.cfg.specials.mask))

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = crit(src, tgt, masked)
        loss.backward()
        opt.step()

    t = measure(step, device, warmup=1, repeats=repeats)
    tokens = int((tgt != PAD).sum())
    # Rows: how many exist, how many are projected, and what projecting all of them would cost.
    st = Streams.of(exp.objective)
    rows = build_training_rows(tgt, masked, pad=PAD, mask=model.cfg.specials.mask, ar=st.ar, nar=st.nar, aux=st.aux)
    real_rows = int((rows.kinds != RowKind.PAD).sum())
    used = sum(r.numel() for r in (rows.ar_rows, rows.p_rows, rows.q_rows) if r is not None)
    hidden = torch.randn(real_rows, model.cfg.d_model, device=device, requires_grad=True)

    def project(n: int):
        logits = model.project(hidden[:n])
        F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=device)).backward()

    t_used = measure(lambda: project(used), device, warmup=1, repeats=repeats)
    t_all = measure(lambda: project(real_rows), device, warmup=1, repeats=repeats)
    return dict(
        **dataclasses.asdict(exp),
        sentences=src.shape[0],
        tgt_tokens=tokens,
        update_ms_p50=t.p50_ms,
        update_ms_p90=t.p90_ms,
        tokens_per_s=tokens / (t.p50_ms / 1e3),
        decoder_rows=real_rows,
        projected_rows=used,
        projection_ms_used=t_used.p50_ms,
        projection_ms_all=t_all.p50_ms,
        params=model.num_parameters(),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["iwslt"])
    p.add_argument("--objective", nargs="+", default=["janus", "ar", "cmlm"])
    p.add_argument("--max-tokens", nargs="+", type=int, default=[4096])
    p.add_argument("--src-len", type=int, default=26)
    p.add_argument("--tgt-len", type=int, default=26)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/train_speed.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    exps = [
        Experiment(pr, ob, mt, a.src_len, a.tgt_len)
        for pr, ob, mt in itertools.product(a.preset, a.objective, a.max_tokens)
    ]
    rows = [run(e, a.vocab, device, a.repeats) for e in exps]
    print_table(
        rows,
        [
            "preset",
            "objective",
            "max_tokens",
            "sentences",
            "update_ms_p50",
            "tokens_per_s",
            "decoder_rows",
            "projected_rows",
            "projection_ms_used",
            "projection_ms_all",
        ],
    )
    write_json(Path(a.out), {"benchmark": "train_speed", "environment": environment(device), "results": rows})


if __name__ == "__main__":
    main()
