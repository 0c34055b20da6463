#!/usr/bin/env bash
# MobileCLIP2-S0 training on CPU: dfndr vs OpenCLIP's training step (timm fastvit_mci0 +
# OpenCLIP text tower, Apple's loss, AdamW), same random weights, same in-memory batch at
# 256 px, same threads, in alternating rounds; prints the median samples/s of both, the ratio,
# each side's peak resident memory, and dfndr's split into forward, backward and optimiser.
#
# Usage: bench/train.sh [--batch B] [--rounds R] [--steps N] [--threads T] [--recompute]
#   defaults: batch 32, 3 rounds of 2 timed steps each (after one warm-up step), threads =
#   nproc. --recompute: dfndr with activation recomputation (grad_checkpointing);
#   --ref-checkpointing: OpenCLIP with its --grad-checkpointing (default: its plain step). The reference saves its random weights and the batch under
#   ${BENCH_DIR:-/tmp/dfndr-bench} on first use. PYTHON defaults to python3 with torch,
#   open_clip and safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=32
ROUNDS=3
STEPS=2
THREADS=$(nproc)
OURS_ARGS=()
REF_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --batch) BATCH=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --recompute) OURS_ARGS+=(--recompute); shift ;;
        --ref-checkpointing) REF_ARGS+=(--grad-checkpointing); shift ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
DIR=${BENCH_DIR:-/tmp/dfndr-bench}
mkdir -p "$DIR"
files=(--weights "$DIR/mobileclip2_s0.random.safetensors" --data "$DIR/s0_batch$BATCH.safetensors")
cargo build --release -q -p dfndr-bench --bin train_bench
results=()
for round in $(seq "$ROUNDS"); do
    # The reference runs first in every round: on the first it creates the shared files.
    ref=$(OMP_NUM_THREADS=$THREADS /usr/bin/time -f '%M' -o "$DIR/ref.mem" "$PYTHON" \
          bench/train_reference.py "${files[@]}" --batch "$BATCH" --steps "$STEPS" --threads "$THREADS" "${REF_ARGS[@]}")
    ours=$(RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS /usr/bin/time -f '%M' -o "$DIR/ours.mem" \
           ./target/release/train_bench "${files[@]}" --steps "$STEPS" "${OURS_ARGS[@]}")
    echo "round $round: dfndr $ours" >&2
    echo "round $round: OpenCLIP $ref" >&2
    results+=("$ours" "$ref" "$(cat "$DIR/ours.mem")" "$(cat "$DIR/ref.mem")")
done
"$PYTHON" - "${results[@]}" <<'PY'
import json, statistics, sys
a = sys.argv[1:]
rounds = [a[i:i + 4] for i in range(0, len(a), 4)]
ours = [json.loads(r[0]) for r in rounds]
ref = [json.loads(r[1]) for r in rounds]
o = statistics.median(x["samples_per_s"] for x in ours)
r = statistics.median(x["samples_per_s"] for x in ref)
mo = max(int(x[2]) for x in rounds) / 1024
mr = max(int(x[3]) for x in rounds) / 1024
print(f"samples/s   dfndr {o:8.2f}   OpenCLIP {r:8.2f}   ratio {o / r:.2f}x")
print(f"peak RSS    dfndr {mo:8.0f} MiB   OpenCLIP {mr:8.0f} MiB   ratio {mo / mr:.2f}")
best = min(ours, key=lambda x: abs(x["samples_per_s"] - o))
t = best["forward_seconds"] + best["backward_seconds"] + best["optimizer_seconds"]
print(f"dfndr split: forward+loss {best['forward_seconds']:.2f} s ({100 * best['forward_seconds'] / t:.0f}%), "
      f"backward {best['backward_seconds']:.2f} s ({100 * best['backward_seconds'] / t:.0f}%), "
      f"clip+AdamW {best['optimizer_seconds']:.2f} s ({100 * best['optimizer_seconds'] / t:.0f}%)")
PY
