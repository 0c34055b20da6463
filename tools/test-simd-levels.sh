#!/usr/bin/env bash
# Runs the numeric tests (the crates with hand-vectorised kernels) and the end-to-end tests of
# the generation job again at every SIMD level below this machine's best, so that the code
# paths of users' older CPUs are tested on a machine that would never take them. The level is
# forced with DFNDR_SIMD (see simd/src/lib.rs); `scalar` also turns libjpeg-turbo's SIMD off.
# `make test` runs this after the main run, which covers the machine's own level.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }
levels=()
if has avx512f && has fma; then
  levels=(avx2 scalar)
elif has avx2 && has fma; then
  levels=(scalar)
fi
if [ ${#levels[@]} -eq 0 ]; then
  echo "test-simd-levels: this CPU runs the baseline level already; nothing below it to test"
  exit 0
fi
# The test executables of the main run (same features, so nothing is rebuilt): every test
# of the crates with hand-vectorised kernels, the trainer's op and S0 parity tests (its
# depthwise and BatchNorm kernels are vectorised), and the generation job's end-to-end tests.
mapfile -t tests < <($CARGO test --workspace --no-run --message-format=json 2>/dev/null | python3 -c '
import json, os, sys
numeric = {"dfndr-simd", "dfndr-augment", "dfndr-teachers", "dfndr-captioner"}
end_to_end = {"reinforce", "teachers", "captions"}
trainer = {"parity"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    crate_dir = os.path.dirname(m["manifest_path"])
    tail = m["package_id"].split("#")[-1]
    package = tail.split("@")[0] if "@" in tail else os.path.basename(crate_dir)
    name = m["target"]["name"]
    if package in numeric or (package == "dfndr" and name in end_to_end) or \
            (package == "dfndr-trainer" and name in trainer):
        print(crate_dir + "\t" + m["executable"])
')
if [ ${#tests[@]} -eq 0 ]; then
  echo "test-simd-levels: found no test executables" >&2
  exit 1
fi
failed=0
for level in "${levels[@]}"; do
  echo "=== ${#tests[@]} test binaries at DFNDR_SIMD=$level ==="
  jsimd=()
  if [ "$level" = scalar ]; then jsimd=(JSIMD_FORCENONE=1); fi
  for entry in "${tests[@]}"; do
    dir=${entry%%$'\t'*}
    t=${entry#*$'\t'}
    echo "--- $(basename "$t") at $level"
    # From the crate's folder, as `cargo test` runs them.
    if ! (cd "$dir" && env DFNDR_SIMD="$level" "${jsimd[@]}" "$t" -q); then
      failed=1
    fi
  done
done
exit $failed
