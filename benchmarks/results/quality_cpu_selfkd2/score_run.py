"""Average a run's last 4 checkpoints and score it on the first N LibreOffice test pairs (all 1000 by default):
AR beam 5 and NAR T=10 l=3 (plain, and with --length-weight 1 --dedup), or with --full every decode of
benchmarks/quality.py. Writes RUN-quick{N}.json; with --at STEP, the checkpoints of updates STEP - 750 .. STEP
(every 250) are averaged instead, to compare runs at the same update while they train, and it writes
RUN-at-STEP.scores.json.

    R=janus-repo D=../shared/data/libreoffice-de-en python score_run.py RUN [N] [--full] [--at STEP]
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(os.environ.get("R", "janus-repo")) / "benchmarks"))
import torch  # noqa: E402
from harness import write_json  # noqa: E402
from quality import DECODES, NAR_TUNED, score  # noqa: E402

from janus.api import Generator  # noqa: E402
from janus.data import read_lines  # noqa: E402

run = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 1000
torch.set_num_threads(1)
at = int(sys.argv[sys.argv.index("--at") + 1]) if "--at" in sys.argv else None
avg = Path(run) / ("averaged" if at is None else f"averaged-at-{at}")
if at is None:
    which = ["--save-dir", run, "--last", "4"]
    latest = json.loads((Path(run) / "latest.json").read_text())
else:
    which = ["--inputs", *(str(Path(run) / f"checkpoint_{step:08d}") for step in range(at - 750, at + 1, 250))]
    latest = dict(checkpoint=f"checkpoint_{at:08d}", step=at)
subprocess.run([sys.executable, "-m", "janus", "average", *which, "--output", str(avg)], check=True)
test = Path(os.environ.get("D", "../shared/data/libreoffice-de-en")) / "test"
src, ref = (read_lines(f"{test}.{lang}")[0][:n] for lang in ("de", "en"))
gen = Generator.from_checkpoint(str(avg), device="cpu", dtype="float32")
quick = ("AR beam 5", "NAR T=10 l=3", NAR_TUNED)
decodes = DECODES if "--full" in sys.argv else [d for d in DECODES if d[0] in quick]
rows = {}
for label, options, _ in decodes:
    row, _ = score(gen, label, dataclasses.replace(options, max_batch_size=64), src, ref, False)
    rows[label] = {k: row[k] for k in ("bleu", "chrf", "passes", "bleu_signature")}
    print(f"{run} {label}: BLEU {row['bleu']:.2f} chrF {row['chrf']:.1f} passes {row['passes']:.2f}", flush=True)
out = Path(f"{run}-quick{n}.json" if at is None else f"{run}-at-{at}.scores.json")
write_json(out, dict(run=run, sentences=n, latest=latest, scores=rows))
