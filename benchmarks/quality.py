"""The quality study: named variants (objectives and recipes) at an equal budget, scored with sacreBLEU.

    # the corpus, once (joint 8000-piece vocabulary)
    D=../shared/data/libreoffice-de-en
    janus prepare --trainpref $D/train --validpref $D/valid --testpref $D/test --src de --tgt en \\
        --destdir bin --vocab-size 8000
    # the three objectives on a CPU (the defaults: small preset, 3000 updates of 2048 tokens each)
    python benchmarks/quality.py --data bin --test-prefix $D/test --out runs/quality
    # the ablation (every variant of VARIANTS); on 2 cores train two at a time on one thread each, then score
    S="--data bin --out runs/quality --threads 1 --train-only"
    python benchmarks/quality.py $S --variants ar,janus-ar-init,janus-noskl,janus-sched &
    python benchmarks/quality.py $S --variants cmlm,janus,janus-stopgrad,janus-noaux
    wait; python benchmarks/quality.py --data bin --test-prefix $D/test --out runs/quality --variants all
    # the full study on a GPU
    python benchmarks/quality.py --data bin --test-prefix $D/test --out runs/quality \\
        --preset iwslt --max-tokens 8192 --steps 30000 --warmup 4000 --lr 5e-4 --device cuda

Every variant (``VARIANTS``: ``ar``, ``cmlm``, ``janus`` and the janus recipes) trains with the same preset,
updates, batch budget, schedule and seed; a variant started from another one's checkpoint
(``janus-ar-init``: ``ar`` for the first half of the budget, janus for the rest) trains only the rest, so
that its total number of updates is the budget too. For each variant:

1. train into ``OUT/<variant>`` (``janus.train.train``: an interrupted run resumes from its last
   checkpoint, a finished one is not trained again); every checkpoint is kept (the curves and the
   ``*-init`` variants read them): several hundred MB per variant at the small preset;
2. BLEU along the run (``--curve-every``): AR greedy and NAR T=4 l=1 (whichever the variant trains) of
   the checkpoints every N updates, on the first ``--curve-sentences`` of the prepared valid split
   (detokenized ids as references: for the shape of the curves, not for comparison with the test
   scores); cached in ``OUT/<variant>/curve.json``;
3. average its last ``--average`` checkpoints at multiples of ``--save-interval`` (not the ones saved by
   wall time, which fall elsewhere in every run) into ``OUT/<variant>/averaged``;
4. decode the test set (raw text: ``--test-prefix`` + .src/.tgt language suffixes; else the prepared
   split, detokenized): AR beam 5 and greedy, NAR T=10 l=3 (with and without AR re-ranking, and with
   ``--length-weight 1 --dedup``) and T=4 l=1, and self-speculative decoding where the model has both
   heads (with the share of sentences where it equals greedy search, which it must, and its decoder
   passes per sentence); sacreBLEU BLEU and chrF with their signatures;
5. time every decode at batch 1 on the first ``--timing-sentences`` (encoder included, after a warm-up),
   all of them taking turns for ``--timing-rounds`` rounds: p50 and p90 per sentence, and the speedup
   over AR beam 5.

Writes ``OUT/quality.json`` (settings, budget and wall time of every variant, hardware, every row, the
curves), ``OUT/quality.md`` (the tables), ``OUT/logs/<variant>.train.jsonl`` and, with matplotlib,
``OUT/bleu_vs_speed.png`` and ``OUT/bleu_vs_updates.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from harness import (
    environment,
    interleaved,
    percentile,
    plot_bleu_vs_speed,
    print_table,
    pyplot,
    save_figure,
    write_json,
)

from janus.api import Generator
from janus.checkpoint import average_checkpoints, checkpoint_name, latest_checkpoint, list_checkpoints
from janus.config import DecodeConfig, TrainConfig
from janus.memory import keep_freed_memory
from janus.train import train

# The decodes of the study: (label, options, which head it needs). Greedy search is there for spec, whose
# output must equal it (JANUS.md section 4): every row of spec reports the share of sentences where it does.
GREEDY = "AR greedy"
# Mask-predict as JANUS.md specifies it, then with the two options beyond it that pay on every model
# measured (README, Decoding modes): the length head's vote in the choice of candidate, repeats collapsed.
NAR_TUNED = "NAR T=10 l=3 lw1 dedup"
# A joint model's best NAR decode: its P_AR chooses among the candidates with their repeats collapsed (one more pass).
NAR_RERANKED = "NAR T=10 l=3 rerank dedup"
DECODES = [
    ("AR beam 5", DecodeConfig(mode="ar", beam_size=5), "ar"),
    (GREEDY, DecodeConfig(mode="ar", beam_size=1), "ar"),
    ("NAR T=10 l=3", DecodeConfig(mode="nar", iterations=10, length_beam=3), "nar"),
    ("NAR T=10 l=3 rerank", DecodeConfig(mode="nar", iterations=10, length_beam=3, rerank=True), "both"),
    (NAR_TUNED, DecodeConfig(mode="nar", iterations=10, length_beam=3, length_weight=1.0, dedup=True), "nar"),
    (NAR_RERANKED, DecodeConfig(mode="nar", iterations=10, length_beam=3, rerank=True, dedup=True), "both"),
    ("NAR T=4 l=1", DecodeConfig(mode="nar", iterations=4, length_beam=1), "nar"),
    ("spec", DecodeConfig(mode="spec"), "both"),
]
# Along the run (--curve-every): the cheap decode of each head.
CURVE_DECODES = [(GREEDY, DecodeConfig(mode="ar", beam_size=1), "ar"),
                 ("NAR T=4 l=1", DecodeConfig(mode="nar", iterations=4, length_beam=1), "nar")]  # fmt: skip
HEADS = {"ar": ("ar",), "cmlm": ("nar",), "janus": ("ar", "nar")}


@dataclass(frozen=True)
class Variant:
    """One trained model of the study: an objective, the TrainConfig options of its recipe, and optionally
    the variant whose checkpoint it starts from.

    ``joint_start`` / ``joint_ramp`` are fractions of the budget (TrainConfig's fields are updates);
    ``init_from`` names another variant, trained for ``init_share`` of the budget before this one starts
    from its checkpoint and trains the rest (the total is the budget)."""

    name: str
    objective: str
    about: str
    options: dict[str, Any] = field(default_factory=dict)
    joint_start: float = 0.0
    joint_ramp: float = 0.0
    init_from: str = ""
    init_share: float = 0.0
    distilled: bool = False  # trains on --distilled-data (a `janus distill` folder) instead of --data

    def heads(self) -> tuple[str, ...]:
        return HEADS[self.objective]

    def decodes(self) -> list[tuple[str, DecodeConfig]]:
        """The decodes of DECODES this variant's heads can run."""
        heads = self.heads()
        return [(label, options) for label, options, need in DECODES
                if need in heads or (need == "both" and len(heads) == 2)]  # fmt: skip

    def own_steps(self, steps: int) -> int:
        """Updates this variant trains itself (the budget less its source's share)."""
        return steps - self.init_step(steps)

    def init_step(self, steps: int) -> int:
        return round(steps * self.init_share) if self.init_from else 0


# Every weight but P_AR's at a tenth of JANUS.md's (w_ar stays at its default).
_LIGHT = dict(w_nar=0.05, w_aux=0.05, w_length=0.01, w_skl_ar_nar=0.1, w_skl_ar_aux=0.3, w_skl_nar_aux=0.1)
_NO_SKL = dict(w_skl_ar_nar=0.0, w_skl_ar_aux=0.0, w_skl_nar_aux=0.0)
VARIANTS = {v.name: v for v in [
    Variant("ar", "ar", "plain AR Transformer (the AR baseline)"),
    Variant("cmlm", "cmlm", "plain CMLM (the NAR baseline: uniform masking, NAR + length loss)"),
    Variant("janus", "janus", "the published JANUS objective (JANUS.md section 3)"),
    Variant("janus-noskl", "janus", "janus without the three SKL terms", options=_NO_SKL),
    Variant("janus-noaux", "janus", "janus without P_AUX (its CE and both of its SKL terms)",
            options=dict(w_aux=0.0, w_skl_ar_aux=0.0, w_skl_nar_aux=0.0)),
    Variant("janus-stopgrad", "janus", "janus, no SKL gradient into P_AR (P_AR a fixed teacher)",
            options=dict(skl_stop_grad="ar")),
    Variant("janus-light", "janus", "janus with every term but P_AR's at a tenth of its published weight",
            options=_LIGHT),
    Variant("janus-x0.03", "janus", "janus with every term but P_AR's at 3% of its published weight",
            options=dict(w_nar=0.015, w_aux=0.015, w_length=0.003, w_skl_ar_nar=0.03, w_skl_ar_aux=0.09,
                         w_skl_nar_aux=0.03)),
    Variant("janus-sched", "janus", "P_AR alone for half the budget, the other terms ramped in over a tenth",
            joint_start=0.5, joint_ramp=0.1),
    Variant("janus-sched-stopgrad", "janus", "janus-sched with no SKL gradient into P_AR",
            options=dict(skl_stop_grad="ar"), joint_start=0.5, joint_ramp=0.1),
    Variant("janus-ar-init", "janus", "`ar` for half the budget, then janus from its checkpoint (fresh optimizer)",
            init_from="ar", init_share=0.5),
    Variant("janus-ar-init-stopgrad", "janus", "janus-ar-init with no SKL gradient into P_AR",
            options=dict(skl_stop_grad="ar"), init_from="ar", init_share=0.5),
    Variant("ar-kd", "ar", "ar on --distilled-data (the control of the -kd recipes' AR)", distilled=True),
    Variant("cmlm-kd", "cmlm", "cmlm on --distilled-data (sequence-level knowledge distillation)", distilled=True),
    Variant("janus-stopgrad-kd", "janus", "janus-stopgrad on --distilled-data", options=dict(skl_stop_grad="ar"),
            distilled=True),
    Variant("janus-light-kd", "janus", "janus-light on --distilled-data", options=_LIGHT, distilled=True),
]}  # fmt: skip


def trained_steps(save_dir: Path) -> int:
    """The update count of the latest checkpoint in ``save_dir`` (0 when there is none)."""
    path = latest_checkpoint(save_dir)
    return 0 if path is None else int(path.name.rsplit("_", 1)[-1])  # checkpoint_<step>


def interval_checkpoints(save_dir: Path, interval: int) -> list[Path]:
    """The checkpoints of ``save_dir`` at multiples of ``interval`` updates, oldest first: the ones every
    variant has at the same places (a run also saves by wall time, at updates that differ by variant)."""
    return [p for p in list_checkpoints(save_dir) if int(p.name.rsplit("_", 1)[-1]) % interval == 0]


def training_record(save_dir: Path, until_step: Optional[int] = None) -> dict[str, Any]:
    """What ``save_dir``'s train.jsonl says about its training: wall seconds (every run, a resumed one
    too, from its "start" event to its last logged event; with ``until_step``, only up to the first event
    at that update), the number of runs, and the threads and device of the last run. Empty without a log."""
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
        if until_step is not None and event.get("step", -1) >= until_step and event.get("event") != "start":
            break
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
        src, ref = prepared_split(args.data, "test", gen)
    n = args.test_sentences or len(src)
    return src[:n], ref[:n]


def prepared_split(data: str, split: str, gen: Generator, limit: int = 0) -> tuple[list[str], list[str]]:
    """(sources, references) of a prepared split, detokenized (the first ``limit`` pairs; 0 = all)."""
    from janus.data import Dataset

    ds = Dataset(data, split)
    n = min(limit or len(ds), len(ds))
    return ([gen.vocab.decode(ds.src(i).tolist()) for i in range(n)],
            [gen.vocab.decode(ds.tgt(i).tolist()) for i in range(n)])  # fmt: skip


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
    """Each row's batch-1 speedup over AR beam 5: of the same model where it has an AR head, else of the
    ``ar`` model (the same architecture, so the same cost per pass)."""
    beams = {r["variant"]: r["ms_b1_p50"] for r in rows if r["decode"] == "AR beam 5"}
    for r in rows:
        beam = beams.get(r["variant"], beams.get("ar"))
        r["speedup_vs_beam5"] = beam / r["ms_b1_p50"] if beam and r["ms_b1_p50"] else None


def variants_of(spec: str, distilled: bool = False) -> list[Variant]:
    """The variants named by ``spec`` (comma-separated names, or "all": every one, the *-kd ones only with
    ``distilled`` data), each after the variant it starts from, which is added when missing."""
    if spec == "all":
        names = [n for n, v in VARIANTS.items() if distilled or not v.distilled]
    else:
        names = [n for n in spec.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)} (or all)")
    ordered: list[str] = []
    for n in names:
        source = VARIANTS[n].init_from
        if source and source not in ordered:
            ordered.append(source)
        if n not in ordered:
            ordered.append(n)
    return [VARIANTS[n] for n in ordered]


