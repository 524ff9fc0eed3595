"""The answer filters: how many answers a training question brings under each `answers=` mode,
rewrites whose final answer differs from the reference's dropped and counted, and the synthetic
agreement filter at `min_agreement` and one below it."""

from collections import Counter
from functools import cache

import pytest
from omegaconf import OmegaConf

from stat_exp.config import TeacherConfig, VariantConfig
from stat_exp.data import DataInputs, build_training_data
from stat_exp.select import Answers, lineage
from stat_exp.synth import agreeing_solutions
from stat_exp.teacher.client import Teacher
from teacher_server import TeacherServer


def rows(n: int) -> list[dict]:
    return [{"id": f"t{i}", "problem": f"Problem number {i}.", "solution": f"Reference. \\boxed{{{i}}}",
             "answer": str(i)} for i in range(n)]


def rewriter(wrong_first: str | None = None, unboxed_first: str | None = None):
    """Rewrites that keep the reference's answer, except the first rewrite asked of the problem
    `wrong_first` (a different answer) and of `unboxed_first` (no \\boxed{} at all)."""
    asked = Counter()

    def respond(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        problem = prompt.split("## Problem\n")[1].split("\n")[0]
        number = problem.removeprefix("Problem number ").removesuffix(".")
        asked[problem] += 1
        if problem == wrong_first and asked[problem] == 1:
            return "A slip. \\boxed{999}"
        if problem == unboxed_first and asked[problem] == 1:
            return "The answer is the reference's."
        return f"Rewritten step by step. \\boxed{{{number}}}"

    return respond


def teacher(server: TeacherServer, tmp_path) -> Teacher:
    cfg = OmegaConf.structured(TeacherConfig(name="local", model="openai/scripted", api_base=server.url,
                                             parse_retries=0))
    return Teacher(cfg, tmp_path)


# answers_per_question = 3: (answers a question brings, rewrites asked of the teacher per question)
@pytest.mark.parametrize("mode,answers,rewrites", [("reference", 1, 0), ("rewrite", 3, 3), ("both", 3, 2)])
def test_each_answers_mode_gives_the_documented_number_of_answers(tmp_path, mode, answers, rewrites):
    questions = rows(4)
    with TeacherServer(rewriter()) as server:
        source = Answers(lambda: teacher(server, tmp_path), mode, per_question=3)
        source.fetch(questions)
        source.fetch(questions)  # fetched once per question
        assert server.requests == 4 * rewrites
    for row in questions:
        pairs = source.of(row, ["skill"], lineage("augment"))
        assert len(pairs) == answers
        origins = [p["origin"] for p in pairs]
        assert origins == (["reference"] if mode != "rewrite" else []) + ["rewrite"] * rewrites
        assert all(p["answer"].endswith(f"\\boxed{{{row['answer']}}}") for p in pairs)
    assert source.rejected == {"unparsed": 0, "wrong_answer": 0}


def test_rewrites_with_another_final_answer_or_none_are_dropped_and_counted(tmp_path):
    questions = rows(4)
    with TeacherServer(rewriter(wrong_first="Problem number 1.", unboxed_first="Problem number 2.")) as server:
        source = Answers(lambda: teacher(server, tmp_path), "both", per_question=3)
        source.fetch(questions)
    assert [len(source.of(row, [], lineage("augment"))) for row in questions] == [3, 2, 2, 3]
    assert all("999" not in p["answer"] for row in questions for p in source.of(row, [], lineage("augment")))
    assert source.rejected == {"unparsed": 1, "wrong_answer": 1}


def test_the_data_card_counts_the_dropped_rewrites(tmp_path):
    train = rows(4)
    with TeacherServer(rewriter(wrong_first="Problem number 1.")) as server:
        inputs = DataInputs(train=train, skill_map={}, catalogue={}, diagnoses=[], difficult=[],
                            teacher=cache(lambda: teacher(server, tmp_path)))
        cfg = OmegaConf.structured(VariantConfig(name="augment"))
        pairs, card = build_training_data(inputs, cfg, budget=12, seed=0)
    assert card["details"]["rejected_rewrites"] == {"unparsed": 0, "wrong_answer": 1}
    # 4 questions x 3 rewrites, one dropped: 11 pairs in the pool, so the budget of 12 is not met.
    assert len(pairs) == 11 and not card["budget_met"] and all("999" not in p["answer"] for p in pairs)


@pytest.mark.parametrize("min_agreement", [2, 3])
def test_agreement_filter_keeps_a_group_of_min_agreement_and_drops_one_smaller(min_agreement):
    agreeing = [f"solution {i} \\boxed{{7}}" for i in range(min_agreement)]
    others = ["other \\boxed{8}", "another \\boxed{9}"]
    assert agreeing_solutions([*agreeing, *others], min_agreement) == agreeing
    assert agreeing_solutions([*agreeing[1:], *others], min_agreement) == []


def test_an_unknown_answers_mode_is_named():
    with pytest.raises(ValueError, match="variant.answers must be reference, rewrite or both, got 'all'"):
        Answers(None, "all", per_question=3)


def test_every_unparsed_rewrite_is_counted(tmp_path):
    with TeacherServer(lambda body: "Rewritten, but with no boxed answer.") as server:
        source = Answers(lambda: teacher(server, tmp_path), "rewrite", per_question=3)
        source.fetch(rows(2))
    assert source.rejected == {"unparsed": 6, "wrong_answer": 0} and source.of(rows(2)[0], [], lineage("augment")) == []
