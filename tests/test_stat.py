"""The STAT loop through the CLI: a multirun over variants shares every upstream stage."""

import json
import logging
import re
import threading
from collections import Counter

import pytest

from helpers import compose_config, run_cli
from stat_exp.pipeline import round_validation
from teacher_server import TeacherServer
from wandb_records import logged

SKILLS = ["linear_equations", "factoring", "quadratics"]


class ScriptedTeacher:
    """Answers labelling, diagnosis, rewrite, synthesis and solution prompts; counts them by kind."""

    def __init__(self):
        self.kinds = Counter()
        self.diagnosed = Counter()  # diagnosis requests by problem number
        self._lock = threading.Lock()

    def __call__(self, body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        kind, answer = self._answer(prompt)
        with self._lock:
            self.kinds[kind] += 1
            if kind == "diagnosis":
                self.diagnosed[int(re.search(r"Problem (\d+)", prompt).group(1))] += 1
        return answer

    @staticmethod
    def _answer(prompt: str) -> tuple[str, str]:
        number = re.search(r"Problem (\d+)", prompt)
        skill = SKILLS[int(number.group(1)) % 3] if number else SKILLS[0]
        if "Which skills from this list" in prompt:
            return "labelling", f"<skill>{skill}</skill><reason>used</reason>"
        if "Find out whether its response is correct" in prompt:
            return "diagnosis", f"<reason>step 1 is wrong</reason><judge>incorrect</judge><skill>{skill}</skill>"
        if "Rewrite the reference solution" in prompt:
            answer = re.findall(r"\\boxed\{(\d+)\}", prompt)[0]
            return "rewrite", f"Another way to see it. So the answer is \\boxed{{{answer}}}."
        if "NEW problems" in prompt:
            tag = abs(hash(prompt)) % 10**6
            return "synthesis", (f"<question>Brand new question {tag} about a pond?</question>"
                                 f"<question>Another new question {tag} about a bridge?</question>")
        if prompt.startswith("Solve"):
            return "solution", "Reason carefully. \\boxed{42}"
        raise AssertionError(prompt[:300])


def run_sweep(teacher: ScriptedTeacher, data, tmp_path, *overrides: str) -> None:
    """`python -m stat_exp -m ...` on the tiny model with the scripted teacher, W&B offline."""
    with TeacherServer(teacher) as server:
        run_cli(
            "-m", *overrides,
            f"task.data_dir={data}", "task.val_size=6", "task.skills.catalogue_file=skills.json",
            "teacher=local", f"teacher.api_base={server.url}", "teacher.model=openai/scripted",
            "difficulty=outcome", "difficulty.max_tokens=8", "eval=default",  # not the paper's recipe: every job alike
            "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
            f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        )


@pytest.fixture
def math_like_data(tmp_path):
    data = tmp_path / "data"
    (data / "math").mkdir(parents=True)
    rows = [{"problem": f"Problem {i}: solve x + {i} = {2 * i}.", "solution": f"x = {i}, so \\boxed{{{i}}}.",
             "type": "Algebra", "level": f"Level {1 + i % 5}"} for i in range(40)]
    (data / "math" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "skills.json").write_text(json.dumps({"Algebra": SKILLS}))
    (data / "math500").mkdir()
    tests = [{"problem": f"Problem {i}: what is {i} + {i}?", "solution": "", "answer": str(2 * i), "subject": "Algebra",
              "level": 1 + i % 5, "unique_id": f"test/{i}"} for i in range(100, 106)]
    (data / "math500" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tests))
    return data


def test_multirun_over_variants_computes_upstream_stages_once(tmp_path, math_like_data):
    teacher = ScriptedTeacher()
    run_sweep(teacher, math_like_data, tmp_path, "variant=sel,syn", "~sft", "difficulty.test_benchmark=null",
              "eval.benchmarks=[]", "data.budget=30", "experiment_name=stat_sweep")

    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 2
    stages = [{s["stage"]: s["status"] for s in json.loads((j / "metrics.json").read_text())["stages"]} for j in jobs]
    upstream = ["skills", "skill_map", "model", "probe", "difficulty", "profile"]
    assert [stages[0][s] for s in upstream] == ["computed"] * 6
    assert [stages[1][s] for s in upstream] == ["reused"] * 6
    assert stages[0]["data"] == stages[1]["data"] == "computed"

    # Each training question labelled once, each difficult answer diagnosed once, for both jobs.
    assert teacher.kinds["labelling"] == 34
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    difficult = metrics[0]["difficulty"]["base"]["val"]["difficult"]
    assert difficult >= 1 and teacher.kinds["diagnosis"] == difficult
    assert teacher.kinds["rewrite"] > 0 and teacher.kinds["synthesis"] > 0 and teacher.kinds["solution"] > 0
    assert [m["data"]["pairs"] for m in metrics] == [30, 30]

    sel_rows = [json.loads(line) for line in
                next((tmp_path / "cache" / "data").glob("*/rows.jsonl")).read_text().splitlines()]
    assert len(sel_rows) == 30

    runs = [logged(j) for j in jobs]
    assert {r["group"] for r in runs} == {"stat_sweep"}
    assert {r["config"]["variant"]["name"] for r in runs} == {"sel", "syn"}
    assert all(r["summary"]["data/pairs"] == 30 for r in runs)


