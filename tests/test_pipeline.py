"""End to end: the eval-only preset on a slice of MATH500 with the tiny model, then a rerun."""

import json

import yaml

from helpers import SHARED_DATA, compose_config, run_cli
from stat_exp.pipeline import run
from wandb_records import logged

SMALL = [
    "experiment=eval_tiny",
    f"task.data_dir={SHARED_DATA}",
    "eval.limit=3",
    "eval.max_tokens=16",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.tokenizer_corpus_size=200",
]


def small_config(tmp_path, *overrides):
    return compose_config(*SMALL, f"paths.cache_dir={tmp_path / 'cache'}", *overrides)


def eval_rows(cache_dir) -> list[dict]:
    (rows_path,) = cache_dir.glob("eval/*/rows.jsonl")
    return [json.loads(line) for line in rows_path.read_text().splitlines()]


# The first three MATH500 questions' subjects and levels.
SUBJECTS = ["Precalculus", "Intermediate Algebra", "Algebra"]
LEVELS = ["2", "5", "3"]


def test_eval_only_run_writes_metrics_and_offline_wandb_then_reuses(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = small_config(tmp_path)

    metrics = run(cfg, tmp_path / "run1")
    result = metrics["eval"]["base"]["math500"]
    rows = eval_rows(tmp_path / "cache")
    assert set(result) == {"n", "pass@1", "strict_pass@1", "no_answer", "by_subject", "by_level"}  # one sample
    first = [json.loads(line)["problem"] for line in (SHARED_DATA / "math500" / "test.jsonl").open()][:3]
    assert result["n"] == 3 and [r["problem"] for r in rows] == first
    # Each metric from the graded rows, counted here by hand.
    assert result["pass@1"] == round(sum(r["correct"][0] for r in rows) / 3, 4)
    assert result["no_answer"] == round(sum(r["predictions"][0] is None for r in rows) / 3, 4)
    assert result["by_subject"] == {s: {"n": 1, "accuracy": float(r["correct"][0])} for s, r in zip(SUBJECTS, rows)}
    assert [(s["stage"], s["status"]) for s in metrics["stages"]] == [("model", "computed"), ("eval", "computed")]
    assert json.loads((tmp_path / "run1" / "metrics.json").read_text())["eval"] == metrics["eval"]

    saved = yaml.safe_load((tmp_path / "run1" / "config.yaml").read_text())
    assert saved["eval"]["limit"] == 3

    wandb = logged(tmp_path / "run1")
    assert wandb["summary"]["eval/base/math500/pass@1"] == result["pass@1"]
    assert any(h.get("eval/base/math500/n") == 3 for h in wandb["history"])
    assert wandb["config"]["eval"]["limit"] == 3

    again = run(cfg, tmp_path / "run2")
    assert [s["status"] for s in again["stages"]] == ["reused", "reused"]
    assert again["eval"] == metrics["eval"]


def test_eval_rows_hold_graded_samples(tmp_path):
    cfg = small_config(tmp_path, "logger=none", "eval.samples=2", "eval.temperature=0.8")
    metrics = run(cfg, tmp_path / "run")
    result = metrics["eval"]["base"]["math500"]
    rows = eval_rows(tmp_path / "cache")
    assert len(rows) == 3 and all(len(r["responses"]) == len(r["correct"]) == len(r["strict"]) == 2 for r in rows)
    assert set(result) == {"n", "pass@1", "strict_pass@1", "no_answer", "avg@2", "pass@2", "strict_avg@2",
                           "strict_pass@2", "by_subject", "by_level"}
    assert result["avg@2"] == round(sum(sum(r["correct"]) / 2 for r in rows) / 3, 4)
    assert result["pass@2"] == round(sum(any(r["correct"]) for r in rows) / 3, 4)
    assert result["by_level"] == {level: {"n": 1, "accuracy": sum(r["correct"]) / 2}
                                  for level, r in sorted(zip(LEVELS, rows))}


def test_cli_runs_then_reuses_every_stage(tmp_path):
    for name in ("first", "second"):
        run_cli(*SMALL, f"paths.cache_dir={tmp_path / 'cache'}", "logger=none", f"hydra.run.dir={tmp_path / name}",
                timeout=300)
    log = (tmp_path / "second" / "stat_exp.log").read_text()
    assert "model      reused" in log and "eval       reused" in log and "computed" not in log
    assert (tmp_path / "second" / "metrics.json").exists()


def test_grpo_on_the_base_model_is_evaluated_before_and_after(tmp_path):
    cfg = small_config(tmp_path, "logger=none", "eval.limit=2", "variant=none", "rl=grpo", "rl.max_steps=1",
                       "rl.num_generations=2", "rl.questions_per_batch=2", "rl.questions_per_update=2", "rl.max_completion_length=8",
                       "rl.learning_rate=1e-3", "rl.bf16=false", "task.val_size=10")
    metrics = run(cfg, tmp_path / "run")
    assert set(metrics["eval"]) == {"base", "rl"} and metrics["train"]["rl"]["steps"] == 1
    assert set(metrics["summary"]["math500"]) == {"base", "rl"}
    assert ("rl", "computed") in [(s["stage"], s["status"]) for s in metrics["stages"]]


def test_pretraining_needs_a_task_with_a_pretrain_split(tmp_path):
    import pytest

    cfg = small_config(tmp_path, "model=tiny_pretrained", "logger=none")
    with pytest.raises(ValueError, match="model=tiny_pretrained pre-trains on the task's 'pretrain' split, which task 'math' lacks"):
        run(cfg, tmp_path / "run")
