import asyncio
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from stat_exp.config import TeacherConfig, WorldConfig
from stat_exp.grading import extract_boxed
from stat_exp.tasks import skillworld
from stat_exp.tasks.skillworld import first_wrong_step, solve
from stat_exp.teacher import oracle, parsers
from stat_exp.teacher.client import Request, Teacher
from stat_exp.teacher.prompts import KINDS, render

WORLD = WorldConfig()
SKILLS = list(WORLD.skills)
MODEL = "oracle/skillworld"


@pytest.fixture(scope="module", autouse=True)
def registered() -> Iterator[None]:
    import litellm

    before = list(litellm.custom_provider_map)
    oracle.register(WORLD)
    oracle.register(WORLD)  # idempotent: still one handler
    assert [entry["provider"] for entry in litellm.custom_provider_map].count("oracle") == 1
    yield
    litellm.custom_provider_map = before


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    # Three-step problems have a step of each position to plant errors in.
    return [row for row in skillworld.generate(WORLD, 60, seed=5) if row["level"] == 3][:8]


def ask(kind: str, **variables: object) -> str:
    import litellm

    response = litellm.completion(model=MODEL, messages=render(kind, **variables))
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    return response.choices[0].message.content


def test_every_kind_is_recognised(rows: list[dict]) -> None:
    row = rows[0]
    variables = {
        "skill_extraction": dict(subject="arithmetic", problem=row["problem"], solution=row["solution"]),
        "skill_clustering": dict(subject="arithmetic", skills=SKILLS, min_skills=3, max_skills=10),
        "skill_labelling": dict(subject="arithmetic", problem=row["problem"], solution=row["solution"], skills=SKILLS),
        "diagnosis": dict(subject="arithmetic", problem=row["problem"], answer=row["answer"], response="", skills=SKILLS),
        "synthesis": dict(subject="arithmetic", skill="add", examples=rows[:3]),
        "solution": dict(problem=row["problem"]),
        "rewrite": dict(problem=row["problem"], solution=row["solution"]),
    }
    assert set(variables) == set(KINDS)
    for kind, values in variables.items():
        assert oracle.detect_kind(render(kind, **values)[1]["content"]) == kind


def test_extraction_names_the_first_skill(rows: list[dict]) -> None:
    for row in rows:
        text = ask("skill_extraction", subject="arithmetic", problem=row["problem"], solution=row["solution"])
        assert parsers.parse_fine_skill(text) == row["skills"][0]


def test_clustering_answers_the_worlds_skills_whatever_the_sample_showed() -> None:
    # A skill rare in the pool can be absent from the extraction sample; the profile must still name it.
    text = ask("skill_clustering", subject="arithmetic", skills=["modulo", "add", "long_division"],
               min_skills=2, max_skills=10)
    assert parsers.parse_clusters(text) == SKILLS
    assert "<skill>modulo</skill>\n<members>modulo</members>" in text
    assert "<skill>multiply</skill>\n<members></members>" in text


def test_labelling_returns_the_known_skills(rows: list[dict]) -> None:
    for row in rows:
        text = ask("skill_labelling", subject="arithmetic", problem=row["problem"], solution=row["solution"],
                   skills=SKILLS)
        assert list(parsers.parse_labels(text, SKILLS).skills) == row["skills"]
    row = next(row for row in rows if len(row["skills"]) > 1)
    some = [skill for skill in SKILLS if skill != row["skills"][0]]
    text = ask("skill_labelling", subject="arithmetic", problem=row["problem"], solution=row["solution"], skills=some)
    assert list(parsers.parse_labels(text, some).skills) == row["skills"][1:]
    text = ask("skill_labelling", subject="arithmetic", problem=row["problem"], solution=row["solution"],
               skills=SKILLS, max_skills=1)
    assert list(parsers.parse_labels(text, SKILLS).skills) == row["skills"][:1]


def plant_error(row: dict, j: int) -> str:
    """The row's solution with step j's result off by one and a wrong final answer."""
    steps = solve(row["problem"])
    lines = [step.line for step in steps]
    lines[j] = f"{steps[j].expression}={steps[j].result + 1}"
    return "\n".join(lines + [f"\\boxed{{{steps[-1].result + 1}}}"])


def diagnose(row: dict, response: str, **extra: object) -> parsers.Diagnosis:
    text = ask("diagnosis", subject="arithmetic", problem=row["problem"], answer=row["answer"], response=response,
               skills=SKILLS, **extra)
    return parsers.parse_diagnosis(text, SKILLS)


def test_diagnosis_names_the_planted_wrong_steps_skill(rows: list[dict]) -> None:
    for row in rows:
        steps = solve(row["problem"])
        for j in range(len(steps)):
            response = plant_error(row, j)
            assert first_wrong_step(row["problem"], response) == j
            diagnosis = diagnose(row, response, reference=row["solution"])
            assert diagnosis.judge == "incorrect"
            assert diagnosis.skills == (steps[j].skill,)
            assert f"step {j + 1}" in diagnosis.reason


def test_diagnosis_of_right_and_unreadable_responses(rows: list[dict]) -> None:
    row = rows[0]
    right = diagnose(row, row["solution"])
    assert right.judge == "correct" and right.skills == ()
    garbage = diagnose(row, "I do not know.\n--- END RESPONSE ---")
    assert garbage.judge == "incorrect" and garbage.skills == tuple(row["skills"])


def test_synthesis_writes_new_solvable_problems_with_the_skill(rows: list[dict]) -> None:
    for skill in SKILLS:
        examples = [row for row in skillworld.generate(WORLD, 40, seed=9) if skill in row["skills"]][:3]
        text = ask("synthesis", subject="arithmetic", skill=skill, examples=examples, count=4)
        questions = parsers.parse_questions(text, 4)
        assert len(set(questions)) == 4
        for question in questions:
            assert skill in [step.skill for step in solve(question)]
            assert question not in {example["problem"] for example in examples}
        assert ask("synthesis", subject="arithmetic", skill=skill, examples=examples, count=4) == text


