"""The data stage: STAT-Sel's proportions, STAT-Syn's filters, the budget, and the baselines."""

import logging
import re
from collections import Counter
from functools import cache

import pytest
from omegaconf import OmegaConf
from scipy.stats import chisquare

from stat_exp.config import TeacherConfig, VariantConfig
from stat_exp.data import DataInputs, build_training_data
from stat_exp.synth import agreeing_solutions, is_near_copy
from stat_exp.teacher.client import Teacher
from teacher_server import TeacherServer

SKILLS = ["algebra_skill", "geometry_skill", "counting_skill"]
PROFILE = {"algebra_skill": 6, "geometry_skill": 3, "counting_skill": 1}


def pool(n: int = 300) -> list[dict]:
    return [{"id": f"t{i}", "problem": f"Training problem {i} about {SKILLS[i % 3]}.",
             "solution": f"Work it out. The answer is \\boxed{{{i}}}.", "answer": str(i),
             "subject": "Algebra", "level": 1 + i % 5} for i in range(n)]


def diagnoses() -> list[dict]:
    """Ten difficult questions; question j misses the skills that make f = PROFILE."""
    owners = [s for s, n in PROFILE.items() for _ in range(n)]
    return [{"id": f"v{j}", "subject": "Algebra", "judge": "incorrect", "skills": [skill], "unknown": []}
            for j, skill in enumerate(owners)]


def inputs(teacher=None, train=None) -> DataInputs:
    train = train or pool()
    return DataInputs(train=train, skill_map={r["id"]: [SKILLS[int(r["id"][1:]) % 3]] for r in train},
                      catalogue={"Algebra": SKILLS}, diagnoses=diagnoses(),
                      difficult=[{"id": f"v{j}", "problem": f"Hard problem {j}", "subject": "Algebra"} for j in range(10)],
                      teacher=teacher)


def variant(name: str, **overrides) -> VariantConfig:
    return OmegaConf.merge(OmegaConf.structured(VariantConfig(name=name)), overrides)


def test_stat_sel_draws_each_skill_in_proportion_to_the_profile():
    pairs, card = build_training_data(inputs(), variant("sel", answers="reference"), budget=3000, seed=0)
    assert len(pairs) == 3000 and card["budget_met"]
    counts = Counter(p["skills"][0] for p in pairs)
    observed = [counts[s] for s in SKILLS]
    expected_share = [PROFILE[s] / sum(PROFILE.values()) for s in SKILLS]
    assert chisquare(observed, [3000 * p for p in expected_share]).pvalue > 0.001
    assert chisquare(observed).pvalue < 1e-6  # and clearly not uniform over skills
    assert all(p["origin"] == "reference" and p["source"].startswith("t") for p in pairs)
    assert card["profile"] == PROFILE and card["skill_histogram"]["algebra_skill"] == counts["algebra_skill"]


def test_stat_sel_draws_only_questions_with_the_missing_skill():
    pairs, _ = build_training_data(inputs(), variant("sel", answers="reference"), budget=200, seed=1)
    for p in pairs:
        number = int(re.search(r"problem (\d+)", p["question"]).group(1))
        assert SKILLS[number % 3] == p["skills"][0]


@pytest.mark.parametrize("name", ["sel", "train", "hard"])
def test_variants_hit_the_budget_exactly(name):
    pairs, card = build_training_data(inputs(), variant(name, answers="reference"), budget=777, seed=0)
    assert len(pairs) == 777 and card["budget_met"] and card["pairs"] == 777


def test_hard_draws_only_levels_4_and_5():
    pairs, _ = build_training_data(inputs(), variant("hard"), budget=100, seed=0)
    sources = {int(p["source"][1:]) for p in pairs}
    assert all(1 + i % 5 in (4, 5) for i in sources)


