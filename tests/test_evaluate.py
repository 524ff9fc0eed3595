"""The evaluation summary against numbers worked out by hand, and an eval run whose student
answers a known subset right (recorded responses replayed through `generator=replay`)."""

import json
import logging

import pytest

from helpers import SHARED_DATA, compose_config
from stat_exp.config import EvalConfig, GeneratorConfig, ModelConfig
from stat_exp.evaluate import evaluate, grade_responses, summarize
from stat_exp.pipeline import run
from stat_exp.store import read_jsonl, write_jsonl
from stat_exp.student.replay import recorded_responses
from wandb_records import logged

T, F = True, False


def record(subject, level, skills, correct, strict, predictions) -> dict:
    return {"subject": subject, "level": level, "skills": skills, "correct": correct, "strict": strict,
            "predictions": predictions}


# Three samples a question; the strict grades are a subset of the lenient ones, and differ from them.
K3 = [
    record("A", 1, ["s1", "s2"], [T, T, T], [T, T, F], ["1", "1", "1"]),
    record("A", 2, ["s1"], [F, T, T], [F, F, F], [None, "3", "3"]),
    record("B", 1, [], [F, F, F], [F, F, F], [None, None, "x"]),
    record("B", 2, ["s2"], [T, T, T], [F, T, T], ["5", "5", "5"]),
]
K3_EXPECTED = {
    "n": 4,
    "pass@1": 0.5,  # first samples: T F F T
    "strict_pass@1": 0.25,  # T F F F
    "no_answer": 0.5,  # first predictions None for the 2nd and 3rd
    "avg@3": 0.6667,  # (3/3 + 2/3 + 0/3 + 3/3) / 4 = 8/12
    "pass@3": 0.75,  # any right: T T F T
    "strict_avg@3": 0.3333,  # (2/3 + 0 + 0 + 2/3) / 4 = 4/12
    "strict_pass@3": 0.5,  # any strict: T F F T
    "by_subject": {"A": {"n": 2, "accuracy": 0.8333},  # (1 + 2/3) / 2
                   "B": {"n": 2, "accuracy": 0.5}},  # (0 + 1) / 2
    "by_level": {"1": {"n": 2, "accuracy": 0.5},  # (1 + 0) / 2
                 "2": {"n": 2, "accuracy": 0.8333}},  # (2/3 + 1) / 2
    "by_skill": {"s1": {"n": 2, "accuracy": 0.8333},  # (1 + 2/3) / 2
                 "s2": {"n": 2, "accuracy": 1.0}},  # (1 + 1) / 2
}

# One sample a question: no @k metrics, no level or skill breakdown (none recorded).
K1 = [
    record("Algebra", None, [], [T], [T], ["2"]),
    record("Algebra", None, [], [T], [F], ["0.5"]),
    record("Algebra", None, [], [F], [F], [None]),
    record("Geometry", None, [], [F], [F], ["7"]),
    record("Geometry", None, [], [T], [F], ["1/2"]),
]
K1_EXPECTED = {
    "n": 5,
    "pass@1": 0.6,  # 3 of 5
    "strict_pass@1": 0.2,  # 1 of 5
    "no_answer": 0.2,  # 1 of 5
    "by_subject": {"Algebra": {"n": 3, "accuracy": 0.6667},  # 2 of 3
                   "Geometry": {"n": 2, "accuracy": 0.5}},  # 1 of 2
}


# Two samples: the smallest k with @k metrics.
K2 = [
    record("A", None, [], [F, T], [F, T], [None, "1"]),
    record("A", None, [], [F, F], [F, F], ["2", "3"]),
]
K2_EXPECTED = {"n": 2, "pass@1": 0.0, "strict_pass@1": 0.0, "no_answer": 0.5, "avg@2": 0.25, "pass@2": 0.5,
               "strict_avg@2": 0.25, "strict_pass@2": 0.5, "by_subject": {"A": {"n": 2, "accuracy": 0.25}}}


