"""The test scores of a model for its MODEL card: every decode of the quality study, on up to three sets.

    python benchmarks/builtin_card.py --test-prefix ../shared/data/libreoffice-de-en/test
    python benchmarks/builtin_card.py --model run/averaged --out scores.json   # any trained de-en model

Sets: the whole test split (``--test-prefix``, optional), the 500 test pairs shipped in janus.samples, and
its first ``--slice`` (64) pairs in float32 at one batch: ``tests/test_builtin_model.py`` decodes that
slice again and compares its BLEU with the figure written here. Decodes: those of
``benchmarks/quality.py`` (AR beam 5 and greedy, NAR T=10 l=3 with and without re-ranking, NAR T=4 l=1,
spec), and spec's decoder passes against greedy's. Writes ``--out`` (default: the shipped model's
``scores.json``) and prints a markdown table for the card.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from harness import cpu_name, write_json
from quality import DECODES, GREEDY, score

import janus
from janus.api import Generator
from janus.data import read_lines
from janus.samples import builtin_model, libreoffice_sample

SLICE_BATCH = 64


def score_set(gen: Generator, src: list[str], ref: list[str], batch: int, progress: bool) -> dict[str, Any]:
    """{decode label: score row} for every decode of DECODES, at ``batch`` sentences per batch."""
    rows = {}
    for label, options, _ in DECODES:
        row, _ = score(gen, label, dataclasses.replace(options, max_batch_size=batch), src, ref, progress)
        rows[label] = {k: row[k] for k in ("bleu", "chrf", "passes", "sentences", "bleu_signature")}
    rows["spec"]["passes_vs_greedy"] = rows["spec"]["passes"] / rows[GREEDY]["passes"]
    return rows


def markdown(doc: dict[str, Any]) -> str:
    sets = [name for name in ("test", "sample", "slice") if name in doc["sets"]]
    head = "| decode | " + " | ".join(f"{doc['sets'][s]['about']}" for s in sets) + " |"
    lines = [head, "|---|" + "---|" * len(sets)]
    for label, _, _ in DECODES:
        cells = []
        for s in sets:
            r = doc["sets"][s]["scores"][label]
            extra = f" ({r['passes_vs_greedy']:.3f} of greedy's passes)" if "passes_vs_greedy" in r else ""
            cells.append(f"{r['bleu']:.2f}{extra}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:de-en", help="the model (default builtin:de-en)")
    p.add_argument("--test-prefix", default="", help="PREFIX.de / PREFIX.en: the whole test split (optional)")
    p.add_argument("--slice", type=int, default=64, help="pairs of the shipped sample the test re-decodes (64)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="", help="JSON to write (default: the shipped model's scores.json)")
    p.add_argument("--progress", action="store_true", help="tqdm bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else builtin_model("de-en") / "scores.json"
    gen = Generator.from_checkpoint(args.model, device="cpu", dtype="float32")
    sample = libreoffice_sample()
    sets: dict[str, tuple[str, list[str], list[str], int]] = {}
    if args.test_prefix:
        src, ref = read_lines(f"{args.test_prefix}.de")[0], read_lines(f"{args.test_prefix}.en")[0]
        if len(src) != len(ref):
            raise SystemExit(f"{args.test_prefix}: {len(src)} source but {len(ref)} reference lines")
        sets["test"] = (f"test split ({len(src)} pairs)", src, ref, SLICE_BATCH)
    sets["sample"] = (f"shipped sample ({len(sample.source)} pairs)", sample.source, sample.target, SLICE_BATCH)
    n = args.slice
    sets["slice"] = (f"its first {n} pairs", sample.source[:n], sample.target[:n], n)
    doc: dict[str, Any] = dict(
        model=args.model, dtype="float32", device=cpu_name(), python=platform.python_version(),
        torch=torch.__version__, janus=janus.__version__, sets={},
    )  # fmt: skip
    for name, (about, src, ref, batch) in sets.items():
        print(f"{name}: {about}, batch {batch}", file=sys.stderr, flush=True)
        doc["sets"][name] = dict(about=about, sentences=len(src), batch=batch,
                                 scores=score_set(gen, src, ref, batch, args.progress))  # fmt: skip
    doc["bleu_signature"] = next(iter(doc["sets"].values()))["scores"][DECODES[0][0]]["bleu_signature"]
    write_json(out, doc)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