def test_solution_and_rewrite_are_right(rows: list[dict]) -> None:
    for row in rows:
        solution = parsers.parse_solution(ask("solution", problem=row["problem"]))
        assert solution == row["solution"]
        rewrite = parsers.parse_solution(ask("rewrite", problem=row["problem"], solution=row["solution"]))
        assert rewrite != row["solution"]
        assert extract_boxed(rewrite) == row["answer"]
        assert first_wrong_step(row["problem"], rewrite) is None
        assert len(rewrite.splitlines()) == row["level"] + 1  # one line per step, then the answer


def test_metadata_sets_the_kind_and_the_sample(rows: list[dict]) -> None:
    import litellm

    messages = render("rewrite", problem=rows[0]["problem"], solution=rows[0]["solution"])
    rewrites = {oracle.answer(messages[1]["content"], WORLD, sample=sample) for sample in range(10)}
    assert len(rewrites) > 1  # samples differ; each is still right
    response = litellm.completion(model=MODEL, messages=messages, metadata={"kind": "rewrite", "sample": 3})
    assert response.choices[0].message.content == oracle.answer(messages[1]["content"], WORLD, sample=3)


def test_a_prompt_it_cannot_answer_gets_an_unparsable_reply() -> None:
    text = ask("solution", problem="What is $\\int_0^1 x\\,dx$?")
    with pytest.raises(parsers.ParseError):
        parsers.parse_solution(text)


def test_async_completion(rows: list[dict]) -> None:
    import litellm

    messages = render("solution", problem=rows[0]["problem"])
    response = asyncio.run(litellm.acompletion(model=MODEL, messages=messages))
    assert response.choices[0].message.content == rows[0]["solution"]


def test_the_teacher_client_uses_the_oracle(rows: list[dict], tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    teacher = Teacher(TeacherConfig(name="oracle", model=MODEL), tmp_path)
    requests = [Request("solution", tuple(render("solution", problem=row["problem"]))) for row in rows]
    replies = teacher.ask(requests, parsers.parse_solution)
    assert [reply.parsed for reply in replies] == [row["solution"] for row in rows]
    assert teacher.usage.calls == len(rows) and teacher.usage.failed == 0 and teacher.usage.prompt_tokens > 0
    # No line per call in the run's log (litellm's warnings still come through).
    assert not [r for r in caplog.records if r.name.startswith("LiteLLM") and r.levelno < logging.WARNING]


def test_the_client_calls_the_oracle_directly_with_litellms_answer_and_usage(rows: list[dict], tmp_path: Path,
                                                                             monkeypatch) -> None:
    import litellm

    messages = render("rewrite", problem=rows[0]["problem"], solution=rows[0]["solution"])
    through_litellm = litellm.completion(model=MODEL, messages=messages, metadata={"kind": "rewrite", "sample": 2})

    def refuse(*args, **kwargs):
        raise AssertionError("the client called litellm for the oracle")

    monkeypatch.setattr(litellm, "acompletion", refuse)
    teacher = Teacher(TeacherConfig(name="oracle", model=MODEL), tmp_path)
    (reply,) = teacher.ask([Request("rewrite", tuple(messages), sample=2)], parsers.parse_solution)
    assert reply.raw == through_litellm.choices[0].message.content and reply.parsed is not None
    usage = through_litellm.usage
    assert (teacher.usage.prompt_tokens, teacher.usage.completion_tokens) == (usage.prompt_tokens,
                                                                               usage.completion_tokens)
    assert teacher.usage.unpriced_calls == 1 and teacher.usage.cost_usd == 0.0


def test_the_teacher_client_reaches_the_oracle(tmp_path):
    from omegaconf import OmegaConf

    from stat_exp.config import TeacherConfig, WorldConfig
    from stat_exp.skills import label_questions
    from stat_exp.tasks.skillworld import generate

    rows = generate(WorldConfig(), 6, seed=3)
    teacher = Teacher(OmegaConf.structured(TeacherConfig(name="oracle", model="oracle/skillworld")), tmp_path)
    records = label_questions(teacher, rows, {skillworld.SUBJECT: WorldConfig().skills}, max_skills=5)
    assert [r["skills"] for r in records] == [r["skills"] for r in rows]
    assert teacher.usage.calls == 6 and teacher.usage.unparsed == 0


def test_the_client_sends_sample_indices_and_the_registered_world(rows: list[dict], tmp_path: Path) -> None:
    from stat_exp.teacher.oracle import register

    prompt = tuple(render("synthesis", subject="arithmetic", skill="multiply", examples=rows[:3], count=4))
    requests = [Request("synthesis", prompt, sample=i) for i in range(3)]

    def questions(world: WorldConfig | None) -> list[list[str]]:
        register(world)
        # One cache for both worlds: it must key on the registered world, which the prompt does not name.
        teacher = Teacher(TeacherConfig(name="oracle", model=MODEL), tmp_path)
        answers = [reply.parsed for reply in teacher.ask(requests, parsers.parse_questions)]
        assert teacher.usage.cache_hits == 0
        return answers

    default = questions(None)
    assert len({tuple(q) for q in default}) == 3  # the sample index reaches the oracle: new problems each time
    try:
        small = questions(WorldConfig(max_operand=5, max_value=12))
    finally:
        register()  # the default world again, for the other tests
    numbers = [int(n) for q in small for problem in q for n in re.findall(r"\d+", problem)]
    assert max(numbers) <= 12 and any(n > 12 for q in default for p in q for n in map(int, re.findall(r"\d+", p)))
