"""How far an averaged checkpoint's NAR decodes are below its own AR beam 5, with a bootstrap interval.

Translates all 1000 LibreOffice de-en test sources (SPLIT=valid: the valid ones) with AR beam 5 and with
mask-predict T=10 l=3: as JANUS.md decodes it, with ``--length-weight 1 --dedup``, with ``--rerank``, and with
``--rerank --dedup`` (float32, batches of up to 64); writes the outputs to OUT/<decode>.en, and for each NAR
decode the gap BLEU(AR beam 5) - BLEU(NAR) on the split and over 1000 resamples of its sentences (the same
resample for both systems, sacreBLEU's corpus statistics summed per resample): the mean, the 95% interval,
and the share of resamples whose gap is at most 2. Writes OUT/gap.json.

    R=janus-repo D=../shared/data/libreoffice-de-en python gap_bootstrap.py CHECKPOINT OUT
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from sacrebleu.metrics import BLEU

from janus.api import Generator
from janus.config import DecodeConfig
from janus.data import read_lines

checkpoint, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
split = os.environ.get("SPLIT", "test")
test = Path(os.environ.get("D", "../shared/data/libreoffice-de-en")) / split
src, ref = (read_lines(f"{test}.{lang}")[0] for lang in ("de", "en"))
nar = dict(mode="nar", iterations=10, length_beam=3, max_batch_size=64)
decodes = {
    "ar-beam5": DecodeConfig(mode="ar", beam_size=5, max_batch_size=64),
    "nar": DecodeConfig(**nar),
    "nar-lw1-dedup": DecodeConfig(**nar, length_weight=1.0, dedup=True),
    "nar-rerank": DecodeConfig(**nar, rerank=True),
    "nar-rerank-dedup": DecodeConfig(**nar, rerank=True, dedup=True),
}
gen = Generator.from_checkpoint(checkpoint, device="cpu", dtype="float32")
texts = {}
for name, options in decodes.items():
    path = out / f"{name}.en"
    if not path.exists():
        path.write_text("".join((h.text or "") + "\n" for h in gen.generate(src, options, progress=True)))
    texts[name] = path.read_text().split("\n")[:-1]
    assert len(texts[name]) == len(src), (path, len(texts[name]))

bleu = BLEU()
stats = {name: np.array(bleu._extract_corpus_statistics(t, [ref]), dtype=np.int64) for name, t in texts.items()}


def score(s: np.ndarray) -> float:
    return bleu._compute_score_from_stats(s.tolist()).score


rng = np.random.default_rng(12345)
draws = [rng.integers(0, len(src), len(src)) for _ in range(1000)]
ar = stats["ar-beam5"]
ar_full = score(ar.sum(0))
result = dict(checkpoint=checkpoint, split=split, sentences=len(src), signature=str(bleu.get_signature()),
              resamples=len(draws), bleu={name: score(s.sum(0)) for name, s in stats.items()}, gaps={})  # fmt: skip
for name, s in stats.items():
    if name == "ar-beam5":
        continue
    gaps = np.array([score(ar[d].sum(0)) - score(s[d].sum(0)) for d in draws])
    lo, hi = np.percentile(gaps, [2.5, 97.5])
    result["gaps"][name] = dict(gap=ar_full - score(s.sum(0)), mean=float(gaps.mean()), ci95=[float(lo), float(hi)],
                                share_at_most_2=float((gaps <= 2).mean()))  # fmt: skip
    print(f"{name}: BLEU {result['bleu'][name]:.2f}, gap {result['gaps'][name]['gap']:.2f} "
          f"[{lo:.2f}, {hi:.2f}], <= 2 in {result['gaps'][name]['share_at_most_2']:.1%} of resamples")  # fmt: skip
(out / "gap.json").write_text(json.dumps(result, indent=2) + "\n")
