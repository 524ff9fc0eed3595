"""The Missing-Skill-Profile: diagnoses through the teacher, f(s), and the plot."""

import re

import pytest
from omegaconf import OmegaConf

from stat_exp.config import TeacherConfig
from stat_exp.profile import diagnose, missing_skill_profile, plot_profiles, profile_summary
from stat_exp.teacher.client import Teacher
from teacher_server import TeacherServer

CATALOGUE = {"Algebra": ["linear_equations", "factoring", "quadratics"]}
# What the teacher says about the answer to question i.
DIAGNOSES = {
    0: "<reason>sign error</reason><judge>incorrect</judge><skill>factoring</skill><skill>quadratics</skill>",
    1: "<reason>bad</reason><judge>Incorrect.</judge><skill>Factoring</skill><skill>made_up</skill>",
    2: "<judge>correct</judge><reason>it is right</reason>",
    3: "The answer is wrong because of factoring.",  # malformed every time
    4: "<judge>incorrect</judge><reason>r</reason><skill>linear equations</skill>",
}


def records() -> list[dict]:
    return [{"id": f"q{i}", "problem": f"Question {i}", "subject": "Algebra", "answer": "1", "solution": "",
             "responses": [f"Response {i}a", f"Response {i}b"]} for i in range(6)]


def test_profile_counts_match_the_diagnoses_and_malformed_answers_are_kept(tmp_path):
    def respond(body):
        i = int(re.search(r"Question (\d+)", body["messages"][-1]["content"]).group(1))
        return DIAGNOSES[i]

    verdicts = [{"difficult": i != 5, "response": i % 2} for i in range(6)]  # question 5 is not difficult
    with TeacherServer(respond) as server:
        cfg = OmegaConf.structured(TeacherConfig(name="local", model="openai/scripted", api_base=server.url,
                                                 parse_retries=1, backoff_initial=0.01))
        diagnoses = diagnose(Teacher(cfg, tmp_path), records(), verdicts, CATALOGUE)
        sent = [b["messages"][-1]["content"] for b in server.bodies]

    assert [d["id"] for d in diagnoses] == ["q0", "q1", "q2", "q3", "q4"]
    assert any("Response 1b" in p for p in sent) and any("Response 0a" in p for p in sent)  # the flagged sample
    assert not any("## Reference solution" in p for p in sent)  # the records have none to show
    assert diagnoses[1]["skills"] == ["factoring"] and diagnoses[1]["unknown"] == ["made_up"]
    assert diagnoses[2]["judge"] == "correct" and diagnoses[2]["skills"] == []
    assert diagnoses[3]["judge"] is None and diagnoses[3]["raw"] == DIAGNOSES[3] and diagnoses[3]["error"]
    assert missing_skill_profile(diagnoses) == {"factoring": 2, "linear_equations": 1, "quadratics": 1}
    # Most missed first, ties by name; a skill named twice in one diagnosis counts once.
    tied = [{"skills": ["b", "z", "b"]}, {"skills": ["z", "c"]}, {"skills": ["b", "a"]}]
    assert list(missing_skill_profile(tied).items()) == [("b", 2), ("z", 2), ("a", 1), ("c", 1)]

    summary = profile_summary(diagnoses)
    assert summary["difficult"] == 5 and summary["judged_incorrect"] == 3 and summary["judged_correct"] == 1
    assert summary["unparsed"] == 1 and summary["unknown_skill_names"] == 1 and summary["pairs"] == 4

    png = plot_profiles({"before": summary["profile"], "after": {"factoring": 1}}, tmp_path / "profile.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_diagnosis_sees_the_reference_only_when_configured(tmp_path):
    """The paper's diagnosis shows the question, the response and the skills; the option adds the reference."""
    rows = [{"id": "q0", "problem": "Question 0", "subject": "Algebra", "answer": "17",
             "solution": "Reference solution text", "responses": ["Response 0a"]}]
    sent = {}
    for sees_reference in (False, True):
        with TeacherServer(lambda body: DIAGNOSES[0]) as server:
            cfg = OmegaConf.structured(TeacherConfig(name="local", model="openai/scripted", api_base=server.url,
                                                     diagnosis_sees_reference=sees_reference))
            (diagnosis,) = diagnose(Teacher(cfg, tmp_path / str(sees_reference)), rows, [{"difficult": True, "response": 0}],
                                    CATALOGUE)
            (sent[sees_reference],) = [b["messages"][-1]["content"] for b in server.bodies]
        assert diagnosis["skills"] == ["factoring", "quadratics"]
    assert "Reference solution text" not in sent[False] and "17" not in sent[False]
    assert all("answered a problem in Algebra from" in text for text in sent.values())
    assert "## Reference solution\nReference solution text\n\n## Reference final answer\n17" in sent[True]
    assert diagnosis["subject"] == "Algebra" and diagnosis["response"] == 0 and diagnosis["reason"] == "sign error"


def test_a_diagnosis_that_sees_the_reference_shows_only_the_answer_of_a_row_without_a_solution(tmp_path):
    rows = [{"id": "q0", "problem": "Question 0", "subject": "Algebra", "answer": "17", "responses": ["Response 0a"]}]
    with TeacherServer(lambda body: DIAGNOSES[0]) as server:
        cfg = OmegaConf.structured(TeacherConfig(name="local", model="openai/scripted", api_base=server.url,
                                                 diagnosis_sees_reference=True))
        diagnose(Teacher(cfg, tmp_path), rows, [{"difficult": True, "response": 0}], CATALOGUE)
        (sent,) = [b["messages"][-1]["content"] for b in server.bodies]
    assert "## Reference solution" not in sent and "## Reference final answer\n17\n" in sent


def test_records_and_verdicts_of_different_lengths_fail():
    with pytest.raises(ValueError):
        diagnose(None, records(), [{"difficult": True, "response": 0}], CATALOGUE)
