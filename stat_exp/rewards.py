"""Reward functions for GRPO, by name (open-r1 style).

Each is a plain function `fn(completions, answer, **kwargs) -> list[float]`, as TRL's
GRPOTrainer calls it: `completions` are strings, or (conversational datasets) lists of
messages whose last one is the assistant's answer; `answer` holds the gold final answers,
one per completion (the dataset's `answer` column); TRL passes its other columns and its
own extras (prompts, completion_ids, trainer_state, ...) as keyword arguments.
"""

from collections.abc import Callable, Sequence
from typing import Any

from stat_exp.grading import extract_boxed, grade

RewardFunc = Callable[..., list[float]]


def completion_text(completion: str | list[dict]) -> str:
    """The text of one completion: the string itself, or the content of its last message."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def correctness_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 when the last \\boxed{} answer is equivalent to the gold answer (math-verify), else 0.0."""
    preds = [extract_boxed(completion_text(c)) for c in completions]
    # grade() checks inline in the main thread, where math-verify's signal-based timeouts work and
    # where TRL calls reward functions; from any other thread it falls back to worker processes.
    return [float(g.correct) for g in grade(answer, preds, progress=False)]


def format_reward(completions: Sequence[Any], answer: Sequence[str] | None = None, **kwargs: Any) -> list[float]:
    """1.0 when the completion has a readable \\boxed{} answer (the last one, braces balanced), else 0.0."""
    return [float(extract_boxed(completion_text(c)) is not None) for c in completions]


REWARDS: dict[str, RewardFunc] = {
    "correctness": correctness_reward,
    "format": format_reward,
}


def get_rewards(names: Sequence[str]) -> list[RewardFunc]:
    """The reward functions called `names`, in order."""
    unknown = [name for name in names if name not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {', '.join(map(repr, unknown))}; choose from {', '.join(REWARDS)}")
    return [REWARDS[name] for name in names]
