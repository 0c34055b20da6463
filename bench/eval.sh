#!/usr/bin/env bash
# Zero-shot classification of MobileCLIP2-S0 on an image folder: `dfndr eval` vs clip_benchmark
# (OpenCLIP model, torchvision ImageFolder + DataLoader, clip_benchmark's evaluate), same
# weights, same images, OpenAI's 80 ImageNet templates, same threads, in alternating rounds.
# Prints each side's seconds (classifier + images, model loading excluded), the ratio, each
# side's peak resident memory, and both sides' metrics (they must agree).
#
# Usage: bench/eval.sh [--rounds R] [--classes C] [--per-class N] [--batch B] [--threads T]
#   defaults: 2 rounds, 10 classes x 40 images, batch 64, threads = nproc. The reference
#   creates the random weights and the image folder under ${BENCH_DIR:-/tmp/dfndr-bench} on
#   first use. PYTHON defaults to python3 with torch, torchvision, open_clip, clip_benchmark
#   (--no-deps), scikit-learn, tqdm and numpy < 2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=2
CLASSES=10
PER_CLASS=40
BATCH=64
THREADS=$(nproc)
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --classes) CLASSES=$2; shift 2 ;;
        --per-class) PER_CLASS=$2; shift 2 ;;
        --batch) BATCH=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
DIR=${BENCH_DIR:-/tmp/dfndr-bench}
mkdir -p "$DIR"
WEIGHTS="$DIR/mobileclip2_s0.eval-random.safetensors"
DATA="$DIR/eval-folder-${CLASSES}x${PER_CLASS}"
cargo build --release -q -p dfndr
results=()
for round in $(seq "$ROUNDS"); do
    ref=$(OMP_NUM_THREADS=$THREADS /usr/bin/time -f '%M' -o "$DIR/ref.mem" "$PYTHON" \
          bench/eval_reference.py --weights "$WEIGHTS" --data "$DATA" --classes "$CLASSES" \
          --per-class "$PER_CLASS" --batch "$BATCH" --threads "$THREADS" --workers "$THREADS" 2>/dev/null)
    ours=$(RAYON_NUM_THREADS=$THREADS /usr/bin/time -f '%M' -o "$DIR/ours.mem" \
           ./target/release/dfndr eval --no-progress --model MobileCLIP2-S0 --weights "$WEIGHTS" \
           --data "$DATA" --batch-size "$BATCH" 2>/dev/null)
    echo "round $round: dfndr $ours" >&2
    echo "round $round: clip_benchmark $ref" >&2
    results+=("$ours" "$ref" "$(cat "$DIR/ours.mem")" "$(cat "$DIR/ref.mem")")
done
"$PYTHON" - "${results[@]}" <<'PY'
import json, statistics, sys
a = sys.argv[1:]
rounds = [a[i:i + 4] for i in range(0, len(a), 4)]
ours = [json.loads(r[0]) for r in rounds]
ref = [json.loads(r[1]) for r in rounds]
o = statistics.median(x["seconds"] for x in ours)
r = statistics.median(x["seconds"] for x in ref)
n = ours[0]["samples"]
print(f"seconds     dfndr {o:8.2f}   clip_benchmark {r:8.2f}   speed ratio {r / o:.2f}x   ({n} images)")
mo = max(int(x[2]) for x in rounds) / 1024
mr = max(int(x[3]) for x in rounds) / 1024
print(f"peak RSS    dfndr {mo:8.0f} MiB   clip_benchmark {mr:8.0f} MiB   ratio {mo / mr:.2f}")
for k in ["acc1", "acc5", "mean_per_class_recall"]:
    print(f"{k:22s} dfndr {ours[0]['metrics'][k]:.6f}   clip_benchmark {ref[0][k]:.6f}")
PY
