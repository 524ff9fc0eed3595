from pathlib import Path

import pytest
from helpers import ROOT, compose_config

from stat_exp.config import ModelConfig, SFTConfig
from stat_exp.student.models import chat_messages, format_prompt, load_model, load_tokenizer
from stat_exp.student.sft import sft_dataset, train_sft

MODEL = ModelConfig(name="tiny", dtype="float32")
PAIRS = [(1, 2), (3, 4), (10, 20), (7, 8), (5, 5), (12, 13), (40, 2), (9, 9)]
ROWS = [
    {"question": f"What is {a}+{b}?", "answer": f"We compute {a}+{b} = {a + b}. The answer is \\boxed{{{a + b}}}."}
    for a, b in PAIRS
]


def small(**overrides) -> SFTConfig:
    """A LoRA run that fits the tiny model in seconds: high learning rate, no warmup, a log every step."""
    settings = dict(
        name="lora", learning_rate=1e-2, per_device_batch_size=4, gradient_accumulation_steps=1, warmup_ratio=0.0,
        max_length=128, max_steps=3, logging_steps=1, load_in_4bit=False, optim="adamw_torch", bf16=False,
    )
    return SFTConfig(**{**settings, **overrides})


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("sft_lora")
    summary = train_sft(str(tiny_model_dir), ROWS, small(max_steps=25), out_dir, model_cfg=MODEL, eval_rows=ROWS[:2])
    return out_dir, summary


def test_lora_lowers_the_loss(lora_run: tuple[Path, dict]) -> None:
    _, summary = lora_run
    assert summary["steps"] == 25 and len(summary["losses"]) == 25
    assert summary["losses"][-1] < summary["losses"][0] - 0.1
    assert summary["final_loss"] == summary["losses"][-1]
    assert summary["eval_loss"] is not None and summary["trainable_params"] > 0 and summary["seconds"] > 0


def test_lora_trains_the_adapter_and_merges_it(lora_run: tuple[Path, dict], tiny_model_dir: Path) -> None:
    out_dir, _ = lora_run
    adapter = weights(out_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # peft starts B at zero

    base = weights(tiny_model_dir / "model.safetensors")
    merged = weights(out_dir / "model" / "model.safetensors")
    assert set(merged) == set(base)  # a plain checkpoint: no peft names left
    changed = {name for name in base if not base[name].equal(merged[name])}
    assert changed and all(name.endswith("proj.weight") for name in changed)


def test_merged_model_loads_and_generates(lora_run: tuple[Path, dict]) -> None:
    import torch

    out_dir, _ = lora_run
    tokenizer = load_tokenizer(str(out_dir / "model"))
    model = load_model(str(out_dir / "model"), device="cpu")
    prompt = format_prompt(tokenizer, "What is 2+3?", instruction=MODEL.instruction)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_activation_checkpointing_changes_the_time_not_the_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Why the sft and rl stage keys leave it out: LoRA dropout included, the recomputed forward is the same.
    runs = {on: train_sft(str(tiny_model_dir), ROWS, small(activation_checkpointing=on), tmp_path / str(on),
                          model_cfg=MODEL) for on in (True, False)}
    assert [runs[on]["settings"]["activation_checkpointing"] for on in (True, False)] == [True, False]
    assert runs[True]["losses"] == runs[False]["losses"]
    with_it, without = (weights(tmp_path / str(on) / "adapter" / "adapter_model.safetensors") for on in (True, False))
    assert set(with_it) == set(without) and all(with_it[name].equal(without[name]) for name in with_it)


def test_full_fine_tuning_changes_every_layer(tiny_model_dir: Path, tmp_path: Path) -> None:
    summary = train_sft(str(tiny_model_dir), ROWS, small(lora=False, learning_rate=1e-3), tmp_path, model_cfg=MODEL)
    assert summary["steps"] == 3 and not (tmp_path / "adapter").exists()
    base = weights(tiny_model_dir / "model.safetensors")
    trained = weights(tmp_path / "model" / "model.safetensors")
    assert all(not base[name].equal(trained[name]) for name in base if name.endswith("proj.weight"))
    assert load_tokenizer(str(tmp_path / "model")).chat_template is not None


def test_lora_targets_that_match_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"none of the LoRA targets \['query', 'value'\].*q_proj"):
        train_sft(str(tiny_model_dir), ROWS, small(lora_targets=["query", "value"]), tmp_path, model_cfg=MODEL)


def test_dataset_is_prompt_completion(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    row = sft_dataset(ROWS[:1], tokenizer, MODEL)[0]
    assert row["prompt"] == chat_messages(ROWS[0]["question"], instruction=MODEL.instruction)
    assert row["completion"] == [{"role": "assistant", "content": ROWS[0]["answer"]}]

    tokenizer.chat_template = None  # a base model: the plain-text prompt that generation uses
    row = sft_dataset(ROWS[:1], tokenizer, MODEL)[0]
    assert row["prompt"] == format_prompt(tokenizer, ROWS[0]["question"], instruction=MODEL.instruction)
    assert row["completion"] == " " + ROWS[0]["answer"]


@pytest.mark.parametrize("name", sorted(path.stem for path in (ROOT / "conf" / "sft").glob("*.yaml")))
def test_sft_configs_compose(name: str) -> None:
    cfg = compose_config(f"sft={name}").sft
    assert cfg.name == name
    assert not (cfg.load_in_4bit and not cfg.lora)


def test_only_the_last_checkpoints_are_kept_and_none_at_the_end(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stat_exp.student import sft

    kept = []
    real_drop = sft.drop_checkpoints

    def seen_then_dropped(trainer, folder: Path) -> None:
        kept.extend(sorted(p.name for p in folder.glob("checkpoint-*")))
        real_drop(trainer, folder)

    monkeypatch.setattr(sft, "drop_checkpoints", seen_then_dropped)
    train_sft(str(tiny_model_dir), ROWS, small(max_steps=4, save_steps=1, save_total_limit=2), tmp_path, model_cfg=MODEL)
    assert kept == ["checkpoint-3", "checkpoint-4"]  # one saved per step, the older ones deleted
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "model" / "config.json").exists()
