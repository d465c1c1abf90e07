#!/bin/bash
# BLEU drift of bf16 / int8 against fp32 on the shipped model, all 1000 test pairs. (stage2/: the same for the
# model shipped before, MODEL.md's stage 2; its run had no --rerank --dedup row.)
set -eu  # a missing janus or sacrebleu stops here, before any result file is rewritten
cd "$(dirname "$0")/../../.."
D=${1:-../shared/data/libreoffice-de-en}  # DTYPES="int8" bash run.sh: some precisions only
O=benchmarks/results/precision_bleu_builtin_cpu
mkdir -p $O/hyps  # hypotheses, not committed
for dt in ${DTYPES:-float32 bfloat16 int8}; do
  janus evaluate --checkpoint builtin:de-en --src $D/test.de --ref $D/test.en --threads 2 --no-progress \
    --dtype $dt --modes ar,nar,spec --output-json $O/$dt.beam5_nar10l3_spec.json --hyp-prefix $O/hyps/$dt.default
  janus evaluate --checkpoint builtin:de-en --src $D/test.de --ref $D/test.en --threads 2 --no-progress \
    --dtype $dt --modes ar --beam-size 1 --output-json $O/$dt.greedy.json --hyp-prefix $O/hyps/$dt.greedy
  janus evaluate --checkpoint builtin:de-en --src $D/test.de --ref $D/test.en --threads 2 --no-progress \
    --dtype $dt --modes nar --iterations 4 --length-beam 1 --output-json $O/$dt.nar4l1.json --hyp-prefix $O/hyps/$dt.nar4l1
  janus evaluate --checkpoint builtin:de-en --src $D/test.de --ref $D/test.en --threads 2 --no-progress \
    --dtype $dt --modes nar --rerank --dedup --output-json $O/$dt.nar10l3_rerank_dedup.json \
    --hyp-prefix $O/hyps/$dt.rerank_dedup
done

python $O/summarize.py   # summary.json, table.md
sacrebleu $D/test.en -i $O/hyps/float32.default.nar $O/hyps/int8.default.nar -m bleu --paired-bs -f text \
  > $O/paired_bootstrap_nar_t10l3_int8.txt
sacrebleu $D/test.en -i $O/hyps/float32.rerank_dedup.nar $O/hyps/bfloat16.rerank_dedup.nar -m bleu --paired-bs \
  -f text > $O/paired_bootstrap_rerank_dedup_bf16.txt
