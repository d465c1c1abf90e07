"""Decoding speed: AR greedy, AR beam search, mask-predict and self-speculative decoding.

    python benchmarks/decode_speed.py --data bin                        # iwslt preset, random weights, CPU
    python benchmarks/decode_speed.py --data bin --checkpoint run/avg   # a trained model (own lengths)
    python benchmarks/decode_speed.py --data bin --batch-sizes 1,32 --methods greedy,beam5,nar-T10-l3,spec

Every method decodes the same source sentences (the first ``--sentences`` of ``--split``
of a folder written by ``janus prepare``), in batches of each size, with the encoder
included in the time. Timing is honest: one untimed warm-up, a device sync around every
repeat, p50 and p90 over ``--repeats``. With random weights (no ``--checkpoint``) every
method is forced to the reference target lengths, so all of them produce the same
number of tokens; with a checkpoint, lengths are the model's own.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import environment, measure, print_table, write_json

from janus.api import Generator
from janus.config import DecodeConfig, preset
from janus.data import Dataset
from janus.model import JanusModel


@dataclass(frozen=True)
class Method:
    name: str
    options: DecodeConfig


def methods() -> list[Method]:
    out = [
        Method("greedy", DecodeConfig(mode="ar", beam_size=1)),
        Method("beam5", DecodeConfig(mode="ar", beam_size=5)),
    ]
    for T in (1, 4, 10):
        for beam in (1, 3):
            out.append(Method(f"nar-T{T}-l{beam}", DecodeConfig(mode="nar", iterations=T, length_beam=beam)))
    out.append(Method("spec", DecodeConfig(mode="spec")))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder written by janus prepare")
    p.add_argument("--split", default="test")
    p.add_argument("--sentences", type=int, default=20, help="how many source sentences (the first ones)")
    p.add_argument("--checkpoint", default="", help="a trained model; default: random weights of --preset")
    p.add_argument("--preset", default="iwslt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--methods", default="", help="comma list of method names (default: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default="", help="JSON result file (optional)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = Dataset(args.data, args.split)
    n = min(args.sentences, len(data))
    sources = [data.src(i).astype("int64").tolist() for i in range(n)]
    ref_lengths = [len(data.tgt(i)) for i in range(n)]
    if args.checkpoint:
        gen = Generator.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
        forced = None
    else:
        torch.manual_seed(0)
        cfg = preset(args.preset, vocab_size=int(data.manifest["vocab_size"]), dropout=0.0)
        gen = Generator(JanusModel(cfg), device=args.device, dtype=args.dtype)
        forced = ref_lengths
    chosen = [m for m in methods() if not args.methods or m.name in args.methods.split(",")]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    env = environment(gen.device)
    print(f"{env['device_name']}, {env['cpu_threads']} threads, torch {env['torch']}; model "
          f"{args.checkpoint or args.preset + ' (random weights)'} with {gen.model.num_parameters() / 1e6:.1f}M "
          f"parameters, {gen.dtype}; {n} sentences of {args.data}:{args.split}"
          + ("; every method forced to the reference target lengths" if forced else ""))  # fmt: skip

    rows = []
    for batch in sizes:
        for m in chosen:
            opts = dataclasses.replace(m.options, max_batch_size=batch)
            hyps = []

            def run(opts=opts, hyps=hyps):
                hyps[:] = gen.generate(sources, opts, target_lengths=forced)

            t = measure(run, gen.device, warmup=1, repeats=args.repeats)
            tokens = sum(len(h.ids) + 1 for h in hyps)
            rows.append(
                dict(
                    method=m.name,
                    batch=batch,
                    passes=sum(h.passes for h in hyps) / n,
                    ms_p50=t.p50_ms / n,
                    ms_p90=t.p90_ms / n,
                    sent_s=n / (t.p50_ms / 1e3),
                    tok_s=tokens / (t.p50_ms / 1e3),
                )
            )
    for r in rows:
        base = {x["method"]: x["ms_p50"] for x in rows if x["batch"] == r["batch"]}
        r["vs_beam5"] = base["beam5"] / r["ms_p50"] if "beam5" in base else float("nan")
        r["vs_greedy"] = base["greedy"] / r["ms_p50"] if "greedy" in base else float("nan")
    print_table(rows, ["method", "batch", "passes", "ms_p50", "ms_p90", "sent_s", "tok_s", "vs_beam5", "vs_greedy"])
    if args.output:
        settings = dict(vars(args), forced_lengths=forced is not None, sentences=n)
        write_json(Path(args.output), dict(environment=env, settings=settings, results=rows))


if __name__ == "__main__":
    main()
