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
  64 x 256, l = 3: the same 192 canvases), and their canvases;
- mask_predict_update: one mask-predict pass over the same canvases with half of the
  slots masked, D = 512, V = 32000 (bf16 on CUDA);
- janus_loss (forward + backward): N AR rows, M masked rows of P_NAR and P_AUX over
  V = 32000 (default on CUDA: N = 8192, M = 5600, bf16; on the CPU 1/32 of the rows);
- janus_linear_loss (forward + backward): the same from decoder states of width D = 512
  and the projection; the reference forms all (N + 2M, V) logits;
- skinny_linear: the GEMMs of one incremental decoder step, as one product of M rows
  (``--skinny-rows``, default 2, 10 and 16: greedy, beam 5 and greedy at batch 8) with an
  (N, 512) weight of the size an iwslt decoder step reads with the shipped sample's 8000-piece
  vocabulary (N = 38,720: 79 MB in fp32, far beyond the L2 cache), and an (N, 128) one of the small
  preset's (the shipped model: N = 11,840, 6 MB), in fp32 and in bf16, the weight row-major and
  in panels (``janus.ops.skinny_linear.pack_panels``).

For each case and each backend available on the device (the compiled "cpp"/"cuda"
kernels, "triton", "blocked", "reference", and "dispatch": the public function, which picks a
backend per call), the script first checks that the backend agrees with the reference
(bit for bit for the selection ops, within a tolerance for the floating-point ones),
then times single calls after untimed warm-up calls: the wall clock on the CPU, CUDA
events on a GPU (launch to finish). Inputs an op writes are restored before every call,
outside the timing. ``--calls`` and ``--warmup`` are capped so that one backend takes
about ``--budget`` seconds. It reports the median and p90 time per call, the speedup over
the reference and, on a GPU, the peak memory a call allocates beyond its inputs. The
JSON (``--json``) carries the device, versions, git commit and settings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from harness import environment, percentile, print_table, sync, write_json

from janus.ops import registry
from janus.ops.skinny_linear import pack_panels