@pytest.mark.parametrize("records,expected", [(K3, K3_EXPECTED), (K2, K2_EXPECTED), (K1, K1_EXPECTED)],
                         ids=["k=3", "k=2", "k=1"])
def test_summary_matches_hand_computed_metrics(records, expected):
    assert summarize(records) == expected


def test_summary_of_no_questions_fails():
    with pytest.raises(ValueError, match="^cannot summarise an evaluation with no questions$"):
        summarize([])


def test_replay_matches_questions_by_problem_and_names_a_missing_one(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"id": "a", "problem": "P1", "responses": ["x", "y", "z"]},
                       {"id": "b", "problem": "P2", "responses": ["u", "v", "w"]}])
    rows = [{"id": "q2", "problem": "P2"}, {"id": "q1", "problem": "P1"}]
    assert recorded_responses(path, rows, 2) == [["u", "v"], ["x", "y"]]
    with pytest.raises(KeyError, match="question 'q3'.*'P3'"):
        recorded_responses(path, [{"id": "q3", "problem": "P3"}], 1)
    with pytest.raises(ValueError, match="3 responses for question 'q1', but 4 samples"):
        recorded_responses(path, rows[1:], 4)
    with pytest.raises(FileNotFoundError, match="replay_from='.*nothing.jsonl'"):
        recorded_responses(tmp_path / "nothing.jsonl", rows, 1)


def test_evaluate_grades_replayed_responses_writes_the_rows_and_summarises(tmp_path):
    previous = tmp_path / "previous.jsonl"
    write_jsonl(previous, [{"problem": "P1", "responses": ["\\boxed{0.5}", "no answer"]},
                           {"problem": "P2", "responses": ["\\boxed{3}", "\\boxed{4}"]}])
    rows = [{"id": "a", "problem": "P1", "answer": "\\frac{1}{2}", "subject": "Algebra", "level": 1, "skills": ["frac"]},
            {"id": "b", "problem": "P2", "answer": "3"}]
    gen_cfg = GeneratorConfig(backend="replay", replay_from=str(previous))
    metrics = evaluate(rows, tmp_path, cfg=EvalConfig(samples=2), gen_cfg=gen_cfg, model_cfg=ModelConfig(name="unused"),
                       model_path="unused")
    assert read_jsonl(tmp_path / "rows.jsonl") == [
        {"id": "a", "problem": "P1", "subject": "Algebra", "level": 1, "skills": ["frac"], "answer": "\\frac{1}{2}",
         "responses": ["\\boxed{0.5}", "no answer"], "predictions": ["0.5", None], "correct": [True, False],
         "strict": [False, False]},  # 0.5 equals 1/2 for math-verify, not as a string
        {"id": "b", "problem": "P2", "subject": None, "level": None, "skills": [], "answer": "3",
         "responses": ["\\boxed{3}", "\\boxed{4}"], "predictions": ["3", "4"], "correct": [True, False],
         "strict": [True, False]},
    ]
    assert metrics == {"n": 2, "pass@1": 1.0, "strict_pass@1": 0.5, "no_answer": 0.0, "avg@2": 0.5, "pass@2": 1.0,
                       "strict_avg@2": 0.25, "strict_pass@2": 0.5,
                       "by_subject": {"Algebra": {"n": 1, "accuracy": 0.5}},
                       "by_level": {"1": {"n": 1, "accuracy": 0.5}},
                       "by_skill": {"frac": {"n": 1, "accuracy": 0.5}}}


def test_grading_fewer_response_lists_than_questions_fails():
    with pytest.raises(ValueError):
        grade_responses([{"id": "a", "answer": "1"}, {"id": "b", "answer": "2"}], [["\\boxed{1}"]], EvalConfig())


def test_replay_without_a_file_to_replay_fails_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="^generator=replay needs generator.replay_from"):
        evaluate([{"id": "a", "problem": "P1", "answer": "1"}], tmp_path, cfg=EvalConfig(),
                 gen_cfg=GeneratorConfig(backend="replay"), model_cfg=ModelConfig(name="unused"), model_path="unused")


