#!/bin/bash
# The equal-budget control of builtin:de-en (janus-light 10,500 updates + 11,000 self-distilled ones):
# plain `ar` for 21,500 updates at the quality study's settings (small preset, 2048 tokens per update,
# lr 1e-3 after 400 warm-up updates, inverse square root, dropout 0.1, seed 1), one CPU thread, on the
# same prepared folder as rebuild_builtin.sh's (`janus prepare ... --vocab-size 8000`, the shipped
# spm.model copied in). Resumable: the same command continues from the last checkpoint. Then scored
# like the shipped model, on the 1000 test pairs (real references).
set -e
D=${D:-../shared/data/libreoffice-de-en}
R=${R:-janus-repo}
janus train --data bin --save-dir ar21k --preset small --objective ar --max-tokens 2048 \
  --max-steps 21500 --warmup-steps 400 --lr 1e-3 --dropout 0.1 --seed 1 --threads 1 \
  --save-interval 250 --validate-interval 500 --keep-last 4
janus average --save-dir ar21k --last 4 --output ar21k/averaged
python $R/benchmarks/builtin_card.py --model ar21k/averaged --test-prefix $D/test --threads 2 --out ar21k-averaged.scores.json
