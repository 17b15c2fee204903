#!/bin/bash
# LQ-LoRA (Fisher) vs QLoRA vs GPTQ-LoRA after a short fine-tune on Gemma 3 270M, one method after another on one
# niced single-thread worker; every run is saved in its method's part, so re-running this script resumes.
# Run from the repository root: nohup bash bench/results/gemma3-270m/equal_bits/run.sh &
set -u
OUT=bench/results/gemma3-270m/equal_bits
OMP_NUM_THREADS=1 nice -n 5 python3 bench/finetune_equal_bits.py --out $OUT \
    --methods qlora lq-fisher-3.0 gptq-int4-g32 lq-fisher-2.75 gptq-int3-g64 --lrs 2.5e-4 5e-4 --grow-to 1e-3 \
    --reuse-qlora bench/results/gemma3-270m/paper/finetune_quality_paper.qlora.json --verify-lr 5e-4 "$@"
