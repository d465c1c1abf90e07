"""One table of recipes from several quality studies, and the AR-against-NAR trade-off plot.

``benchmarks/quality.py`` writes one ``quality.json`` per run; recipes scored in runs of their own,
or at other budgets, end up in several files. This reads them all and writes, per (variant, updates):
AR beam 5 and greedy, NAR T=10 l=3 (plain and re-ranked by P_AR) and T=4 l=1, spec's passes against
greedy's, and the training minutes, each with the file it came from; and the question the quality
study asks of a joint recipe: does its AR reach the AR baseline's (``ar`` at the same updates) and
its NAR the NAR baseline's + 2 BLEU (``cmlm`` at the same updates)?

    python benchmarks/quality_summary.py benchmarks/results/quality_cpu_*/*quality.json \\
        --out benchmarks/results/quality_summary

writes ``quality_summary.json``, ``quality_summary.md`` and ``quality_summary_tradeoff.png`` (AR beam 5
against NAR T=10 l=3, one point per recipe, the baselines' lines drawn at each budget).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from harness import print_table, pyplot, save_figure, write_json

DECODES = {"AR beam 5": "ar_beam5", "AR greedy": "ar_greedy", "NAR T=10 l=3": "nar_t10_l3",
           "NAR T=10 l=3 rerank": "nar_t10_l3_rerank", "NAR T=10 l=3 lw1 dedup": "nar_t10_l3_lw1_dedup",
           "NAR T=10 l=3 rerank dedup": "nar_t10_l3_rerank_dedup", "NAR T=4 l=1": "nar_t4_l1"}  # fmt: skip
AR_BASELINE, NAR_BASELINE, NAR_MARGIN = "ar", "cmlm", 2.0


def load(paths: list[Path]) -> list[dict[str, Any]]:
    """One row per (variant, updates) over ``paths`` (quality.json files, in order; a later file's scores
    of the same variant and updates replace an earlier one's, and the row says which file it holds)."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        try:
            study = json.loads(path.read_text(encoding="utf-8"))
            results, budget = study["results"], study.get("budget", {})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}: not a quality.py result file ({e})") from e
        for r in results:
            if not isinstance(r, dict) or not ({"variant", "objective"} & r.keys()) or "decode" not in r:
                raise SystemExit(f"{path}: a result row without its variant and decode: {str(r)[:200]}")
            name = r.get("variant") or r["objective"]  # the first study's rows name only their objective
            spent = budget.get(name, {})
            updates = int(spent.get("updates") or study.get("settings", {}).get("steps", 0))
            row = rows.get((name, updates))
            if row is None or row["file"] != str(path):  # a new file: its record of this variant replaces the old
                row = rows[name, updates] = dict(variant=name, updates=updates, file=str(path),
                                                 objective=r.get("objective"), train_min=r.get("train_min"),
                                                 about=spent.get("about", ""))  # fmt: skip
            key = DECODES.get(r["decode"])
            if key is not None:
                row[key] = r["bleu"]
            elif r["decode"] == "spec":
                row["spec_passes_vs_greedy"] = r.get("passes_vs_greedy")
                row["spec_equals_greedy"] = r.get("equals_ar_greedy")
    out = sorted(rows.values(), key=lambda r: (r["updates"], r["variant"]))
    judge(out)
    return out


def judge(rows: list[dict[str, Any]]) -> None:
    """Mark each joint recipe against the baselines of its own budget: ``ar_vs_ar`` (its AR beam 5 less
    ``ar``'s), ``nar_vs_cmlm`` (its NAR T=10 l=3 less ``cmlm``'s) and ``pays`` (both criteria met)."""
    by = {(r["variant"], r["updates"]): r for r in rows}
    for r in rows:
        if "ar_beam5" not in r or "nar_t10_l3" not in r:
            continue
        ar, cmlm = by.get((AR_BASELINE, r["updates"]), {}), by.get((NAR_BASELINE, r["updates"]), {})
        if "ar_beam5" in ar:
            r["ar_vs_ar"] = r["ar_beam5"] - ar["ar_beam5"]
        if "nar_t10_l3" in cmlm:
            r["nar_vs_cmlm"] = r["nar_t10_l3"] - cmlm["nar_t10_l3"]
        if "ar_vs_ar" in r and "nar_vs_cmlm" in r:
            r["pays"] = r["ar_vs_ar"] >= 0 and r["nar_vs_cmlm"] >= NAR_MARGIN


def plot(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """AR beam 5 against NAR T=10 l=3 of every joint recipe; per budget, ``ar``'s AR beam 5 (horizontal)
    and ``cmlm``'s NAR + 2 (vertical): a recipe that pays lies above and right of its budget's lines."""
    plt = pyplot()
    joint = [r for r in rows if "ar_beam5" in r and "nar_t10_l3" in r]
    if plt is None or not joint:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    budgets = sorted({r["updates"] for r in rows})
    colors = {u: f"C{i}" for i, u in enumerate(budgets)}
    for r in rows:
        c = colors[r["updates"]]
        if r["variant"] == AR_BASELINE and "ar_beam5" in r:
            ax.axhline(r["ar_beam5"], color=c, linestyle="--", linewidth=1, label=f"ar, {r['updates']} updates")
        if r["variant"] == NAR_BASELINE and "nar_t10_l3" in r:
            ax.axvline(r["nar_t10_l3"] + NAR_MARGIN, color=c, linestyle=":", linewidth=1,
                       label=f"cmlm + {NAR_MARGIN:g}, {r['updates']} updates")  # fmt: skip
    for r in joint:
        ax.scatter(r["nar_t10_l3"], r["ar_beam5"], color=colors[r["updates"]], s=25)
        ax.annotate(f"{r['variant']} ({r['updates']})", (r["nar_t10_l3"], r["ar_beam5"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("NAR T=10 l=3 BLEU")
    ax.set_ylabel("AR beam 5 BLEU")
    return save_figure(fig, ax, path, "joint recipes: AR against NAR quality (test BLEU)", dict(fontsize=7))


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="quality.json files of benchmarks/quality.py")
    p.add_argument("--out", type=Path, required=True, help="output prefix: <out>.json, <out>.md, <out>_tradeoff.png")
    args = p.parse_args(argv)
    rows = load(args.files)
    columns = ["variant", "updates", *DECODES.values(), "spec_passes_vs_greedy", "ar_vs_ar", "nar_vs_cmlm", "pays",
               "train_min"]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    formats = {**{k: ".2f" for k in DECODES.values()}, "ar_vs_ar": "+.2f", "nar_vs_cmlm": "+.2f",
               "spec_passes_vs_greedy": ".3f", "train_min": ".0f"}  # fmt: skip
    table = print_table(rows, columns, formats)
    args.out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    figure = plot(rows, args.out.parent / f"{args.out.name}_tradeoff.png")
    write_json(args.out.with_suffix(".json"), dict(files=[str(f) for f in args.files], rows=rows,
                                                   plot=str(figure) if figure else None))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
