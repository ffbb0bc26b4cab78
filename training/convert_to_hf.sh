#!/usr/bin/env bash
# Merge a veRL (FSDP) actor checkpoint into a Hugging Face model directory that vLLM can serve.
#
#   bash training/convert_to_hf.sh runs/adrpo/checkpoints/global_step_50 models/membuilder-adrpo-step50
#
# The checkpoint directory is the one veRL writes per save (it holds actor/). Extra arguments are
# passed to `python -m verl.model_merger merge` (e.g. --backend megatron --tie-word-embedding).
# If the run saved `hf_model` among actor.checkpoint.save_contents (run_adrpo.sh does), the
# weights are already in actor/huggingface; merging is still the reliable way to get one
# self-contained directory.
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ $# -lt 2 ]]; then
    echo "usage: $0 CHECKPOINT_DIR OUTPUT_DIR [extra model_merger args]" >&2
    exit 2
fi
CKPT=$1
OUT=$2
shift 2
ACTOR=${CKPT%/}/actor
if [[ ! -d "${ACTOR}" ]]; then
    echo "error: ${ACTOR} not found; pass a global_step_N directory written by veRL" >&2
    exit 2
fi
BACKEND=${BACKEND:-fsdp}
"${PYTHON}" -m verl.model_merger merge --backend "${BACKEND}" --local_dir "${ACTOR}" --target_dir "${OUT}" "$@"
# The tokenizer travels with the checkpoint; copy it so the directory is complete for vLLM.
if [[ -d "${ACTOR}/huggingface" ]]; then
    for f in "${ACTOR}"/huggingface/*token* "${ACTOR}"/huggingface/*.jinja; do
        [[ -e "$f" ]] && cp -n "$f" "${OUT}/"
    done
fi
echo "Hugging Face model written to ${OUT}"
