#!/usr/bin/env bash
# End-to-end `dfndr reinforce` vs a RayGen-style Python script (PIL, torchvision, OpenCLIP, tar
# writing) on the demo shards repeated to about SAMPLES samples, with the tiny teachers and
# captioner of configs/demo.toml, on the same machine in one run; prints samples/s of both, the
# ratio, and how busy each of dfndr's stages was.
#
# Usage: bench/reinforce.sh [SAMPLES]   (default 2000; PYTHON: python3 with torch + open_clip)
#   BENCH_DIR (default /tmp/dfndr-bench/reinforce) holds the repeated shards and both outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${1:-2000}
PYTHON=${PYTHON:-python3}
BENCH_DIR=${BENCH_DIR:-/tmp/dfndr-bench/reinforce}
IN=$BENCH_DIR/in-$SAMPLES
bench/repeat_demo.sh "$IN" "$SAMPLES"
cargo build --release -q -p dfndr
rm -rf "$BENCH_DIR/out" "$BENCH_DIR/out-ref"
start=$(date +%s.%N)
./target/release/dfndr reinforce --no-progress --log warn --config configs/demo.toml \
    --input "$IN/*.tar" --output "$BENCH_DIR/out" 2>/dev/null
end=$(date +%s.%N)
ours=$(./target/release/dfndr status --json "$BENCH_DIR/out")
ref=$("$PYTHON" bench/reinforce_reference.py "$IN" "$BENCH_DIR/out-ref")
echo "$ref"
"$PYTHON" - "$ours" "$ref" "$start" "$end" <<'PY'
import json, sys
ours, ref = json.loads(sys.argv[1]), json.loads(sys.argv[2])
seconds = float(sys.argv[4]) - float(sys.argv[3])
rate = ours["rows"] / seconds
print(f"dfndr reinforce: {ours['rows']} samples in {seconds:.1f} s = {rate:.1f} samples/s "
      f"(process wall time, model loading included)")
print(f"Python (RayGen-style): {ref['samples']} samples in {ref['seconds']:.1f} s = "
      f"{ref['samples_per_s']:.1f} samples/s ({ref['threads']} torch threads)")
print(f"ratio: {rate / ref['samples_per_s']:.2f}x")
shares = ours.get("stage_busy_share", {})
order = ["read", "decode", "caption", "teachers", "write"]
print("dfndr stage busy share of shard time: " +
      ", ".join(f"{s} {shares[s] * 100:.0f}%" for s in order if s in shares))
PY
