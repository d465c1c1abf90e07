#!/bin/bash
# After run_masking.sh: kd2-uni resumed from its update 6250 (the same command) to 10500, scored at 6000, 8000,
# 9500 and 10500;
# from its checkpoint at 6250, three runs resumed (the same optimizer state and schedule, lr 5.3e-5 there) with
# error exposure, one thread each, the first beside kd2-uni and the other two side by side:
#   kd2-uni-ee    --nar-exposure 0.5                                      (random masked set)
#   kd2-uni-lc5   --nar-exposure 0.5 --nar-exposure-mask least-confident
#   kd2-uni-lc10  --nar-exposure 1.0 --nar-exposure-mask least-confident
# each scored at 8000 (checkpoints 7250 .. 8000 averaged), kd2-uni-lc5 trained on to 9500 and scored there too;
# and the length head of kd2-uni at 8000 examined
# (length_head_fit.py, length_head_fit.json). The runs were stopped and resumed in between (one thread each, a
# resumed run continues the same trajectory); the order below gives the same checkpoints. From the folder of run.sh.
set -e
R=${R:-janus-repo}
D=${D:-../shared/data/libreoffice-de-en}
COMMON="--data bin-kd2 --preset small --objective janus --max-tokens 2048 --max-steps 30000 --threads 1
  --validate-interval 500 --save-interval 250 --keep-last 8 --init-from kd2-skl-at-9000 --lr 3e-4
  --warmup-steps 200 --seed 4 --skl-stop-grad ar --masking uniform --w-nar 1.0 --w-length 0.1 --w-aux 0.05
  --w-skl-ar-nar 1.0 --w-skl-ar-aux 0.3 --w-skl-nar-aux 0.1"
resume_from_6250() {  # a copy of kd2-uni's checkpoint 6250 as the latest of a new folder: resuming continues it
  mkdir -p "$1" && cp -r kd2-uni/checkpoint_00006250 "$1"/
  printf '{"checkpoint": "checkpoint_00006250", "step": 6250}\n' > "$1"/latest.json
}
for RUN in kd2-uni-ee kd2-uni-lc5 kd2-uni-lc10; do resume_from_6250 $RUN; done
janus train $COMMON --save-dir kd2-uni --max-steps 9500 &
janus train $COMMON --save-dir kd2-uni-ee --max-steps 8000 --nar-exposure 0.5
wait
janus train $COMMON --save-dir kd2-uni-lc5 --max-steps 8000 --nar-exposure 0.5 --nar-exposure-mask least-confident &
janus train $COMMON --save-dir kd2-uni-lc10 --max-steps 8000 --nar-exposure 1.0 --nar-exposure-mask least-confident
wait
janus train $COMMON --save-dir kd2-uni-lc5 --max-steps 9500 --nar-exposure 0.5 --nar-exposure-mask least-confident &
janus train $COMMON --save-dir kd2-uni --max-steps 10500
wait
for STEP in 6000 8000 9500 10500; do R=$R D=$D python score_run.py kd2-uni 1000 --at $STEP; done
for RUN in kd2-uni-ee kd2-uni-lc5 kd2-uni-lc10; do R=$R D=$D python score_run.py $RUN 1000 --at 8000; done
R=$R D=$D python score_run.py kd2-uni-lc5 1000 --at 9500
R=$R D=$D python length_head_fit.py kd2-uni/averaged-at-8000 bin-kd2
