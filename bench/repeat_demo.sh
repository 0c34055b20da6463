#!/usr/bin/env bash
# Copies the demo shards, alternating, into DIR until they hold at least SAMPLES samples (done
# once: an existing DIR is kept). Used by bench/reinforce.sh and bench/gpu/run.sh.
#
# Usage: bench/repeat_demo.sh DIR SAMPLES   (run from the repository root)
set -euo pipefail
DIR=${1:?usage: repeat_demo.sh DIR SAMPLES}
SAMPLES=${2:?usage: repeat_demo.sh DIR SAMPLES}
[ -d "$DIR" ] && exit 0
mkdir -p "$DIR.tmp"
n=0 i=0
while [ "$n" -lt "$SAMPLES" ]; do
    src=assets/demo/demo-0000$((i % 2)).tar
    cp "$src" "$(printf '%s/rep-%05d.tar' "$DIR.tmp" "$i")"
    n=$((n + $(tar tf "$src" | grep -c '\.txt$')))
    i=$((i + 1))
done
mv "$DIR.tmp" "$DIR"
