#!/usr/bin/env bash
# dfndr on an NVIDIA GPU against PyTorch/OpenCLIP on the same GPU, in one run, one table:
#   - ViT-L-14 teacher images/s at batch 256 (dfndr bf16 vs OpenCLIP eager bf16 autocast, the
#     same random weights written by OpenCLIP on the machine) and the share of the dense bf16
#     peak (790 TFLOP/s on an H200; 162 GFLOP per image);
#   - CoCa ViT-L/14 captions/s (dfndr's cached decoder vs the loop OpenCLIP's generate() runs,
#     called once per caption as RayGen does);
#   - end-to-end `dfndr reinforce` samples/s with two ViT-L-14 teachers, the CoCa captioner
#     and 2 augmentations over the demo shards repeated;
#   - cosine similarity of dfndr's GPU image embeddings to OpenCLIP's (float32 and bf16).
#
# Needs only the binaries of `make cuda` (dfndr, teachers_bench, captioner_bench) and a Python
# with PyTorch; open-clip-torch 3.3.0 and the pure-Python packages it needs that the machine
# lacks are installed from wheels in $WHEELS (made by `make gpu-wheels`) into $WORK, without
# network. Finishes in a few minutes on an H200.
#
# Usage: bench/gpu/run.sh [BIN_DIR | KIT.tar.xz]   (default target/cuda/release)
#   A kit (`make gpu-kit`: binaries and wheels, ~32 MB) is unpacked under WORK first.
#   PYTHON (python3), WORK (/tmp/dfndr-gpu), WHEELS (target/gpu-wheels), DEVICE (cuda:0),
#   SAMPLES (reinforce samples, 1200), CAPTION_IMAGES (images captioned, 32).
#   SMOKE=1 checks the script itself on a CPU with small models (ViT-B-32, coca_ViT-B-32).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/cuda/release}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/dfndr-gpu}
WHEELS=${WHEELS:-target/gpu-wheels}
DEVICE=${DEVICE:-cuda:0}
SAMPLES=${SAMPLES:-1200}
CAPTION_IMAGES=${CAPTION_IMAGES:-32}
TEACHER=ViT-L-14 COCA=coca_ViT-L-14 BATCH=256 PRECISION=bf16 ITERS=5
if [ "${SMOKE:-0}" = 1 ]; then
    TEACHER=ViT-B-32 COCA=coca_ViT-B-32 BATCH=4 ITERS=1 DEVICE=${DEVICE/cuda:0/cpu}
    SAMPLES=48 CAPTION_IMAGES=2
fi
mkdir -p "$WORK"
if [ -f "$BIN" ]; then
    tar xJf "$BIN" -C "$WORK"
    BIN="$WORK/gpu-kit" WHEELS="$WORK/gpu-kit/wheels"
fi
R="$WORK/results"
rm -rf "$R" && mkdir -p "$R"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)" >&2; }

step "python environment"
if ! "$PYTHON" -c 'import open_clip' 2>/dev/null; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no open_clip and no wheels in $WHEELS" >&2; exit 2; }
    "$PYTHON" -c 'import torchvision' || { echo "open_clip needs torchvision" >&2; exit 2; }
    "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" \
        --target "$WORK/site" open_clip_torch==3.3.0 timm==1.0.31 ftfy wcwidth
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c 'import torch, open_clip; print("torch", torch.__version__, "open_clip", open_clip.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))' >&2
[ "${SMOKE:-0}" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >&2 || true

step "teacher $TEACHER: OpenCLIP (writes the weights and images)"
"$PYTHON" bench/gpu/reference.py teacher --model "$TEACHER" --batch "$BATCH" --iters "$ITERS" \
    --device "$DEVICE" --weights "$WORK/teacher.safetensors" --images "$WORK/images.safetensors" \
    --out "$WORK/teacher_ref_emb.safetensors" | tee "$R/teacher_ref.json"

step "teacher $TEACHER: dfndr"
"$BIN/teachers_bench" --model "$TEACHER" --batch "$BATCH" --text-batch "$BATCH" --iters "$ITERS" \
    --device "$DEVICE" --precision "$PRECISION" --weights "$WORK/teacher.safetensors" \
    --images "$WORK/images.safetensors" --out "$WORK/teacher_ours_emb.safetensors" \
    | tee "$R/teacher_ours.json"
"$PYTHON" bench/gpu/reference.py compare --ours "$WORK/teacher_ours_emb.safetensors" \
    --ref "$WORK/teacher_ref_emb.safetensors" | tee "$R/compare.json"

step "captioner $COCA: OpenCLIP (writes the weights and images)"
"$PYTHON" bench/gpu/reference.py coca --model "$COCA" --batch "$CAPTION_IMAGES" --captions 5 \
    --device "$DEVICE" --weights "$WORK/coca.safetensors" --images "$WORK/coca_images.safetensors" \
    | tee "$R/coca_ref.json"

step "captioner $COCA: dfndr"
"$BIN/captioner_bench" --model "$COCA" --batch "$CAPTION_IMAGES" --captions 5 --device "$DEVICE" \
    --precision "$PRECISION" --weights "$WORK/coca.safetensors" --images "$WORK/coca_images.safetensors" \
    | tee "$R/coca_ours.json"

step "reinforce: 2 x $TEACHER, $COCA, K = 2, about $SAMPLES samples"
IN="$WORK/in-$SAMPLES"
bench/repeat_demo.sh "$IN" "$SAMPLES"
cat > "$WORK/reinforce.toml" <<EOF
[job]
input = ["$IN/*.tar"]
batch_size = 256
[augment]
num_augmentations = 2
[[teachers]]
name = "dfn"
arch = "$TEACHER-quickgelu"
weights = "$WORK/teacher.safetensors"
[[teachers]]
name = "datacomp"
arch = "$TEACHER"
weights = "$WORK/teacher.safetensors"
[embed]
batch_size = 256
device = "$DEVICE"
precision = "$PRECISION"
[[captioners]]
tag = "coca"
arch = "$COCA"
weights = "$WORK/coca.safetensors"
num_captions = 5
[caption]
batch_size = 64
device = "$DEVICE"
precision = "$PRECISION"
EOF
rm -rf "$WORK/out"
start=$(date +%s.%N)
"$BIN/dfndr" reinforce --no-progress --log warn --config "$WORK/reinforce.toml" --output "$WORK/out"
end=$(date +%s.%N)
"$BIN/dfndr" status --json "$WORK/out" > "$WORK/status.json"
"$PYTHON" - "$WORK/status.json" "$start" "$end" <<'PY' | tee "$R/reinforce.json"
import json, sys
status = json.load(open(sys.argv[1]))
seconds = float(sys.argv[3]) - float(sys.argv[2])
print(json.dumps({"samples": status["rows"], "seconds": seconds,
                  "samples_per_s": status["rows"] / seconds,
                  "stage_busy_share": status.get("stage_busy_share", {})}))
PY

step "table"
"$PYTHON" bench/gpu/reference.py table "$R"/teacher_ref.json "$R"/teacher_ours.json \
    "$R"/coca_ref.json "$R"/coca_ours.json "$R"/compare.json "$R"/reinforce.json
