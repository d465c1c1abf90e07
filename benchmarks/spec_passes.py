"""Decoder passes of self-speculative decoding variants against greedy search's, on a trained model.

Passes do not depend on the machine or the batch (batch invariance), so this counts them at a large
batch; every variant's output is checked against greedy's, sentence by sentence.

    python benchmarks/spec_passes.py --checkpoint builtin:de-en --src ../shared/data/libreoffice-de-en/test.de \
        --out benchmarks/results/spec_align_builtin_cpu/passes.json

Each variant is ``policy:T:align`` or ``policy:T:align:block`` (draft policy, draft iterations, draft
alignment, and the most draft tokens a pass checks, 0 = the whole draft; without it, DecodeConfig's default:
janus.config.DecodeConfig).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from harness import write_json
from tqdm import tqdm

from janus.api import Generator
from janus.data import read_lines

DEFAULT_VARIANTS = ",".join(
    f"{policy}:{T}:{align}" for policy in ("exhausted", "always") for T in (1, 2, 3) for align in ("position", "lookup")
)


def parse_variant(text: str) -> dict:
    """``policy:T:align[:block]`` -> DecodeConfig overrides; names the bad part."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not all(x.isdigit() for x in parts[1::2]):
        raise SystemExit(
            f"variant {text!r}: expected policy:T:align or policy:T:align:block, e.g. exhausted:1:lookup:0"
        )
    kw = dict(draft_policy=parts[0], draft_iterations=int(parts[1]), draft_align=parts[2])
    if len(parts) == 4:
        kw["draft_block"] = int(parts[3])
    return kw


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint, averaged or training folder, or builtin:NAME")
    p.add_argument("--src", required=True, help="source text, one sentence per line")
    p.add_argument("--sentences", type=int, default=0, help="the first N lines only (0 = all)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated policy:T:align")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variants.split(",") if v]
    lines = read_lines(args.src)[0]
    src = lines[: args.sentences] if args.sentences else lines
    gen = Generator.from_checkpoint(args.checkpoint, device="cpu", dtype="float32")
    greedy = gen.generate(src, mode="ar", beam_size=1, max_batch_size=args.batch_size)
    total = sum(h.passes for h in greedy)
    rows = []
    for kw in tqdm(variants, desc="variants", disable=not sys.stderr.isatty()):
        spec = gen.generate(src, mode="spec", max_batch_size=args.batch_size, **kw)
        rows.append(
            dict(
                kw,
                sentences=len(src),
                greedy_passes_per_sentence=round(total / len(src), 3),
                passes_per_sentence=round(sum(h.passes for h in spec) / len(src), 3),
                passes_vs_greedy=round(sum(h.passes for h in spec) / total, 4),
                identical=sum(s.ids == g.ids for s, g in zip(spec, greedy, strict=True)),
                more_passes_than_greedy=sum(s.passes > g.passes for s, g in zip(spec, greedy, strict=True)),
            )
        )
        r = rows[-1]
        print(
            f"{r['draft_policy']:>9} T={r['draft_iterations']} {r['draft_align']:>8} "
            f"block={r.get('draft_block', 'default')}: "
            f"{r['passes_vs_greedy']:.4f} of greedy's passes, {r['identical']}/{len(src)} identical",
            flush=True,
        )
    if args.out:
        info = dict(checkpoint=args.checkpoint, src=args.src, batch_size=args.batch_size)
        write_json(Path(args.out), dict(settings=info, results=rows))
    return rows


if __name__ == "__main__":
    main()
