from dataclasses import replace
from pathlib import Path

import pytest
from helpers import ROOT, compose_config

from stat_exp.config import ModelConfig, RLConfig
from stat_exp.rewards import REWARDS
from stat_exp.student.grpo import GRPOBatch, grpo_args, grpo_batch, grpo_dataset, train_grpo
from stat_exp.student.models import chat_messages, load_tokenizer

MODEL = ModelConfig(name="tiny", dtype="float32")
ROWS = [{"problem": f"What is {a}+{b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (10, 20), (7, 8)]]


def small(rewards: list[str]) -> RLConfig:
    """Two optimizer steps of 2 questions x 4 samples of 8 tokens; a learning rate that visibly moves weights."""
    return RLConfig(
        name="grpo", learning_rate=1e-3, num_generations=4, max_completion_length=8, questions_per_batch=2,
        questions_per_update=2,
        max_steps=2, logging_steps=1, rewards=rewards, bf16=False,
    )


def coin(completions: list, answer: list[str], completion_ids: list[list[int]], **kwargs) -> list[float]:
    """Scores a random bit of each sample (its first token's parity): samples of one question disagree."""
    assert len(answer) == len(completions) == len(completion_ids)
    return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]


def constant(completions: list, answer: list[str], **kwargs) -> list[float]:
    return [1.0] * len(completions)


def changed_weights(before: Path, after: Path) -> list[str]:
    from safetensors.torch import load_file

    a, b = load_file(before / "model.safetensors"), load_file(after / "model" / "model.safetensors")
    assert set(a) == set(b)
    return [name for name in a if not a[name].equal(b[name])]


def test_varying_rewards_change_the_policy(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(REWARDS, "coin", coin)
    # correctness runs inside TRL's loop too (the random model never answers right: 0 everywhere).
    summary = train_grpo(str(tiny_model_dir), ROWS, small(["correctness", "coin"]), tmp_path, model_cfg=MODEL)
    assert summary["steps"] == 2 and len(summary["rewards"]) == 2
    assert summary["settings"]["activation_checkpointing"]  # TRL's default
    assert all(std > 0 for std in summary["reward_stds"])
    assert min(summary["zero_std_fractions"]) < 1  # some question's samples scored differently
    assert changed_weights(tiny_model_dir, tmp_path)
    assert load_tokenizer(str(tmp_path / "model")).chat_template is not None


def test_constant_rewards_leave_the_policy_alone(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal rewards within a group give zero advantages, so no gradient (beta=0: no KL term either)."""
    monkeypatch.setitem(REWARDS, "constant", constant)
    cfg = replace(small(["constant"]), activation_checkpointing=False)
    summary = train_grpo(str(tiny_model_dir), ROWS, cfg, tmp_path, model_cfg=MODEL)
    assert summary["rewards"] == [1.0, 1.0] and summary["zero_std_fractions"] == [1.0, 1.0]
    assert summary["settings"]["activation_checkpointing"] is False
    assert changed_weights(tiny_model_dir, tmp_path) == []


def test_batch_arithmetic() -> None:
    # The paper on one GPU: 256 questions x 4 samples a round, 64 questions (256 completions) an update.
    assert grpo_batch(256, 64, 4, 1) == GRPOBatch(per_device=4, accumulation=64, generation=1024)
    assert grpo_batch(256, 64, 4, 8) == GRPOBatch(per_device=4, accumulation=8, generation=1024)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        grpo_batch(256, 60, 4, 8)
    with pytest.raises(ValueError, match=r"questions_per_batch \(100\) must be a positive multiple of questions_per_update \(64\)"):
        grpo_batch(100, 64, 4, 1)
    with pytest.raises(ValueError, match="at least 2"):
        grpo_batch(256, 64, 1, 1)


CPU = {"use_cpu": True, "bf16": False, "activation_checkpointing": False}


def updates_per_round(args) -> float:
    """Gradient updates TRL makes on one generation round: its passes (steps_per_generation, each
    num_iterations times) over the passes per update (gradient_accumulation_steps)."""
    return args.steps_per_generation * args.num_iterations / args.gradient_accumulation_steps


def test_paper_defaults_give_four_updates_per_round(tmp_path: Path) -> None:
    """Read off TRL's own config: 256 questions x 4 rollouts a round, 4 updates of 64 questions."""
    args = grpo_args(RLConfig(name="grpo"), tmp_path, settings=CPU, model_init_kwargs={}, use_vllm=False,
                     report_to="none")
    assert updates_per_round(args) == 4
    assert args.generation_batch_size == 1024 and args.generation_batch_size // args.num_generations == 256
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 256  # 64 questions x 4 an update
    assert (args.learning_rate, args.lr_scheduler_type, args.beta, args.max_completion_length, args.num_train_epochs) \
        == (5e-7, "constant", 0.0, 2048, 6.0)


def test_scaled_down_round(tmp_path: Path) -> None:
    """12 questions x 2 rollouts a round in updates of 4 questions: 3 updates of 4 passes each."""
    cfg = RLConfig(name="grpo", num_generations=2, questions_per_batch=12, questions_per_update=4)
    args = grpo_args(cfg, tmp_path, settings=CPU, model_init_kwargs={}, use_vllm=False, report_to="none")
    assert updates_per_round(args) == 3
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.generation_batch_size) == (2, 4, 24)
    assert args.steps_per_generation == 12


def test_interrupted_grpo_resumes_from_its_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import load_file

    calls = []

    def dies_in_step_2(completions: list, answer: list[str], completion_ids: list[list[int]], **kwargs) -> list[float]:
        calls.append(1)
        if len(calls) == 2:  # step 2's rollouts: step 1's checkpoint is on disk
            raise KeyboardInterrupt
        return coin(completions, answer, completion_ids)

    cfg = replace(small(["coin"]), save_steps=1)
    monkeypatch.setitem(REWARDS, "coin", dies_in_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_grpo(str(tiny_model_dir), ROWS, cfg, tmp_path / "killed", model_cfg=MODEL)
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-1"]

    monkeypatch.setitem(REWARDS, "coin", coin)
    with caplog.at_level("INFO", logger="stat_exp.student.checkpoints"):
        resumed = train_grpo(str(tiny_model_dir), ROWS, cfg, tmp_path / "killed", model_cfg=MODEL)
    assert resumed["steps"] == 2 and "resumed from step 1" in caplog.text
    assert not (tmp_path / "killed" / "checkpoints").exists()
    train_grpo(str(tiny_model_dir), ROWS, cfg, tmp_path / "whole", model_cfg=MODEL)
    got, expected = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("killed", "whole"))
    assert max((got[name] - expected[name]).abs().max().item() for name in expected) <= 1e-6


def test_vllm_rollouts_on_a_cpu_fail_at_once_saying_why(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU, vLLM rollouts run")
    with pytest.raises(ValueError, match="needs a GPU.*cannot take the trainer's updated weights"):
        train_grpo(str(tiny_model_dir), ROWS, small(["correctness"]), tmp_path, model_cfg=MODEL, use_vllm=True)


def test_dataset_keeps_the_answer(tiny_model_dir: Path) -> None:
    row = grpo_dataset(ROWS[:1], load_tokenizer(str(tiny_model_dir)), MODEL)[0]
    assert row == {"prompt": chat_messages(ROWS[0]["problem"], instruction=MODEL.instruction), "answer": "3"}


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "rl").glob("*.yaml") if p.stem != "none"))
def test_rl_configs_compose(name: str) -> None:
    cfg = compose_config(f"rl={name}").rl
    assert cfg.name == name
    grpo_batch(cfg.questions_per_batch, cfg.questions_per_update, cfg.num_generations, 1)
    assert set(cfg.rewards) <= set(REWARDS)
