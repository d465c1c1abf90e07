#!/bin/bash
# Rebuild the model shipped as builtin:de-en (janus/samples/de-en) from the LibreOffice de-en corpus.
#
#   bash benchmarks/rebuild_builtin.sh CORPUS [WORK]
#
# CORPUS holds train/valid/test .de/.en (the development corpus: ../shared/data/libreoffice-de-en); WORK
# (default builtin-work) gets the prepared data and the checkpoints. About 5 hours on a 2-core CPU (170 min
# of stage 1 on one thread, 8 min of distillation and 100 min of stage 2 on two, measured); interrupted, the
# same command resumes where it stopped. Stage 1 is janus-light (README: Quality study): every JANUS term but
# P_AR's at a tenth of its published weight; stage 2 self-distils it (MODEL.md).
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
janus average --save-dir "$W/janus-light" --last 4 --output "$W/janus-light-averaged" --dtype float16
# Stage 2: self-distillation. Stage 1's AR beam 5 over the train sources (the real valid and test targets
# kept), then its weights trained on those targets with P_NAR's cross-entropy and the length loss at their
# published weights (every other term still at a tenth), a fresh optimizer and schedule.
[ -f "$W/bin-kd/manifest.json" ] || janus distill --data "$W/bin" --checkpoint "$W/janus-light-averaged" \
    --destdir "$W/bin-kd" --keep-valid --beam-size 5
janus train --data "$W/bin-kd" --save-dir "$W/janus-kd" --init-from "$W/janus-light-averaged" --preset small \
    --objective janus --max-tokens 2048 --max-steps 11000 --lr 4e-4 --warmup-steps 1000 --seed 1 --threads 2 \
    --validate-interval 500 --save-interval 250 \
    --w-nar 0.5 --w-aux 0.05 --w-length 0.1 --w-skl-ar-nar 0.1 --w-skl-ar-aux 0.3 --w-skl-nar-aux 0.1
janus average --save-dir "$W/janus-kd" --last 4 --output "$W/averaged" --dtype float16
cp "$W/averaged/model.safetensors" "$W/averaged/config.json" "$W/averaged/spm.model" "$W/averaged/average.json" "$OUT/"
python "$(dirname "$0")/builtin_card.py" --test-prefix "$D/test"   # scores.json, and the card's table
