#!/bin/bash
# After run_more.sh: kd2-skl resumed from update 7500 (the same command; it ran on to 9600 before it was stopped)
# and scored at 9000 (checkpoints 8250-9000); SKL(P_AR, P_NAR) at 3.0 tried from its update 7500 (kd2-skl3: the
# kd2-skl command with --init-from kd2-skl/checkpoint_00007500 --warmup-steps 200 --w-skl-ar-nar 3.0, stopped
# after 1750 updates and scored there). Then, from kd2-skl's checkpoint at update 9000, the same recipe twice,
# side by side on one thread each, differing in the NAR stream's masking only:
#   kd2-uni   uniform masking (m ~ U[1, k], CMLM's: every share of the target masked, up to all of it, as in
#             mask-predict's first pass)
#   kd2-span  span masking at ratio 0.7 (JANUS.md's default, the masking kd2-skl trained with)
# Both from a fresh optimizer, lr 3e-4 after 200 warm-up updates, stopped by hand after update 4000 (the same
# commands resume). From the folder of run.sh.
set -e
R=${R:-janus-repo}
D=${D:-../shared/data/libreoffice-de-en}
cp -r kd2-skl/checkpoint_00009000 kd2-skl-at-9000  # kd2-skl keeps its last 8 checkpoints only
R=$R D=$D python score_run.py kd2-skl 1000          # kd2-skl-at-9000.scores.json
COMMON="--data bin-kd2 --preset small --objective janus --max-tokens 2048 --max-steps 30000 --threads 1
  --validate-interval 500 --save-interval 250 --keep-last 8 --init-from kd2-skl-at-9000 --lr 3e-4
  --warmup-steps 200 --seed 4 --skl-stop-grad ar --w-nar 1.0 --w-length 0.1 --w-aux 0.05 --w-skl-ar-nar 1.0
  --w-skl-ar-aux 0.3 --w-skl-nar-aux 0.1"
janus train $COMMON --save-dir kd2-uni --masking uniform &
janus train $COMMON --save-dir kd2-span
wait
# Scored at the same updates (checkpoints STEP - 750 .. STEP averaged), while they trained:
for RUN in kd2-uni kd2-span; do
  for STEP in 2000 4000; do R=$R D=$D python score_run.py $RUN 1000 --at $STEP; done  # RUN-at-STEP.scores.json
done
# and the NAR outputs at 4000 compared (uni_vs_span_at_4000.paired_bs.json): sacrebleu $D/test.en -i SPAN UNI
# --paired-bs -m bleu, SPAN and UNI the two models' NAR T=10 l=3 outputs of the test sources (plain, and with
# --length-weight 1 --dedup)
