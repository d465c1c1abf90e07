"""Decoding speed beside quality, the main job: AR greedy and beam 5, mask-predict, self-speculative.

    python benchmarks/decode_speed.py                          # the embedded default (below)
    python benchmarks/decode_speed.py --checkpoint run/avg     # your trained model, on the shipped sample
    python benchmarks/decode_speed.py --data bin --split test  # ... or on a `janus prepare` folder's split
    python benchmarks/decode_speed.py --device cuda --batch-sizes 1,8,32,128 --rounds 5
    python benchmarks/decode_speed.py --random-weights --preset iwslt   # the compute benchmark, forced lengths

The embedded default (under 5 minutes on 2 CPU cores): the model shipped as ``builtin:de-en`` (a small
janus model trained on the LibreOffice help corpus: janus/samples/de-en/MODEL.md) on the 500 test
sentences shipped in janus.samples (German -> English, MPL-2.0), with the model's own lengths.

Methods (``methods()``): AR greedy, AR beam 5, mask-predict with T in {1, 4, 10} passes and length beam l
in {1, 3}, T=10 l=3 re-ranked by the model's AR head with repeats collapsed, self-speculative decoding
(exactly greedy's output) and its relaxed verification (top-3 within 2 nats: not greedy's output, its BLEU says
what that costs), and ``spec-whole`` (every draft token checked, drafts refined over 2 passes: the fewest passes,
each dearer); ``spec-always``, ``spec-T3`` and ``spec-position`` by name only. Precisions: ``--dtype``
takes one or a comma list (float32, bfloat16, float16, int8: dynamic int8 linear layers on the CPU); the
first runs every method, the others ``--dtype-methods``; default float32, bfloat16 and int8 for a trained
model on the CPU.

Quality: every method and precision decodes all ``--sentences`` (default: all) once at the largest batch
size, for its sacreBLEU (13a, signature in the JSON). Fp32 decoding is batch-invariant, so that BLEU is
the batch-1 output's too; column ``same`` checks it on the timed sentences (in bf16 and int8 a GEMM's
rounding, or int8's per-batch activation scale, depends on the other rows: their ``same`` may be < 1).

Timing: a warm-up (two sentences through every method), then, per batch size, ``--rounds`` rounds in
which every method decodes the timed sentences once (batch 1: the first ``--b1-sentences``, one at a
time; larger batches: the first ``--timed-sentences``, in the batches a decode makes of them), the methods
taking turns batch by batch (``harness.interleaved_pieces``: every method decodes batch j, in reverse order
every other batch, before batch j + 1), so that a slow spell of a shared machine, which lasts seconds,
falls on all of them alike; after 3 rounds no new round starts once ``--batch-seconds`` were spent. Each
batch is timed with the encoder included and a device sync; a run is a round's sum over the batches, p50
and p90 over the runs. Writes ``results.json`` (device, versions, git commit, settings, every row;
rewritten after each batch size with ``complete: false`` until the last), ``speedup.png`` (speedup over AR
beam 5 by batch size) and, with BLEU, ``bleu_vs_speed.png`` (BLEU against ms per sentence, the Pareto
front of each batch size marked) to ``--out``.

``--random-weights``: random weights of ``--preset`` instead, on the first 32 sentences (batch 1: the
first 8), every method forced to the reference target lengths (said in the output; a length beam of 3
tries the reference length and its two neighbours, so it may end a token off), no BLEU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from harness import environment, interleaved_pieces, percentile, plot_bleu_vs_speed, print_table, pyplot, write_json
from tqdm import tqdm

from janus.api import Generator, make_decode_batches
from janus.cli import auto_threads
from janus.config import DecodeConfig, preset
from janus.memory import keep_freed_memory
from janus.model import JanusModel
from janus.samples import BUILTIN_PREFIX

BUILTIN = BUILTIN_PREFIX + "de-en"

# One number format per column of the printed table, and what each column means.
FORMATS = {"passes": ".1f", "ms_step": ".2f", "ms_p50": ",.1f", "ms_p90": ",.1f", "sent_s": ",.1f", "tok_s": ",.0f",
           "vs_beam5": ".2f", "vs_greedy": ".2f", "bleu": ".2f", "same": ".2f"}  # fmt: skip
LEGEND = """
passes     decoder passes per sentence (AR: steps; NAR: T, whatever the length beam)
ms_step    milliseconds per decoder pass: the median run divided by the passes it made one after another
           (per batch, its sentence with the most passes), encoder included
