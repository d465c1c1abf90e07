"""Where a trained model's NAR loses to its own AR: mask-predict with the model's lengths, its AR's and the
references', with more passes, other length beams and re-ranking, each scored against the same references.

    python benchmarks/nar_gap.py --checkpoint builtin:de-en \\
        --src ../shared/data/libreoffice-de-en/test.de --ref ../shared/data/libreoffice-de-en/test.en \\
        --out benchmarks/results/nar_gap_builtin_cpu

Rows (``ROWS``): AR beam 5 and greedy; NAR T=10 with the length head's l = 1, 3, 5 candidates, l=3 re-ranked
by P_AR, l=3 with repeats collapsed; NAR with the token counts of the model's own AR beam-5 output (l = 1
and 3: those counts and their neighbours) and of the references, at T=10 and T=20. If the NAR given its own
AR's lengths stays far below that AR, the length head is not what it lacks. Column ``repeats``: adjacent
equal tokens per sentence in the output (the usual NAR failure; AR output has some too).

Writes ``nar_gap.json`` (settings, every row, sacreBLEU's signature) and ``nar_gap.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import sacrebleu
import torch
from harness import write_json
from tqdm import tqdm

from janus.api import Generator
from janus.data import read_lines

# (name, decoding options, the target lengths given: None = the model's own, "ar" = its AR beam-5
# output's, "ref" = the references')
ROWS = (
    ("AR beam 5", dict(mode="ar", beam_size=5), None),
    ("AR greedy", dict(mode="ar", beam_size=1), None),
    ("NAR T=10 l=1", dict(mode="nar", iterations=10, length_beam=1), None),
    ("NAR T=10 l=3", dict(mode="nar", iterations=10, length_beam=3), None),
    ("NAR T=10 l=5", dict(mode="nar", iterations=10, length_beam=5), None),
    ("NAR T=10 l=3, AR re-rank", dict(mode="nar", iterations=10, length_beam=3, rerank=True), None),
    ("NAR T=10 l=3, repeats collapsed", dict(mode="nar", iterations=10, length_beam=3, dedup=True), None),
    ("NAR T=10 l=3, length-weighted", dict(mode="nar", iterations=10, length_beam=3, length_weight=1.0), None),
    (
        "NAR T=10 l=3, length-weighted, repeats collapsed",
        dict(mode="nar", iterations=10, length_beam=3, length_weight=1.0, dedup=True),
        None,
    ),
    ("NAR T=10 l=1, AR beam's lengths", dict(mode="nar", iterations=10, length_beam=1), "ar"),
    ("NAR T=10 l=3, around AR beam's lengths", dict(mode="nar", iterations=10, length_beam=3), "ar"),
    ("NAR T=20 l=1, AR beam's lengths", dict(mode="nar", iterations=20, length_beam=1), "ar"),
    ("NAR T=10 l=1, reference lengths", dict(mode="nar", iterations=10, length_beam=1), "ref"),
    ("NAR T=20 l=1, reference lengths", dict(mode="nar", iterations=20, length_beam=1), "ref"),
)


def repeats(ids: list[int]) -> int:
    """Adjacent equal tokens: positions i > 0 with ids[i] == ids[i - 1]."""
    return sum(a == b for a, b in zip(ids, ids[1:]))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint, averaged or training folder, or builtin:NAME")
    p.add_argument("--src", required=True, help="source text, one sentence per line")
    p.add_argument("--ref", required=True, help="reference translations, line by line with --src")
    p.add_argument("--sentences", type=int, default=0, help="the first N lines only (0 = all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", help="folder for nar_gap.json and nar_gap.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    src, ref = (read_lines(path)[0][: args.sentences or None] for path in (args.src, args.ref))
    if len(src) != len(ref):
        raise SystemExit(f"{args.src} has {len(src)} lines but {args.ref} {len(ref)}")
    gen = Generator.from_checkpoint(args.checkpoint, device="cpu", dtype="float32")
    if gen.vocab is None:
        raise SystemExit(f"{args.checkpoint} has no vocabulary beside it: text in and out needs one")
    lengths = {"ref": [len(ids) for ids in gen.vocab.encode(ref)]}
    bleu = sacrebleu.BLEU()
    rows = []
    for name, options, given in tqdm(ROWS, desc="rows", disable=not sys.stderr.isatty()):
        start = time.perf_counter()
        hyps = gen.generate(src, max_batch_size=args.batch_size, target_lengths=lengths.get(given), **options)
        seconds = time.perf_counter() - start
        if name == "AR beam 5":
            lengths["ar"] = [len(h.ids) for h in hyps]
        text = [h.text for h in hyps]
        score = bleu.corpus_score(text, [ref])
        rows.append(
            dict(
                name=name,
                options=options,
                lengths={None: "model", "ar": "its AR beam 5 output's", "ref": "the references'"}[given],
                bleu=round(score.score, 2),
                chrf=round(sacrebleu.corpus_chrf(text, [ref]).score, 1),
                repeats=round(sum(repeats(h.ids) for h in hyps) / len(hyps), 3),
                tokens=round(sum(len(h.ids) for h in hyps) / len(hyps), 2),
                seconds=round(seconds, 1),
            )
        )
        print(f"{name:>40}: BLEU {rows[-1]['bleu']:6.2f}  repeats {rows[-1]['repeats']:.3f}", flush=True)
    top = rows[0]["bleu"]
    for r in rows:
        r["vs_ar_beam5"] = round(r["bleu"] - top, 2)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        settings = dict(checkpoint=args.checkpoint, src=args.src, ref=args.ref, sentences=len(src),
                        batch_size=args.batch_size, dtype="float32", signature=str(bleu.get_signature()))  # fmt: skip
        write_json(out / "nar_gap.json", dict(settings=settings, results=rows))
        lines = [
            f"`{args.checkpoint}`, {len(src)} sentences of `{args.src}`, float32; sacreBLEU {settings['signature']}",
            "",
            "| decode | lengths | BLEU | vs AR beam 5 | chrF | repeats / sent | tokens / sent |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['name']} | {r['lengths']} | {r['bleu']:.2f} | {r['vs_ar_beam5']:+.2f} | {r['chrf']:.1f} "
            f"| {r['repeats']:.3f} | {r['tokens']:.2f} |"
            for r in rows
        ]
        (out / "nar_gap.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
