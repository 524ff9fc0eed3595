"""The teacher's prompt templates: every kind renders, asks for its parser's tags, keeps LaTeX, follows
the paper's inputs, and puts what a stage's requests share first."""

import json
import os

import jinja2
import pytest

from helpers import SHARED_DATA
from stat_exp.teacher.prompts import KINDS, SYSTEM, render, template_variables

PROBLEM = r"Let $f(x) = \frac{x^{2}-1}{x+1}$ for $x < 0$. Find $\{f(-2)\}$ and \begin{cases} a \\ b \end{cases}."
SOLUTION = r"Since $f(x) = x - 1$, $f(-2) = -3$, so the answer is $\boxed{-3}$. {{ not jinja }} {% raw %}"
SKILLS = ["algebraic_expression_skills", "factoring_skills", "function_skills"]
EXAMPLES = [{"problem": f"{PROBLEM} ({i})"} for i in range(3)]

SAMPLES = {
    "skill_extraction": dict(subject="Algebra", problem=PROBLEM, solution=SOLUTION),
    "skill_clustering": dict(subject="Algebra", skills=SKILLS, min_skills=10, max_skills=25),
    "skill_labelling": dict(subject="Algebra", problem=PROBLEM, skills=SKILLS),
    "diagnosis": dict(subject="Algebra", problem=PROBLEM, response=r"We get $\boxed{-1}$ <because> x < y", skills=SKILLS),
    "synthesis": dict(skill="factoring_skills", subject="Algebra", examples=EXAMPLES),
    "solution": dict(problem=PROBLEM),
    "rewrite": dict(problem=PROBLEM, solution=SOLUTION),
}

# The tags each kind's parser reads, and what each prompt must show of its variables.
TAGS = {
    "skill_extraction": ["<skill>", "<reason>"],
    "skill_clustering": ["<skill>", "<members>"],
    "skill_labelling": ["<skill>", "<reason>"],
    "diagnosis": ["<judge>", "<reason>", "<skill>"],
    "synthesis": ["<reason>", "<draft>", "<question>"],
    "solution": ["\\boxed{}"],
    "rewrite": ["\\boxed{}"],
}


def user_message(kind: str, **variables) -> str:
    messages = render(kind, **variables)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == SYSTEM
    return messages[1]["content"]


