#!/usr/bin/env bash
# decode + RandomResizedCrop + RandAugment + normalise: dfndr vs PIL + torchvision on the same
# machine, the same images (the demo images, repeated) in one run; prints the ratios.
#
# Usage: bench/augment.sh [IMAGES]   (PYTHON defaults to python3 with torch + torchvision)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${1:-1000}
PYTHON=${PYTHON:-python3}
cargo build --release -q -p dfndr-bench --bin augment_bench
ours=$(./target/release/augment_bench assets/demo "$IMAGES")
ref=$("$PYTHON" bench/augment_reference.py assets/demo "$IMAGES")
echo "$ours"
echo "$ref"
"$PYTHON" - "$ours" "$ref" <<'PY'
import json, sys
ours, ref = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for k, r, label in [
    ("one_core_images_per_s", "one_core_images_per_s", "one core"),
    ("all_cores_images_per_s", "all_cores_images_per_s", "all cores"),
    ("one_core_whole_decode_images_per_s", "one_core_images_per_s", "one core, whole-image decode"),
]:
    print(f"{label:>28}: dfndr {ours[k]:8.1f} img/s   PIL+torchvision {ref[r]:8.1f} img/s   ratio {ours[k] / ref[r]:.2f}x")
PY
