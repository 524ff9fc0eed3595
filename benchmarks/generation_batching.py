"""Time greedy generation with the hf backend: one prompt at a time vs batches of prompts.

Run from the repository root:  python -m benchmarks.generation_batching --prompts 32 --batch-size 16
It builds a small random Qwen2 (hidden 128, 4 layers) in a temporary directory; no hub needed.
"""

import argparse
import random
import tempfile
import time
from pathlib import Path

from stat_exp.config import GeneratorConfig, TinyModelConfig
from stat_exp.student.generation import HFGenerator
from stat_exp.student.models import build_tiny_model


def prompts(count: int, seed: int = 0) -> list[str]:
    """Arithmetic questions of varied length, as an evaluation set would have."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        terms = [str(rng.randint(0, 999)) for _ in range(rng.randint(2, 12))]
        out.append(f"What is {' + '.join(terms)}? Show your work.")
    return out


def timed(generator: HFGenerator, texts: list[str], max_tokens: int) -> tuple[float, list[list[str]]]:
    start = time.perf_counter()
    out = generator.generate(texts, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()

    texts = prompts(args.prompts)
    cfg = TinyModelConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(cfg, prompts(2000, seed=1), Path(tmp))
        single = HFGenerator(GeneratorConfig(batch_size=1, device=args.device), tmp)
        batched = HFGenerator(GeneratorConfig(batch_size=args.batch_size, device=args.device), tmp)
        timed(batched, texts[:2], args.max_tokens)  # warm-up: first-call allocations are not generation time
        single_s, single_out = timed(single, texts, args.max_tokens)
        batched_s, batched_out = timed(batched, texts, args.max_tokens)

    print(f"device {single.model.device}, {args.prompts} prompts, max {args.max_tokens} new tokens, greedy")
    print(f"{'one at a time:':<20}{single_s:7.2f} s")
    print(f"{f'batches of {args.batch_size}:':<20}{batched_s:7.2f} s")
    print(f"speed-up (one at a time / batched): {single_s / batched_s:.1f}x")
    print(f"same completions: {single_out == batched_out}")


if __name__ == "__main__":
    main()
