#!/usr/bin/env bash
# CoCa captioning on CPU: dfndr (image encoded once per image, KV-cached decoding) vs OpenCLIP
# generate() called the way RayGen calls it (once per caption), same random coca_ViT-L-14
# weights, same images, same thread count, 5 top-p (0.9) captions of length 30 per image;
# prints captions/s of both, the ratio, the batch-1 seconds per image and the encode/decode
# split.
#
# Usage: bench/captioner.sh [--batch B] [--captions N] [--threads T]
#   defaults: batch 4, 5 captions, threads = nproc. The reference saves its random weights
#   (2.5 GB) and images under ${BENCH_DIR:-/tmp/dfndr-bench} on first use.
#   PYTHON defaults to python3 with torch + open_clip + transformers<4.57 + safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=4
CAPTIONS=5
THREADS=$(nproc)
while [ $# -gt 0 ]; do
    case "$1" in
        --batch) BATCH=$2; shift 2 ;;
        --captions) CAPTIONS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
DIR=${BENCH_DIR:-/tmp/dfndr-bench}
mkdir -p "$DIR"
files=(--weights "$DIR/coca_ViT-L-14.random.safetensors" --images "$DIR/coca_images.safetensors")
cargo build --release -q -p dfndr-bench --bin captioner_bench
# The reference runs first: it creates the shared weights and images.
ref=$(OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS "$PYTHON" bench/captioner_reference.py \
      "${files[@]}" --batch "$BATCH" --captions "$CAPTIONS" --threads "$THREADS")
ours=$(RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS ./target/release/captioner_bench \
       "${files[@]}" --batch "$BATCH" --captions "$CAPTIONS")
echo "$ours"
echo "$ref"
"$PYTHON" - "$ours" "$ref" <<'PY'
import json, sys
o, r = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"captions/s        dfndr {o['captions_per_s']:8.3f}   OpenCLIP {r['captions_per_s']:8.3f}   ratio {o['captions_per_s'] / r['captions_per_s']:.1f}x")
print(f"s/image, batch 1  dfndr {o['batch1_seconds_per_image']:8.2f}   OpenCLIP {r['batch1_seconds_per_image']:8.2f}   ratio {r['batch1_seconds_per_image'] / o['batch1_seconds_per_image']:.1f}x")
for name, x in (("dfndr", o), ("OpenCLIP", r)):
    t = x["encode_seconds"] + x["decode_seconds"]
    print(f"{name:>9} split: encode {x['encode_seconds']:.2f} s ({100 * x['encode_seconds'] / t:.0f}%), decode {x['decode_seconds']:.2f} s ({100 * x['decode_seconds'] / t:.0f}%)")
PY
