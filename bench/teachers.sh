#!/usr/bin/env bash
# OpenCLIP tower throughput on CPU: dfndr's candle towers vs OpenCLIP (PyTorch) on the same
# machine, the same architecture with random weights, the same inputs and the same thread
# count, fp32; prints images/s and texts/s of both and the ratios.
#
# Usage: bench/teachers.sh [--model NAME] [--batch B] [--text-batch N] [--iters N]
#                          [--rounds R] [--threads T] [--profile]
#   defaults: ViT-L-14-quickgelu, image batch 8, text batch 64 (the demo captions repeated),
#   5 timed calls after 1 warm-up (the median call counts), 3 rounds, threads = nproc.
#   Each round runs dfndr, then OpenCLIP; the ratio of each round is printed and the median
#   ratio closes the table (this shared machine drifts by 10% or more within minutes, so
#   the sides alternate rather than run one after the other).
#   --profile adds an op-by-op breakdown of one image-batch forward from each side (stderr).
#   PYTHON defaults to python3 with torch + open_clip.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=ViT-L-14-quickgelu
BATCH=8
TEXT_BATCH=64
ITERS=5
ROUNDS=3
THREADS=$(nproc)
PROFILE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --batch) BATCH=$2; shift 2 ;;
        --text-batch) TEXT_BATCH=$2; shift 2 ;;
        --iters) ITERS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --profile) PROFILE=(--profile); shift ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
args=(--model "$MODEL" --batch "$BATCH" --text-batch "$TEXT_BATCH" --iters "$ITERS" --demo assets/demo
      ${PROFILE[@]+"${PROFILE[@]}"})
cargo build --release -q -p dfndr-bench --bin teachers_bench
results=()
for round in $(seq "$ROUNDS"); do
    # candle: gemm's rayon pool and the element-wise pool; torch: intra-op (OpenMP / MKL) threads.
    ours=$(RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS ./target/release/teachers_bench "${args[@]}")
    ref=$(OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
          "$PYTHON" bench/teachers_reference.py "${args[@]}" --threads "$THREADS")
    echo "round $round: $ours"
    echo "round $round: $ref"
    results+=("$ours" "$ref")
done
"$PYTHON" - "${results[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(r) for r in sys.argv[1:]]
pairs = list(zip(runs[0::2], runs[1::2]))
ours, ref = pairs[0]
print(f"\n{ours['model']}, fp32, random weights; threads {ours['threads']} vs {ref['threads']}, "
      f"image batch {ours['batch']}, text batch {ours['text_batch']} (demo captions), "
      f"median of {ours['iters']} calls per round, {len(pairs)} rounds")
if any(o["token_sum"] != r["token_sum"] for o, r in pairs):
    print("warning: the token batches differ between the two sides")
print(f"{'round':>6} {'dfndr img/s':>12} {'torch img/s':>12} {'ratio':>7}"
      f" {'dfndr txt/s':>12} {'torch txt/s':>12} {'ratio':>7}")
img_ratios, txt_ratios = [], []
for i, (o, r) in enumerate(pairs, 1):
    ri, rt = o["images_per_s"] / r["images_per_s"], o["texts_per_s"] / r["texts_per_s"]
    img_ratios.append(ri)
    txt_ratios.append(rt)
    print(f"{i:>6} {o['images_per_s']:12.3f} {r['images_per_s']:12.3f} {ri:6.2f}x"
          f" {o['texts_per_s']:12.2f} {r['texts_per_s']:12.2f} {rt:6.2f}x")
gi = ours["image_gflop"]
print(f"median ratio: images {statistics.median(img_ratios):.2f}x, "
      f"texts {statistics.median(txt_ratios):.2f}x")
print(f"image tower GFLOP/s (median round): dfndr "
      f"{statistics.median(o['images_per_s'] for o, _ in pairs) * gi:.1f}, OpenCLIP "
      f"{statistics.median(r['images_per_s'] for _, r in pairs) * gi:.1f} "
      f"({gi:.1f} GFLOP per image)")
print("texts: OpenCLIP runs all 77 positions of every caption; dfndr stops each caption at its "
      "end-of-text token, which gives the same embedding (causal mask)")
PY
