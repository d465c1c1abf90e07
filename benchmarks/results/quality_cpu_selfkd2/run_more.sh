#!/bin/bash
# After run.sh: kd2-nar1 (P_NAR weight 1.0) trained on past update 8000, and two recipes started from its
# checkpoint at update 8000 on the same distilled folder, three runs side by side on one thread each:
#   kd2-nar1  resumed (the same command: it resumes from its last checkpoint), lr 9.2e-5 at 8000, decaying
#   kd2-nar2  P_NAR's cross-entropy at 2.0, a fresh optimizer, lr 3e-4 after 500 warm-up updates
#   kd2-skl   SKL(P_AR, P_NAR) at its published weight (1.0) with P_AR a fixed teacher in the SKL terms
#             (--skl-stop-grad ar), P_NAR's cross-entropy at 1.0, a fresh optimizer, lr 3e-4 after 500 warm-up
# All three stopped by hand at the same wall time (the same commands resume), the last 4 checkpoints averaged
# and scored on the 1000 test pairs. From the folder of run.sh.
set -e
R=${R:-janus-repo}
D=${D:-../shared/data/libreoffice-de-en}
# the resumed kd2-nar1 keeps its last 8 checkpoints only: the start of the other two is copied aside first
cp -r kd2-nar1/checkpoint_00008000 kd2-nar1-at-8000
COMMON="--data bin-kd2 --preset small --objective janus --max-tokens 2048 --max-steps 30000 --threads 1
  --validate-interval 500 --save-interval 250 --keep-last 8 --w-length 0.1 --w-aux 0.05 --w-skl-ar-aux 0.3
  --w-skl-nar-aux 0.1"
janus train $COMMON --save-dir kd2-nar1 --init-from builtin:de-en --lr 1.5e-4 --warmup-steps 3000 --seed 2 \
  --w-nar 1.0 --w-skl-ar-nar 0.1 &
janus train $COMMON --save-dir kd2-nar2 --init-from kd2-nar1-at-8000 --lr 3e-4 --warmup-steps 500 \
  --seed 3 --w-nar 2.0 --w-skl-ar-nar 0.1 &
janus train $COMMON --save-dir kd2-skl --init-from kd2-nar1-at-8000 --lr 3e-4 --warmup-steps 500 \
  --seed 4 --w-nar 1.0 --w-skl-ar-nar 1.0 --skl-stop-grad ar
# Scored along the way (AR beam 5 and NAR T=10 l=3 of the last 4 checkpoints, all 1000 test pairs):
# `python score_run.py RUN`, its RUN-quick1000.json kept as RUN-at-STEP.scores.json. kd2-nar1 was stopped first
# (at update 12000), the other two 37 minutes later; then each was scored as below (RUN-quick1000.json and
# RUN-spec_passes.json kept as RUN-at-STEP.scores.json and RUN-at-STEP.spec_passes.json):
wait
for RUN in kd2-nar1 kd2-nar2 kd2-skl; do
  R=$R D=$D python score_run.py $RUN 1000 --full
  python $R/benchmarks/spec_passes.py --checkpoint $RUN/averaged --src $D/test.de --threads 1 \
    --variants exhausted:1:lookup,exhausted:3:lookup,exhausted:2:lookup:0 --out $RUN-spec_passes.json
done
