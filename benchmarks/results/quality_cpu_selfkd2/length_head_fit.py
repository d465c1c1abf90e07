"""How much of the distilled NAR's gap is its length head? With the model frozen, fit new length heads on the
mean-pooled encoder states of the distilled training sources (absolute classes, started from the trained head;
offset classes, n - source length + C/2, from scratch), report their accuracy on the distilled valid lengths and
the NAR BLEU each gives on the test set; also NAR with the model's own AR beam-5 lengths and the references'
lengths forced. Writes length_head_fit.json.

    R=janus-repo D=../shared/data/libreoffice-de-en python length_head_fit.py MODEL DATA_BIN
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F

from janus.api import Generator
from janus.config import DecodeConfig
from janus.data import Dataset, Masking, collate, read_lines

torch.set_num_threads(1)
torch.manual_seed(0)
model_path, data_bin = sys.argv[1], sys.argv[2]
gen = Generator.from_checkpoint(model_path, device="cpu", dtype="float32")
model = gen.model.eval()
C = model.cfg.length_classes


def features(split: str):
    ds = Dataset(data_bin, split)
    order = np.argsort(ds.src_lengths)
    pooled, src_len, tgt_len = [], [], []
    with torch.no_grad():
        for i in range(0, len(ds), 256):
            b = collate(ds, order[i : i + 256], Masking(kind="none"), 0, 0)
            enc = model.encode(b.src)
            keep = (~enc.padding).unsqueeze(-1).float()
            pooled.append((enc.states * keep).sum(1) / keep.sum(1))
            src_len.append(enc.lengths)
            tgt_len.append(b.tgt_lengths)
    return torch.cat(pooled), torch.cat(src_len), torch.cat(tgt_len)


def classes(offset: bool, src_len, tgt_len):
    return (tgt_len - src_len + C // 2 if offset else tgt_len).clamp(0, C - 1)


def accuracy(head, offset: bool, feats) -> dict:
    pooled, src_len, tgt_len = feats
    with torch.no_grad():
        logits = head(pooled)
        c = logits.argmax(-1)
        ce = F.cross_entropy(logits, classes(offset, src_len, tgt_len)).item()
    err = ((c - C // 2 + src_len if offset else c) - tgt_len).abs().float()
    share = lambda ok: round(ok.float().mean().item(), 3)  # noqa: E731
    return dict(
        ce=round(ce, 3), exact=share(err == 0), within_1=share(err <= 1), mean_abs_error=round(err.mean().item(), 2)
    )


def fit(offset: bool, init, train, epochs: int = 10):
    head = torch.nn.Linear(train[0].shape[1], C)
    if init is not None:
        head.load_state_dict(init.state_dict())
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    pooled, src_len, tgt_len = train
    y = classes(offset, src_len, tgt_len)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 512):
            j = perm[i : i + 512]
            loss = F.cross_entropy(head(pooled[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head


test = Path(os.environ.get("D", "../shared/data/libreoffice-de-en")) / "test"
src, ref = (read_lines(f"{test}.{lang}")[0] for lang in ("de", "en"))


def bleu(hyps) -> float:
    return round(sacrebleu.corpus_bleu([h.text for h in hyps], [ref]).score, 2)


def nar(**kw) -> dict:
    out = {}
    for label, lb, lw in (("T=10 l=1", 1, 0.0), ("T=10 l=3", 3, 0.0), ("T=10 l=3 lw1", 3, 1.0)):
        options = DecodeConfig(mode="nar", iterations=10, length_beam=lb, length_weight=lw, max_batch_size=64)
        out[label] = bleu(gen.generate(src, options, **kw))
        print(label, "lengths forced" if kw else "", out[label], flush=True)
    return out


train_f, valid_f = features("train"), features("valid")
result = dict(model=model_path, data=data_bin, heads={})
trained = model.length_head
result["heads"]["trained (absolute)"] = dict(valid=accuracy(trained, False, valid_f), nar_bleu=nar())
ar = gen.generate(src, DecodeConfig(mode="ar", beam_size=5, max_batch_size=64))
result["ar_beam5_bleu"] = bleu(ar)
result["forced_lengths"] = {
    "the model's AR beam 5 lengths": nar(target_lengths=[len(h.ids) for h in ar]),
    "the references' lengths": nar(target_lengths=[len(x) for x in gen.vocab.encode(ref)]),
}
state = {k: v.clone() for k, v in trained.state_dict().items()}
for name, offset, init in (("refit (absolute)", False, trained), ("fit (offset)", True, None)):
    head = fit(offset, init, train_f)
    model.length_head.load_state_dict(head.state_dict())
    object.__setattr__(model.cfg, "length_offset", offset)
    result["heads"][name] = dict(valid=accuracy(head, offset, valid_f), nar_bleu=nar())
    model.length_head.load_state_dict(state)
    object.__setattr__(model.cfg, "length_offset", False)
Path("length_head_fit.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result, indent=1))