def train_config(v: Variant, args: argparse.Namespace, out: Path) -> TrainConfig:
    """The TrainConfig of variant ``v`` at the study's budget."""
    options = dict(v.options)
    if v.joint_start or v.joint_ramp:
        options.update(joint_start=round(args.steps * v.joint_start), joint_ramp=round(args.steps * v.joint_ramp))
    if v.init_from:
        source = out / v.init_from / checkpoint_name(v.init_step(args.steps))
        if not source.is_dir():
            raise SystemExit(f"{v.name} starts from {source}, which is missing: train {v.init_from} first")
        options["init_from"] = str(source)
    data = args.data
    if v.distilled:
        if not args.distilled_data:
            raise SystemExit(f"{v.name} trains on distilled targets: pass --distilled-data (a `janus distill` folder)")
        data = args.distilled_data
    # keep_last=0: every checkpoint stays (the curves and the *-init variants read them).
    return TrainConfig(data=data, save_dir=str(out / v.name), preset=args.preset, objective=v.objective,
                       max_tokens=args.max_tokens, max_steps=v.own_steps(args.steps), warmup_steps=args.warmup,
                       lr=args.lr, dropout=args.dropout, seed=args.seed, save_interval=args.save_interval,
                       validate_interval=args.save_interval, keep_last=0, device=args.device, threads=args.threads,
                       progress=args.progress, **options)  # fmt: skip