ms_p50/90  milliseconds per sentence, encoder included: the median / 90th percentile run of the set, divided by
           its sentences
sent_s     sentences per second at the median run
tok_s      output tokens (eos included) per second at the median run
vs_beam5   speedup over AR beam 5 at the same batch size (its ms_p50 / this ms_p50; above 1 is faster)
vs_greedy  speedup over AR greedy, likewise"""
BLEU_LEGEND = """
bleu       sacreBLEU (13a) of the method in that precision over all {n} sentences, decoded at batch {batch}
same       fraction of the timed sentences whose output equals that decode's (decoding is batch-invariant: 1.00)"""


@dataclass(frozen=True)
class Method:
    name: str
    options: DecodeConfig
    default: bool = True  # run without --methods


def methods() -> list[Method]:
    out = [
        Method("greedy", DecodeConfig(mode="ar", beam_size=1)),
        Method("beam5", DecodeConfig(mode="ar", beam_size=5)),
    ]
    for T in (1, 4, 10):
        for beam in (1, 3):
            out.append(Method(f"nar-T{T}-l{beam}", DecodeConfig(mode="nar", iterations=T, length_beam=beam)))
    # The best NAR decode of a joint model: its AR head re-ranks the candidates, repeats collapsed (one more pass).
    rerank = DecodeConfig(mode="nar", iterations=10, length_beam=3, rerank=True, dedup=True)
    out.append(Method("nar-T10-l3-rerank-dedup", rerank))
    out.append(Method("spec", DecodeConfig(mode="spec")))
    # A NAR canvas in every pass: fewer passes than the default policy, each dearer (slower on every model
    # measured: janus/decoding/speculative.py); by name only.
    out.append(Method("spec-always", DecodeConfig(mode="spec", draft_policy="always"), default=False))
    # Drafts refined over 3 passes: fewer passes on trained models, each dearer; and drafts by position instead of
    # lookup (janus/decoding/speculative.py, benchmarks/spec_passes.py); by name only.
    out.append(Method("spec-T3", DecodeConfig(mode="spec", draft_iterations=3), default=False))
    out.append(Method("spec-position", DecodeConfig(mode="spec", draft_align="position"), default=False))
    # Every draft token checked (no block) and drafts refined over 2 passes: the fewest passes of the variants
    # measured on trained models (benchmarks/spec_passes.py), each pass dearer than the default's: the row for
    # where passes are the time (a GPU).
    out.append(Method("spec-whole", DecodeConfig(mode="spec", draft_block=0, draft_iterations=2)))
    # Relaxed verification: NOT greedy's output (JANUS.md section 4; its BLEU says what it costs).
    out.append(Method("spec-relaxed", DecodeConfig(mode="spec", verify_top_beta=3, verify_tolerance=2.0)))
    return out


# The methods of the precisions after the first (--dtype a,b,c): the first runs every method.
DTYPE_METHODS = "greedy,beam5,nar-T4-l1,nar-T10-l3,spec"


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """vs_beam5 and vs_greedy of every row, against the rows of its batch size and precision."""
    for r in rows:
        base = {x["method"]: x["ms_p50"] for x in rows if x["batch"] == r["batch"] and x["dtype"] == r["dtype"]}
        r["vs_beam5"] = base["beam5"] / r["ms_p50"] if "beam5" in base else math.nan
        r["vs_greedy"] = base["greedy"] / r["ms_p50"] if "greedy" in base else math.nan


@dataclass
class Workload:
    """What is decoded: source texts or ids, reference texts (for BLEU), reference target lengths."""

    name: str
    sources: list[Any]
    references: list[str]
    target_lengths: list[int]


