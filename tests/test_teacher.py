"""The teacher through litellm over HTTP, against the scripted local server."""

import json
import re
import sqlite3

import pytest
from omegaconf import OmegaConf

from stat_exp.config import TeacherConfig
from stat_exp.skills import label_questions
from stat_exp.teacher.client import BudgetExceeded, Request, Teacher, _cache_key
from teacher_server import Faults, TeacherServer

CATALOGUE = {"Algebra": ["linear_equations", "factoring", "quadratics"], "Geometry": ["triangles", "circles"]}


def questions(n: int) -> list[dict]:
    """Questions whose text names the skills the scripted teacher will answer with."""
    rows = []
    for i in range(n):
        subject = "Algebra" if i % 2 else "Geometry"
        skills = CATALOGUE[subject][: 1 + i % 2]
        rows.append({"id": f"q{i}", "subject": subject, "problem": f"Question {i} [needs: {', '.join(skills)}]",
                     "solution": f"Solution {i}. \\boxed{{{i}}}"})
    return rows


def labeller(body: dict) -> str:
    """Answers a labelling prompt with the skills named in its question."""
    prompt = body["messages"][-1]["content"]
    needs = re.search(r"\[needs: ([^\]]*)\]", prompt).group(1).split(", ")
    return "".join(f"<skill>{s}</skill>" for s in needs) + "<reason>named in the question</reason>"


def teacher_config(server: TeacherServer, **overrides) -> TeacherConfig:
    base = OmegaConf.structured(TeacherConfig(name="local", model="openai/test-teacher", api_base=server.url,
                                              concurrency=16, backoff_initial=0.01, backoff_max=0.05, timeout=5))
    return OmegaConf.merge(base, overrides)


def test_labels_200_questions_then_a_rerun_makes_no_call(tmp_path):
    rows = questions(200)
    with TeacherServer(labeller) as server:
        teacher = Teacher(teacher_config(server), tmp_path)
        records = label_questions(teacher, rows, CATALOGUE, max_skills=5)
        assert server.requests == 200 and teacher.usage.calls == 200
        assert [r["skills"] for r in records][:4] == [["triangles"], ["linear_equations", "factoring"],
                                                       ["triangles"], ["linear_equations", "factoring"]]
        assert all(r["error"] is None for r in records)

        again = Teacher(teacher_config(server), tmp_path)  # a new run over the same cache
        assert label_questions(again, rows, CATALOGUE, max_skills=5) == records
        assert server.requests == 200 and again.usage.cache_hits == 200 and again.usage.calls == 0


def test_injected_rate_limits_errors_and_timeouts_still_answer_every_item(tmp_path):
    rows = questions(60)
    faults = Faults(error_rate=0.14, hang_rate=0.06, hang_seconds=1.5, seed=1)
    with TeacherServer(labeller, faults) as server:
        teacher = Teacher(teacher_config(server, timeout=0.5, max_retries=8), tmp_path)
        records = label_questions(teacher, rows, CATALOGUE, max_skills=5)
    assert all(r["skills"] and r["error"] is None for r in records)
    assert teacher.usage.retries >= 5 and teacher.usage.failed == 0
    # Each retry follows a fault the server injected, or a keep-alive connection it dropped while hanging.
    assert 60 < server.requests <= 60 + teacher.usage.retries


