"""summary.json and table.md of this folder from run.sh's JSONs and hypotheses (hyps/, not committed)."""

import json
from pathlib import Path

HERE = Path(__file__).parent
DTYPES = ("float32", "bfloat16", "int8")
# row: (json file stem, mode in it, hypothesis file)
ROWS = {
    "AR beam 5": ("beam5_nar10l3_spec", "ar", "default.ar"),
    "NAR T=10 l=3": ("beam5_nar10l3_spec", "nar", "default.nar"),
    "spec": ("beam5_nar10l3_spec", "spec", "default.spec"),
    "AR greedy": ("greedy", "ar", "greedy.ar"),
    "NAR T=4 l=1": ("nar4l1", "nar", "nar4l1.nar"),
    "NAR T=10 l=3 --rerank --dedup": ("nar10l3_rerank_dedup", "nar", "rerank_dedup.nar"),
}

summary, lines = {}, []
for row, (stem, mode, hyp) in ROWS.items():
    bleu = {d: json.loads((HERE / f"{d}.{stem}.json").read_text())["modes"][mode]["bleu"] for d in DTYPES}
    ref = (HERE / "hyps" / f"float32.{hyp}").read_text().splitlines()
    same = {}
    for d in DTYPES[1:]:
        out = (HERE / "hyps" / f"{d}.{hyp}").read_text().splitlines()
        same[d] = sum(a == b for a, b in zip(ref, out, strict=True)) / len(ref)
    summary[row] = {"bleu": bleu, "identical_to_float32": same}
    f, b, i = (bleu[d] for d in DTYPES)
    lines.append(
        f"| {row} | {f:.2f} | {b:.2f} | {i:.2f} | {b - f:+.2f} | {i - f:+.2f} | "
        f"{100 * same['bfloat16']:.1f}% / {100 * same['int8']:.1f}% |"
    )
(HERE / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
head = [
    "| decode | float32 | bfloat16 | int8 | bf16 - fp32 | int8 - fp32 | identical to fp32 (bf16 / int8) |",
    "|---|---|---|---|---|---|---|",
]
(HERE / "table.md").write_text("\n".join(head + lines) + "\n")
print("\n".join(head + lines))