PAD, BOS, EOS, UNK, MASK = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Case:
    """One op at one size.

    ``make(device, seed)`` returns the op's positional arguments; ``mutated`` lists the
    positions of arguments the op writes in place (restored before every call). ``call``
    runs one backend on the arguments (default: ``fn(*args, **kwargs)``) and returns what
    ``agree`` compares with the reference's (default: bit-equal); ``agree`` returns None
    when they agree, else what differs."""

    name: str
    op: str
    size: str
    make: Callable[[torch.device, int], tuple]
    mutated: tuple[int, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    call: Optional[Callable[[Callable[..., Any], tuple, dict], Any]] = None
    agree: Optional[Callable[[Any, Any], Optional[str]]] = None

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return self.call(fn, args, kwargs) if self.call is not None else fn(*args, **kwargs)

    def disagreement(self, out: Any, want: Any) -> Optional[str]:
        if self.agree is not None:
            return self.agree(out, want)
        return None if same(out, want) else "outputs differ"


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


def update_inputs(rows: int, length: int, dim: int, vocab: int) -> Callable[[torch.device, int], tuple]:
    """One mask-predict pass: decoder states of R canvases of L tokens with about half of the slots <mask>,
    the output projection (bf16 on CUDA, fp32 on the CPU), fp32 scores; pad, bos, eos and <mask> banned."""

    def make(device: torch.device, seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        hidden = torch.randn(rows, length, dim, generator=g)
        weight = torch.randn(vocab, dim, generator=g) * dim**-0.5
        tokens = torch.randint(5, vocab, (rows, length), generator=g)
        tokens[torch.rand(rows, length, generator=g) < 0.5] = MASK
        scores = torch.rand(rows, length, generator=g).log()
        return (
            hidden.to(device, dtype),
            weight.to(device, dtype),
            tokens.to(device),
            scores.to(device),
            MASK,
            [PAD, BOS, EOS, MASK],
        )

    return make


def loss_inputs(ar_rows: int, masked_rows: int, vocab: int, dim: int) -> Callable[[torch.device, int], tuple]:
    """janus_loss (dim = 0: logits) or janus_linear_loss (decoder states of width dim and the projection)
    arguments: bf16 on CUDA, fp32 on the CPU; 10% of the targets ignored; masked rows paired in order."""

    def make(device: torch.device, seed: int) -> tuple:
        from janus.ops.janus_loss import LossScales

        g = torch.Generator().manual_seed(seed)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ya = torch.randint(0, vocab, (ar_rows,), generator=g)
        ya[torch.rand(ar_rows, generator=g) < 0.1] = -100
        y = torch.randint(0, vocab, (masked_rows,), generator=g)
        pair = torch.randperm(ar_rows, generator=g)[:masked_rows].sort().values
        scales = LossScales(1 / ar_rows, 1 / masked_rows, 1 / masked_rows, 1 / masked_rows, 1 / masked_rows, 0.0)

        def leaf(*shape: int, scale: float) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

        if dim == 0:
            a, b, c = (leaf(n, vocab, scale=2.0) for n in (ar_rows, masked_rows, masked_rows))
            return a, ya.to(device), b, c, y.to(device), pair.to(device), 0.1, scales
        h = [leaf(n, dim, scale=1.0) for n in (ar_rows, masked_rows, masked_rows)]
        w = leaf(vocab, dim, scale=dim**-0.5)
        return h[0], h[1], h[2], w, ya.to(device), y.to(device), pair.to(device), 0.1, scales

    return make


# Rows N of the skinny_linear weight (K = 512): what an iwslt decoder step reads, 6 layers x (3 + 1 + 1 +
# 1 + 2 + 2) x 512 rows of 512 (self-attention q, k, v and out, cross-attention q and out, FFN in and
# out) + the 8000 x 512 output projection of the shipped sample's vocabulary.
SKINNY_N = 6 * 10 * 512 + 8000
# The same for the small preset (width 128, the shipped model): 3 layers x 10 x 128 rows of 128 (the FFN's
# second product, 128 x 512, counted as 4 x 128 x 128) + its 8000 x 128 projection: 6 MB in fp32, in cache.
SKINNY_SMALL_N = 3 * 10 * 128 + 8000


def skinny_inputs(
    rows: int, dtype: torch.dtype, n: int = SKINNY_N, k: int = 512, panels: bool = False
) -> Callable[[torch.device, int], tuple]:
    def make(device: torch.device, seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, k, generator=g).to(device, dtype)
        w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
        b = torch.randn(n, generator=g).to(device, dtype)
        return (x, pack_panels(w), b) if panels else (x, w, b)

    return make


def forward_backward(fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple:
    """The loss, its term sums and the gradients of every input that requires one (set to None first)."""
    leaves = [x for x in args if isinstance(x, torch.Tensor) and x.requires_grad]
    for x in leaves:
        x.grad = None
    out = fn(*args, **kwargs)
    out.loss.backward()
    return (out.loss.detach(), out.sums, *(x.grad for x in leaves))


def close(rtol: float, atol: float) -> Callable[[Any, Any], Optional[str]]:
    """Agreement of float outputs within a relative and an absolute tolerance (max over elements)."""

    def agree(out: Any, want: Any) -> Optional[str]:
        for i, (x, y) in enumerate(zip(out, want)):
            x, y = x.float(), y.float()
            excess = ((x - y).abs() - rtol * y.abs()).max().item() if x.numel() else 0.0
            if not excess <= atol:
                return f"output {i}: max |difference| beyond rtol {rtol:g} is {excess:.3g} > atol {atol:g}"
        return None

    return agree


def updates_agree(out: Any, want: Any) -> Optional[str]:
    """mask_predict_update: the same tokens but at near-ties (at most 1% of slots), and close scores there."""
    tokens, scores = out
    want_tokens, want_scores = want
    differ = tokens != want_tokens
    if differ.float().mean().item() > 0.01:
        return f"{int(differ.sum())} of {differ.numel()} tokens differ"
    err = (scores - want_scores).abs()[~differ].max().item()
    return None if err <= 0.05 else f"scores differ by {err:.3g}"


def cases(args: argparse.Namespace) -> list[Case]:
    rows, length = args.rows, args.length
    sentences = max(1, rows // args.beam)
    # The loss sizes of a training batch on a GPU; 1/32 of its rows on the CPU, where only the reference runs.
    shrink = 1 if args.device.startswith("cuda") else 32
    n, m = max(1, args.ar_rows // shrink), max(1, args.masked_rows // shrink)
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
        Case(
            "mask_predict_update",
            "mask_predict_update",
            f"R={rows} L={length} D=512 V=32000",
            update_inputs(rows, length, 512, 32000),
            mutated=(2, 3),
            agree=updates_agree,
        ),
        Case(
            "janus_loss fwd+bwd",
            "janus_loss",
            f"N={n} M={m} V={args.vocab}",
            loss_inputs(n, m, args.vocab, 0),
            call=forward_backward,
            agree=close(rtol=2e-2, atol=2e-3),
        ),
        Case(
            "janus_linear_loss fwd+bwd",
            "janus_linear_loss",
            f"N={n} M={m} V={args.vocab} D={args.dim}",
            loss_inputs(n, m, args.vocab, args.dim),
            call=forward_backward,
            agree=close(rtol=2e-2, atol=2e-3),
        ),
    ] + [
        Case(
            f"skinny_linear {name}{' panels' if panels else ''} {str(dtype).replace('torch.', '')} M={m}",
            "skinny_linear",
            f"M={m} N={n} K={k}",
            skinny_inputs(m, dtype, n, k, panels),
            agree=close(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else close(rtol=1e-2, atol=1e-2),
        )
        for name, n, k in (("iwslt", SKINNY_N, 512), ("small", SKINNY_SMALL_N, 128))
        for panels in (False, True)
        for dtype in (torch.float32, torch.bfloat16)
        for m in (int(r) for r in args.skinny_rows.split(","))
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


def run_case(case: Case, device: torch.device, calls: int, warmup: int, budget: float) -> list[dict[str, Any]]:
    op = registry()[case.op]
    pristine = case.make(device, 0)
    kwargs = dict(case.kwargs)
    # Working copies of the arguments the op writes; restored (outside the timing) before every call,
    # which also leaves them in cache, as in a decoding loop.
    work = tuple(x.detach().clone() if i in case.mutated else x for i, x in enumerate(pristine))

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

    want = clone_outputs(case.run(op.backend("reference").impl, restore(), kwargs))
    timer = Timer(device)
    rows = []
    for name, fn in runners:
        t0 = time.perf_counter()
        problem = case.disagreement(case.run(fn, restore(), kwargs), want)
        if problem:
            raise AssertionError(f"{case.name}: backend {name} disagrees with the reference: {problem}")
        once = time.perf_counter() - t0
        for _ in range(max(1, min(warmup, int(0.25 * budget / once)))):
            case.run(fn, restore(), kwargs)
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        times = []
        for _ in range(max(3, min(calls, int(budget / once)))):
            args = restore()
            times.append(timer(case.run, (fn, args, kwargs), {}))
        times.sort()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        rows.append(
            {
                "case": case.name,
                "size": case.size,
                "backend": name,
                "calls": len(times),
                "us_p50": statistics.median(times),
                "us_p90": percentile(times, 0.9),
                "peak_mib": peak,
            }
        )
    reference = next(r["us_p50"] for r in rows if r["backend"] == "reference")
    peak_reference = next(r["peak_mib"] for r in rows if r["backend"] == "reference")
    for r in rows:
        r["speedup_vs_reference"] = reference / r["us_p50"]
        if peak_reference is not None and r["peak_mib"]:
            r["memory_vs_reference"] = peak_reference / r["peak_mib"]
    return rows


def clone_outputs(out: Any) -> Any:
    """A copy of an op's outputs that later calls (in place) cannot change."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
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
    parser.add_argument("--ar-rows", type=int, default=8192, help="AR rows N of the loss cases (default 8192)")
    parser.add_argument("--masked-rows", type=int, default=5600, help="masked rows M of the loss cases (default 5600)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary V of the loss cases (default 32000)")
    parser.add_argument("--dim", type=int, default=512, help="model width D of janus_linear_loss (default 512)")
    parser.add_argument("--skinny-rows", default="2,10,16", help="rows M of the skinny_linear cases (default 2,10,16)")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per backend at most (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first, at most (default 20)")
    parser.add_argument("--budget", type=float, default=10.0, help="about this many seconds per backend (default 10)")
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
        rows += run_case(case, device, args.calls, args.warmup, args.budget)
    columns = ["case", "size", "backend", "calls", "us_p50", "us_p90", "speedup_vs_reference"]
    if device.type == "cuda":
        columns += ["peak_mib", "memory_vs_reference"]
    print_table(rows, columns)
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        described = [{"name": c.name, "op": c.op, "size": c.size, "kwargs": dict(c.kwargs)} for c in selected]
        write_json(args.json, {"environment": env, "settings": settings, "cases": described, "results": rows})


if __name__ == "__main__":
    main()
