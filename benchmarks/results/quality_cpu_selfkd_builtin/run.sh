#!/bin/bash
# Stage 2 of builtin:de-en: self-distillation of janus-light at 10,500 updates (STAGE1: the builtin:de-en
# shipped before this stage, janus/samples/de-en in this repository's history, or rebuild_builtin.sh's
# janus-light-averaged), from a folder holding this repository as `janus-repo` (any path: set R). Two CPU
# threads; about 8 minutes of distillation, then about 9 minutes per thousand updates.
set -e
R=${R:-janus-repo}
STAGE1=${STAGE1:?the janus-light model folder}
D=${D:-../shared/data/libreoffice-de-en}
janus prepare --trainpref $D/train --validpref $D/valid --testpref $D/test --src de --tgt en --destdir bin --vocab-size 8000
# the same pieces and scores as the shipped vocabulary (checked: all 68,710 train lines encode alike);
# only its trainer record differs, which janus distill compares byte for byte
cp $STAGE1/spm.model bin/spm.model
# 1. The shipped model's AR beam 5 over the 34,355 train sources (real valid/test targets kept).
janus distill --data bin --checkpoint $STAGE1 --destdir bin-kd --keep-valid --threads 2 --beam-size 5
# 2. Its weights trained on those targets with P_NAR's cross-entropy and the length loss at their published
#    weights, every other term at a tenth (janus-kd-nar), a fresh optimizer: lr 4e-4 after 1000 warm-up
#    updates, then inverse square root.
janus train --data bin-kd --save-dir kd-nar --init-from $STAGE1 --preset small \
  --objective janus --max-tokens 2048 --max-steps 30000 --lr 4e-4 --warmup-steps 1000 --seed 1 --threads 2 \
  --validate-interval 500 --save-interval 250 --keep-last 8 \
  --w-nar 0.5 --w-length 0.1 --w-aux 0.05 --w-skl-ar-nar 0.1 --w-skl-ar-aux 0.3 --w-skl-nar-aux 0.1
# (stopped by hand after update 11,000; the same command resumes.)
# 3. The last 4 checkpoints averaged and scored on the 1000 test pairs (real references).
janus average --save-dir kd-nar --last 4 --output kd-nar/averaged   # + --dtype float16: the shipped weights
python $R/benchmarks/builtin_card.py --model kd-nar/averaged --test-prefix $D/test --threads 2 --out kd-nar-averaged-fp32.scores.json
# spec's passes of the shipped (float16) weights: benchmarks/results/spec_align_builtin_cpu/passes.json
