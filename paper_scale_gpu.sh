#!/usr/bin/env bash
# The paper-scale training run for a GPU machine: one command, its own time budget, partial progress kept.
#
#     OUT=/some/folder bash paper_scale_gpu.sh [MINUTES]      # MINUTES: wall budget of the whole run (default 9)
#
# 1. a --quick --device cuda smoke run of main.py and test_amplification.py (a CUDA-only bug costs seconds);
# 2. the 8 paper cells (seed 42) with --time-budget, unfinished cells saving resume states;
# 3. if all 8 finished and time is left: seeds 0-4 of the 8 cells, into checkpoints/seeds/seed_S;
# 4. bench.py on the GPU; 5. whatever exists is archived under $OUT in 15 MB pieces (the device tool's
#    file limit): paper_scale.tgz.part-* (checkpoints, resume states, bench, log) and seeds.tgz.part-*; cat, untar. No `set -e`: step 5 always runs.
# Rehearse on a CPU: OUT=/tmp/o DEVICE=cpu QUICK=--quick bash paper_scale_gpu.sh 1
export PYTHONUNBUFFERED=1
MINUTES=${1:-9}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
W=$(mktemp -d)
LOG=$OUT/log.txt
START=$(date +%s)
minutes_until() { awk -v s="$START" -v at="$1" -v now="$(date +%s)" 'BEGIN { m = (s + 60 * at - now) / 60; print (m > 0.05 ? m : 0.05) }'; }
say() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print('torch', torch.__version__)"; } >>"$LOG" 2>&1
say "smoke: main.py and test_amplification.py --quick --device $DEVICE"
if timeout 180 python3 main.py --quick --device "$DEVICE" --jobs 2 --ckpt-dir "$W/quick" --out "$W/quick_results" >>"$LOG" 2>&1 &&
   timeout 60 python3 test_amplification.py --quick --device "$DEVICE" --ckpt-dir "$W/quick" --out "$W/quick_results" --samples 4 >>"$LOG" 2>&1; then
    say "smoke passed"
    # The training phases end by themselves (--time-budget); `timeout` is only a backstop 1 minute later.
    TRAIN_END=$(awk -v m="$MINUTES" 'BEGIN { print m - 1.6 }')
    SEEDS_END=$(awk -v m="$MINUTES" 'BEGIN { print m - 1.1 }')
    say "training the 8 paper cells (budget $(minutes_until "$TRAIN_END") min)"
    timeout "${MINUTES}m" python3 train.py $QUICK --device "$DEVICE" --jobs 8 --resume --ckpt-dir "$W/checkpoints" \
        --time-budget "$(minutes_until "$TRAIN_END")" >>"$LOG" 2>&1
    say "train.py exit $?: $(ls "$W"/checkpoints/*.pt 2>/dev/null | wc -l) of 8 cells done"
    if [ "$(ls "$W"/checkpoints/*.pt 2>/dev/null | wc -l)" = 8 ]; then
        say "training seeds 0-4 (budget $(minutes_until "$SEEDS_END") min)"
        timeout "${MINUTES}m" python3 train.py $QUICK --device "$DEVICE" --jobs 8 --resume --ckpt-dir "$W/checkpoints" \
            --seeds 0 1 2 3 4 --time-budget "$(minutes_until "$SEEDS_END")" >>"$LOG" 2>&1
        say "seeds: exit $?, $(find "$W/checkpoints/seeds" -name '*.pt' | wc -l) of 40 cells done"
    fi
    say "bench"
    timeout 50 python3 bench.py $QUICK --device "$DEVICE" --ckpt-dir "$W/checkpoints" --out "$W/results" >>"$LOG" 2>&1
    say "bench exit $?"
else
    say "SMOKE FAILED: nothing trained"
fi
cp "$LOG" "$W/log.txt"
tar czf - -C "$W" --exclude=checkpoints/seeds checkpoints results log.txt 2>>"$LOG" | split -b 15M - "$OUT/paper_scale.tgz.part-"
[ -d "$W/checkpoints/seeds" ] && tar czf - -C "$W/checkpoints" seeds | split -b 15M - "$OUT/seeds.tgz.part-"
say "archived: $(ls "$OUT" | tr '\n' ' ')"
