"""The quality study: objectives ar, cmlm and janus at an equal budget, scored with sacreBLEU.

    # the corpus, once (joint 8000-piece vocabulary)
    D=../shared/data/libreoffice-de-en
    janus prepare --trainpref $D/train --validpref $D/valid --testpref $D/test --src de --tgt en \\
        --destdir bin --vocab-size 8000
    # a reduced study on a CPU (the defaults: small preset, 3000 updates of 2048 tokens per objective)
    python benchmarks/quality.py --data bin --test-prefix $D/test --out runs/quality
    # the same on 2 cores in about half the time: train two at once on one thread each, then score
    python benchmarks/quality.py --data bin --out runs/quality --threads 1 --train-only --objectives janus &
    python benchmarks/quality.py --data bin --out runs/quality --threads 1 --train-only --objectives ar,cmlm
    wait; python benchmarks/quality.py --data bin --test-prefix $D/test --out runs/quality
    # the full study on a GPU
    python benchmarks/quality.py --data bin --test-prefix $D/test --out runs/quality \\
        --preset iwslt --max-tokens 8192 --steps 30000 --warmup 4000 --lr 5e-4 --device cuda

For every objective, with the same preset, updates, batch budget, schedule and seed:

1. train into ``OUT/<objective>`` (``janus.train.train``: an interrupted run resumes from its
   last checkpoint, and a run that already reached ``--steps`` is not trained again);
2. average its last ``--average`` checkpoints into ``OUT/<objective>/averaged``;
3. decode the test set (raw text: ``--test-prefix`` + .src/.tgt language suffixes; else the
   prepared split, detokenized): AR beam 5 and greedy for ``ar`` and ``janus``, NAR T=10 l=3
   for ``cmlm`` and ``janus`` (and with AR re-ranking for ``janus``), and self-speculative
   decoding for ``janus`` (with the share of sentences where it equals greedy search, which it
   must); sacreBLEU BLEU and chrF (with their signatures) and mean passes;
4. time every decode at batch 1 on the first ``--timing-sentences`` (encoder included, after a
   warm-up), all of them taking turns for ``--timing-rounds`` rounds: p50 and p90 per sentence,
   and the speedup over AR beam 5.

Writes ``OUT/quality.json`` (settings, budget, hardware, every row), ``OUT/quality.md``
(the table) and, with matplotlib, ``OUT/bleu_vs_speed.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path
from typing import Any, Optional

import torch
from harness import environment, interleaved, percentile, plot_bleu_vs_speed, print_table, write_json

from janus.api import Generator
from janus.checkpoint import average_checkpoints, last_checkpoints, latest_checkpoint
from janus.config import DecodeConfig, TrainConfig
from janus.memory import keep_freed_memory
from janus.train import train

# What each objective is decoded with: (label, options). Greedy search is there for spec, whose output
# must equal it (JANUS.md section 4): every row of spec reports the share of sentences where it does.
GREEDY = "AR greedy"
DECODES = {
    "ar": [("AR beam 5", DecodeConfig(mode="ar", beam_size=5)), (GREEDY, DecodeConfig(mode="ar", beam_size=1))],
    "cmlm": [("NAR T=10 l=3", DecodeConfig(mode="nar", iterations=10, length_beam=3))],
    "janus": [
        ("AR beam 5", DecodeConfig(mode="ar", beam_size=5)),
        (GREEDY, DecodeConfig(mode="ar", beam_size=1)),
        ("NAR T=10 l=3", DecodeConfig(mode="nar", iterations=10, length_beam=3)),
        ("NAR T=10 l=3 rerank", DecodeConfig(mode="nar", iterations=10, length_beam=3, rerank=True)),
        ("spec", DecodeConfig(mode="spec")),
    ],
}


def trained_steps(save_dir: Path) -> int:
    """The update count of the latest checkpoint in ``save_dir`` (0 when there is none)."""
    path = latest_checkpoint(save_dir)
    return 0 if path is None else int(path.name.rsplit("_", 1)[-1])  # checkpoint_<step>


def training_record(save_dir: Path) -> dict[str, Any]:
    """What ``save_dir``'s train.jsonl says about its training: wall seconds (every run, a resumed one
    too, from its "start" event to its last logged event), the number of runs, and the threads and
    device of the last run. Empty without a log."""
    import json

    log = save_dir / "train.jsonl"
    if not log.exists():
        return {}
    total, runs, start, last, started = 0.0, 0, None, 0.0, {}
    for line in log.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if "time" not in event or event.get("event") == "resume":  # logged before its run's "start"
            continue
        if event.get("event") == "start":
            total += last - start if start is not None else 0.0
            start, runs, started = event["time"], runs + 1, event
        last = event["time"]
    total += last - start if start is not None else 0.0
    return dict(train_seconds=total, runs=runs, threads=started.get("train", {}).get("threads"),
                device=started.get("device"), log=str(log))  # fmt: skip


def test_set(args: argparse.Namespace, gen: Generator) -> tuple[list[str], list[str]]:
    """(sources, references) as text: the raw files of --test-prefix, else the prepared split, detokenized."""
    if args.test_prefix:
        from janus.data import read_lines

        src = read_lines(f"{args.test_prefix}.{args.src}")[0]
        ref = read_lines(f"{args.test_prefix}.{args.tgt}")[0]
        if len(src) != len(ref):
            raise SystemExit(f"{args.test_prefix}: {len(src)} source but {len(ref)} reference lines")
    else:
        from janus.data import Dataset

        data = Dataset(args.data, "test")
        src = [gen.vocab.decode(data.src(i).tolist()) for i in range(len(data))]
        ref = [gen.vocab.decode(data.tgt(i).tolist()) for i in range(len(data))]
    n = args.test_sentences or len(src)
    return src[:n], ref[:n]


def score(gen: Generator, label: str, options: DecodeConfig, src: list[str], ref: list[str],
          progress: bool) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """BLEU/chrF (with their signatures) and mean passes of ``options`` on (src, ref); also the hypotheses."""
    from sacrebleu.metrics import BLEU, CHRF

    hyps = gen.generate(src, options, progress=progress)
    texts = [h.text or "" for h in hyps]
    bleu, chrf = BLEU(), CHRF()
    row = dict(decode=label, settings=dataclasses.asdict(options), bleu=bleu.corpus_score(texts, [ref]).score,
               chrf=chrf.corpus_score(texts, [ref]).score, bleu_signature=str(bleu.get_signature()),
               chrf_signature=str(chrf.get_signature()), passes=sum(h.passes for h in hyps) / max(1, len(hyps)),
               sentences=len(hyps))  # fmt: skip
    return row, texts


def time_batch1(decodes: list[tuple[Generator, DecodeConfig]], sentences: list[str], rounds: int) -> list[list[float]]:
    """Seconds per sentence at batch 1 (encoder included) of every (generator, options), one sentence at a
    time. The decodes take turns sentence by sentence, round after round (``harness.interleaved``), so that
    a drift of the machine's speed (a shared VM, a warming cache) spreads over all of them instead of
    favouring whichever ran first."""
    ones = [(gen, dataclasses.replace(options, max_batch_size=1)) for gen, options in decodes]
    for gen, one in ones:  # warm-up
        gen.generate(sentences[:1], one)
    runs = [functools.partial(gen.generate, [s], one) for s in sentences for gen, one in ones]
    # Each median is over sentences x rounds runs, so one round is already many samples.
    ms = interleaved(runs, ones[0][0].device, rounds=rounds, min_rounds=1)
    # runs are sentence-major: decode d's times are every len(ones)-th list, from d on
    return [[t / 1e3 for per_run in ms[d :: len(ones)] for t in per_run] for d in range(len(ones))]


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Each row's batch-1 speedup over AR beam 5: of the same model where it has one (ar, janus), else of
    the ``ar`` model (the same architecture, so the same cost per pass)."""
    beams = {r["objective"]: r["ms_b1_p50"] for r in rows if r["decode"] == "AR beam 5"}
    for r in rows:
        beam = beams.get(r["objective"], beams.get("ar"))
        r["speedup_vs_beam5"] = beam / r["ms_b1_p50"] if beam and r["ms_b1_p50"] else None


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a `janus prepare` folder")
    p.add_argument("--out", required=True, help="study folder (one training folder per objective)")
    p.add_argument("--objectives", default="ar,cmlm,janus")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=3000, help="updates per objective (default 3000)")
    p.add_argument("--max-tokens", type=int, default=2048, help="token budget of a batch (default 2048)")
    p.add_argument("--warmup", type=int, default=400, help="warm-up updates (default 400)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--save-interval", type=int, default=250, help="updates between checkpoints (default 250)")
    p.add_argument("--average", type=int, default=4, help="last checkpoints averaged (default 4)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--test-prefix", default="", help="raw test text: PREFIX.SRC / PREFIX.TGT")
    p.add_argument("--src", default="de")
    p.add_argument("--tgt", default="en")
    p.add_argument("--test-sentences", type=int, default=0, help="decode only the first N (0 = all)")
    p.add_argument("--timing-sentences", type=int, default=50, help="sentences timed at batch 1 (default 50)")
    p.add_argument("--timing-rounds", type=int, default=3, help="rounds over every decode (default 3)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--train-only", action="store_true",
                   help="train and average only (e.g. objectives in parallel, one thread each); "
                   "a later run without it scores them")  # fmt: skip
    args = p.parse_args(argv)
    keep_freed_memory()  # the same allocator for every decode, first or last
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    objectives = [o for o in args.objectives.split(",") if o]
    unknown = set(objectives) - set(DECODES)
    if unknown:
        raise SystemExit(f"unknown objectives {sorted(unknown)}; choose from {sorted(DECODES)}")

    rows: list[dict[str, Any]] = []
    timed: list[tuple[Generator, DecodeConfig]] = []
    budget: dict[str, Any] = {}
    src: list[str] = []
    for objective in objectives:
        save_dir = out / objective
        cfg = TrainConfig(data=args.data, save_dir=str(save_dir), preset=args.preset, objective=objective,
                          max_tokens=args.max_tokens, max_steps=args.steps, warmup_steps=args.warmup, lr=args.lr,
                          dropout=args.dropout, seed=args.seed, save_interval=args.save_interval,
                          validate_interval=args.save_interval, keep_last=max(args.average, 1) + 1,
                          device=args.device, threads=args.threads, progress=args.progress)  # fmt: skip
        if trained_steps(save_dir) < args.steps:
            train(cfg)
        else:
            print(f"{objective}: {save_dir} already holds {args.steps} updates; not training again")
        budget[objective] = training_record(save_dir)
        averaged = average_checkpoints(last_checkpoints(save_dir, args.average), save_dir / "averaged")
        if args.train_only:
            continue
        gen = Generator.from_checkpoint(averaged, device=args.device)
        src, ref = test_set(args, gen)
        outputs: dict[str, list[str]] = {}
        for label, options in DECODES[objective]:
            row, outputs[label] = score(gen, label, options, src, ref, args.progress)
            if options.mode == "spec":
                same = sum(a == b for a, b in zip(outputs[label], outputs[GREEDY]))
                row["equals_ar_greedy"] = same / max(1, len(src))
            rows.append(dict(objective=objective, **row))
            timed.append((gen, options))
            print(f"{objective:>6} {label:<19} BLEU {row['bleu']:6.2f}  chrF {row['chrf']:6.2f}", flush=True)

    if args.train_only:
        return rows
    print(f"timing every decode at batch 1: {args.timing_rounds} rounds of {args.timing_sentences} sentences")
    for row, spent in zip(rows, time_batch1(timed, src[: args.timing_sentences], args.timing_rounds)):
        row["ms_b1_p50"] = 1e3 * percentile(spent, 0.5) if spent else None
        row["ms_b1_p90"] = 1e3 * percentile(spent, 0.9) if spent else None
        row["timing_sentences"], row["timing_rounds"] = min(len(src), args.timing_sentences), args.timing_rounds
    add_speedups(rows)
    env = environment(timed[0][0].device)
    columns = ["objective", "decode", "bleu", "chrf", "passes", "ms_b1_p50", "ms_b1_p90", "speedup_vs_beam5",
               "equals_ar_greedy", "sentences"]  # fmt: skip
    table = print_table(rows, columns)
    title = f"{args.preset}, {args.steps} updates of {args.max_tokens} tokens, {env['device_name']}"
    settings = {k: v for k, v in vars(args).items()}
    write_json(out / "quality.json", dict(environment=env, settings=settings, budget=budget, results=rows))
    (out / "quality.md").write_text(f"{title}\n\n{table}\n", encoding="utf-8")
    points = [(f"{r['objective']}: {r['decode']}", r["ms_b1_p50"], r["bleu"]) for r in rows]
    written = plot_bleu_vs_speed({"": points}, out / "bleu_vs_speed.png", title, "ms per sentence at batch 1 (p50)")
    if written:
        print(f"wrote {written}")
    return rows


if __name__ == "__main__":
    main()