def load_workload(args: argparse.Namespace, gen: Generator) -> Workload:
    """The shipped sample, or the first sentences of a prepared folder's split (``--sentences`` of them; 0: all)."""
    if args.data:
        from janus.data import Dataset

        data = Dataset(args.data, args.split)
        n = min(args.sentences or len(data), len(data))
        targets = [data.tgt(i).astype("int64").tolist() for i in range(n)]
        references = [gen.vocab.decode(t) for t in targets] if gen.vocab is not None else []
        return Workload(f"{args.data}:{args.split}", [data.src(i).astype("int64").tolist() for i in range(n)],
                        references, [len(t) for t in targets])  # fmt: skip
    from janus.samples import libreoffice_sample

    sample = libreoffice_sample()
    n = min(args.sentences or len(sample.source), len(sample.source))
    if gen.vocab is None:
        raise SystemExit("the model has no vocabulary to encode the shipped sample with; pass --data")
    lengths = [len(t) for t in gen.vocab.encode(sample.target[:n])]
    return Workload(sample.name, sample.source[:n], sample.target[:n], lengths)


def bleu_scores(outputs: list[list[Any]], refs: list[str]) -> tuple[list[Optional[float]], Optional[str]]:
    """sacreBLEU of each list of hypotheses against ``refs``, and the metric's signature (None without refs)."""
    if not refs:
        return [None] * len(outputs), None
    import sacrebleu

    metric = sacrebleu.BLEU()
    scores: list[Optional[float]] = [metric.corpus_score([h.text for h in hyps], [refs]).score for hyps in outputs]
    return scores, str(metric.get_signature()) if outputs else None


