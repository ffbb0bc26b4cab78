#!/usr/bin/env bash
# Supervised fine-tuning of the memory agents with LLaMA-Factory (the paper's settings live in
# training/configs/sft_qwen3_4b.yaml: Qwen3-4B-Instruct-2507, cutoff 20,000, lr 5e-7, 10 epochs,
# ZeRO-2). Run it after `membuilder export-sft` has written the data:
#
#   SFT_DATA_DIR=data/sft bash training/run_sft.sh
#   SFT_DATA_DIR=data/sft bash training/run_sft.sh learning_rate=1e-6 num_train_epochs=3
#
# Arguments are key=value overrides of the YAML, passed on last. Multi-GPU runs use torchrun
# (FORCE_TORCHRUN=1, LLaMA-Factory's switch); NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT for several nodes.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=${CONFIG:-${HERE}/configs/sft_qwen3_4b.yaml}
DEEPSPEED=${DEEPSPEED:-${HERE}/configs/ds_zero2.json}
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-4B-Instruct-2507}
SFT_DATA_DIR=${SFT_DATA_DIR:-data/sft}
DATASET=${DATASET:-membuilder_sft}
OUTPUT_DIR=${OUTPUT_DIR:-saves/membuilder-sft}
if ! command -v llamafactory-cli >/dev/null 2>&1; then
    echo "error: llamafactory-cli not found; pip install 'llamafactory[deepspeed,metrics]'" >&2
    exit 2
fi
if [[ ! -f "${SFT_DATA_DIR}/dataset_info.json" ]]; then
    echo "error: ${SFT_DATA_DIR}/dataset_info.json not found; run 'membuilder export-sft' first" >&2
    exit 2
fi
export FORCE_TORCHRUN=${FORCE_TORCHRUN:-1}
exec llamafactory-cli train "${CONFIG}" \
    model_name_or_path="${MODEL_PATH}" \
    deepspeed="${DEEPSPEED}" \
    dataset_dir="${SFT_DATA_DIR}" \
    dataset="${DATASET}" \
    output_dir="${OUTPUT_DIR}" \
    "$@"