def curve(v: Variant, args: argparse.Namespace, out: Path) -> dict[int, dict[str, float]]:
    """BLEU of the cheap decodes (CURVE_DECODES) at every ``--curve-every`` updates of the run, by total
    updates (a variant started from another's checkpoint counts its source's updates), cached in
    ``OUT/<variant>/curve.json``."""
    if args.curve_every <= 0:
        return {}
    from sacrebleu.metrics import BLEU

    cache = out / v.name / "curve.json"
    key = f"{args.curve_sentences} valid sentences"
    saved = json.loads(cache.read_text()) if cache.exists() else {}
    points = {int(k): p for k, p in saved.get("points", {}).items()} if saved.get("key") == key else {}
    offset = v.init_step(args.steps)
    decodes = [(label, options) for label, options, need in CURVE_DECODES if need in v.heads()]
    for step in range(args.curve_every, v.own_steps(args.steps) + 1, args.curve_every):
        folder = out / v.name / checkpoint_name(step)
        if step + offset in points or not folder.is_dir():
            continue
        gen = Generator.from_checkpoint(folder, device=args.device)
        src, ref = prepared_split(args.data, "valid", gen, args.curve_sentences)
        points[step + offset] = {label: BLEU().corpus_score([h.text or "" for h in gen.generate(src, options)],
                                                            [ref]).score for label, options in decodes}  # fmt: skip
        print(f"{v.name:>22} update {step + offset:>6}: " + "  ".join(f"{k} {b:5.2f}" for k, b in
              points[step + offset].items()), flush=True)  # fmt: skip
        write_json(cache, dict(key=key, points={str(k): p for k, p in sorted(points.items())}))
    return dict(sorted(points.items()))


