#!/usr/bin/env bash
# Run one demo experiment into a fresh run dir and point logs/<experiment>/latest at it.
#   scripts/run_demo.sh <python> <experiment> [overrides...]
# A run dir is never reused (meddiff refuses to train anew into a dir that holds a run), so each `make demo` keeps
# the earlier runs: logs/<experiment>/<timestamp>/, with `latest` a symlink to the newest complete one.
set -euo pipefail
py=$1; exp=$2; shift 2
base=logs/$exp
# unique even for two `make demo` started in the same second: nanoseconds, this shell's pid and a random number
run=$(date +%Y-%m-%d_%H-%M-%S-%N)_$$_$RANDOM
mkdir -p "$base"
if [ -d "$base/latest" ] && [ ! -L "$base/latest" ]; then  # a real folder from an older meddiff: keep it
  mv "$base/latest" "$base/$run-previous"
fi
"$py" -m meddiff.train experiment="$exp" hydra.run.dir="$base/$run" "$@"
ln -sfn "$run" "$base/latest"
echo "Report, figures and checkpoints: $base/latest/ (-> $run)"
