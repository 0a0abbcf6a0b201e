#!/usr/bin/env bash
# The GPU run behind bench/results/decode*.{json,md}: `bash bench/gpu_decode.sh OUT_DIR`.
# Step 1 measures the engine against transformers' dynamic cache and checks exactness; step 2 adds the
# static cache (+ torch.compile where transformers applies it), under a time limit since it compiles.
set -u
out=${1:?usage: bash bench/gpu_decode.sh OUT_DIR}
mkdir -p "$out"
[ -f bench/results/summary.json ] && cp bench/results/summary.json "$out/summary.json"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m bench decode --results-dir "$out" ${DECODE_ARGS:-} 2>&1 | tee "$out/decode.log"
timeout "${STATIC_TIMEOUT:-300}" python3 -m bench decode --peers static --tag static --exact-seqs 0 --repeat 2 \
  --results-dir "$out" 2>&1 | tee "$out/decode_static.log" || echo "static-cache peer: exit $? (timeout or failure; see log)"
