#!/usr/bin/env bash
# ADRPO training with veRL (>= 0.9.1, v1 trainer), on one node or on a Ray cluster.
#
# One node:
#   MODEL_PATH=saves/membuilder-sft TRAIN_DATA=data/rl/train.parquet STATE_ROOT=data/rl \
#     bash training/run_adrpo.sh
# Several nodes (start Ray first: `ray start --head` on one node, `ray start --address=HEAD:6379`
# on the others, with the same environment on each), then on the head node:
#   NNODES=2 RAY_ADDRESS=auto MODEL_PATH=... TRAIN_DATA=... bash training/run_adrpo.sh
#
# Every setting below is an environment variable with the paper's value as default, and every
# veRL key can be overridden by appending Hydra overrides: they are passed on last ("$@").
# Appending `--cfg job` prints the composed configuration and starts nothing.
#
# The reward model's key is read from the environment of the reward workers (OPENAI_API_KEY, or
# REWARD_API_KEY_ENV naming another variable); it is never put on the command line.
set -euo pipefail

PYTHON=${PYTHON:-python3}

# --- what to train on ---------------------------------------------------------------------
MODEL_PATH=${MODEL_PATH:-}                 # the SFT checkpoint (Hugging Face directory)
TRAIN_DATA=${TRAIN_DATA:-data/rl/train.parquet}
VAL_DATA=${VAL_DATA:-${TRAIN_DATA}}
STATE_ROOT=${STATE_ROOT:-$(dirname "${TRAIN_DATA}")}   # relative state_before paths resolve here
OUTPUT_DIR=${OUTPUT_DIR:-runs/adrpo}
# Ray workers do not start in this directory: hand them absolute paths.
abspath() {
    if [[ -z "$1" || "$1" == *"://"* ]]; then echo "$1"; else realpath -m -- "$1" 2>/dev/null || echo "$1"; fi
}
STATE_ROOT=$(abspath "${STATE_ROOT}")
OUTPUT_DIR=$(abspath "${OUTPUT_DIR}")
TRAIN_DATA=$(abspath "${TRAIN_DATA}")
VAL_DATA=$(abspath "${VAL_DATA}")
[[ -d "${MODEL_PATH}" ]] && MODEL_PATH=$(abspath "${MODEL_PATH}")
EXPERIMENT=${EXPERIMENT:-membuilder_adrpo}

# --- cluster ------------------------------------------------------------------------------
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP_SIZE=${TP_SIZE:-1}
GPU_MEM_UTIL=${GPU_MEM_UTIL:-0.7}

# --- the paper's hyperparameters ------------------------------------------------------------
LR=${LR:-1e-6}
KL_COEF=${KL_COEF:-0.02}
KL_TYPE=${KL_TYPE:-low_var_kl}
N_ROLLOUTS=${N_ROLLOUTS:-8}
TEMPERATURE=${TEMPERATURE:-0.8}
TOP_P=${TOP_P:-0.9}
MAX_PROMPT=${MAX_PROMPT:-20000}
MAX_RESPONSE=${MAX_RESPONSE:-6000}
EPOCHS=${EPOCHS:-5}
BATCH_PER_NODE=${BATCH_PER_NODE:-32}        # prompts per step per node (a multiple of 4 keeps sessions whole)
TRAIN_BATCH=${TRAIN_BATCH:-$((BATCH_PER_NODE * NNODES))}
MINI_BATCH=${MINI_BATCH:-${TRAIN_BATCH}}
MICRO_BATCH=${MICRO_BATCH:-4}
SAVE_FREQ=${SAVE_FREQ:-10}