def test_kinds_have_samples_and_tags():
    assert set(KINDS) == set(SAMPLES) == set(TAGS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders_its_variables_and_tags(kind):
    text = user_message(kind, **SAMPLES[kind])
    assert text == text.strip() and "\n\n\n" not in text
    for tag in TAGS[kind]:
        assert tag in text, tag
    for name, value in SAMPLES[kind].items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            for part in item.values() if isinstance(item, dict) else [item]:
                assert str(part) in text, (name, part)  # LaTeX and braces pass through unchanged


@pytest.mark.parametrize("kind", KINDS)
def test_every_variable_of_a_sample_is_read(kind):
    assert set(SAMPLES[kind]) <= template_variables(kind)


def test_skill_lists_are_bulleted():
    for kind in ("skill_clustering", "skill_labelling", "diagnosis"):
        text = user_message(kind, **SAMPLES[kind])
        assert "\n".join(f"- {s}" for s in SKILLS) in text


def test_defaults_and_their_overrides():
    assert "at most 5" in user_message("skill_labelling", **SAMPLES["skill_labelling"])
    assert "at most 3" in user_message("skill_labelling", **SAMPLES["skill_labelling"], max_skills=3)
    assert "Write 2 NEW problems" in user_message("synthesis", **SAMPLES["synthesis"])
    assert "Write 4 NEW problems" in user_message("synthesis", **SAMPLES["synthesis"], count=4)
    text = user_message("skill_clustering", **SAMPLES["skill_clustering"])
    assert "between 10 and 25" in text


def test_synthesis_shows_the_skill_and_every_example_question_as_the_paper_does():
    text = user_message("synthesis", **SAMPLES["synthesis"])
    assert "## Skill\n`factoring_skills`, in Algebra" in text
    assert [f"## Example {i}\n### Problem\n{PROBLEM} ({i - 1})" in text for i in (1, 2, 3)] == [True] * 3
    assert "Solution" not in text  # the paper shows the questions, not their solutions
    without_skill = user_message("synthesis", **SAMPLES["synthesis"] | {"skill": None})
    assert "## Skill" not in without_skill and "the skills that the example problems need" in without_skill


def test_labelling_sees_the_question_and_not_the_solution_and_answers_in_one_tag():
    text = user_message("skill_labelling", **SAMPLES["skill_labelling"])
    assert "Reference solution" not in text and "boxed" not in text
    assert "one <skill> tag holding the chosen names separated by commas, then one <reason> tag" in text
    assert text.index("<skill>...</skill>") < text.index("<reason>...</reason>")
    # A solution is shown only when a caller passes one; the pipeline passes none.
    shown = user_message("skill_labelling", **SAMPLES["skill_labelling"], solution=SOLUTION)
    assert shown.endswith(f"## Problem\n{PROBLEM}\n\n## Reference solution\n{SOLUTION}")


def test_diagnosis_sees_no_reference_by_default():
    text = user_message("diagnosis", **SAMPLES["diagnosis"])
    assert "Reference" not in text and "-3" not in text
    assert "Solve the problem yourself" in text and "against the reference" not in text
    assert "all in one <skill> tag, separated by commas" in text


def test_diagnosis_that_sees_the_reference():
    text = user_message("diagnosis", **SAMPLES["diagnosis"], reference=SOLUTION, answer="-3")
    assert f"## Reference solution\n{SOLUTION}\n\n## Reference final answer\n-3\n\n## Student's response" in text
    assert "against the reference" in text and "Solve the problem yourself" not in text
    # A record without a reference solution still shows its answer.
    answer_only = user_message("diagnosis", **SAMPLES["diagnosis"], reference="", answer="-3")
    assert "Reference solution" not in answer_only and "## Reference final answer\n-3" in answer_only


# Two requests of one stage: what differs between them (the question, the response, the examples).
SECOND = {
    "skill_extraction": dict(problem="What is $1+1$?", solution="$\\boxed{2}$"),
    "skill_clustering": dict(subject="Geometry", skills=["triangle_skills", "circle_skills"]),
    "skill_labelling": dict(problem="What is $1+1$?"),
    "diagnosis": dict(problem="What is $1+1$?", response="It is $\\boxed{3}$."),
    "synthesis": dict(skill="function_skills", examples=[{"problem": "What is $1+1$?"}] * 3),
    "solution": dict(problem="What is $1+1$?"),
    "rewrite": dict(problem="What is $1+1$?", solution="$\\boxed{2}$"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_what_a_stages_requests_share_comes_first(kind):
    first = user_message(kind, **SAMPLES[kind])
    second = user_message(kind, **SAMPLES[kind] | SECOND[kind])
    shared = os.path.commonprefix([first, second])
    for tag in TAGS[kind]:  # the instructions and the answer format, before anything that differs
        assert tag in shared, tag
    if kind in ("skill_labelling", "diagnosis"):
        assert "\n".join(f"- {s}" for s in SKILLS) in shared  # the subject's list too


def test_two_labelling_requests_of_a_subject_share_half_their_prompt():
    """With MATH's real Algebra list and two real questions, as a provider's prefix cache sees them."""
    skills = json.loads((SHARED_DATA / "math" / "skills.json").read_text())["Algebra"]
    with open(SHARED_DATA / "math" / "train.jsonl", encoding="utf-8") as f:
        rows = [row for row in map(json.loads, f) if row["type"] == "Algebra"][:2]
    first, second = (json.dumps(render("skill_labelling", subject="Algebra", problem=row["problem"], skills=skills))
                     for row in rows)
    assert len(os.path.commonprefix([first, second])) >= 0.5 * max(len(first), len(second))


OPTIONAL = {"reference", "answer", "solution", "max_skills", "count"}  # variables with a default


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_variable_is_named(kind):
    for name in set(SAMPLES[kind]) - OPTIONAL:
        variables = {k: v for k, v in SAMPLES[kind].items() if k != name}
        with pytest.raises(jinja2.UndefinedError, match=name):
            render(kind, **variables)


def test_a_missing_example_field_is_named():
    examples = [{"solution": SOLUTION}] * 3
    with pytest.raises(jinja2.UndefinedError, match="problem"):
        render("synthesis", **SAMPLES["synthesis"] | {"examples": examples})


def test_an_unknown_variable_is_an_error():
    with pytest.raises(ValueError, match="max_skill"):
        render("skill_labelling", **SAMPLES["skill_labelling"], max_skill=3)


def test_an_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="'labelling'.*skill_extraction, skill_clustering"):
        render("labelling", problem=PROBLEM)
