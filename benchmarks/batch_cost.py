"""Batch-mode cost: the labelling requests of MATH's pool priced online and through the Batch API.

Builds the requests the `skill_map` stage sends for every question of `math/train.jsonl` (4,500)
with the catalogue `math/skills.json`, counts their prompt tokens with litellm.token_counter
(tiktoken's encoding for OpenAI models, with the chat format's per-message tokens), assumes
`--completion-tokens` per answer (nothing is sent: no answer is seen), and prices both at
litellm's list prices: online with `cost_per_token`, in batch with `batch_cost_calculator`, as the
teacher does. Run from the repository root:

    .venv/bin/python -m benchmarks.batch_cost [--model openai/gpt-4o-mini] [--completion-tokens 100]
"""

import argparse
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from tqdm import tqdm

from stat_exp.config import register_configs
from stat_exp.skills import label_questions, load_catalogue
from stat_exp.tasks.loader import load_source
from stat_exp.teacher.client import Reply

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm's bundled price table, no fetch


class Recorder:
    """Stands in for the Teacher: keeps the requests it is asked and answers none."""

    def ask(self, requests, parse, *, desc):
        self.requests = list(requests)
        return [Reply(request, None, None, "not asked", 0) for request in requests]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--model", default="openai/gpt-4o-mini")
    parser.add_argument("--completion-tokens", type=int, default=100,
                        help="assumed answer length: five names in one <skill> tag and a short <reason>")
    args = parser.parse_args()

    import litellm
    from litellm.cost_calculator import batch_cost_calculator
    from litellm.types.utils import Usage

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=math", f"task.data_dir={args.data_dir.resolve()}"])
    rows = load_source(cfg.task.train, cfg.task.data_dir, "math-train")
    catalogue = load_catalogue(args.data_dir / "math" / "skills.json")
    recorder = Recorder()
    label_questions(recorder, rows, catalogue, max_skills=cfg.task.skills.max_skills_per_question)
    name = litellm.get_llm_provider(args.model)[0]
    prompt = sum(litellm.token_counter(model=name, messages=list(request.messages))
                 for request in tqdm(recorder.requests, desc="counting tokens", unit="req"))
    completion = args.completion_tokens * len(recorder.requests)

    online = litellm.cost_per_token(model=args.model, prompt_tokens=prompt, completion_tokens=completion)
    batch = batch_cost_calculator(Usage(prompt_tokens=prompt, completion_tokens=completion,
                                        total_tokens=prompt + completion), args.model)
    info = litellm.get_model_info(args.model)
    print(f"{len(recorder.requests)} labelling requests, {args.model}: {prompt:,} prompt tokens "
          f"({prompt / len(recorder.requests):.0f} a request), {completion:,} completion tokens "
          f"({args.completion_tokens} a request, assumed)")
    print(f"{'mode':<8} {'$/M in':>7} {'$/M out':>8} {'prompt $':>9} {'answers $':>10} {'total $':>8}")
    for mode, (inp, out), (p_cost, c_cost) in (
        ("online", ("input_cost_per_token", "output_cost_per_token"), online),
        ("batch", ("input_cost_per_token_batches", "output_cost_per_token_batches"), batch),
    ):
        rate = [info.get(key) for key in (inp, out)]
        shown = [f"{r * 1e6:.3f}" if r is not None else "half" for r in rate]
        print(f"{mode:<8} {shown[0]:>7} {shown[1]:>8} {p_cost:9.3f} {c_cost:10.3f} {p_cost + c_cost:8.3f}")
    print(f"batch / online: {sum(batch) / sum(online):.2f}")


if __name__ == "__main__":
    main()
