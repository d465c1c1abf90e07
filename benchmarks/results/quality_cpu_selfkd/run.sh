#!/bin/bash
# How these results were made (from a folder holding the prepared corpus `bin` and the 9000-update
# quality study `v9k`, benchmarks/results/quality_cpu_9k). One thread per training.
set -e
D=../shared/data/libreoffice-de-en
# 1. Self-distillation: janus-light@9000's AR beam 5 over the train sources (real valid/test kept).
janus distill --data bin --checkpoint v9k/janus-light/averaged --destdir bin-kd9 --keep-valid --threads 1 --beam-size 5
# 2. janus-light continued from update 9000 to 10500: on bin-kd9 (janus-light-kd) and, as the control,
#    on the real targets (janus-light); the schedule and optimizer continue (resume).
for v in janus-light janus-light-kd; do
  mkdir -p v10k/$v
  cp -r v9k/janus-light/checkpoint_00009000 v9k/janus-light/latest.json v9k/janus-light/train.jsonl v10k/$v/
done
Q="python benchmarks/quality.py --data bin --distilled-data bin-kd9 --out v10k --preset small --steps 10500"
OMP_NUM_THREADS=1 $Q --variants janus-light --train-only --threads 1 &
OMP_NUM_THREADS=1 $Q --variants janus-light-kd --train-only --threads 1
wait
# 3. Both scored on the 1000 test pairs (real references).
$Q --variants janus-light,janus-light-kd --test-prefix $D/test --threads 2
