#!/bin/bash
# Rebuild the model shipped as builtin:de-en (janus/samples/de-en) from the LibreOffice de-en corpus.
#
#   bash benchmarks/rebuild_builtin.sh CORPUS [WORK]
#
# CORPUS holds train/valid/test .de/.en (the development corpus: ../shared/data/libreoffice-de-en); WORK
# (default builtin-work) gets the prepared data and the checkpoints. About 12 hours on a 2-core CPU (measured:
# 170 min of stage 1 on one thread, 8 min of distillation and 100 min of stage 2 on two; stages 3-5, 27,500
# updates on one thread, 60-75 updates a minute); interrupted, the same command resumes where it stopped.
# Stage 1 is janus-light (README: Quality study): every JANUS term but P_AR's at a tenth of its published weight;
# stage 2 self-distils it; stages 3-5 are a second round of self-distillation, the NAR's terms raised to their
# published weights and SKL(P_AR, P_NAR) taught by a fixed P_AR (MODEL.md).
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
janus average --save-dir "$W/janus-kd" --last 4 --output "$W/stage2" --dtype float16
# Stage 3: a second round. Stage 2's AR beam 5 over the train sources, its weights trained on them with P_NAR's
# cross-entropy at its published weight (1.0), a fresh optimizer, lr 1.5e-4 after 3000 warm-up updates.
[ -f "$W/bin-kd2/manifest.json" ] || janus distill --data "$W/bin" --checkpoint "$W/stage2" --destdir "$W/bin-kd2" \
    --keep-valid --beam-size 5
COMMON=(--data "$W/bin-kd2" --preset small --objective janus --max-tokens 2048 --threads 1 --validate-interval 500
        --save-interval 250 --keep-last 8 --w-nar 1.0 --w-length 0.1 --w-aux 0.05 --w-skl-ar-aux 0.3
        --w-skl-nar-aux 0.1)
janus train "${COMMON[@]}" --save-dir "$W/kd2-nar1" --init-from "$W/stage2" --max-steps 8000 --lr 1.5e-4 \
    --warmup-steps 3000 --seed 2 --w-skl-ar-nar 0.1
# Stage 4: SKL(P_AR, P_NAR) at its published weight, P_AR a fixed teacher in the SKL terms; from stage 3's last
# checkpoint, a fresh optimizer, lr 3e-4 after 500 warm-up updates.
janus train "${COMMON[@]}" --save-dir "$W/kd2-skl" --init-from "$W/kd2-nar1/checkpoint_00008000" --max-steps 9000 \
    --lr 3e-4 --warmup-steps 500 --seed 4 --w-skl-ar-nar 1.0 --skl-stop-grad ar
# Stage 5: the same terms with uniform masking of the NAR stream (CMLM's), from stage 4's last checkpoint, a fresh
# optimizer, lr 3e-4 after 200 warm-up updates; its last 4 checkpoints (updates 9,750 to 10,500) averaged.
janus train "${COMMON[@]}" --save-dir "$W/kd2-uni" --init-from "$W/kd2-skl/checkpoint_00009000" --max-steps 10500 \
    --lr 3e-4 --warmup-steps 200 --seed 4 --w-skl-ar-nar 1.0 --skl-stop-grad ar --masking uniform
janus average --save-dir "$W/kd2-uni" --last 4 --output "$W/averaged" --dtype float16
cp "$W/averaged/model.safetensors" "$W/averaged/config.json" "$W/averaged/spm.model" "$W/averaged/average.json" "$OUT/"
python "$(dirname "$0")/builtin_card.py" --test-prefix "$D/test"   # scores.json, and the card's table
