#!/bin/bash
# After run.sh: a method whose chosen lr is the lowest of its grid gets the lr one step below it (/2); one whose
# chosen lr is the highest grows one step upward (--grow-to 2x). Resumes each part, then joins them again.
set -u
OUT=bench/results/gemma3-270m/paper
COMMON="--model gemma3-270m --steps 30 --seeds 0 1 2 --lr-seed 1000 --threads 1 --out $OUT"
for m in qalora qahira qlora qbara qahira-authors; do
    f=$OUT/finetune_quality_paper.$m.json
    [ -f "$f" ] || continue
    extra=$(python3 - "$f" "$m" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))["methods"][sys.argv[2]]
grid, best = sorted(e["lrs"]), e["best_lr"]
if abs(best - grid[0]) <= 1e-12 * best:
    print(f"--lrs {grid[0] / 2:g}")
elif abs(best - grid[-1]) <= 1e-12 * best:
    print(f"--lrs {grid[-1]:g} --grow-to {2 * grid[-1]:g}")
PY
)
    [ -n "$extra" ] || continue
    echo "extending $m: $extra"
    OMP_NUM_THREADS=1 nice -n 5 python3 bench/finetune_paper.py $COMMON --resume "$f" --methods "$m" --part "$m" $extra
done
WALL=$(python3 -c "import glob, json; print(sum(json.load(open(f))['wall_s'] for f in glob.glob('$OUT/finetune_quality_paper.*.json')))")
python3 bench/finetune_paper.py --combine $OUT --notes $OUT/NOTES.json --wall-s "$WALL" \
    --wall-note "the five parts one after another on one niced single-thread worker, summed"