def plot_curves(curves: dict[str, dict[int, dict[str, float]]], path: Path, title: str) -> Optional[Path]:
    """BLEU vs updates, one line per (variant, decode)."""
    plt = pyplot()
    if plt is None or not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        for label in sorted({k for p in points.values() for k in p}):
            xs = [s for s, p in points.items() if label in p]
            ax.plot(xs, [points[s][label] for s in xs], marker="o", markersize=3,
                    linestyle="-" if label == GREEDY else "--", label=f"{name}: {label}")  # fmt: skip
    ax.set_xlabel("updates")
    ax.set_ylabel("BLEU (valid subset)")
    return save_figure(fig, ax, path, title, dict(fontsize=6, ncol=2))


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a `janus prepare` folder")
    p.add_argument("--distilled-data", default="",
                   help="a `janus distill` folder of --data for the *-kd variants (scored on real refs)")  # fmt: skip
    p.add_argument("--out", required=True, help="study folder (one training folder per variant)")
    p.add_argument("--variants", "--objectives", dest="variants", default="ar,cmlm,janus",
                   help=f"comma-separated, or all: {', '.join(VARIANTS)} (default ar,cmlm,janus)")  # fmt: skip
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=3000, help="updates per variant (default 3000)")
    p.add_argument("--max-tokens", type=int, default=2048, help="token budget of a batch (default 2048)")
    p.add_argument("--warmup", type=int, default=400, help="warm-up updates (default 400)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--save-interval", type=int, default=250, help="updates between checkpoints (default 250)")
    p.add_argument("--average", type=int, default=4, help="last checkpoints averaged (default 4)")
    p.add_argument("--curve-every", type=int, default=500, help="updates between curve points (0 = no curves)")
    p.add_argument("--curve-sentences", type=int, default=300, help="valid sentences a curve point decodes")
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
                   help="train and average only (e.g. variants in parallel, one thread each); "
                   "a later run without it scores them")  # fmt: skip
    args = p.parse_args(argv)
    keep_freed_memory()  # the same allocator for every decode, first or last
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    variants = variants_of(args.variants, bool(args.distilled_data))
    if args.curve_every and args.curve_every % args.save_interval:
        raise SystemExit(f"--curve-every {args.curve_every} is not a multiple of --save-interval {args.save_interval}")

    rows: list[dict[str, Any]] = []
    timed: list[tuple[Generator, DecodeConfig]] = []
    budget: dict[str, Any] = {}
    curves: dict[str, dict[int, dict[str, float]]] = {}
    src: list[str] = []
    for v in variants:
        save_dir = out / v.name
        cfg = train_config(v, args, out)
        if trained_steps(save_dir) < cfg.max_steps:
            train(cfg)
        else:
            print(f"{v.name}: {save_dir} already holds {cfg.max_steps} updates; not training again")
        record = training_record(save_dir)
        record.update(updates=cfg.max_steps, about=v.about)
        if v.init_from:  # its source's share of the budget, timed in the source's own log
            before = training_record(out / v.init_from, until_step=v.init_step(args.steps))
            record.update(init_from=f"{v.init_from} at update {v.init_step(args.steps)}",
                          source_seconds=before.get("train_seconds", 0.0), updates=args.steps)  # fmt: skip
        record["total_seconds"] = record.get("train_seconds", 0.0) + record.get("source_seconds", 0.0)
        budget[v.name] = record
        averaged = average_checkpoints(interval_checkpoints(save_dir, args.save_interval)[-args.average :],
                                       save_dir / "averaged")  # fmt: skip
        if args.train_only:
            continue
        (out / "logs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(save_dir / "train.jsonl", out / "logs" / f"{v.name}.train.jsonl")
        curves[v.name] = curve(v, args, out)
        gen = Generator.from_checkpoint(averaged, device=args.device)
        src, ref = test_set(args, gen)
        outputs: dict[str, list[str]] = {}
        for label, options in v.decodes():
            row, outputs[label] = score(gen, label, options, src, ref, args.progress)
            if options.mode == "spec":
                same = sum(a == b for a, b in zip(outputs[label], outputs[GREEDY]))
                row["equals_ar_greedy"] = same / max(1, len(src))
                greedy = next(r for r in rows if r["variant"] == v.name and r["decode"] == GREEDY)
                row["passes_vs_greedy"] = row["passes"] / max(1e-9, greedy["passes"])
            rows.append(dict(variant=v.name, objective=v.objective, **row))
            timed.append((gen, options))
            print(f"{v.name:>22} {label:<19} BLEU {row['bleu']:6.2f}  chrF {row['chrf']:6.2f}", flush=True)

    if args.train_only:
        return rows
    print(f"timing every decode at batch 1: {args.timing_rounds} rounds of {args.timing_sentences} sentences")
    for row, spent in zip(rows, time_batch1(timed, src[: args.timing_sentences], args.timing_rounds)):
        row["ms_b1_p50"] = 1e3 * percentile(spent, 0.5) if spent else None
        row["ms_b1_p90"] = 1e3 * percentile(spent, 0.9) if spent else None
        row["timing_sentences"], row["timing_rounds"] = min(len(src), args.timing_sentences), args.timing_rounds
    add_speedups(rows)
    env = environment(timed[0][0].device)
    for r in rows:
        r["train_min"] = budget[r["variant"]]["total_seconds"] / 60
    columns = ["variant", "decode", "bleu", "chrf", "passes", "ms_b1_p50", "ms_b1_p90", "speedup_vs_beam5",
               "equals_ar_greedy", "passes_vs_greedy", "train_min"]  # fmt: skip
    table = print_table(rows, columns)
    recipes = print_table([dict(variant=name, updates=b["updates"], train_min=b["total_seconds"] / 60,
                                threads=b.get("threads"), recipe=b["about"]) for name, b in budget.items()],
                          ["variant", "updates", "train_min", "threads", "recipe"])  # fmt: skip
    title = f"{args.preset}, {args.steps} updates of {args.max_tokens} tokens, {env['device_name']}"
    settings = {k: v for k, v in vars(args).items()}
    saved_curves = {k: {str(s): p for s, p in c.items()} for k, c in curves.items()}
    write_json(out / "quality.json",
               dict(environment=env, settings=settings, budget=budget, results=rows, curves=saved_curves))  # fmt: skip
    (out / "quality.md").write_text(f"{title}\n\n{table}\n\n{recipes}\n", encoding="utf-8")
    points = [(f"{r['variant']}: {r['decode']}", r["ms_b1_p50"], r["bleu"]) for r in rows]
    speed = plot_bleu_vs_speed({"": points}, out / "bleu_vs_speed.png", title, "ms per sentence at batch 1 (p50)")
    for written in (speed, plot_curves(curves, out / "bleu_vs_updates.png", title)):
        if written:
            print(f"wrote {written}")
    return rows


if __name__ == "__main__":
    main()