# --- reward and ADRPO -----------------------------------------------------------------------
ADRPO=${ADRPO:-1}                           # 1: advantages x attribution weight; 0: plain GRPO
ALPHA=${ALPHA:-4.0}
ATTRIBUTION=${ATTRIBUTION:-true}
# What the reward means: paper (the published code's reward) | membuilder (ours); see the
# settings table in training/README.md. The variables below left empty take the protocol's value;
# one that is set overrides it, and the reward's metrics record the override.
PROTOCOL=${PROTOCOL:-paper}
PAIRING=${PAIRING:-}                        # expert | joint (paper: joint, membuilder: expert)
ANSWER_MODEL=${ANSWER_MODEL:-}
JUDGE_MODEL=${JUDGE_MODEL:-}
SPARSE_REWARD=${SPARSE_REWARD:-}            # true: the paper's sparse-reward ablation
JUDGE=${JUDGE:-llm}                         # llm | exact | f1
REWARD_BASE_URL=${REWARD_BASE_URL:-}        # empty: the OpenAI API
REWARD_CONCURRENCY=${REWARD_CONCURRENCY:-64}
EMBEDDER=${EMBEDDER:-}                      # must be the embedder the states were built with
REWARD_CACHE_DIR=${REWARD_CACHE_DIR:-${OUTPUT_DIR}/reward_cache}   # answers/judgements repeat across steps
TOKENIZER=${TOKENIZER:-${MODEL_PATH}}       # count content tokens with the policy's tokenizer

PLUGIN=membuilder.training.verl_plugin
export VERL_USE_EXTERNAL_MODULES=${PLUGIN}

printing_config=0
for arg in "$@"; do
    [[ "${arg}" == "--cfg" || "${arg}" == "-c" || "${arg}" == "--help" ]] && printing_config=1
done
if [[ ${printing_config} == 0 ]]; then
    if [[ -z "${MODEL_PATH}" ]]; then
        echo "error: set MODEL_PATH to the SFT checkpoint (a Hugging Face model directory)" >&2
        exit 2
    fi
    if [[ ! -f "${TRAIN_DATA}" ]]; then
        echo "error: TRAIN_DATA=${TRAIN_DATA} does not exist; build it with 'membuilder export-rl'" >&2
        exit 2
    fi
    mkdir -p "${OUTPUT_DIR}"
fi

