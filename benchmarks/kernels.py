"""Op benchmarks: every backend of an op that runs here, against its PyTorch reference.

    python benchmarks/kernels.py                                  # every case, on the CPU
    python benchmarks/kernels.py --device cuda --json benchmarks/results/kernels_cuda.json
    python benchmarks/kernels.py --case remask_lowest --rows 192 --length 64 --calls 500

Cases (``Case``; sizes from the flags):

- remask_lowest: R canvases of L tokens (default 192 x 64: mask-predict over a batch of
  64 sentences with length beam 3), the re-masking step after a pass of T = 10, i.e.
  about 90% of each canvas's tokens re-masked after the first pass; counts checked
  (``check=True``, the default) and, as a second case, unchecked;
- length_beam_init: B sentences x C length classes with length beam l (default
  64 x 256, l = 3: the same 192 canvases), and their canvases.

For each case and each backend available on the device (the compiled "cpp"/"cuda"
kernels, "reference", and "dispatch": the public function, which picks a backend per
call), the script first checks that the backend's output equals the reference's, then
times ``--calls`` calls in a row, each on its own copy of the inputs (the ops work in
place), with a device sync after the last; it repeats that ``--repeats`` times and
reports the median and p90 time per call and the speedup over the reference. The JSON
(``--json``) carries the device, versions, git commit and settings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from harness import environment, print_table, sync, write_json

from janus.ops import registry

PAD, BOS, EOS, UNK, MASK = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Case:
    """One op at one size. ``make(device, seed)`` returns the op's positional arguments;
    ``mutated`` lists the positions of arguments the op writes in place (copied per call)."""

    name: str
    op: str
    size: str
    make: Callable[[torch.device, int], tuple]
    mutated: tuple[int, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()


def remask_inputs(rows: int, length: int, passes: int) -> Callable[[torch.device, int], tuple]:
    """Canvases after the first of ``passes`` passes: every canvas is [bos, words, eos, pad..] of a random
    length, scores are log-probabilities, counts = floor(words * (T - 1) / T)."""

    def make(device: torch.device, seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        n = torch.randint(max(2, length // 2), length + 1, (rows,), generator=g)
        col = torch.arange(length)[None, :]
        tokens = torch.randint(5, 32000, (rows, length), generator=g)
        tokens[col >= n[:, None]] = PAD
        tokens[col == n[:, None] - 1] = EOS
        tokens[:, 0] = BOS
        scores = torch.rand(rows, length, generator=g).log()
        counts = (n - 2) * (passes - 1) // passes
        return tokens.to(device), scores.to(device), counts.to(device), MASK, PAD, BOS, EOS

    return make


def length_inputs(sentences: int, classes: int, beam: int) -> Callable[[torch.device, int], tuple]:
    """Length log-probabilities of a length head, and per-sentence caps like the decoder's (1.2 * source + 10)."""

    def make(device: torch.device, seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        scores = (torch.randn(sentences, classes, generator=g) * 3).log_softmax(-1)
        max_len = torch.randint(12, min(classes - 1, 80), (sentences,), generator=g)
        return scores.to(device), beam, 2, max_len.to(device), BOS, EOS, MASK, PAD

    return make


def cases(args: argparse.Namespace) -> list[Case]:
    rows, length = args.rows, args.length
    sentences = max(1, rows // args.beam)
    remask = remask_inputs(rows, length, args.passes)
    return [
        Case("remask_lowest", "remask_lowest", f"R={rows} L={length}", remask, mutated=(0, 1)),
        Case("remask_lowest check=False", "remask_lowest", f"R={rows} L={length}", remask, (0, 1), (("check", False),)),
        Case(
            "length_beam_init",
            "length_beam_init",
            f"B={sentences} C={args.classes} l={args.beam}",
            length_inputs(sentences, args.classes, args.beam),
        ),
    ]


def same(a: Any, b: Any) -> bool:
    """Equal outputs: tensors bit-equal (NaN == NaN), tuples element-wise."""
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


class Timer:
    """Times one call: CUDA events on a GPU (the device's time from launch to finish), else the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> float:
        """Microseconds taken by ``fn(*args, **kwargs)``."""
        if self.cuda:
            torch.cuda.synchronize()
            self.start.record()
            fn(*args, **kwargs)
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) * 1e3
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        return (time.perf_counter() - t0) * 1e6


def run_case(case: Case, device: torch.device, calls: int, warmup: int) -> list[dict[str, Any]]:
    op = registry()[case.op]
    pristine = case.make(device, 0)
    kwargs = dict(case.kwargs)
    # Working copies of the arguments the op writes; restored (outside the timing) before every call,
    # which also leaves them in cache, as in a decoding loop.
    work = tuple(x.clone() if i in case.mutated else x for i, x in enumerate(pristine))

    def restore() -> tuple:
        for i in case.mutated:
            work[i].copy_(pristine[i])
        return work

    runners: list[tuple[str, Callable[..., Any]]] = []
    for backend in op.backends:
        ok, why = backend.verdict(*pristine, **kwargs)
        if ok:
            runners.append((backend.name, backend.impl))
        else:
            print(f"  {case.name}: {backend.name} skipped ({why})")
    runners.append((f"dispatch ({op.select(*pristine, **kwargs).name})", op))

    want = clone_outputs(op.backend("reference").impl(*restore(), **kwargs))
    timer = Timer(device)
    rows = []
    for name, fn in runners:
        if not same(fn(*restore(), **kwargs), want):
            raise AssertionError(f"{case.name}: backend {name} disagrees with the reference")
        for _ in range(warmup):
            fn(*restore(), **kwargs)
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        times = sorted(timer(fn, restore(), kwargs) for _ in range(calls))
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        rows.append(
            {
                "case": case.name,
                "size": case.size,
                "backend": name,
                "us_p50": statistics.median(times),
                "us_p90": times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
                "peak_mib": peak,
            }
        )
    reference = next(r["us_p50"] for r in rows if r["backend"] == "reference")
    for r in rows:
        r["speedup_vs_reference"] = reference / r["us_p50"]
    return rows


def clone_outputs(out: Any) -> Any:
    """A copy of an op's outputs that later calls (in place) cannot change."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(clone_outputs(x) for x in out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--case", action="append", help="run only these cases (repeatable; default: all)")
    parser.add_argument("--rows", type=int, default=192, help="canvases: batch x length beam (default 192)")
    parser.add_argument("--length", type=int, default=64, help="tokens per canvas (default 64)")
    parser.add_argument("--beam", type=int, default=3, help="length beam l (default 3)")
    parser.add_argument("--classes", type=int, default=256, help="length classes C of the length head (default 256)")
    parser.add_argument("--passes", type=int, default=10, help="mask-predict passes T for the re-mask counts")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per backend (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (default 20)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    selected = [c for c in cases(args) if not args.case or c.name in args.case or c.op in args.case]
    if not selected:
        raise SystemExit(f"no case matches {args.case}; cases: {[c.name for c in cases(args)]}")
    env = environment(device)
    print(f"{env['device_name']} ({device}), torch {env['torch']}, {env['cpu_threads']} CPU threads")
    rows = []
    for case in selected:
        rows += run_case(case, device, args.calls, args.warmup)
    columns = ["case", "size", "backend", "us_p50", "us_p90", "speedup_vs_reference"]
    if device.type == "cuda":
        columns.append("peak_mib")
    print_table(rows, columns)
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        described = [{"name": c.name, "op": c.op, "size": c.size, "kwargs": dict(c.kwargs)} for c in selected]
        write_json(args.json, {"environment": env, "settings": settings, "cases": described, "results": rows})


if __name__ == "__main__":
    main()
