#!/usr/bin/env bash
# The GPU runs behind bench/results/scale*.{json,md}: `bash bench/gpu_run_scale.sh OUT_DIR [parts]`.
# parts: a comma list of sticky (bench/sticky_error.py, in its own process) and the parts of `python -m bench scale`
# (offsets, rope, prefill, long_mha, long_gqa). Results land in OUT_DIR/results, logs beside them.
set -uo pipefail
out=${1:?usage: bash bench/gpu_run_scale.sh OUT_DIR [parts]}
parts=${2:-sticky,offsets,rope,prefill,long_mha,long_gqa}
mkdir -p "$out/results"
export PYTHONUNBUFFERED=1 KVLAB_CACHE_DIR=${KVLAB_CACHE_DIR:-/tmp/kvlab-cache}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; free -g; date -u; } > "$out/machine.txt"
if [[ ",$parts," == *",sticky,"* ]]; then
  # Its own process: a lost CUDA context cannot be recovered in the process that lost it.
  timeout 240 python3 bench/sticky_error.py --out "$out/results/sticky_error.json" > "$out/sticky.log" 2>&1
  echo "sticky_error.py exited with $?"; tail -c 3000 "$out/sticky.log"
fi
rest=$(echo ",$parts," | sed 's/,sticky,/,/; s/^,//; s/,$//')
if [ -n "$rest" ]; then
  timeout "${SCALE_TIMEOUT_S:-540}" python3 -m bench scale --parts "$rest" --results-dir "$out/results" 2>&1 \
    | tee "$out/scale.log" | grep -v "^|" | tail -60
fi
