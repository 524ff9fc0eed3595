"""Evaluation: the student answers a benchmark; answers are graded; accuracy is summarised.

pass@1 grades the first sample; with k > 1 samples avg@k is the mean accuracy over all k
(the unbiased pass@1 estimate) and pass@k counts a question solved when any sample is right;
each has a `strict_` twin computed from the strict (normalised-string) grades.
Breakdowns by subject, level and (when labelled) skill use avg@k.
"""

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from stat_exp.config import EvalConfig, GeneratorConfig, ModelConfig
from stat_exp.store import write_jsonl


def benchmark_config(cfg: DictConfig, name: str) -> DictConfig:
    """`cfg` (eval) for the benchmark `name`: its `per_benchmark` sampling over the shared settings."""
    own = cfg.per_benchmark.get(name)
    if own is None:
        return cfg
    return OmegaConf.merge(cfg, {k: v for k, v in OmegaConf.to_container(own).items() if v is not None})


def answer_questions(
    rows: Sequence[dict],
    *,
    model_path: str,
    model_cfg: ModelConfig,
    gen_cfg: GeneratorConfig,
    samples: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int,
) -> list[list[str]]:
    """The student's zero-shot answers to `rows`, `samples` per question, in order."""
    if gen_cfg.backend == "replay":  # recorded answers, matched by question: no model, no prompts
        from stat_exp.student.replay import recorded_responses

        if not gen_cfg.replay_from:
            raise ValueError("generator=replay needs generator.replay_from: the rows.jsonl of a previous run")
        return recorded_responses(gen_cfg.replay_from, rows, samples)
    from stat_exp.student.generation import make_generator
    from stat_exp.student.models import format_prompt, load_tokenizer

    tokenizer = load_tokenizer(model_path, revision=model_cfg.revision)
    prompts = [
        format_prompt(tokenizer, r["problem"], instruction=model_cfg.instruction, system_prompt=model_cfg.system_prompt)
        for r in rows
    ]
    generator = make_generator(gen_cfg, model_path, dtype=model_cfg.dtype, revision=model_cfg.revision)
    return generator.generate(
        prompts, n=samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed
    )


def grade_responses(rows: Sequence[dict], responses: Sequence[Sequence[str]], cfg: EvalConfig) -> list[dict]:
    """One graded record per question: extracted answers and both correctness metrics per sample."""
    from stat_exp.grading import extract_boxed, grade

    flat_gold, flat_pred = [], []
    for row, answers in zip(rows, responses, strict=True):
        for text in answers:
            flat_gold.append(row["answer"])
            flat_pred.append(extract_boxed(text))
    grades = iter(grade(flat_gold, flat_pred, workers=cfg.grading_workers, timeout=cfg.grading_timeout))
    preds = iter(flat_pred)
    records = []
    for row, answers in zip(rows, responses):
        row_grades = [next(grades) for _ in answers]
        records.append(
            {
                "id": row["id"],
                "problem": row["problem"],
                "subject": row.get("subject"),
                "level": row.get("level"),
                "skills": row.get("skills") or [],
                "answer": row["answer"],
                "responses": list(answers),
                "predictions": [next(preds) for _ in answers],
                "correct": [g.correct for g in row_grades],
                "strict": [g.strict for g in row_grades],
            }
        )
    return records


def summarize(records: Sequence[dict]) -> dict:
    """Accuracy metrics of graded records (all samples of a record count equally)."""
    if not records:
        raise ValueError("cannot summarise an evaluation with no questions")
    k = len(records[0]["correct"])
    n = len(records)

    def mean(values) -> float:
        values = list(values)
        return round(sum(values) / len(values), 4)

    metrics = {
        "n": n,
        "pass@1": mean(r["correct"][0] for r in records),
        "strict_pass@1": mean(r["strict"][0] for r in records),
        "no_answer": mean(r["predictions"][0] is None for r in records),
    }
    if k > 1:
        metrics[f"avg@{k}"] = mean(mean(r["correct"]) for r in records)
        metrics[f"pass@{k}"] = mean(any(r["correct"]) for r in records)
        metrics[f"strict_avg@{k}"] = mean(mean(r["strict"]) for r in records)
        metrics[f"strict_pass@{k}"] = mean(any(r["strict"]) for r in records)
    for group in ("subject", "level", "skill"):
        breakdown = _breakdown(records, group)
        if breakdown:
            metrics[f"by_{group}"] = breakdown
    return metrics


def _breakdown(records: Sequence[dict], group: str) -> dict:
    totals: dict[str, list[float]] = defaultdict(list)
    for r in records:
        accuracy = sum(r["correct"]) / len(r["correct"])
        keys = r["skills"] if group == "skill" else [r[group]]
        for key in keys:
            if key is not None:
                totals[str(key)].append(accuracy)
    return {key: {"n": len(v), "accuracy": round(sum(v) / len(v), 4)} for key, v in sorted(totals.items())}


def evaluate(
    rows: Sequence[dict],
    out_dir: Path,
    *,
    cfg: EvalConfig,
    gen_cfg: GeneratorConfig,
    model_cfg: ModelConfig,
    model_path: str,
) -> dict:
    """The eval stage: answer, grade, write `rows.jsonl` into `out_dir`, return the metrics."""
    responses = answer_questions(
        rows,
        model_path=model_path,
        model_cfg=model_cfg,
        gen_cfg=gen_cfg,
        samples=cfg.samples,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_tokens,
        seed=cfg.seed,
    )
    records = grade_responses(rows, responses, cfg)
    write_jsonl(out_dir / "rows.jsonl", records)
    return summarize(records)
