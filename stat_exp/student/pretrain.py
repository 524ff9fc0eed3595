"""Pre-training the locally built tiny student from scratch on a task's problems (skillworld's base).

A plain torch loop: each example is the chat prompt the student will later be probed with,
followed by the solution and the end-of-turn token; the loss counts the completion tokens
only. AdamW, linear warmup then cosine decay to 0, batches drawn by epoch-wise shuffles of
`cfg.seed`.
"""

import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

from stat_exp.config import PretrainConfig
from stat_exp.student.generation import encode_prompts
from stat_exp.student.models import IM_END, format_prompt, load_model, load_tokenizer

IGNORE_INDEX = -100  # label of the prompt and padding positions: no loss there
MAX_GRAD_NORM = 1.0  # a from-scratch model at lr 3e-3 has rare loss spikes; clipping keeps them harmless


def pretrain(
    model_dir: Path,
    rows: Sequence[dict],
    cfg: PretrainConfig,
    out_dir: Path,
    *,
    instruction: str,
    system_prompt: str | None = None,
    device: str = "auto",
) -> dict:
    """Train the model saved in `model_dir` on `rows` (problem -> solution) and save it with its
    tokenizer to `out_dir`. Returns a summary: steps, initial and final loss, seconds, params."""
    import torch
    from tqdm import tqdm

    if not rows:
        raise ValueError("pretrain needs at least one row")
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype="float32", device=device)
    examples = encode_examples(tokenizer, rows, instruction=instruction, system_prompt=system_prompt)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

    batches = _batches(len(examples), cfg.batch_size, cfg.steps, cfg.seed)
    losses: list[float] = []
    started = time.monotonic()
    model.train()
    with tqdm(total=cfg.steps, desc="pre-training", unit="step") as bar:
        for step, indices in enumerate(batches):
            batch = collate([examples[i] for i in indices], tokenizer.pad_token_id, model.device)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % 10 == 0 or step == cfg.steps - 1:
                bar.set_postfix(loss=f"{_mean_tail(losses):.4f}")
            bar.update()
    seconds = time.monotonic() - started

    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "steps": cfg.steps,
        "examples": len(examples),
        "initial_loss": round(losses[0], 4),
        "final_loss": round(_mean_tail(losses), 4),  # mean of the last steps: one batch is noisy
        "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }


def encode_examples(
    tokenizer: Any, rows: Sequence[dict], *, instruction: str, system_prompt: str | None = None
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per row: the prompt exactly as generation encodes it, the
    completion the solution and the end-of-turn token that stops generation."""
    if tokenizer.convert_tokens_to_ids(IM_END) in (None, tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer has no {IM_END} token: pretrain expects a tiny model from build_tiny_model")
    prompts = [format_prompt(tokenizer, row["problem"], instruction=instruction, system_prompt=system_prompt)
               for row in rows]
    prompt_ids = encode_prompts(tokenizer, prompts)
    completion_ids = tokenizer([row["solution"] + IM_END for row in rows], add_special_tokens=False).input_ids
    return list(zip(prompt_ids, completion_ids))


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int, device: Any) -> dict:
    """Right-padded input ids, attention mask and labels (completion tokens only) as tensors."""
    import torch

    length = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(examples):
        ids = prompt + completion
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(completion)
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """The learning-rate multiplier at `step`: linear warmup to 1, then cosine decay to 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batches(size: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of indices: consecutive slices of back-to-back shuffles of all examples.

    Not grouped by length: on skillworld, length-sorted batches (one kind of problem each) cut
    the time per step by a third but left the model unable even to copy operands.
    """
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += rng.sample(range(size), size)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _param_groups(model: Any, weight_decay: float) -> list[dict]:
    # Weight decay on matrices only: decaying norm gains and biases only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _mean_tail(losses: list[float], window: int = 50) -> float:
    tail = losses[-window:]
    return sum(tail) / len(tail)
