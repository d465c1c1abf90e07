"""The decoder layers of one incremental pass: ``janus.ops.decoder_step``'s kernel against the model's own layers.

    python benchmarks/decoder_step.py                       # small and iwslt presets, CPU
    python benchmarks/decoder_step.py --preset small --hypotheses 1,5,16 --json out.json

Every pass is a ``JanusModel.decode`` of AR rows over a KV cache of ``--cached`` columns (random weights,
eval mode, no autograd; float32 and bfloat16 models), with R rows per hypothesis: R = 2 is a greedy or
beam step (a content and a query row), R = 10 a speculative verification of a block of 4 drafted tokens
(5 content and 5 query rows). For each preset, dtype and (hypotheses, R), the kernel (``decoder_step``,
"cpp") and the model's layers ("layers": JANUS_BACKEND_DECODER_STEP=reference) take turns in ``--rounds``
rounds of ``--calls`` passes; the table gives microseconds per pass (median over rounds), the speedup, and
whether the model sends that pass to the kernel (rows <= ``janus.ops.decoder_step.max_rows`` of the dtype
and width; lifted here, so that every size is timed). Both return the same hidden states to rounding
(checked first, every size: float32 to 1e-4; bfloat16 to 0.5, the layers rounding every intermediate).
``kernel_read_us`` is the kernel passed the rows the model reads as ``outputs`` (an AR pass its query rows, a
canvas its <mask> slots), as the decoding code calls it: the last layer runs on those rows alone (checked
first: the same bits at the rows read).

``--canvases`` adds mask-predict passes: that many canvases of ``--canvas-width`` tokens, three a sentence,
a ``--masked`` share of them <mask> slots (0.55: the average of T=10's passes). ``--sources`` adds the encoder
(its layers in the kernel's encoder form, ``JanusModel.encode``): batches of that many sources of
``--source-length`` tokens, rows = sentences x tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import os
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import torch
from harness import environment, interleaved, print_table, write_json

import janus.model
from janus.config import PRESETS, ModelConfig
from janus.model import JanusModel, KVCache
from janus.ops.decoder_step import MAX_ROWS, NARROW, NARROW_ROWS, kernel_ready, max_rows
from janus.streams import build_ar_verify_rows, build_canvas_rows

VOCAB = 8000
FORCE = "JANUS_BACKEND_DECODER_STEP"


@contextlib.contextmanager
def through(kernel: bool) -> Iterator[None]:
    """Passes of any size through the kernel (the model's max_rows lifted), or none (the model's layers)."""
    janus.model.max_rows = lambda dtype, width: 1 << 30
    if not kernel:
        os.environ[FORCE] = "reference"
    try:
        yield
    finally:
        janus.model.max_rows = max_rows
        os.environ.pop(FORCE, None)


def make_pass(model: JanusModel, hypotheses: int, rows: int, cached: int, seed: int):
    """A closure running one decode of ``hypotheses`` x ``rows`` AR rows over a cache of ``cached`` columns (given
    ``outputs``, reading those rows alone), and the rows the model reads of such a pass: the query rows."""
    g = torch.Generator().manual_seed(seed)
    sp = model.cfg.specials
    src = torch.randint(5, VOCAB, (1, 24), generator=g)
    src[:, -1] = sp.eos
    enc = model.encode(src)
    C = rows // 2
    tokens = torch.randint(5, VOCAB, (hypotheses, cached + C + 1), generator=g)
    starts = torch.full((hypotheses,), cached, dtype=torch.long)
    built = build_ar_verify_rows(tokens, starts, starts + C, pad=sp.pad, mask=sp.mask)
    cache = KVCache()  # filled once with the first `cached` columns
    model.decode(build_ar_verify_rows(tokens, starts * 0, starts, pad=sp.pad, mask=sp.mask), enc, cache)

    def run(outputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        cache.length = cached
        return model.decode(built, enc, cache, outputs=outputs)

    read = torch.zeros(hypotheses, 2 * C, dtype=torch.bool)
    read[:, C:] = True
    return run, read


def make_canvases(model: JanusModel, hypotheses: int, width: int, masked: float, seed: int):
    """A closure running one mask-predict pass over ``hypotheses`` canvases of ``width`` tokens (bos, eos and a
    ``masked`` share of <mask> slots between; 3 canvases a sentence, as a length beam of 3), and the rows the
    model reads: the <mask> slots."""
    g = torch.Generator().manual_seed(seed)
    sp = model.cfg.specials
    src = torch.randint(5, VOCAB, (max(1, hypotheses // 3), 24), generator=g)
    src[:, -1] = sp.eos
    enc = model.encode(src)
    tokens = torch.randint(5, VOCAB, (hypotheses, width), generator=g)
    read = torch.rand(hypotheses, width, generator=g) < masked
    read[:, 0] = read[:, -1] = False
    tokens[read] = sp.mask
    tokens[:, 0], tokens[:, -1] = sp.bos, sp.eos
    rows = build_canvas_rows(tokens, pad=sp.pad)

    def run(outputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        return model.decode(rows, enc, outputs=outputs)

    return run, read


def encode_states(model: JanusModel, src: torch.Tensor) -> torch.Tensor:
    """The encoder's output states of ``src`` (B, S): the pass the encoder rows time."""
    return model.encode(src).states


