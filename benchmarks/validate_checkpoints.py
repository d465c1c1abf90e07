"""Validate every checkpoint of a training run after the fact: the validation terms of each, as JSON.

    python benchmarks/validate_checkpoints.py --save-dir run --out run/valid_curve.json
    python benchmarks/validate_checkpoints.py --save-dir run --data other_bin --threads 2

Each checkpoint is validated exactly as the trainer validates during training (``Trainer.validate``:
the run's objective, batching, masking seed and precision, in eval mode), on its recorded data folder
unless ``--data`` names another with the same vocabulary. Use it to get a curve of a run whose
checkpoints were kept, or to check a logged curve (the trainer's own validations before the fix of the
stale fused q/k/v cache read the first validation's weights; see janus/train.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from harness import print_table, train_events, write_json
from tqdm.auto import tqdm

from janus.checkpoint import list_checkpoints, load_checkpoint
from janus.config import TrainConfig
from janus.train import Trainer

TERMS = ("ar_nll", "nar_nll", "aux_nll", "length", "loss")


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-dir", required=True, help="a training run's folder (its checkpoint_* folders)")
    p.add_argument("--data", default="", help="prepared folder to validate on (default: the run's own)")
    p.add_argument("--amp", default="", help="precision to validate in (default: the run's own)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default="", help="JSON to write (default: <save-dir>/valid_curve.json)")
    args = p.parse_args(argv)
    save_dir = Path(args.save_dir)
    ckpts = list_checkpoints(save_dir)
    if not ckpts:
        raise SystemExit(f"validate_checkpoints: no complete checkpoint_* folder in {save_dir}")
    torch.set_num_threads(args.threads)
    first = load_checkpoint(ckpts[0])
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    train_cfg = {k: v for k, v in first.config.get("train", {}).items() if k in known}
    with tempfile.TemporaryDirectory() as scratch:
        train_cfg.update(save_dir=scratch, init_from="", progress=False, threads=args.threads)
        if args.data:
            train_cfg["data"] = args.data
        if args.amp:
            train_cfg["amp"] = args.amp
        # The shapes of the run (its vocabulary and specials come from the data folder, as in training).
        shapes = {k: v for k, v in first.config.get("model", {}).items() if k not in ("vocab_size", "specials")}
        trainer = Trainer(TrainConfig(**train_cfg), model_overrides=shapes)
        # The run's own validations by step (the last one of a step wins, after a resume).
        logged = {r["step"]: r for r in train_events(save_dir, "valid")} if (save_dir / "train.jsonl").is_file() else {}
        rows = []
        for path in tqdm(ckpts, desc="checkpoints", disable=None):
            ckpt = load_checkpoint(path)
            trainer.model.load_state_dict(ckpt.model_state)  # bumps every parameter's version: no stale caches
            v = trainer.validate()
            if v is None:
                raise SystemExit(f"validate_checkpoints: {train_cfg['data']} has no valid split")
            row = {"step": ckpt.step, **{k: round(v[k], 5) for k in TERMS}}
            if ckpt.step in logged:
                row["logged_ar_nll"] = logged[ckpt.step].get("ar_nll")
            rows.append(row)
    print_table(rows, list(rows[0]), {k: ".4f" for k in (*TERMS, "logged_ar_nll")})
    out = Path(args.out) if args.out else save_dir / "valid_curve.json"
    write_json(out, {"save_dir": str(save_dir), "data": train_cfg["data"], "checkpoints": rows})
    return rows


if __name__ == "__main__":
    main()