def test_multirun_sel_and_train_fine_tunes_and_evaluates_before_and_after(tmp_path, math_like_data):
    teacher = ScriptedTeacher()
    run_sweep(teacher, math_like_data, tmp_path, "variant=sel,train", "eval.benchmarks=[math500]", "eval.limit=4",
              "eval.max_tokens=8", "data.budget=16", "sft=lora", "sft.max_steps=2", "sft.logging_steps=1",
              "sft.max_length=128", "stat.rounds=2", "stat.round_val=math500", "experiment_name=sft_sweep")

    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    statuses = [[(s["stage"], s["status"]) for s in m["stages"]] for m in metrics]
    assert ("sft", "computed") in statuses[0] and ("sft", "computed") in statuses[1]
    # Everything before the second job's data stage was shared with the first job.
    upstream = statuses[1][: statuses[1].index(("data", "computed"))]
    assert {stage for stage, _ in upstream} >= {"skill_map", "probe", "difficulty", "profile", "eval"}
    assert all(status == "reused" for _, status in upstream)
    for m in metrics:
        assert set(m["eval"]) == {"base", "sft"}  # before and after fine-tuning
        assert set(m["summary"]) == {"math500", "math500_d"}  # MATH-D: the test questions found difficult
        assert set(m["summary"]["math500"]) == {"base", "sft"}
        assert m["train"]["sft1"]["steps"] == m["train"]["sft2"]["steps"] == 2  # two STAT rounds
        assert {"base", "round2", "after"} <= set(m["profile"])  # each round's profile is logged
        # MATH-D is the base student's: only its probe answers the test benchmark.
        assert set(m["difficulty"]["base"]) == {"val", "test"}
        assert set(m["difficulty"]["round2"]) == set(m["difficulty"]["after"]) == {"val"}
    # The continual variant: round 2 profiles each job's student on math500 (problems 100-105), not on
    # the validation questions (problems 0-39), which only the base and after profiles diagnose.
    round2 = [m["difficulty"]["round2"]["val"] for m in metrics]
    assert all(r["questions"] == 6 for r in round2) and sum(r["difficult"] for r in round2) >= 1
    assert {p for p in teacher.diagnosed if p >= 40} <= set(range(100, 106))
    assert any(p >= 100 for p in teacher.diagnosed) and any(p < 40 for p in teacher.diagnosed)
    runs = [logged(j) for j in jobs]
    assert [r["group"] for r in runs] == ["sft_sweep", "sft_sweep"]
    assert [r["job_type"] for r in runs] == ["sel", "train"]
    assert "variant=sel" in runs[0]["name"] and "variant=train" in runs[1]["name"]
    assert "paths.cache_dir" not in runs[0]["name"]
    assert {r["config"]["variant"]["name"] for r in runs} == {"sel", "train"}
    assert all(any("train/loss" in h for h in r["history"]) for r in runs)  # TRL's curve in the job's run
    assert (jobs[0] / "profile_before_after.png").exists()


def test_round_validation_names_a_benchmark_or_probes_val_again(math_like_data, caplog):
    caplog.set_level(logging.INFO)
    val = [{"id": "v"}]
    cfg = compose_config(f"task.data_dir={math_like_data}", "stat.rounds=2", "stat.round_val=math500")
    assert [r["id"] for r in round_validation(cfg, val)] == [f"test/{i}" for i in range(100, 106)]
    assert "rounds after the first build their profile on math500 (6 questions)" in caplog.text
    assert round_validation(compose_config("stat.rounds=2"), val) is val
    assert "stat.round_val is null: rounds after the first probe the same 1 validation questions again" in caplog.text
    with pytest.raises(ValueError, match="unknown benchmark 'no_such_benchmark'"):
        round_validation(compose_config(f"task.data_dir={math_like_data}", "stat.round_val=no_such_benchmark"), val)
