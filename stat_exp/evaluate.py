"""Evaluation: the student answers a benchmark; answers are graded; accuracy is summarised.

pass@1 grades the first sample; with k > 1 samples avg@k is the mean accuracy over all k
(the unbiased pass@1 estimate) and pass@k counts a question solved when any sample is right;
each has a `strict_` twin computed from the strict (normalised-string) grades.
Breakdowns by subject, level and (when labelled) skill use avg@k.

Generation survives being killed: `answer_and_grade` answers and grades `shard_size` questions
at a time and writes each shard (`shards/NNNN.jsonl`) into the stage's unfinished folder, which
the store keeps for the rerun; the rerun generates only the shards that are missing.
"""

import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from stat_exp.config import EvalConfig, GeneratorConfig, ModelConfig
from stat_exp.store import read_jsonl, write_jsonl

SHARDS = "shards"  # the folder, inside a stage's output folder, of its finished shards

log = logging.getLogger(__name__)


def benchmark_config(cfg: DictConfig, name: str) -> DictConfig:
    """`cfg` (eval) for the benchmark `name`: its `per_benchmark` sampling over the shared settings."""
    own = cfg.per_benchmark.get(name)
    if own is None:
        return cfg
    return OmegaConf.merge(cfg, {k: v for k, v in OmegaConf.to_container(own).items() if v is not None})


def shard_seed(seed: int, index: int, shard_size: int) -> int:
    """The seed of shard `index`: shard 0 keeps `seed`, and since the hf backend seeds its batches
    `seed + batch`, with at most `shard_size` batches a shard, no two shards share a batch seed."""
    return seed + index * shard_size


def answer_and_grade(
    rows: Sequence[dict],
    out_dir: Path,
    *,
    model_path: str,
    model_cfg: ModelConfig,
    gen_cfg: GeneratorConfig,
    eval_cfg: EvalConfig,
    samples: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int,
) -> list[dict]:
    """The student's graded zero-shot answers to `rows`, `samples` per question, in order.

    Works in shards of `gen_cfg.shard_size` questions, each written to `out_dir/shards` once graded
    and skipped when already there (a rerun after a kill); writes all records to `out_dir/rows.jsonl`
    and then removes the shards. The model is loaded only when some shard is missing;
    `generator=replay` answers with a previous run's recorded responses instead, with no model.
    """
    from tqdm import tqdm

    from stat_exp.student.generation import make_generator
    from stat_exp.student.models import format_prompt, load_tokenizer

    if gen_cfg.backend == "replay" and not gen_cfg.replay_from:
        raise ValueError("generator=replay needs generator.replay_from: the rows.jsonl of a previous run")
    size = gen_cfg.shard_size
    if size < 1:
        raise ValueError(f"generator.shard_size must be at least 1, got {size}")
    shards = out_dir / SHARDS
    shards.mkdir(exist_ok=True)
    paths = [shards / f"{index:04d}.jsonl" for index in range(-(-len(rows) // size))]
    finished = sum(path.exists() for path in paths)
    if finished:
        log.info("resuming: %d of %d shards of %d questions already answered", finished, len(paths), size)
    tokenizer = generator = None
    records: list[dict] = []
    for index, path in enumerate(tqdm(paths, desc="shards", unit="shard")):
        chunk = rows[index * size : (index + 1) * size]
        if path.exists():
            records += read_jsonl(path)
            continue
        if gen_cfg.backend == "replay":  # recorded answers, matched by question: no model, no prompts
            from stat_exp.student.replay import recorded_responses

            responses = recorded_responses(gen_cfg.replay_from, chunk, samples)
        else:
            if generator is None:
                tokenizer = load_tokenizer(model_path, revision=model_cfg.revision)
                generator = make_generator(gen_cfg, model_path, dtype=model_cfg.dtype, revision=model_cfg.revision)
            prompts = [format_prompt(tokenizer, r["problem"], instruction=model_cfg.instruction,
                                     system_prompt=model_cfg.system_prompt) for r in chunk]
            responses = generator.generate(prompts, n=samples, temperature=temperature, top_p=top_p,
                                           max_tokens=max_tokens, seed=shard_seed(seed, index, size))
        partial = path.with_suffix(".partial")
        write_jsonl(partial, grade_responses(chunk, responses, eval_cfg))
        os.replace(partial, path)  # a shard is there whole or not at all
        records += read_jsonl(path)
    write_jsonl(out_dir / "rows.jsonl", records)
    shutil.rmtree(shards)  # rows.jsonl holds them all
    return records


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
    """The eval stage: answer and grade in shards, write `rows.jsonl` into `out_dir`, return the metrics."""
    records = answer_and_grade(
        rows,
        out_dir,
        model_path=model_path,
        model_cfg=model_cfg,
        gen_cfg=gen_cfg,
        eval_cfg=cfg,
        samples=cfg.samples,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_tokens,
        seed=cfg.seed,
    )
    return summarize(records)