def test_malformed_answers_are_retried_then_recorded(tmp_path):
    def flaky(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        if "Question 0 " in prompt:
            return "I think it needs algebra."  # never parsable: no tags
        if "Question 1 " in prompt and body["temperature"] == 0:
            return "<skill>not_a_skill</skill>"  # only an unknown skill: parsed on the retry
        return labeller(body)

    with TeacherServer(flaky) as server:
        teacher = Teacher(teacher_config(server, parse_retries=2), tmp_path)
        records = label_questions(teacher, questions(4), CATALOGUE, max_skills=5)
    assert records[0]["skills"] == [] and records[0]["raw"] == "I think it needs algebra."
    assert "unparsable" in records[0]["error"]
    assert records[1]["skills"] == ["linear_equations", "factoring"] and records[1]["error"] is None
    assert teacher.usage.parse_failures == 3 + 1 and teacher.usage.unparsed == 1
    assert server.requests == 4 + 2 + 1


def test_budget_cap_stops_keeps_paid_answers_and_a_rerun_resumes(tmp_path):
    rows = questions(40)
    with TeacherServer(labeller) as server:
        # A priced model name, so litellm's price table applies to the local server's answers.
        cfg = teacher_config(server, model="openai/gpt-4o-mini", concurrency=1, max_cost_usd=0.0001)
        teacher = Teacher(cfg, tmp_path)
        with pytest.raises(BudgetExceeded, match=r"of 40 labelling skills requests answered and cached"):
            label_questions(teacher, rows, CATALOGUE, max_skills=5)
        paid = server.requests
        assert 0 < paid < 40 and teacher.usage.cost_usd >= 0.0001
        # One request at a time, so the run stops within one request's cost of the cap.
        costs = [json.loads(v)["cost_usd"] for (v,) in
                 sqlite3.connect(tmp_path / "teacher.sqlite").execute("SELECT value FROM answers")]
        assert len(costs) == paid and all(c > 0 for c in costs)
        assert sum(costs) - max(costs) < 0.0001 <= sum(costs) == pytest.approx(teacher.usage.cost_usd)

        resumed = Teacher(teacher_config(server, model="openai/gpt-4o-mini", concurrency=1), tmp_path)
        records = label_questions(resumed, rows, CATALOGUE, max_skills=5)
        assert all(r["skills"] for r in records)
        assert resumed.usage.cache_hits == paid and server.requests == 40


def test_missing_key_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("STAT_NO_SUCH_KEY", raising=False)
    cfg = OmegaConf.structured(TeacherConfig(name="x", model="openai/gpt-4o-mini", api_key_env="STAT_NO_SUCH_KEY"))
    with pytest.raises(ValueError, match="STAT_NO_SUCH_KEY"):
        Teacher(cfg, tmp_path)


def test_failed_answers_are_not_cached_and_a_rerun_asks_them_again(tmp_path):
    rows = questions(6)
    with TeacherServer(labeller, fail=lambda body: "Question 3 " in body["messages"][-1]["content"]) as server:
        cfg = teacher_config(server, max_retries=1)
        records = label_questions(Teacher(cfg, tmp_path), rows, CATALOGUE, max_skills=5)
        assert records[3]["skills"] == [] and "InternalServerError" in records[3]["error"]
        assert server.requests == 5 + 2  # question 3 was tried twice
        server.fail = None  # the provider recovers
        again = Teacher(cfg, tmp_path)
        records = label_questions(again, rows, CATALOGUE, max_skills=5)
    assert records[3]["skills"] == ["linear_equations", "factoring"] and records[3]["error"] is None
    assert again.usage.cache_hits == 5 and again.usage.calls == 1 and server.requests == 8


def plain_requests(prefix: str, n: int) -> list[Request]:
    return [Request("diagnosis", ({"role": "user", "content": f"{prefix} {i}"},)) for i in range(n)]


def spaced_arrivals(server: TeacherServer, teacher: Teacher, *batches: int) -> list[float]:
    """Gaps between the server's arrivals of `batches` asked one ask() after another, after a warm-up
    call (litellm's first call blocks the event loop long enough for every start to fall due)."""
    teacher.ask(plain_requests("warm-up", 1), str)
    server.arrivals.clear()
    for i, n in enumerate(batches):
        teacher.ask(plain_requests(f"batch {i}", n), str)
    return [b - a for a, b in zip(server.arrivals, server.arrivals[1:])]


def test_requests_per_minute_spaces_request_starts(tmp_path):
    with TeacherServer(lambda body: "ok") as server:
        gaps = spaced_arrivals(server, Teacher(teacher_config(server, requests_per_minute=300), tmp_path), 6)
    # 300 a minute: one start every 0.2 s although 16 may be in flight; an arrival lags its start by a
    # varying few ms, so the typical gap and the whole span are checked, not each gap.
    assert len(gaps) == 5 and sorted(gaps)[2] > 0.15 and 0.8 < sum(gaps) < 3.0


@pytest.mark.xfail(strict=True, reason="the spacing restarts with each ask() (client._ask_all resets _next_start), "
                                       "so a stage asking in several batches bursts at each batch's start")
def test_requests_per_minute_holds_across_ask_calls(tmp_path):
    with TeacherServer(lambda body: "ok") as server:
        gaps = spaced_arrivals(server, Teacher(teacher_config(server, requests_per_minute=60), tmp_path), 2, 2)
    assert min(gaps) > 0.7  # one start a second; the second batch's first request comes at once


def test_a_second_server_under_the_same_model_name_is_asked_not_answered_from_the_cache(tmp_path):
    rows = questions(1)  # a geometry question about triangles
    with TeacherServer(labeller) as first, TeacherServer(lambda body: "<skill>circles</skill>") as second:
        label_questions(Teacher(teacher_config(first), tmp_path), rows, CATALOGUE, max_skills=5)
        records = label_questions(Teacher(teacher_config(second), tmp_path), rows, CATALOGUE, max_skills=5)
    assert second.requests == 1 and records[0]["skills"] == ["circles"]


def test_cache_key_changes_with_everything_that_changes_the_answer():
    request = Request("diagnosis", ({"role": "user", "content": "q"},), sample=0)
    params = {"temperature": 0.0, "max_tokens": 16}
    base = dict(model="openai/m", request=request, params=params, attempt=0, api_base="http://a/v1")
    variants = [
        {"model": "openai/other"},
        {"api_base": "http://b/v1"},
        {"api_base": None},
        {"request": Request("diagnosis", ({"role": "user", "content": "q2"},), sample=0)},
        {"request": Request("diagnosis", ({"role": "system", "content": "q"},), sample=0)},
        {"request": Request("diagnosis", ({"role": "user", "content": "q"},), sample=1)},
        {"params": {"temperature": 0.7, "max_tokens": 16}},
        {"params": {"temperature": 0.0, "max_tokens": 32}},
        {"attempt": 1},
    ]
    keys = [_cache_key(**(base | change)) for change in [{}, *variants]]
    assert len(set(keys)) == len(keys)
    assert _cache_key(**base) == _cache_key(**base)  # and the same request gets the same key
