"""A stage whose teacher failed to answer is never stored as complete, and a rerun resumes it."""

import json
import logging
import re

import pytest

from helpers import compose_config
from stat_exp.pipeline import _teacher_incomplete, run
from stat_exp.store import IncompleteArtifact, Store
from stat_exp.teacher.client import TeacherFailed
from teacher_server import TeacherServer

QUESTIONS = 20  # in the pool after 4 are held out for validation
CATALOGUE = {"Algebra": ["solving_equations", "factoring"], "Geometry": ["triangles"]}


@pytest.fixture
def task_dir(tmp_path):
    rows = [{"problem": f"Problem {i}: what is {i}+1?", "solution": f"It is \\boxed{{{i + 1}}}.",
             "type": "Algebra" if i % 3 else "Geometry", "level": "Level 2"} for i in range(QUESTIONS + 4)]
    data = tmp_path / "data"
    (data / "math").mkdir(parents=True)
    (data / "math" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "math" / "skills.json").write_text(json.dumps(CATALOGUE))
    return data


def number(body: dict) -> int:
    return int(re.search(r"Problem (\d+)", body["messages"][-1]["content"]).group(1))


def label(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    return "<skill>triangles</skill>" if "Geometry" in prompt else "<skill>solving_equations</skill>"


def overrides(tmp_path, task_dir, server, *extra):
    return [f"task.data_dir={task_dir}", "task.val_size=4", "task.skills.catalogue_file=math/skills.json",
            "teacher=local", f"teacher.api_base={server.url}", "teacher.model=openai/scripted",
            "teacher.max_retries=1", "teacher.backoff_initial=0.01", "teacher.backoff_max=0.02",
            "teacher.parse_retries=0", "eval.benchmarks=[]", "logger=none",
            f"paths.cache_dir={tmp_path / 'cache'}", *extra]


def pool_numbers(cfg) -> list[int]:
    """The problem numbers in the training pool (the others were held out for validation), in order."""
    from stat_exp.tasks import load_train_val

    train, _ = load_train_val(cfg.task)
    return [int(re.search(r"Problem (\d+)", r["problem"]).group(1)) for r in train]


def stored(tmp_path, stage: str) -> list:
    folder = tmp_path / "cache" / stage
    return [p for p in folder.iterdir() if (p / "manifest.json").exists()] if folder.exists() else []


def test_every_request_failing_stores_nothing_and_a_healthy_rerun_completes(tmp_path, task_dir):
    with TeacherServer(label, refuse=lambda body: 500) as server:
        cfg = compose_config(*overrides(tmp_path, task_dir, server))
        with pytest.raises(TeacherFailed) as failure:
            run(cfg, tmp_path / "run1")
        assert server.requests == QUESTIONS * 2  # each sent once and retried once, never cached
        message = str(failure.value)
        assert f"{QUESTIONS} of {QUESTIONS} teacher requests" in message and "InternalServerError" in message
        assert "rerun asks only for the failed ones" in message
        assert stored(tmp_path, "skill_map") == [] and len(stored(tmp_path, "skills")) == 1

        server.refuse = None  # the provider is back
        metrics = run(cfg, tmp_path / "run2")
        assert server.requests == QUESTIONS * 3
    assert metrics["skill_map"]["labelled"] == QUESTIONS


def test_a_rejected_key_stores_nothing(tmp_path, task_dir):
    with TeacherServer(label, refuse=lambda body: 401) as server:
        with pytest.raises(Exception, match="401|[Aa]uthentication"):
            run(compose_config(*overrides(tmp_path, task_dir, server)), tmp_path / "run")
    assert stored(tmp_path, "skill_map") == []
    assert not list((tmp_path / "cache" / "skill_map").glob("*/manifest.json"))  # no unfinished folder is trusted


def test_a_partial_outage_stores_nothing_and_the_rerun_sends_only_the_failed_requests(tmp_path, task_dir):
    outage: set[int] = set()
    with TeacherServer(label, refuse=lambda body: 500 if number(body) in outage else None) as server:
        cfg = compose_config(*overrides(tmp_path, task_dir, server))
        outage.update(pool_numbers(cfg)[::3][:6])  # 6 of the 20 labelling requests, 30%
        with pytest.raises(TeacherFailed, match="6 of 20 teacher requests"):
            run(cfg, tmp_path / "run1")
        assert server.answered == 14 and server.requests == 14 + 6 * 2
        assert stored(tmp_path, "skill_map") == []

        server.refuse, sent = None, server.requests  # the provider recovers
        metrics = run(cfg, tmp_path / "run2")
        assert server.requests - sent == 6  # the answered ones came from the answer cache
        assert {number(b) for b in server.bodies[14:]} == outage
    assert metrics["skill_map"]["labelled"] == QUESTIONS and len(stored(tmp_path, "skill_map")) == 1


def test_max_failed_accepts_failures_and_records_them(tmp_path, task_dir, caplog):
    caplog.set_level(logging.WARNING)
    outage: set[int] = set()
    with TeacherServer(label, refuse=lambda body: 500 if number(body) in outage else None) as server:
        cfg = compose_config(*overrides(tmp_path, task_dir, server, "teacher.max_failed=5"))
        outage.update(pool_numbers(cfg)[:2])
        metrics = run(cfg, tmp_path / "run")
    (artifact,) = stored(tmp_path, "skill_map")
    usage = json.loads((artifact / "manifest.json").read_text())["summary"]["teacher"]
    assert usage["failed"] == 2 and usage["errors"] == {"InternalServerError": 2} and usage["failures_accepted"] == 5
    assert metrics["skill_map"]["unlabelled"] == 2 and usage["requests"] == QUESTIONS
    assert "2 failed teacher requests accepted (teacher.max_failed=5)" in caplog.text


@pytest.mark.parametrize("unparsable, fails", [(5, True), (1, False)])
def test_unparsable_answers_fail_the_stage_only_above_the_threshold(tmp_path, task_dir, unparsable, fails):
    def answer(body):
        return f"I cannot say (answer {number(body)})" if number(body) in bad else label(body)

    with TeacherServer(answer) as server:
        cfg = compose_config(*overrides(tmp_path, task_dir, server))
        bad = set(pool_numbers(cfg)[:unparsable])
        if fails:
            with pytest.raises(TeacherFailed) as failure:
                run(cfg, tmp_path / "run")
            assert "5 of 20 teacher answers could not be parsed" in str(failure.value)
            assert "I cannot say (answer" in str(failure.value)  # the raw answers are shown
            assert stored(tmp_path, "skill_map") == []
        else:
            metrics = run(cfg, tmp_path / "run")
            assert metrics["skill_map"]["unlabelled"] == 1 and metrics["teacher"]["skill_map"]["unparsed"] == 1


def test_a_catalogue_is_never_stored_without_a_subject(tmp_path, task_dir):
    with TeacherServer(lambda body: "Sorry, I can't help with that.") as server:
        args = [a for a in overrides(tmp_path, task_dir, server) if "catalogue_file" not in a]
        with pytest.raises(IncompleteArtifact, match=r"\['Algebra', 'Geometry'\].*Sorry, I can't help"):
            run(compose_config(*args, "task.skills.extraction_questions=3"), tmp_path / "run")
    assert stored(tmp_path, "skills") == []


def test_an_empty_output_is_refused_and_an_incomplete_stored_one_recomputed(tmp_path, caplog):
    store, calls = Store(tmp_path), []

    def compute(out, failed):
        calls.append(out)
        return {"skills": 3, "teacher": {"failed": failed}}

    with pytest.raises(IncompleteArtifact, match="stage skills: no skills; nothing was stored"):
        store.stage("skills", config={}, code={}, compute=lambda out: {"skills": 0},
                    incomplete=lambda s: None if s["skills"] else "no skills")
    assert not list((tmp_path / "skills").glob("*/manifest.json"))

    # What older code stored: an artifact whose manifest records failed requests.
    old = store.stage("skills", config={}, code={}, compute=lambda out: compute(out, 7))
    assert old.summary["teacher"]["failed"] == 7
    caplog.set_level(logging.WARNING)
    new = store.stage("skills", config={}, code={}, compute=lambda out: compute(out, 0),
                      incomplete=_teacher_incomplete)
    assert len(calls) == 2 and new.summary["teacher"]["failed"] == 0 and new.key == old.key
    assert "the stored artifact is incomplete (7 of its teacher requests failed); computing it again" in caplog.text
    assert [e.status for e in store.events] == ["computed", "computed"]
    again = store.stage("skills", config={}, code={}, compute=lambda out: compute(out, 0),
                        incomplete=_teacher_incomplete)
    assert len(calls) == 2 and again.path == new.path


def test_failures_are_counted_per_stage_across_its_requests(tmp_path, task_dir):
    """Two asks of one stage, each within teacher.max_failed, fail the stage together."""
    from stat_exp.pipeline import _metered
    from stat_exp.teacher.client import Request, Teacher

    with TeacherServer(label, refuse=lambda body: 500 if number(body) in (0, 10) else None) as server:
        cfg = compose_config(*overrides(tmp_path, task_dir, server, "teacher.max_failed=1"))
        teacher = Teacher(cfg.teacher, tmp_path / "teacher")
        requests = [[Request("skill_labelling", ({"role": "user", "content": f"Problem {i}: Algebra"},))
                     for i in batch] for batch in (range(0, 5), range(10, 15))]

        def work():
            return [teacher.ask(batch, str, desc=f"batch {n}") for n, batch in enumerate(requests)]

        with pytest.raises(TeacherFailed, match=r"2 of 10 teacher requests \(this stage\).*2 x InternalServerError"):
            _metered(cfg, lambda: teacher, work)
        teacher.cfg.max_failed = 0
        with pytest.raises(TeacherFailed, match=r"1 of 5 teacher requests \(batch 0\)"):
            teacher.ask(requests[0], str, desc="batch 0")
