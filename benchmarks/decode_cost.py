"""Where a decode's time goes: the compiled kernels against the host work between them, per method and batch size,
and the speed ratios that decode_speed.py reports, by wall time and by the kernels' time alone.

    python benchmarks/decode_cost.py                                  # the shipped model, its sample, 2 threads
    python benchmarks/decode_cost.py --checkpoint run/avg --methods greedy,spec --batch-sizes 1

Every method (``decode_speed.methods()`` by name; default ``DEFAULT_METHODS``) decodes the first ``--sentences``
of the shipped sample at every batch size, the methods taking turns batch by batch (``harness.interleaved_pieces``),
``--rounds`` rounds in which each decodes every batch twice, once as it is and once under ``torch.profiler``
(the plain and the profiled runs taking turns too). Per sentence:

- ``wall``: the median timed round;
- ``kernels``: the median round's profiled time inside the products and fused ops (``KERNELS``: every
  ``janus::`` op, torch's matrix products; an op inside another counted once, in the outer one);
- ``host``: wall - kernels: Python, the small tensor ops between the kernels, dispatch. A difference of two
  medians: where the host work is a few percent of the time, the machine's noise can exceed it (even below 0).

Ratios (``RATIOS``): beam 5 and the speculative decodes against greedy at batch 1, mask-predict at batch 32
against batch 1, each by wall time and by the kernels alone: the ratio that is left as both methods' host work is
cut (to nothing). Where that one misses a target, only host work that one method does and the other does not (or
faster kernels for one of them) can reach it. Writes ``decode_cost.json`` (environment, settings, rows, ratios) and
``decode_cost.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from decode_speed import BUILTIN, methods
from harness import environment, interleaved_pieces, percentile, print_table, write_json

from janus.api import Generator, make_decode_batches
from janus.samples import libreoffice_sample

DEFAULT_METHODS = "greedy,beam5,spec,spec-whole,nar-T4-l3,nar-T10-l3"
# Ops whose time counts as the kernels': the compiled ops, torch's products (the encoder's cross-attention keys and
# values, and any layer the fused passes do not take).
KERNELS = ("janus::", "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")
# (name, method, its batch size, the method it is compared with, that one's batch size, the target if any)
RATIOS = (
    ("beam 5 / greedy, batch 1", "beam5", 1, "greedy", 1, 1.4),
    ("spec / greedy, batch 1", "spec", 1, "greedy", 1, 0.6),
    ("spec-whole / greedy, batch 1", "spec-whole", 1, "greedy", 1, 0.6),
    ("nar-T4-l3 batch 32 / batch 1", "nar-T4-l3", 32, "nar-T4-l3", 1, 0.5),
    ("nar-T10-l3 batch 32 / batch 1", "nar-T10-l3", 32, "nar-T10-l3", 1, 0.5),
)
FORMATS = {"passes": ".1f", "wall_ms": ".2f", "kernel_ms": ".2f", "host_ms": ".2f", "kernel_share": ".2f",
           "kernel_us_pass": ",.0f", "host_us_pass": ",.0f"}  # fmt: skip


def kernel_ms(prof: Any) -> float:
    """Milliseconds inside ``KERNELS`` ops in a profile, an op nested in another counted once (the outer one)."""
    total = 0.0
    for event in prof.events():
        if not event.name.startswith(KERNELS):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(KERNELS):
            parent = parent.cpu_parent
        if parent is None:
            total += event.cpu_time_total / 1e3
    return total


def profiled(fn: Any) -> Any:
    """fn(j) under torch.profiler, its kernels' milliseconds added to ``run.kernel_ms[-1]`` (a new entry at
    piece 0: one per round)."""

    def run(j: int) -> None:
        if j == 0:
            run.kernel_ms.append(0.0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn(j)
        run.kernel_ms[-1] += kernel_ms(prof)

    run.kernel_ms = []
    return run


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``RATIOS`` over the rows measured: by wall time and by the kernels' time alone."""
    by = {(r["method"], r["batch"]): r for r in rows}
    out = []
    for name, a, ba, b, bb, target in RATIOS:
        if (a, ba) in by and (b, bb) in by:
            x, y = by[(a, ba)], by[(b, bb)]
            out.append(dict(ratio=name, wall=x["wall_ms"] / y["wall_ms"], kernels=x["kernel_ms"] / y["kernel_ms"],
                            target=target))  # fmt: skip
    return out


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=BUILTIN, help=f"the model to decode with (default {BUILTIN})")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list (default {DEFAULT_METHODS})")
    p.add_argument("--batch-sizes", default="1,32", help="comma list (default 1,32)")
    p.add_argument("--sentences", type=int, default=64, help="of the shipped sample, decoded (default 64)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or int8 (default float32)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each method plain and profiled in each (default 3)")
    p.add_argument("--out", default="decode_cost_results", help="output folder (default decode_cost_results)")
    args = p.parse_args(argv)
    if args.rounds < 3:
        raise SystemExit(f"--rounds {args.rounds}: at least 3 (a median of fewer can be one slow run)")
    known = {m.name: m for m in methods()}
    chosen = [x.strip() for x in args.methods.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in known]
    if unknown:
        raise SystemExit(f"unknown methods {unknown} in --methods; choose from {sorted(known)}")
    torch.set_num_threads(args.threads)
    gen = Generator.from_checkpoint(args.checkpoint, device="cpu", dtype=args.dtype)
    sample = libreoffice_sample()
    sources = sample.source[: args.sentences]
    lengths = [len(ids) + 1 for ids in gen.encode(sources)]
    for m in chosen:  # warm-up
        gen.generate(sources[:2], known[m].options)

    rows = []
    for batch in [int(x) for x in args.batch_sizes.split(",")]:
        pieces = make_decode_batches(lengths, dataclasses.replace(known[chosen[0]].options, max_batch_size=batch))
        outputs: dict[str, list] = {m: [None] * len(sources) for m in chosen}

        def run(m: str, j: int, batch: int = batch, pieces: list = pieces, outputs: dict = outputs) -> None:
            group = pieces[j]
            opts = dataclasses.replace(known[m].options, max_batch_size=batch)
            for i, h in zip(group, gen.generate([sources[i] for i in group], opts)):
                outputs[m][i] = h

        # Every method plain and profiled, all taking turns piece by piece: a round's wall time and its kernels'
        # time come from neighbouring runs, in the same state of the machine.
        plain = [functools.partial(run, m) for m in chosen]
        traced = [profiled(functools.partial(run, m)) for m in chosen]
        wall = interleaved_pieces(plain + traced, len(pieces), gen.device, rounds=args.rounds)[: len(chosen)]
        n = len(sources)
        for m, ms, fn in zip(chosen, wall, traced):
            passes = sum(h.passes for h in outputs[m]) / n
            w, k = percentile(ms, 0.5) / n, percentile(fn.kernel_ms, 0.5) / n  # medians, as decode_speed's p50
            rows.append(dict(method=m, batch=batch, sentences=n, passes=passes, wall_ms=w, kernel_ms=k,
                             host_ms=w - k, kernel_share=k / w, kernel_us_pass=1e3 * k / passes,
                             host_us_pass=1e3 * (w - k) / passes))  # fmt: skip
        print(f"batch {batch}: done", file=sys.stderr, flush=True)

    columns = ["method", "batch", "sentences", "passes", "wall_ms", "kernel_ms", "host_ms", "kernel_share",
               "kernel_us_pass", "host_us_pass"]  # fmt: skip
    table = print_table(rows, columns, FORMATS)
    found = ratios(rows)
    ratio_table = print_table(found, ["ratio", "wall", "kernels", "target"], {"wall": ".2f", "kernels": ".2f"})
    env = environment(gen.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "decode_cost.json", dict(environment=env, settings=vars(args), results=rows, ratios=found))
    (out / "decode_cost.md").write_text(
        f"# Decode cost: kernels and host work\n\n{env['device_name']}, {args.threads} threads, {args.checkpoint}, "
        f"{args.dtype}, the first {len(sources)} sentences of {sample.name}; ms per sentence (medians of "
        f"{args.rounds} rounds), us per decoder pass.\n\n```\n{table}\n```\n\n"
        f"Ratios by wall time and by the kernels' time alone:\n\n```\n{ratio_table}\n```\n"
    )
    return rows


if __name__ == "__main__":
    main()