# The first three MATH500 questions (answers (3, pi/2), p - q, 14/3), each answered twice.
REPLAYED = [
    ["... so \\boxed{(3, \\frac{\\pi}{2})}", "\\boxed{(3, \\pi)}"],  # right (strict too), wrong
    ["I cannot tell.", "\\boxed{p - q}"],  # no answer, right (strict too)
    ["\\boxed{14/3}", "\\boxed{5}"],  # right (math-verify only, not strict), wrong
]
REPLAYED_METRICS = {
    "n": 3,
    "pass@1": 0.6667,  # T F T
    "strict_pass@1": 0.3333,  # T F F
    "no_answer": 0.3333,  # the second question's first answer has no \boxed{}
    "avg@2": 0.5,  # (1/2 + 1/2 + 1/2) / 3
    "pass@2": 1.0,  # every question has a right answer
    "strict_avg@2": 0.3333,  # (1/2 + 1/2 + 0) / 3
    "strict_pass@2": 0.6667,  # T T F
}


def test_eval_run_replays_recorded_answers_into_metrics_and_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    questions = read_jsonl(SHARED_DATA / "math500" / "test.jsonl")[:3]
    previous = tmp_path / "previous_rows.jsonl"
    write_jsonl(previous, [{"problem": q["problem"], "responses": r} for q, r in zip(questions, REPLAYED)])
    cfg = compose_config("experiment=eval_tiny", f"task.data_dir={SHARED_DATA}", "eval.limit=3", "eval.samples=2",
                         "model.tiny.tokenizer_corpus_size=200", "generator=replay",
                         f"generator.replay_from={previous}", f"paths.cache_dir={tmp_path / 'cache'}",
                         "logger=wandb")

    metrics = run(cfg, tmp_path / "run")

    result = metrics["eval"]["base"]["math500"]
    assert {k: v for k, v in result.items() if not k.startswith("by_")} == REPLAYED_METRICS
    assert result["by_level"] == {"2": {"n": 1, "accuracy": 0.5}, "3": {"n": 1, "accuracy": 0.5},
                                  "5": {"n": 1, "accuracy": 0.5}}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"]["base"]["math500"]
    assert saved == result
    summary = logged(tmp_path / "run")["summary"]
    assert {k: summary[f"eval/base/math500/{k}"] for k in REPLAYED_METRICS} == REPLAYED_METRICS
    (rows_path,) = (tmp_path / "cache" / "eval").glob("*/rows.jsonl")
    rows = read_jsonl(rows_path)
    assert [r["responses"] for r in rows] == REPLAYED
    assert [r["strict"] for r in rows] == [[True, False], [False, True], [False, False]]


