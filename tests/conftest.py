import random
from pathlib import Path

import pytest

from stat_exp.config import TinyModelConfig

TINY = TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def math_corpus(lines: int, seed: int = 0) -> list[str]:
    """Short arithmetic questions with boxed answers: enough text to train a small BPE vocabulary."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op, result = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        corpus.append(f"What is {a}{op}{b}? We compute {a}{op}{b} = {result}. The answer is \\boxed{{{result}}}.")
    return corpus


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 model and tokenizer saved to a directory, built once per test session."""
    from stat_exp.student.models import build_tiny_model

    out_dir = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(TINY, math_corpus(300), out_dir)
    return out_dir
