"""Same seed, two precisions: the validation curves of an fp32 and a bf16 training run side by side.

    D=../shared/data/libreoffice-de-en
    janus prepare --trainpref $D/train --validpref $D/valid --testpref $D/test --src de --tgt en \\
        --destdir /tmp/cmp/bin --vocab-size 8000
    # the two runs, side by side on one thread each (same seed, same everything but --amp)
    for amp in none bf16; do
      janus train --data /tmp/cmp/bin --save-dir /tmp/cmp/$amp --preset small --objective janus \\
          --max-tokens 2048 --max-steps 1000 --warmup-steps 400 --lr 1e-3 --dropout 0.1 --seed 1 --amp $amp \\
          --threads 1 --validate-interval 100 --save-interval 100 --keep-last 6 --log-interval 50 --no-progress &
    done; wait
    # optional: average the last 5 checkpoints and score AR beam 5 (janus evaluate --output-json)
    python benchmarks/bf16_vs_fp32.py --fp32 /tmp/cmp/none --bf16 /tmp/cmp/bf16 \\
        --out benchmarks/results/bf16_vs_fp32_small/curves.json [--fp32-eval eval.json --bf16-eval eval.json]

Reads each run's ``train.jsonl`` and writes, per validation step, the NLL of P_AR, P_NAR and
P_AUX (and the length loss) of both runs and their differences, the largest difference, and
the BLEU of the given ``janus evaluate`` JSON files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from harness import train_events

KEYS = ("ar_nll", "nar_nll", "aux_nll", "length", "loss")


def curves(fp32: Path, bf16: Path) -> dict[str, Any]:
    """Validation rows at the steps both runs reached (the last record of a step wins after a resume)."""
    a = {r["step"]: r for r in train_events(fp32, "valid")}
    b = {r["step"]: r for r in train_events(bf16, "valid")}
    rows = []
    for step in sorted(set(a) & set(b)):
        row: dict[str, Any] = {"step": step}
        for k in KEYS:
            row[f"fp32_{k}"], row[f"bf16_{k}"] = a[step][k], b[step][k]
            row[f"diff_{k}"] = round(b[step][k] - a[step][k], 5)
        rows.append(row)
    worst = {k: max((abs(r[f"diff_{k}"]) for r in rows), default=None) for k in ("ar_nll", "nar_nll", "aux_nll")}
    runs = (("fp32", fp32), ("bf16", bf16))
    precision = {name: (train_events(d, "start") or [{}])[0].get("precision") for name, d in runs}
    return {"rows": rows, "max_abs_diff": worst, "precision": precision,
            "steps": {"fp32": max(a, default=0), "bf16": max(b, default=0)}}  # fmt: skip


def bleu(path: Optional[str]) -> Optional[list[dict[str, Any]]]:
    return json.loads(Path(path).read_text()) if path else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp32", required=True, help="save dir of the fp32 run")
    p.add_argument("--bf16", required=True, help="save dir of the bf16 run")
    p.add_argument("--fp32-eval", help="janus evaluate --output-json of the fp32 run's averaged checkpoint")
    p.add_argument("--bf16-eval", help="the same for the bf16 run")
    p.add_argument("--out", default="benchmarks/results/bf16_vs_fp32_small/curves.json")
    a = p.parse_args()
    result = curves(Path(a.fp32), Path(a.bf16))
    result["evaluate"] = {"fp32": bleu(a.fp32_eval), "bf16": bleu(a.bf16_eval)}
    result["train_config"] = (train_events(Path(a.fp32), "start") or [{}])[0].get("train")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["rows"]:
        pairs = (f"{k} {r[f'fp32_{k}']:.4f}/{r[f'bf16_{k}']:.4f}" for k in ("ar_nll", "nar_nll", "aux_nll"))
        print(r["step"], " ".join(pairs))
    print("max |bf16 - fp32|:", result["max_abs_diff"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
