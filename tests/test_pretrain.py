from pathlib import Path

import pytest

from stat_exp.config import GeneratorConfig, PretrainConfig, TinyModelConfig, WorldConfig
from stat_exp.student.generation import make_generator
from stat_exp.student.models import IM_END, build_tiny_model, format_prompt, load_model, load_tokenizer
from stat_exp.student.pretrain import IGNORE_INDEX, collate, encode_examples, lr_factor, pretrain
from stat_exp.tasks import skillworld

INSTRUCTION = "Solve step by step."
# vocab_size below the 256 bytes + 4 special tokens: no merges, one token per character.
CHAR_MODEL = TinyModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                             num_kv_heads=1)
CFG = PretrainConfig(steps=40, batch_size=16, learning_rate=3e-3, warmup_steps=5)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return skillworld.generate(WorldConfig(), 300, seed=0)


@pytest.fixture(scope="module")
def base_dir(rows: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("char_model")
    build_tiny_model(CHAR_MODEL, [row["problem"] + "\n" + row["solution"] for row in rows], out)
    return out


@pytest.fixture(scope="module")
def trained(base_dir: Path, rows: list[dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pretrained")
    return out, pretrain(base_dir, rows, CFG, out, instruction=INSTRUCTION, device="cpu")


def completion_loss(model_dir: Path, rows: list[dict]) -> float:
    import torch

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype="float32", device="cpu")
    batch = collate(encode_examples(tokenizer, rows, instruction=INSTRUCTION), tokenizer.pad_token_id, model.device)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_the_tokenizer_has_one_token_per_character(base_dir: Path) -> None:
    tokenizer = load_tokenizer(str(base_dir))
    text = "37 + 45 = 82\n82 mod 7 = 5"
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == len(text)


def test_examples_train_on_the_completion_only(base_dir: Path, rows: list[dict]) -> None:
    tokenizer = load_tokenizer(str(base_dir))
    examples = encode_examples(tokenizer, rows[:3], instruction=INSTRUCTION)
    batch = collate(examples, tokenizer.pad_token_id, "cpu")
    for i, (prompt, completion) in enumerate(examples):
        assert tokenizer.decode(prompt) == format_prompt(tokenizer, rows[i]["problem"], instruction=INSTRUCTION)
        assert tokenizer.decode(completion) == rows[i]["solution"] + IM_END
        labels = batch["labels"][i].tolist()
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) : len(prompt) + len(completion)] == completion
        assert set(labels[len(prompt) + len(completion) :]) <= {IGNORE_INDEX}
        assert batch["attention_mask"][i].sum().item() == len(prompt) + len(completion)


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    factors = [lr_factor(step, CFG) for step in range(CFG.steps)]
    assert factors[0] == pytest.approx(1 / CFG.warmup_steps) and factors[CFG.warmup_steps - 1] == 1.0
    assert factors[CFG.warmup_steps] == 1.0
    assert all(a >= b for a, b in zip(factors[CFG.warmup_steps :], factors[CFG.warmup_steps + 1 :]))
    assert lr_factor(CFG.steps, CFG) == pytest.approx(0.0)


def test_pretraining_lowers_the_loss_and_changes_the_weights(
    base_dir: Path, rows: list[dict], trained: tuple[Path, dict]
) -> None:
    from safetensors.torch import load_file

    out_dir, summary = trained
    assert summary["steps"] == CFG.steps and summary["examples"] == len(rows) and summary["params"] > 0
    assert summary["final_loss"] < summary["initial_loss"]
    held_out = skillworld.generate(WorldConfig(), 32, seed=1)
    assert completion_loss(out_dir, held_out) < 0.8 * completion_loss(base_dir, held_out)
    before, after = load_file(base_dir / "model.safetensors"), load_file(out_dir / "model.safetensors")
    assert before.keys() == after.keys() and all(not before[key].equal(after[key]) for key in before)


def test_the_pretrained_model_generates(trained: tuple[Path, dict]) -> None:
    out_dir, _ = trained
    generator = make_generator(GeneratorConfig(backend="hf", device="cpu"), str(out_dir))
    tokenizer = load_tokenizer(str(out_dir))
    prompt = format_prompt(tokenizer, "Start at 3. Add 4.", instruction=INSTRUCTION)
    [[text]] = generator.generate([prompt], n=1, temperature=0.0, top_p=1.0, max_tokens=20, seed=0)
    assert isinstance(text, str) and IM_END not in text


def test_same_seed_same_weights(base_dir: Path, rows: list[dict], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = PretrainConfig(steps=3, batch_size=8, warmup_steps=1)
    for name in "ab":
        pretrain(base_dir, rows, cfg, tmp_path / name, instruction=INSTRUCTION, device="cpu")
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in "ab")
    assert all(a[key].equal(b[key]) for key in a)
