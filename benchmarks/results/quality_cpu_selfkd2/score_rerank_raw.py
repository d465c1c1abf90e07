"""Score an averaged checkpoint's NAR with P_AR re-ranking (alone and with --dedup) on all 1000 test pairs.

Run at commit a5b21b6, where P_AR re-ranked the raw candidates and --dedup collapsed the chosen one's repeats
afterwards (since 08d6aa2 P_AR scores the collapsed candidates: gap_bootstrap.py). Writes RUN-at-STEP.rerank-raw.json.

    R=janus-repo D=data python score_rerank_raw.py RUN STEP
"""

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(os.environ.get("R", "janus-repo")) / "benchmarks"))
import torch  # noqa: E402
from harness import write_json  # noqa: E402
from quality import score  # noqa: E402

from janus.api import Generator  # noqa: E402
from janus.config import DecodeConfig  # noqa: E402
from janus.data import read_lines  # noqa: E402

run, at = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
test = Path(os.environ.get("D", "../shared/data/libreoffice-de-en")) / "test"
src, ref = (read_lines(f"{test}.{lang}")[0] for lang in ("de", "en"))
gen = Generator.from_checkpoint(str(Path(run) / f"averaged-at-{at}"), device="cpu", dtype="float32")
decodes = {
    "NAR T=10 l=3 rerank": DecodeConfig(mode="nar", iterations=10, length_beam=3, rerank=True),
    "NAR T=10 l=3 rerank dedup": DecodeConfig(mode="nar", iterations=10, length_beam=3, rerank=True, dedup=True),
    "NAR T=10 l=3 dedup": DecodeConfig(mode="nar", iterations=10, length_beam=3, dedup=True),
}
rows = {}
for label, options in decodes.items():
    row, _ = score(gen, label, dataclasses.replace(options, max_batch_size=64), src, ref, False)
    rows[label] = {k: row[k] for k in ("bleu", "chrf", "passes", "bleu_signature")}
    print(f"{run}@{at} {label}: BLEU {row['bleu']:.2f} chrF {row['chrf']:.1f} passes {row['passes']:.2f}", flush=True)
write_json(Path(f"{run}-at-{at}.rerank-raw.json"), dict(run=run, step=at, sentences=len(src), scores=rows))