def test_budget_shortfall_is_reported(caplog):
    caplog.set_level(logging.WARNING)
    pairs, card = build_training_data(inputs(), variant("train", max_passes=2), budget=10_000, seed=0)
    assert len(pairs) == 600 and not card["budget_met"]
    assert "made 600 of the 10000 pairs" in caplog.text


def test_agreeing_solutions_keeps_exactly_the_largest_group_of_two_or_more():
    assert agreeing_solutions(["a \\boxed{2}", "b \\boxed{2.0}", "c \\boxed{3}"], 2) == ["a \\boxed{2}", "b \\boxed{2.0}"]
    assert agreeing_solutions(["\\boxed{\\frac12}", "\\boxed{0.5}", "\\boxed{1/2}"], 2) == [
        "\\boxed{\\frac12}", "\\boxed{0.5}", "\\boxed{1/2}"]
    assert agreeing_solutions(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], 2) == []
    assert agreeing_solutions(["no answer", "\\boxed{1}"], 2) == []


def test_near_copies_include_renamed_numbers():
    example = "A train travels 60 miles in 2 hours. What is its speed?"
    assert is_near_copy("A train travels 90 miles in 3 hours. What is its speed?", [example], 0.8)
    assert not is_near_copy("How many ways can 5 books be arranged on a shelf?", [example], 0.8)


def scripted_synthesis():
    """A teacher that writes a near-copy and two fresh questions per request; the three solutions
    of each A question agree two to one, those of each B question never agree."""
    solved = Counter()

    def respond(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        if "Write 3 NEW problems" in prompt:
            example = re.search(r"### Problem\n(.*)\n", prompt).group(1)
            tag = abs(hash(prompt)) % 10**8
            return ("<reason>r</reason><draft>d</draft>"
                    f"<question>{example}</question>"
                    f"<question>Fresh question A{tag} in a new setting?</question>"
                    f"<question>Fresh question B{tag} with another idea?</question>")
        problem = re.search(r"Fresh question \w+", prompt).group(0)
        solved[problem] += 1
        answers = ["4", "4", "5"] if problem.startswith("Fresh question A") else ["1", "2", "3"]
        return f"Steps. \\boxed{{{answers[solved[problem] % 3]}}}"

    return respond


def test_stat_syn_keeps_consistent_new_questions_and_counts_rejections(tmp_path):
    with TeacherServer(scripted_synthesis()) as server:
        cfg = OmegaConf.structured(TeacherConfig(name="local", model="openai/scripted", api_base=server.url))
        teacher = cache(lambda: Teacher(cfg, tmp_path))
        pairs, card = build_training_data(inputs(teacher), variant("syn", new_questions=3, max_passes=1), budget=10_000, seed=0)
    details = card["details"]
    assert details["near_copies"] == 10  # one per (difficult question, skill) pair
    kept = Counter(p["question"] for p in pairs)
    assert len(kept) == details["kept_questions"] == 10 and details["inconsistent"] == 10
    assert all(q.startswith("Fresh question A") and n == 2 for q, n in kept.items())  # the two agreeing solutions
    assert all(p["answer"].endswith("\\boxed{4}") for p in pairs)
    assert all(p["origin"] == "synthetic" and len(p["skills"]) == 1 for p in pairs)
    assert not card["budget_met"]


def test_embed_sel_draws_the_nearest_training_questions(tmp_path, tiny_model_dir):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    encoder = Transformer(str(tiny_model_dir))
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[encoder, pooling]).save(str(tmp_path / "encoder"))

    data = inputs()
    # Difficult questions that are copies of training questions: their nearest neighbour is that question.
    data.difficult = [{"id": "v0", "problem": data.train[17]["problem"]}, {"id": "v1", "problem": data.train[205]["problem"]}]
    cfg = variant("embed_sel", neighbours=1, answers="reference", embedding_model=str(tmp_path / "encoder"))
    pairs, card = build_training_data(data, cfg, budget=10, seed=0)
    assert {p["source"] for p in pairs} == {"t17", "t205"} and card["budget_met"]
