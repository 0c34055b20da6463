#!/usr/bin/env bash
# Every MobileCLIP2 student on CPU, dfndr vs OpenCLIP: per variant, the image tower's eval
# forward in images/s (branched, and reparameterised for the FastViT variants), training
# samples/s of a full step (both towers, Apple's loss, AdamW, clipping) and the training runs'
# peak resident memory. Same random weights (written by OpenCLIP, the image trunk re-drawn so
# that its features depend on the image, loaded by dfndr by OpenCLIP's key names), same
# inputs, same threads, in alternating rounds (OpenCLIP, then dfndr); prints medians, ratios
# and one table.
#
# Usage: bench/students.sh [--variants "S0 S2 S3 S4 B L-14"] [--batch B] [--iters N]
#                          [--train-batch B] [--steps N] [--rounds R] [--threads T]
#   defaults: all six variants; forward batch 8, 1 timed call after one warm-up; training
#   batch 4 (S0, S2, B) or 2 (S3, S4, L-14), 1 timed step after one warm-up; 2 rounds;
#   threads = nproc (about 20 minutes for the six on a 2-core VM). Files go to
#   ${BENCH_DIR:-/tmp/dfndr-bench}/students (created on first use, 5.8 GB of weights for the
#   six). PYTHON defaults to python3 with torch, open_clip, timm and safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANTS="S0 S2 S3 S4 B L-14"
BATCH=8
ITERS=1
TRAIN_BATCH=
STEPS=1
ROUNDS=2
THREADS=$(nproc)
while [ $# -gt 0 ]; do
    case "$1" in
        --variants) VARIANTS=$2; shift 2 ;;
        --batch) BATCH=$2; shift 2 ;;
        --iters) ITERS=$2; shift 2 ;;
        --train-batch) TRAIN_BATCH=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
DIR=${BENCH_DIR:-/tmp/dfndr-bench}/students
mkdir -p "$DIR"
cargo build --release -q -p dfndr-bench --bin train_bench
export OMP_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS
RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
# Runs one side (ref | ours) of one measurement (forward | train) and appends a result line
# "VARIANT ROUND SIDE KIND PEAK_KIB JSON".
run() {
    local v=$1 round=$2 side=$3 kind=$4 b=$5 out
    local args=(--model "MobileCLIP2-$v" --weights "$DIR/mobileclip2_${v,,}.random.safetensors"
                --data "$DIR/${v,,}_batch$b.safetensors")
    if [ "$kind" = forward ]; then args+=(--forward --steps "$ITERS"); else args+=(--steps "$STEPS"); fi
    if [ "$side" = ref ]; then
        out=$(/usr/bin/time -f '%M' -o "$DIR/peak" "$PYTHON" bench/train_reference.py "${args[@]}" \
              --batch "$b" --threads "$THREADS" --perturb)
    else
        out=$(/usr/bin/time -f '%M' -o "$DIR/peak" ./target/release/train_bench "${args[@]}")
    fi
    local name=dfndr
    [ "$side" = ref ] && name=OpenCLIP
    echo "$v round $round: $kind $name $out" >&2
    echo "$v $round $side $kind $(tail -n 1 "$DIR/peak") $out" >>"$RESULTS"
}
for v in $VARIANTS; do
    case "$v" in
        S0 | S2 | B) tb=${TRAIN_BATCH:-4} ;;
        S3 | S4 | L-14) tb=${TRAIN_BATCH:-2} ;;
        *) echo "unknown variant $v (S0 S2 S3 S4 B L-14)" >&2; exit 2 ;;
    esac
    for round in $(seq "$ROUNDS"); do
        # The reference runs first: on the first round it writes the weights and inputs.
        for kind in forward train; do
            b=$BATCH
            [ "$kind" = train ] && b=$tb
            run "$v" "$round" ref "$kind" "$b"
            run "$v" "$round" ours "$kind" "$b"
        done
    done
done
"$PYTHON" - "$RESULTS" "$BATCH" "$TRAIN_BATCH" "$ROUNDS" "$THREADS" <<'PY'
import json, statistics, sys
path, batch, train_batch, rounds, threads = sys.argv[1:]
runs = {}
for line in open(path):
    v, _, side, kind, peak, js = line.split(" ", 5)
    runs.setdefault((v, kind, side), []).append((int(peak), json.loads(js)))
variants = list(dict.fromkeys(k[0] for k in runs))
med = lambda v, kind, side, key: statistics.median(r[1][key] for r in runs[(v, kind, side)])  # noqa: E731


def cell(v, kind, key):
    if runs[(v, kind, "ours")][0][1][key] is None:
        return "n/a"
    o, r = med(v, kind, "ours", key), med(v, kind, "ref", key)
    return f"{o:.2f} / {r:.2f} ({o / r:.2f}x)"


tb = train_batch or "4 (S0, S2, B) or 2 (S3, S4, L-14)"
print(f"\nMobileCLIP2 students, dfndr / OpenCLIP (ratio), medians of {rounds} rounds, {threads} threads; "
      f"forward batch {batch}, training batch {tb}")
head = ["variant", "forward branched img/s", "forward fused img/s", "train samples/s", "train peak RSS MiB"]
rows = []
for v in variants:
    po = max(p for p, _ in runs[(v, "train", "ours")]) / 1024
    pr = max(p for p, _ in runs[(v, "train", "ref")]) / 1024
    rows.append([v, cell(v, "forward", "images_per_s"), cell(v, "forward", "fused_images_per_s"),
                 cell(v, "train", "samples_per_s"), f"{po:,.0f} / {pr:,.0f} ({po / pr:.2f})"])
w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
for r in [head, ["-" * n for n in w]] + rows:
    print("| " + " | ".join(c.ljust(n) for c, n in zip(r, w)) + " |")
# Both sides must have computed the same thing: same features (mean |feature| of the branched
# forward), fused = branched on each side, and the same training loss (L-14's stochastic depth
# draws its own masks on each side, so its losses differ a little).
print()
for v in variants:
    fo, fr = (runs[(v, "forward", s)][-1][1] for s in ("ours", "ref"))
    lo, lr = (runs[(v, "train", s)][-1][1]["loss"] for s in ("ours", "ref"))
    rel = abs(fo["features_abs_mean"] - fr["features_abs_mean"]) / abs(fr["features_abs_mean"])
    fused = "" if fo["fused_max_diff"] is None else \
        f", fused vs branched max |diff| dfndr {fo['fused_max_diff']:.1e} OpenCLIP {fr['fused_max_diff']:.1e}"
    warn = "  WARNING: the features differ" if rel > 1e-3 else ""
    print(f"{v}: mean |image feature| dfndr {fo['features_abs_mean']:.6g} OpenCLIP {fr['features_abs_mean']:.6g}"
          f"{fused}; last training loss dfndr {lo:.6f} OpenCLIP {lr:.6f}{warn}")
PY
