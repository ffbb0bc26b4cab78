#!/usr/bin/env bash
# Serve a model with vLLM's OpenAI-compatible server, for `membuilder eval --mode build`.
#
#   bash training/serve_vllm.sh models/membuilder-adrpo-step50 [--port 8000]
#
# The model is served under the name SERVED_NAME (default: the directory's name); tensor
# parallelism defaults to the number of visible GPUs. Extra arguments go to `vllm serve`.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 MODEL_DIR [extra vllm serve args]" >&2
    exit 2
fi
MODEL=$1
shift
SERVED_NAME=${SERVED_NAME:-$(basename "${MODEL%/}")}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-8000}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-32768}   # prompts reach 20k tokens, outputs 6k
GPU_MEM_UTIL=${GPU_MEM_UTIL:-0.9}
if [[ -z "${TP_SIZE:-}" ]]; then
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        TP_SIZE=$(awk -F, '{print NF}' <<<"${CUDA_VISIBLE_DEVICES}")
    elif command -v nvidia-smi >/dev/null 2>&1; then
        TP_SIZE=$(nvidia-smi -L | wc -l)
    else
        TP_SIZE=1
    fi
fi
exec vllm serve "${MODEL}" \
    --served-model-name "${SERVED_NAME}" \
    --host "${HOST}" --port "${PORT}" \
    --tensor-parallel-size "${TP_SIZE}" \
    --dtype bfloat16 \
    --max-model-len "${MAX_MODEL_LEN}" \
    --gpu-memory-utilization "${GPU_MEM_UTIL}" \
    --enable-prefix-caching \
    "$@"
