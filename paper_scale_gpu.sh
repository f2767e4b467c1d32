#!/usr/bin/env bash
# The paper-scale training run for a GPU machine: one command, its own time budget, partial progress kept.
#
#     OUT=/some/folder bash paper_scale_gpu.sh [MINUTES]      # MINUTES: wall budget of the whole run (default 9)
#
# Optional: SEEDS="3" (the seeds to train, default "0 1 2 3 4": leave out those the CPU is training; SEEDS="5" adds a
# run to the seed study, whose tables take any number), GROUP=yes (train the cells of a head count in one vmapped
# step, after its own smoke run; default: one cell per process, the measured path), JOBS (cells trained at once, default
# 8: on the H200 eight processes gave 2.8 times one's throughput), BENCH_SECONDS=0 (no bench: every second to the
# training), PYTHON (default python3).
# 1. a --quick --device cuda smoke run of main.py and test_amplification.py (a CUDA-only bug costs seconds), and,
#    with GROUP=yes, of train.py's grouped path;
# 2. the seed study: the 8 cells of each seed in $SEEDS with --resume and --time-budget, over a copy of the repo's
#    finished checkpoints/seeds (skipped); one cell per process (--jobs 8), or grouped if asked and its smoke run
#    passed; an unfinished cell starts afresh here (a CPU resume state is not carried over: one device per cell);
# 3. bench.py on the GPU; 4. what step 2 wrote (new checkpoints, resume states) is archived under $OUT in 15 MB
#    pieces (small enough for any file-transfer limit): seeds.tgz.part-*, and bench + log in run.tgz.part-*; cat, untar into
#    checkpoints/seeds (delete the CPU resume state of a cell that arrives finished). No `set -e`: step 4 always runs.
# Rehearse on a CPU: OUT=/tmp/o DEVICE=cpu QUICK=--quick BENCH_SECONDS=240 bash paper_scale_gpu.sh 3 (JOBS=2: faster)
export PYTHONUNBUFFERED=1
MINUTES=${1:-9}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
SEEDS=${SEEDS:-0 1 2 3 4}
GROUP=${GROUP:-no}
JOBS=${JOBS:-8}
BENCH_SECONDS=${BENCH_SECONDS:-50}
PYTHON=${PYTHON:-python3}  # the interpreter (a virtual environment's, say); the tests pass their own
W=$(mktemp -d)
LOG=$OUT/log.txt
START=$(date +%s)
minutes_until() { awk -v s="$START" -v at="$1" -v now="$(date +%s)" 'BEGIN { m = (s + 60 * at - now) / 60; print (m > 0.05 ? m : 0.05) }'; }
say() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }
cells_done() {  # "k of n": the checkpoints of $SEEDS's cells (8 a seed) in the working copy
    local k=0 s
    for s in $SEEDS; do k=$(( k + $(find "$W/checkpoints/seeds/seed_$s" -name '*.pt' 2>/dev/null | wc -l) )); done
    echo "$k of $(( 8 * $(echo $SEEDS | wc -w) ))"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PYTHON" -c "import torch; print('torch', torch.__version__)"; } >>"$LOG" 2>&1
say "smoke: main.py and test_amplification.py --quick --device $DEVICE"
if timeout 180 "$PYTHON" main.py --quick --device "$DEVICE" --jobs 2 --ckpt-dir "$W/quick" --out "$W/quick_results" >>"$LOG" 2>&1 &&
   timeout 60 "$PYTHON" test_amplification.py --quick --device "$DEVICE" --ckpt-dir "$W/quick" --out "$W/quick_results" --samples 4 >>"$LOG" 2>&1; then
    say "smoke passed"
    if [ "$GROUP" != yes ]; then
        GROUP=no; say "one cell per process (GROUP=yes for the grouped path)"
    elif timeout 120 "$PYTHON" train.py --quick --device "$DEVICE" --group yes --seeds 0 1 --heads 4 8 --ckpt-dir "$W/quick_group" >>"$LOG" 2>&1; then
        say "grouped smoke passed"
    else
        GROUP=no; say "GROUPED SMOKE FAILED: one cell per process"
    fi
    # Training ends by itself (--time-budget); `timeout` is only a backstop 1 minute later.
    MARGIN=$([ "$BENCH_SECONDS" = 0 ] && echo 0.3 || echo 1.1)  # minutes kept for the bench and the archive
    SEEDS_END=$(awk -v m="$MINUTES" -v r="$MARGIN" 'BEGIN { print m - r }')
    mkdir -p "$W/checkpoints/seeds"
    if [ -z "$QUICK" ]; then cp -r checkpoints/seeds/. "$W/checkpoints/seeds/"; find "$W/checkpoints" -name '*.resume' -delete; fi
    touch "$W/started"
    say "training seeds $SEEDS, $(cells_done) cells done before (budget $(minutes_until "$SEEDS_END") min)"
    timeout "${MINUTES}m" "$PYTHON" train.py $QUICK --device "$DEVICE" --group "$GROUP" --jobs "$JOBS" --resume --ckpt-dir "$W/checkpoints" \
        --seeds $SEEDS --time-budget "$(minutes_until "$SEEDS_END")" >>"$LOG" 2>&1
    say "seeds: exit $?, $(cells_done) cells done, $(find "$W/checkpoints/seeds" -name '*.pt' -newer "$W/started" | wc -l) new"
    if [ "$BENCH_SECONDS" != 0 ]; then
        say "bench"
        timeout "$BENCH_SECONDS" "$PYTHON" bench.py $QUICK --device "$DEVICE" --out "$W/results" >>"$LOG" 2>&1
        say "bench exit $?"
    fi
else
    say "SMOKE FAILED: nothing trained"
fi
cp "$LOG" "$W/log.txt"; mkdir -p "$W/results"  # empty without bench; tar needs it
tar czf - -C "$W" results log.txt 2>>"$LOG" | split -b 15M - "$OUT/run.tgz.part-"
(cd "$W/checkpoints" 2>/dev/null && find seeds -type f -newer "$W/started" | tar czf - -T - 2>>"$LOG" | split -b 15M - "$OUT/seeds.tgz.part-")
say "archived: $(ls "$OUT" | tr '\n' ' ')"