class RecordingGenerator:
    """The hf and vLLM backends' interface, recording each request; every answer of call i is \\boxed{i}."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, **sampling):
        self.calls.append((list(prompts), sampling))
        return [[f"\\boxed{{{len(self.calls)}}}"] * sampling["n"] for _ in prompts]


@pytest.fixture
def backend(monkeypatch):
    """A recording model backend in place of the tokenizer, the generator and the prompt format:
    (what was built, the generator)."""
    from stat_exp.student import generation, models

    built, generator = [], RecordingGenerator()
    monkeypatch.setattr(models, "load_tokenizer", lambda path, revision: built.append(("tokenizer", path, revision))
                        or "TOK")
    monkeypatch.setattr(generation, "make_generator", lambda gen_cfg, path, dtype, revision: built.append(
        ("generator", gen_cfg.backend, path, dtype, revision)) or generator)
    monkeypatch.setattr(models, "format_prompt", lambda tokenizer, problem, instruction, system_prompt:
                        f"{tokenizer}|{system_prompt}|{instruction}|{problem}")
    return built, generator


FIVE = [{"id": str(i), "problem": f"P{i}", "answer": "1"} for i in range(5)]


def evaluate_in_shards(out_dir, shard_size: int, **eval_settings) -> dict:
    return evaluate(FIVE, out_dir, cfg=EvalConfig(**eval_settings),
                    gen_cfg=GeneratorConfig(backend="hf", shard_size=shard_size), model_cfg=ModelConfig(name="m"),
                    model_path="/models/m")


def test_a_model_backend_is_built_once_and_asked_with_the_eval_settings(tmp_path, backend):
    built, generator = backend
    cfg = EvalConfig(samples=2, temperature=0.7, top_p=0.9, max_tokens=33, seed=11)
    model_cfg = ModelConfig(name="m", revision="r1", dtype="float32", instruction="Think.", system_prompt="Be brief.")
    metrics = evaluate(FIVE, tmp_path, cfg=cfg, gen_cfg=GeneratorConfig(backend="hf", shard_size=2),
                       model_cfg=model_cfg, model_path="/models/m")
    assert built == [("tokenizer", "/models/m", "r1"), ("generator", "hf", "/models/m", "float32", "r1")]
    # Shards of 2, 2 and 1 questions, shard i seeded seed + i x shard_size (shard_seed).
    sampling = {"n": 2, "temperature": 0.7, "top_p": 0.9, "max_tokens": 33}
    assert generator.calls == [([f"TOK|Be brief.|Think.|P{i}" for i in questions], {**sampling, "seed": seed})
                               for questions, seed in (((0, 1), 11), ((2, 3), 13), ((4,), 15))]
    assert metrics["pass@1"] == 0.4 and metrics["pass@2"] == 0.4  # only the first shard answers 1


def test_a_rerun_after_a_kill_answers_only_the_shards_not_written(tmp_path, backend, caplog):
    _, generator = backend
    (tmp_path / "shards").mkdir()  # the rerun finds the second shard written: read back, the others answered
    second = grade_responses(FIVE[2:4], [["\\boxed{1}"], ["\\boxed{7}"]], EvalConfig())
    write_jsonl(tmp_path / "shards" / "0001.jsonl", second)
    with caplog.at_level(logging.INFO, logger="stat_exp.evaluate"):
        metrics = evaluate_in_shards(tmp_path, 2, seed=11)
    assert "resuming: 1 of 3 shards of 2 questions already answered" in caplog.messages
    assert [sampling["seed"] for _, sampling in generator.calls] == [11, 15]  # the first and the third
    written = read_jsonl(tmp_path / "rows.jsonl")
    assert written[2:4] == second and [r["id"] for r in written] == ["0", "1", "2", "3", "4"]
    # Right: the first call's (answering 1) 2 of 2, the written shard's 1 of 2; the shards are gone.
    assert metrics["pass@1"] == 0.6 and not (tmp_path / "shards").exists()


def test_shards_of_one_question_and_no_shards_of_none(tmp_path, backend):
    _, generator = backend
    (tmp_path / "one").mkdir()
    evaluate_in_shards(tmp_path / "one", 1, seed=3)
    assert [(len(prompts), sampling["seed"]) for prompts, sampling in generator.calls] == [(1, s) for s in range(3, 8)]
    with pytest.raises(ValueError, match="^generator.shard_size must be at least 1, got 0$"):
        evaluate_in_shards(tmp_path, 0)


def test_grading_runs_with_the_eval_workers_and_timeout(monkeypatch):
    from stat_exp import grading

    asked = []
    monkeypatch.setattr(grading, "grade", lambda gold, predicted, *, workers, timeout:
                        asked.append((gold, predicted, workers, timeout)) or [grading.Grade(True, False)] * len(gold))
    records = grade_responses([{"id": "a", "problem": "P", "answer": "2"}], [["\\boxed{2}", "none"]],
                              EvalConfig(grading_workers=3, grading_timeout=1.5))
    assert asked == [(["2", "2"], ["2", None], 3, 1.5)]
    assert (records[0]["correct"], records[0]["strict"]) == ([True, True], [False, False])
