#!/bin/bash
# A second round of self-distillation of builtin:de-en: the shipped model's own AR beam-5 outputs of the
# 34,355 training sources as targets (the real valid targets kept), its weights trained on them with a fresh
# optimizer: lr 1.5e-4 after 3000 warm-up updates (about where the first round's inverse square root had
# decayed to), two runs side by side on one thread each:
#   kd2       the first round's weights (janus-kd-nar: P_NAR's cross-entropy 0.5, length 0.1, the rest light)
#   kd2-nar1  the same with P_NAR's cross-entropy at its published weight, 1.0
# Both stopped by hand after update 8000 (the same commands resume), the last 4 checkpoints averaged and
# scored on the 1000 test pairs. From a folder holding this repository as `janus-repo` (any path: set R).
set -e
R=${R:-janus-repo}
D=${D:-../shared/data/libreoffice-de-en}
janus prepare --trainpref $D/train --validpref $D/valid --testpref $D/test --src de --tgt en --destdir bin --vocab-size 8000
cp $R/janus/samples/de-en/spm.model bin/spm.model   # the shipped pieces (see quality_cpu_selfkd_builtin/run.sh)
janus distill --data bin --checkpoint builtin:de-en --destdir bin-kd2 --keep-valid --threads 1 --beam-size 5
COMMON="--data bin-kd2 --init-from builtin:de-en --preset small --objective janus --max-tokens 2048 --max-steps 30000
  --lr 1.5e-4 --warmup-steps 3000 --seed 2 --threads 1 --validate-interval 500 --save-interval 250 --keep-last 8
  --w-length 0.1 --w-aux 0.05 --w-skl-ar-nar 0.1 --w-skl-ar-aux 0.3 --w-skl-nar-aux 0.1"
janus train $COMMON --save-dir kd2 --w-nar 0.5 &
janus train $COMMON --save-dir kd2-nar1 --w-nar 1.0
wait
for RUN in kd2 kd2-nar1; do
  janus average --save-dir $RUN --last 4 --output $RUN/averaged
  python $R/benchmarks/builtin_card.py --model $RUN/averaged --test-prefix $D/test --threads 2 --out $RUN-averaged.scores.json
  python $R/benchmarks/nar_gap.py --checkpoint $RUN/averaged --src $D/test.de --ref $D/test.en --threads 2 --out $RUN-nar_gap
  python $R/benchmarks/spec_passes.py --checkpoint $RUN/averaged --src $D/test.de --threads 2 \
    --variants exhausted:1:lookup,exhausted:3:lookup,always:1:lookup --out $RUN-spec_passes.json
done
