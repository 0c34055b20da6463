#!/usr/bin/env bash
# OpenCLIP tower throughput on CPU: dfndr's candle towers vs OpenCLIP (PyTorch) on the same
# machine, the same architecture with random weights, the same batch shapes and the same thread
# count, fp32, in one run; prints images/s and texts/s of both and the ratios.
#
# Usage: bench/teachers.sh [--model NAME] [--batch B] [--text-batch N] [--iters N]
#                          [--threads T] [--profile]
#   defaults: ViT-L-14-quickgelu, image batch 8, text batch 64 (demo captions repeated),
#   3 timed calls after 1 warm-up, threads = nproc. --profile adds an op-by-op breakdown of
#   one image-batch forward from each side (stderr).
#   PYTHON defaults to python3 with torch + open_clip.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=ViT-L-14-quickgelu
BATCH=8
TEXT_BATCH=64
ITERS=3
THREADS=$(nproc)
PROFILE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --batch) BATCH=$2; shift 2 ;;
        --text-batch) TEXT_BATCH=$2; shift 2 ;;
        --iters) ITERS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --profile) PROFILE=(--profile); shift ;;
        -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
args=(--model "$MODEL" --batch "$BATCH" --text-batch "$TEXT_BATCH" --iters "$ITERS" --demo assets/demo
      ${PROFILE[@]+"${PROFILE[@]}"})
cargo build --release -q -p dfndr-bench --bin teachers_bench
# candle: gemm's rayon pool and the element-wise pool; torch: intra-op (OpenMP / MKL) threads.
ours=$(RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS ./target/release/teachers_bench "${args[@]}")
ref=$(OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
      "$PYTHON" bench/teachers_reference.py "${args[@]}" --threads "$THREADS")
echo "$ours"
echo "$ref"
"$PYTHON" - "$ours" "$ref" <<'PY'
import json, sys
ours, ref = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{ours['model']}, fp32, random weights; threads {ours['threads']} vs {ref['threads']}, "
      f"image batch {ours['batch']}, text batch {ours['text_batch']}, {ours['iters']} timed calls")
if ours["token_sum"] != ref["token_sum"]:
    print(f"warning: the token batches differ (id sums {ours['token_sum']} vs {ref['token_sum']})")
print(f"{'':>14} {'dfndr (candle)':>15} {'OpenCLIP (torch)':>17} {'ratio':>7}")
for key, label, gflop in [("images_per_s", "images/s", "image_gflop"), ("texts_per_s", "texts/s", "text_gflop")]:
    a, b = ours[key], ref[key]
    print(f"{label:>14} {a:15.2f} {b:17.2f} {a / b:6.2f}x")
    print(f"{'  GFLOP/s':>14} {a * ours[gflop]:15.1f} {b * ours[gflop]:17.1f}")
PY
