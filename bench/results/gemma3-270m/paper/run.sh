#!/bin/bash
# The paper setting on Gemma 3 270M, one method at a time, each resumable (re-running this script continues a
# part from its JSON). Run from the repository root: nohup bash bench/results/gemma3-270m/paper/run.sh &
set -u
OUT=bench/results/gemma3-270m/paper
COMMON="--model gemma3-270m --steps 30 --seeds 0 1 2 --lr-seed 1000 --threads 1 --out $OUT"
run() {
    m=$1; shift
    f=$OUT/finetune_quality_paper.$m.json
    R=""; [ -f "$f" ] && R="--resume $f"
    OMP_NUM_THREADS=1 nice -n 5 python3 bench/finetune_paper.py $COMMON $R --methods "$m" --part "$m" --lrs "$@"
}
run qalora 4e-3 8e-3 1.6e-2
run qahira 1.6e-2 3.2e-2 6.4e-2
run qlora 5e-4 1e-3 2e-3
run qbara 1e-3 2e-3 4e-3
run qahira-authors 2e-3 4e-3 8e-3
python3 bench/finetune_paper.py --combine $OUT