# The pairing decides the reward workers and the data order; ask the protocol for its own.
EFFECTIVE_PAIRING=${PAIRING}
if [[ -z "${EFFECTIVE_PAIRING}" ]]; then
    if ! EFFECTIVE_PAIRING=$("${PYTHON}" -c "import sys; from membuilder.protocol import get_protocol
try:
    print(get_protocol(sys.argv[1]).reward_pairing)
except ValueError as exc:
    sys.exit(str(exc))" "${PROTOCOL}"); then
        echo "error: could not read the pairing of PROTOCOL=${PROTOCOL} (paper | membuilder) with ${PYTHON}" >&2
        exit 2
    fi
fi
if [[ "${EFFECTIVE_PAIRING}" == "joint" ]]; then
    # A session's four agents must meet in one reward worker, and the data loader must not split them.
    REWARD_WORKERS=${REWARD_WORKERS:-1}
    SHUFFLE=${SHUFFLE:-false}
else
    # The scorer is asynchronous and batched: two workers keep up, and fewer workers share more
    # states and deduplicate more calls. Each worker has its own REWARD_CONCURRENCY limit.
    REWARD_WORKERS=${REWARD_WORKERS:-2}
    SHUFFLE=${SHUFFLE:-true}
fi

if [[ "${ADRPO}" == "1" ]]; then TRAINER_MODE=adrpo_sync; else TRAINER_MODE=sync; fi

RK=+reward.custom_reward_function.reward_kwargs
args=(
    algorithm.adv_estimator=grpo
    algorithm.use_kl_in_reward=false

    data.train_files="${TRAIN_DATA}"
    data.val_files="${VAL_DATA}"
    data.train_batch_size=${TRAIN_BATCH}
    data.shuffle=${SHUFFLE}
    data.max_prompt_length=${MAX_PROMPT}
    data.max_response_length=${MAX_RESPONSE}
    data.filter_overlong_prompts=false
    data.truncation=error

    actor_rollout_ref.model.path="${MODEL_PATH:-MODEL_PATH_UNSET}"
    actor_rollout_ref.model.use_remove_padding=true
    actor_rollout_ref.model.enable_gradient_checkpointing=true
    actor_rollout_ref.actor.optim.lr=${LR}
    actor_rollout_ref.actor.ppo_mini_batch_size=${MINI_BATCH}
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=${MICRO_BATCH}
    actor_rollout_ref.actor.use_kl_loss=true
    actor_rollout_ref.actor.kl_loss_coef=${KL_COEF}
    actor_rollout_ref.actor.kl_loss_type=${KL_TYPE}
    actor_rollout_ref.actor.entropy_coeff=0
    'actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]'
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.n=${N_ROLLOUTS}
    actor_rollout_ref.rollout.temperature=${TEMPERATURE}
    actor_rollout_ref.rollout.top_p=${TOP_P}
    actor_rollout_ref.rollout.tensor_model_parallel_size=${TP_SIZE}
    actor_rollout_ref.rollout.gpu_memory_utilization=${GPU_MEM_UTIL}
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=${MICRO_BATCH}
    actor_rollout_ref.rollout.max_num_batched_tokens=32768
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=${MICRO_BATCH}
    actor_rollout_ref.ref.fsdp_config.param_offload=true

    reward.num_workers=${REWARD_WORKERS}
    reward.custom_reward_function.path=pkg://membuilder.training.reward
    reward.custom_reward_function.name=compute_score
    reward.reward_manager.source=importlib
    reward.reward_manager.name=MembuilderRewardManager
    reward.reward_manager.module.path=pkg://membuilder.training.reward_manager
    "${RK}.protocol=${PROTOCOL}"
    "${RK}.judge=${JUDGE}"
    "${RK}.max_concurrency=${REWARD_CONCURRENCY}"
    "${RK}.state_root='${STATE_ROOT}'"
    "${RK}.llm_cache_dir='${REWARD_CACHE_DIR}/llm'"
    "${RK}.embed_cache_dir='${REWARD_CACHE_DIR}/embeddings'"
    "${RK}.attribution_alpha=${ALPHA}"
    "${RK}.attribution_enabled=${ATTRIBUTION}"

    trainer.v1.trainer_mode=${TRAINER_MODE}
    "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=${PLUGIN}"
    trainer.critic_warmup=0
    'trainer.logger=["console","tensorboard"]'
    trainer.project_name=membuilder
    trainer.experiment_name="${EXPERIMENT}"
    trainer.n_gpus_per_node=${GPUS_PER_NODE}
    trainer.nnodes=${NNODES}
    trainer.save_freq=${SAVE_FREQ}
    trainer.test_freq=-1
    trainer.val_before_train=false
    trainer.total_epochs=${EPOCHS}
    trainer.default_local_dir="${OUTPUT_DIR}/checkpoints"
)
[[ -n "${REWARD_BASE_URL}" ]] && args+=("${RK}.base_url='${REWARD_BASE_URL}'")
[[ -n "${PAIRING}" ]] && args+=("${RK}.pairing=${PAIRING}")
[[ -n "${ANSWER_MODEL}" ]] && args+=("${RK}.answer_model='${ANSWER_MODEL}'")
[[ -n "${JUDGE_MODEL}" ]] && args+=("${RK}.judge_model='${JUDGE_MODEL}'")
[[ -n "${EMBEDDER}" ]] && args+=("${RK}.embedder='${EMBEDDER}'")
[[ -n "${SPARSE_REWARD}" ]] && args+=("${RK}.sparse_reward=${SPARSE_REWARD}")
[[ -n "${TOKENIZER}" && -d "${TOKENIZER}" ]] && args+=("${RK}.tokenizer='${TOKENIZER}'")

if [[ ${NNODES} -gt 1 ]]; then
    export RAY_ADDRESS=${RAY_ADDRESS:-auto}   # join the running cluster instead of starting one
fi

exec "${PYTHON}" -m verl.trainer.main_ppo "${args[@]}" "$@"
