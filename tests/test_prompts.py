"""The teacher's prompt templates: every kind renders, asks for its parser's tags, and keeps LaTeX."""

import jinja2
import pytest

from stat_exp.teacher.prompts import KINDS, SYSTEM, render, template_variables

PROBLEM = r"Let $f(x) = \frac{x^{2}-1}{x+1}$ for $x < 0$. Find $\{f(-2)\}$ and \begin{cases} a \\ b \end{cases}."
SOLUTION = r"Since $f(x) = x - 1$, $f(-2) = -3$, so the answer is $\boxed{-3}$. {{ not jinja }} {% raw %}"
SKILLS = ["algebraic_expression_skills", "factoring_skills", "function_skills"]
EXAMPLES = [{"problem": f"{PROBLEM} ({i})", "solution": SOLUTION} for i in range(3)]

SAMPLES = {
    "skill_extraction": dict(subject="Algebra", problem=PROBLEM, solution=SOLUTION),
    "skill_clustering": dict(subject="Algebra", skills=SKILLS, min_skills=10, max_skills=25),
    "skill_labelling": dict(subject="Algebra", problem=PROBLEM, solution=SOLUTION, skills=SKILLS),
    "diagnosis": dict(subject="Algebra", problem=PROBLEM, reference=SOLUTION, answer="-3",
                      response=r"We get $\boxed{-1}$ <because> x < y", skills=SKILLS),
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


def test_synthesis_shows_every_example():
    text = user_message("synthesis", **SAMPLES["synthesis"])
    assert [f"## Example {i}" in text for i in (1, 2, 3)] == [True] * 3
    assert "Here are 3 problems" in text


def test_diagnosis_without_a_reference_solution():
    variables = SAMPLES["diagnosis"] | {"reference": ""}
    text = user_message("diagnosis", **variables)
    assert "Reference solution" not in text and "Reference final answer\n-3" in text
    del variables["reference"]
    assert user_message("diagnosis", **variables) == text


OPTIONAL = {"reference", "max_skills", "count"}  # variables with a default


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_variable_is_named(kind):
    for name in set(SAMPLES[kind]) - OPTIONAL:
        variables = {k: v for k, v in SAMPLES[kind].items() if k != name}
        with pytest.raises(jinja2.UndefinedError, match=name):
            render(kind, **variables)


def test_a_missing_example_field_is_named():
    examples = [{"problem": PROBLEM}] * 3
    with pytest.raises(jinja2.UndefinedError, match="solution"):
        render("synthesis", **SAMPLES["synthesis"] | {"examples": examples})


def test_an_unknown_variable_is_an_error():
    with pytest.raises(ValueError, match="max_skill"):
        render("skill_labelling", **SAMPLES["skill_labelling"], max_skill=3)


def test_an_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="'labelling'.*skill_extraction, skill_clustering"):
        render("labelling", problem=PROBLEM)
