#!/bin/bash
# Rebuild the model shipped as builtin:de-en (janus/samples/de-en) from the LibreOffice de-en corpus.
#
#   bash benchmarks/rebuild_builtin.sh CORPUS [WORK]
#
# CORPUS holds train/valid/test .de/.en (the development corpus: ../shared/data/libreoffice-de-en); WORK
# (default builtin-work) gets the prepared data and the checkpoints. About 3 hours on one CPU thread
# (170 min measured); interrupted, the same command resumes the training where it stopped. The recipe is
# janus-light (README: Quality study): every JANUS term but P_AR's at a tenth of its published weight.
# Training is seeded, but another CPU's kernels round differently: the result is not bit for bit the shipped one.
set -euo pipefail
D=${1:?usage: rebuild_builtin.sh CORPUS [WORK]}
W=${2:-builtin-work}
OUT=$(cd "$(dirname "$0")/.." && pwd)/janus/samples/de-en
[ -f "$W/bin/manifest.json" ] || janus prepare --trainpref "$D/train" --validpref "$D/valid" --testpref "$D/test" \
    --src de --tgt en --destdir "$W/bin" --vocab-size 8000
janus train --data "$W/bin" --save-dir "$W/janus-light" --preset small --objective janus \
    --max-tokens 2048 --max-steps 10500 --lr 1e-3 --warmup-steps 400 --seed 1 --threads 1 \
    --validate-interval 250 --save-interval 250 \
    --w-nar 0.05 --w-aux 0.05 --w-length 0.01 --w-skl-ar-nar 0.1 --w-skl-ar-aux 0.3 --w-skl-nar-aux 0.1
janus average --save-dir "$W/janus-light" --last 4 --output "$W/averaged" --dtype float16
cp "$W/averaged/model.safetensors" "$W/averaged/config.json" "$W/averaged/spm.model" "$W/averaged/average.json" "$OUT/"
python "$(dirname "$0")/builtin_card.py" --test-prefix "$D/test"   # scores.json, and the card's table
