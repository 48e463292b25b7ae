#!/bin/bash
# Runs one libFuzzer harness for a number of seconds: test/fuzz/native/run.sh NAME SECONDS.
# libFuzzer first runs every file of the committed corpus test/fuzz/corpus/NAME, then mutates them.
# New inputs that it keeps go to a scratch folder, never into the checkout. A crash, sanitizer
# report or timeout (1 s per input) is copied to test/fuzz/corpus/NAME/finding-<first 16 hex
# digits of its SHA-256>, and the script exits 1.
set -euo pipefail

name=$1
seconds=$2
root=$(cd "$(dirname "$0")/../../.." && pwd)
binary=$root/node_modules/.cache/ambient-agent/fuzz/$name
corpus=$root/test/fuzz/corpus/$name
if [ ! -x "$binary" ]; then
  echo "fuzz $name: $binary is missing: build it with make fuzz-native" >&2
  exit 2
fi

scratch=$(mktemp -d /tmp/aafuzz-native-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/corpus" "$scratch/artifacts"
if "$binary" -max_total_time="$seconds" -max_len=4096 -timeout=1 -rss_limit_mb=1024 \
  -artifact_prefix="$scratch/artifacts/" "$scratch/corpus" "$corpus" >"$scratch/log" 2>&1; then
  echo "fuzz $name: $(grep -o 'Done [0-9]* runs in [0-9]* second(s)' "$scratch/log" || echo "done"), no finding"
  exit 0
fi

tail -n 40 "$scratch/log" >&2
for artifact in "$scratch"/artifacts/*; do
  [ -f "$artifact" ] || continue
  finding=$corpus/finding-$(sha256sum "$artifact" | cut -c1-16)
  cp "$artifact" "$finding"
  echo "fuzz $name: FINDING in $finding" >&2
done
exit 1
