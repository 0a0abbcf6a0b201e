#!/usr/bin/env bash
# The GPU runs behind bench/results/: `bash bench/gpu_run.sh OUT_DIR [STEP ...]` (all steps: about 45 minutes on an
# H100; CUPTI counters need the optional cupti-python and nvidia-cuda-cupti wheels). Naming steps runs only those, in
# this file's order, e.g. `bash bench/gpu_run.sh OUT decode decode_attention` to fit a time-limited GPU session.
# Each step is bounded so one failure leaves the others' results; logs go beside the results.
set -u
out=${1:?usage: bash bench/gpu_run.sh OUT_DIR [STEP ...]}
shift
only=" $* "
mkdir -p "$out"
[ -f bench/results/summary.json ] && cp bench/results/summary.json "$out/summary.json"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
# CUPTI for the L2 counters, where the optional wheels lie in .whl/ (not committed; README, Telemetry): installed
# apart under /tmp, with their libcupti preloaded (the image's own lacks the single-pass-set API).
cupti=()
if ls .whl/cupti_python-*.whl .whl/nvidia_cuda_cupti-*.whl > /dev/null 2>&1; then
  site=/tmp/kvlab-cupti-site
  if python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl > "$out/cupti_install.log" 2>&1; then
    lib=$site/nvidia/cu13/lib
    cupti=(env "PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}"
           "LD_PRELOAD=$lib/libcupti.so.13:$lib/libnvperf_host.so:$lib/libnvperf_target.so")
  else
    echo "CUPTI wheels did not install (see $out/cupti_install.log): the study runs without L2 counters"
  fi
fi
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || return 0
  timeout "$limit" "$@" > "$out/$name.log" 2>&1 || echo "$name: exit $? (see $out/$name.log)"
}
# Engine vs transformers (dynamic cache), GPU exactness on random 7B weights and on the trained demo model (394-427 s
# on an H200 with --exact-seqs 64; a cut-off run keeps its finished cases in decode.partial.json).
step decode 540 python3 -m bench decode --exact-seqs 64 --exact-models demo --repeat 5 --results-dir "$out"
# transformers' static cache (it compiles its forward) beside our compiled step.
step decode_static 330 python3 -m bench decode --ours auto,compiled --peers static --tag static --exact-seqs 0 \
  --repeat 3 --results-dir "$out"
step decode_attention 240 python3 -m bench decode_attention --repeat 11 --results-dir "$out"
# The prefetch study: every depth x prefetch variant per shape (and depth 1 with 32-key tiles), L2 counters where
# CUPTI is installed; writes this device's tuning table.
step decode_attention_study 480 ${cupti[@]+"${cupti[@]}"} python3 -m bench decode_attention_study --counters-ms 40 --results-dir "$out"
step ncu 240 python3 bench/ncu_decode_attention.py --results-dir "$out"
step demo_chat 90 python3 -m bench demo_chat --results-dir "$out"
step gpu_oom 120 python3 -m bench gpu_oom --results-dir "$out"
step profile 120 python3 bench/profile_decode.py
# KV offload: placements, splits, predictions, transformers' offloaded cache, telemetry overhead and trace.
step offload 590 python3 -m bench offload --repeat 1 --results-dir "$out"
step offload_telemetry 400 python3 -m bench offload --parts telemetry --tag telemetry --repeat 1 --results-dir "$out"
step profile_session 200 python3 bench/profile_session.py --out "$out"
# Reliability: faults inside runs (each reported, memory given back, next run unchanged) and 4 API clients x 50 turns
# through the served app (needs the gradio wheels), GPU-resident and offloaded; the engine's memory alone beside them.
step reliability_faults 200 python3 -m bench reliability --parts faults --tag faults --results-dir "$out"
step reliability_load_gpu 330 python3 -m bench reliability --parts load --placements gpu --tag load_gpu --results-dir "$out"
step reliability_load_cpu 330 python3 -m bench reliability --parts load --placements cpu --tag load_cpu --results-dir "$out"
step engine_memory 200 python3 -m bench.engine_memory --model demo --chats 150 --results-dir "$out"