def plot(rows: list[dict[str, Any]], out: Path, with_bleu: bool, title: str) -> list[Path]:
    """speedup.png (and bleu_vs_speed.png); none when matplotlib is missing (said once)."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    several = len({r["dtype"] for r in rows}) > 1
    label = (lambda r: f"{r['method']} {r['dtype']}") if several else (lambda r: r["method"])  # noqa: E731
    names = list(dict.fromkeys(label(r) for r in rows))
    sizes = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(sizes)
    for k, batch in enumerate(sizes):
        by = {label(r): r["vs_beam5"] for r in rows if r["batch"] == batch}
        ax.bar([i + k * width for i in range(len(names))], [by.get(n, math.nan) for n in names], width,
               label=f"batch {batch}")  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("speedup over AR beam 5 (ms/sentence)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    written.append(out / "speedup.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    if with_bleu:
        groups = {f"batch {b}": [(label(r), r["ms_p50"], r["bleu"]) for r in rows
                                 if r["batch"] == b and r["bleu"] is not None] for b in sizes}  # fmt: skip
        path = plot_bleu_vs_speed(groups, out / "bleu_vs_speed.png", title, "ms per sentence (p50)", front=True)
        written.append(path)
    return written


def same_output(hyps: list[Any], reference: list[Any]) -> float:
    """Fraction of ``hyps`` whose ids equal those of ``reference`` (the same sentences decoded another way)."""
    return sum(h.ids == r.ids for h, r in zip(hyps, reference, strict=True)) / max(len(hyps), 1)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=BUILTIN, help=f"the model to decode with (default {BUILTIN})")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of --preset instead, every method forced to the reference lengths")  # fmt: skip
    p.add_argument("--preset", default="iwslt", help="model preset of --random-weights (default iwslt)")
    p.add_argument("--data", default="", help="a `janus prepare` folder instead of the shipped sample")
    p.add_argument("--split", default="test", help="split of --data (default test)")
    p.add_argument("--sentences", type=int, default=-1,
                   help="sentences decoded (0: all; default all, 32 with --random-weights)")  # fmt: skip
    p.add_argument("--b1-sentences", type=int, default=-1,
                   help="of those, how many batch 1 times (default 32, 8 with --random-weights)")  # fmt: skip
    p.add_argument("--timed-sentences", type=int, default=-1,
                   help="of those, how many batches over 1 time (default 64; 0, --random-weights: all)")  # fmt: skip
    p.add_argument("--batch-sizes", default="1,32", help="comma list (default 1,32)")
    p.add_argument("--methods", default="", help="comma list of method names (default: all but spec-always)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto (default cpu)")
    p.add_argument(
        "--dtype",
        default="",
        help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16, int8, or a comma list of them "
        "(default: float32,bfloat16,int8 for a trained model on the CPU, else auto)",
    )
    p.add_argument("--dtype-methods", default=DTYPE_METHODS,
                   help=f"methods of the precisions after the first (default {DTYPE_METHODS}; or all)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed rounds, every method once per round (default 3, at least 3)")  # fmt: skip
    p.add_argument("--batch-seconds", type=float, default=600.0,
                   help="after 3 rounds, no new round once a batch size has taken this long (default 600)")  # fmt: skip
    p.add_argument("--out", default="decode_speed_results", help="output folder (default decode_speed_results)")
    args = p.parse_args(argv)
    trained = not args.random_weights
    if args.sentences < 0:
        args.sentences = 0 if trained else 32
    if args.b1_sentences < 0:
        args.b1_sentences = 32 if trained else 8
    if args.timed_sentences < 0:
        args.timed_sentences = 64 if trained else 0
    if not args.dtype:
        args.dtype = "float32,bfloat16,int8" if trained and args.device == "cpu" else "auto"
    keep_freed_memory()  # the same allocator for every method, first or last
    if args.threads:
        torch.set_num_threads(args.threads)
    free, why = auto_threads()
    if args.device == "cpu" and torch.get_num_threads() > free:
        print(f"decode_speed: warning: {torch.get_num_threads()} threads but only {free} free CPU(s) ({why}): "
              "OpenMP threads that lose their core stall the others, and timings can be many times slower "
              f"than on a quiet machine; run it alone, or with --threads {free}", file=sys.stderr)  # fmt: skip

    dtypes = list(dict.fromkeys(d.strip() for d in args.dtype.split(",") if d.strip())) or ["auto"]
    if trained:
        gens = [Generator.from_checkpoint(args.checkpoint, device=args.device, dtype=d) for d in dtypes]
    else:
        from janus.samples import libreoffice_sample
        from janus.vocab import Vocab

        if args.data:
            from janus.data import Dataset

            size = int(Dataset(args.data, args.split).manifest["vocab_size"])
            spm = Path(args.data) / "spm.model"
            vocab = Vocab(spm) if spm.is_file() else None
        else:
            vocab = Vocab(libreoffice_sample().spm_model)
            size = len(vocab)
        torch.manual_seed(0)
        model = JanusModel(preset(args.preset, vocab_size=size, dropout=0.0))
        gens = [Generator(copy.deepcopy(model), vocab, device=args.device, dtype=d) for d in dtypes]
    gen = gens[0]
    names = {id(g): str(g.dtype).replace("torch.", "").replace("qint8", "int8") for g in gens}
    work = load_workload(args, gen)
    forced = None if trained else work.target_lengths
    known = [m.name for m in methods()]
    for option in ("methods", "dtype_methods"):
        unknown = set(getattr(args, option).split(",")) - set(known) - {"all"} if getattr(args, option) else set()
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)} in --{option.replace('_', '-')}; choose from {known}")
    chosen = (
        [m for m in methods() if m.name in args.methods.split(",")]
        if args.methods
        else [m for m in methods() if m.default]
    )
    later = set(known) if args.dtype_methods == "all" else set(args.dtype_methods.split(","))
    runs_of = [(g, m) for g in gens for m in chosen if g is gen or m.name in later]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    env = environment(gen.device)
    model_name = f"{args.preset} (random weights)" if not trained else args.checkpoint
    title = (f"{env['device_name']} ({gen.device}, {env['cpu_threads']} threads), {model_name}, "
             f"{gen.model.num_parameters() / 1e6:.1f}M parameters, {', '.join(names.values())}")  # fmt: skip
    total = len(work.sources)
    counts = {b: min(total, args.b1_sentences) if b == 1 else min(total, args.timed_sentences or total) for b in sizes}
    decoded = "; ".join(f"batch {b}: {'the first ' if counts[b] < total else ''}{counts[b]} sentences"
                        + (", one at a time" if b == 1 else "") for b in sizes)  # fmt: skip
    print(f"{title}\n{work.name}, timed: {decoded}; {args.rounds} rounds, every method once per round"
          + ("; every method forced to the reference target lengths" if forced else "")
          + (f"; BLEU over all {total} sentences at batch {max(sizes)}" if trained else ""), flush=True)  # fmt: skip

    # Warm-up: two sentences through every method, precision and batch size (allocators, caches, kernels).
    for batch in sizes:
        for g, m in runs_of:
            g.generate(work.sources[:2], dataclasses.replace(m.options, max_batch_size=batch),
                       target_lengths=forced[:2] if forced else None)  # fmt: skip

    # Quality: every method and precision decodes the whole set once, at the largest batch size (decoding is
    # batch-invariant: the timed runs' outputs are compared with these, column `same`).
    full: list[list[Any]] = []
    if trained:
        for g, m in tqdm(runs_of, desc=f"BLEU of {total} sentences", unit="method", file=sys.stdout):
            full.append(g.generate(work.sources, dataclasses.replace(m.options, max_batch_size=max(sizes))))
    scores, signature = bleu_scores(full, work.references)

    columns = (["method"] + (["dtype"] if len(gens) > 1 else [])
               + ["batch", "sentences", "passes", "ms_step", "ms_p50", "ms_p90", "sent_s", "tok_s", "vs_beam5",
                  "vs_greedy"] + (["bleu", "same"] if trained else []))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(vars(args), workload=work.name, forced_lengths=forced is not None, model=model_name,
                    parameters=gen.model.num_parameters(), dtype=", ".join(names.values()),
                    bleu_sentences=total if trained else 0, bleu_signature=signature)  # fmt: skip
    rows = []
    for batch in sizes:
        n = counts[batch]
        sources, lengths = work.sources[:n], (forced[:n] if forced else None)
        outputs: list[list] = [[None] * n for _ in runs_of]
        # The batches the decode makes of these sentences (by length): every method decodes batch j in turn.
        batching = dataclasses.replace(runs_of[0][1].options, max_batch_size=batch)
        pieces = make_decode_batches([len(ids) + 1 for ids in gen.encode(sources)], batching)

        def run(g: Generator, opts: DecodeConfig, hyps: list, j: int, sources=sources, lengths=lengths,
                pieces=pieces) -> None:  # fmt: skip
            group = pieces[j]
            forced_j = None if lengths is None else [lengths[i] for i in group]
            for i, h in zip(group, g.generate([sources[i] for i in group], opts, target_lengths=forced_j)):
                hyps[i] = h

        runs = [functools.partial(run, g, dataclasses.replace(m.options, max_batch_size=batch), hyps)
                for (g, m), hyps in zip(runs_of, outputs)]  # fmt: skip
        print(f"batch {batch}: timing {len(runs)} decodes in turn, batch by batch ({len(pieces)}), {args.rounds} "
              f"rounds", flush=True)  # fmt: skip
        times = interleaved_pieces(runs, len(pieces), gen.device, rounds=args.rounds, budget_s=args.batch_seconds)
        for k, ((g, m), hyps, ms) in enumerate(zip(runs_of, outputs, times)):
            p50, p90 = percentile(ms, 0.5) / 1e3, percentile(ms, 0.9) / 1e3
            tokens = sum(len(h.ids) + 1 for h in hyps)  # + eos
            sequential = sum(max(hyps[i].passes for i in g) for g in pieces)  # the batches it decoded
            rows.append(dict(method=m.name, dtype=names[id(g)], batch=batch, sentences=n, runs=len(ms), tokens=tokens,
                             passes=sum(h.passes for h in hyps) / n, ms_step=1e3 * p50 / max(sequential, 1),
                             ms_p50=1e3 * p50 / n, ms_p90=1e3 * p90 / n, sent_s=n / p50, tok_s=tokens / p50,
                             bleu=scores[k] if trained else None,
                             same=same_output(hyps, full[k][:n]) if trained else None))  # fmt: skip
        add_speedups(rows)
        if batch != sizes[-1]:  # what is measured so far, in case the run is stopped before the end
            print_table([r for r in rows if r["batch"] == batch], columns, FORMATS)
            write_json(out / "results.json", dict(environment=env, settings=settings, results=rows, complete=False))
    print()
    print_table(rows, columns, FORMATS)
    legend = LEGEND + (BLEU_LEGEND.format(n=total, batch=max(sizes)) if trained else "")
    print(legend)
    write_json(out / "results.json", dict(environment=env, settings=settings, results=rows, complete=True))
    for path in plot(rows, out, trained, title):
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