def kernel_and_layers(run, read, args, label: str, dtype: str) -> tuple[float, float, float, float]:
    """(kernel us, kernel us reading the rows ``read`` alone, layers us, max abs difference) of one pass closure:
    the results compared first (the rows read: the same bits with and without ``outputs``), then the three taking
    turns in ``args.rounds`` rounds of ``args.calls`` passes."""
    with through(kernel=False):
        want = run().clone()
    with through(kernel=True):
        got = run().clone()
        part = None if read is None else run(read)
    err = (got.float() - want.float()).abs().max().item()
    if not err <= (1e-4 if dtype == "float32" else 0.5):  # bf16: the layers round every op
        raise AssertionError(f"{label}: kernel and layers differ by {err}")
    if part is not None and not torch.equal(part[read], got[read]):
        raise AssertionError(f"{label}: the rows read differ with outputs")

    def timed(kernel: bool, outputs: Optional[torch.Tensor] = None):
        def go() -> None:
            with through(kernel):
                for _ in range(args.calls):
                    run(outputs)

        return go

    runs = [timed(True), timed(False)] + ([timed(True, read)] if read is not None else [])
    times = interleaved(runs, torch.device("cpu"), rounds=args.rounds)
    fused, layers, *some = (statistics.median(t) * 1e3 / args.calls for t in times)
    return fused, some[0] if some else fused, layers, err


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small,iwslt", help="model presets (default small,iwslt)")
    parser.add_argument("--hypotheses", default="1,5,8,16,32", help="hypotheses per pass (default 1,5,8,16,32)")
    parser.add_argument("--rows", default="2,10", help="rows per hypothesis (default 2,10)")
    parser.add_argument("--dtype", default="float32,bfloat16", help="model dtypes (default float32,bfloat16)")
    parser.add_argument("--cached", type=int, default=20, help="cached columns before the pass (default 20)")
    parser.add_argument("--canvases", default="3,96", help="mask-predict passes, canvases (default 3,96; '' none)")
    parser.add_argument("--canvas-width", type=int, default=22, help="tokens per canvas (default 22)")
    parser.add_argument("--masked", type=float, default=0.55, help="share of <mask> slots (default 0.55: T=10)")
    parser.add_argument("--sources", default="1,8,32", help="encoder batches, sentences (default 1,8,32; '' none)")
    parser.add_argument("--source-length", type=int, default=20, help="tokens per source (default 20)")
    parser.add_argument("--calls", type=int, default=50, help="passes per timed run (default 50)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get(FORCE) or os.environ.get("JANUS_BACKEND"):
        raise SystemExit(f"unset {FORCE} and JANUS_BACKEND: this script switches between the two itself")
    if not kernel_ready():
        raise SystemExit("the decoder_step kernel is not available here (python -m janus.info says why)")
    results = []
    torch.manual_seed(0)
    for preset, dtype in itertools.product(args.preset.split(","), args.dtype.split(",")):
        model = JanusModel(ModelConfig(vocab_size=VOCAB, **PRESETS[preset])).eval().to(getattr(torch, dtype))
        passes = [("decoder", n, rows) for rows in (int(r) for r in args.rows.split(","))
                  for n in (int(h) for h in args.hypotheses.split(","))]  # fmt: skip
        passes += [("canvas", int(c), args.canvas_width) for c in args.canvases.split(",") if c]
        passes += [("encoder", int(b), args.source_length) for b in args.sources.split(",") if b]
        for kind, n, rows in passes:
            with torch.inference_mode():
                if kind == "decoder":
                    run, read = make_pass(model, n, rows, args.cached, seed=n * 100 + rows)
                elif kind == "canvas":
                    run, read = make_canvases(model, n, rows, args.masked, seed=n * 100 + rows)
                else:
                    src = torch.randint(5, VOCAB, (n, rows), generator=torch.Generator().manual_seed(n))
                    src[:, -1] = model.cfg.specials.eos
                    run, read = functools.partial(encode_states, model, src), None  # hypotheses: sentences here
                fused, part, layers, err = kernel_and_layers(run, read, args, f"{preset} {kind} {n}x{rows}", dtype)
            row = {
                "pass": kind,
                "preset": preset,
                "dtype": dtype,
                "hypotheses": n,
                "rows_per_hyp": rows,
                "rows": n * rows,
                "kernel_us": fused,
                "kernel_read_us": part,
                "layers_us": layers,
                "speedup": layers / fused,
                "used": n * rows <= max_rows(getattr(torch, dtype), model.cfg.d_model),
                "max_abs_diff": err,
            }
            results.append(row)
            print(f"  {preset} {dtype} {kind} {n} x {rows}: kernel {fused:.0f} us (rows read: {part:.0f}), layers "
                  f"{layers:.0f} us", flush=True)  # fmt: skip
    print()
    columns = ["pass", "preset", "dtype", "hypotheses", "rows_per_hyp", "rows", "kernel_us", "kernel_read_us",
               "layers_us", "speedup", "used"]  # fmt: skip
    print_table(results, columns)
    if args.json:
        payload = {
            "environment": environment(torch.device("cpu")),
            "settings": vars(args) | {"json": str(args.json)},
            "max_rows": {str(k).removeprefix("torch."): v for k, v in MAX_ROWS.items()},
            "max_rows_narrow": {
                "width_at_most": NARROW,
                "rows": {str(k).removeprefix("torch."): v for k, v in NARROW_ROWS.items()},
            },
            "results": results,
        }
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
