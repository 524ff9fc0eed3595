"""The data stage: STAT-Sel's proportions, STAT-Syn's filters, the budget, and the baselines."""

import logging
import random
import re
from collections import Counter
from functools import cache

import pytest
from helpers import compose_config
from omegaconf import OmegaConf
from scipy.stats import chisquare

from stat_exp import select, synth
from stat_exp.config import TeacherConfig, VariantConfig
from stat_exp.data import DataInputs, build_training_data
from stat_exp.select import Answers
from stat_exp.synth import agreeing_solutions, is_near_copy
from stat_exp.teacher.client import Reply, Teacher
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


def test_stat_sel_lineage_names_the_difficult_question_and_its_missing_skill():
    pairs, _ = build_training_data(inputs(), variant("sel", answers="reference"), budget=200, seed=2)
    missing = {d["id"]: d["skills"] for d in diagnoses()}
    for p in pairs:
        why = p["lineage"]
        assert why["rule"] == "sel" and len(why["difficult_ids"]) == 1 and why["skill"] == p["skills"][0]
        assert why["skill"] in missing[why["difficult_ids"][0]]
        assert why["seed_ids"] == [] and why["agreeing"] is why["rank"] is why["similarity"] is None
    assert {p["lineage"]["difficult_ids"][0] for p in pairs} == set(missing)  # every difficult question drew some


def test_baseline_lineage_is_its_rule():
    pairs, _ = build_training_data(inputs(), variant("train"), budget=10, seed=0)
    assert [p["lineage"] for p in pairs] == [select.lineage("train")] * 10
    assert select.lineage("train") == {"rule": "train", "difficult_ids": [], "skill": None, "seed_ids": [],
                                       "agreeing": None, "rank": None, "similarity": None}


def test_a_pair_is_the_chat_the_student_is_trained_on():
    made = select.pair("Q?", "A.", source="t1", skills=("s",), origin="reference", why=select.lineage("train"))
    assert made == {"question": "Q?", "answer": "A.", "source": "t1", "skills": ["s"], "origin": "reference",
                    "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                    "lineage": select.lineage("train")}


def test_stat_sel_draws_only_questions_with_the_missing_skill():
    pairs, _ = build_training_data(inputs(), variant("sel", answers="reference"), budget=200, seed=1)
    for p in pairs:
        number = int(re.search(r"problem (\d+)", p["question"]).group(1))
        assert SKILLS[number % 3] == p["skills"][0]


def test_stat_sel_hits_the_budget_exactly():
    pairs, card = build_training_data(inputs(), variant("sel", answers="reference"), budget=777, seed=0)
    assert len(pairs) == 777 and card["budget_met"] and card["pairs"] == 777
    # A pass: 10 (difficult question, skill) pairs x questions_per_pair (5) references = 50 pairs; 777 needs 16.
    assert card["details"] == {"pairs_profiled": 10, "skills_without_questions": [], "passes": 16,
                               "rejected_rewrites": {"unparsed": 0, "wrong_answer": 0}}


def test_stat_sel_asks_the_teacher_for_rewrites(tmp_path):
    asked, respond = rewriting_teacher(tmp_path)
    with TeacherServer(respond) as server:
        pairs, card = build_training_data(inputs(local_teacher(server, tmp_path)), variant("sel", answers="both"),
                                          budget=30, seed=0)
    assert len(pairs) == 30 and set(card["origins"]) == {"reference", "rewrite"} and set(asked.values()) == {2}


def test_stat_sel_names_a_missing_skill_no_training_question_has():
    data = inputs()
    data.diagnoses.append({"id": "v10", "subject": "Algebra", "judge": "incorrect", "skills": ["rare_skill"],
                           "unknown": []})
    data.catalogue = {"Algebra": [*SKILLS, "rare_skill"]}
    del data.skill_map["t0"]  # a training question the skill map lacks has no skill, and is not drawn
    pairs, card = build_training_data(data, variant("sel", answers="reference"), budget=30, seed=0)
    assert card["details"]["skills_without_questions"] == ["rare_skill"] and card["details"]["pairs_profiled"] == 11
    assert len(pairs) == 30 and "t0" not in sources(pairs)


def sources(pairs: list[dict]) -> Counter:
    return Counter(p["source"] for p in pairs)


def test_train_is_every_training_question_once():
    """The paper's MATH-Train: the pool's size (300 here), whatever the budget."""
    pairs, card = build_training_data(inputs(), variant("train", whole_pool=True), budget=9500, seed=0)
    assert len(pairs) == 300 and sources(pairs) == Counter({f"t{i}": 1 for i in range(300)})
    assert all(p["answer"] == f"Work it out. The answer is \\boxed{{{p['source'][1:]}}}." for p in pairs)
    assert card["budget"] == 300 and card["budget_met"] and card["budget_from"] == "the pool"
    assert card["origins"] == {"reference": 300}


def test_train_at_a_budget_draws_distinct_questions():
    pairs, card = build_training_data(inputs(), variant("train"), budget=120, seed=0)
    assert len(pairs) == 120 and set(sources(pairs).values()) == {1}
    assert card["budget_from"] == "data.budget"


def test_whole_pool_is_for_train_only():
    with pytest.raises(ValueError, match="whole_pool is for variant=train .* not 'hard'"):
        build_training_data(inputs(), variant("hard", whole_pool=True), budget=10, seed=0)


def test_paper_train_and_the_demos_plain_sft():
    """conf/variant/train.yaml is the paper's whole pool; the demo keeps plain SFT at STAT's budget."""
    assert compose_config("variant=train").variant.whole_pool
    demo = compose_config("experiment=demo", "variant=train")
    assert not demo.variant.whole_pool and demo.data.budget == 3200
    pairs, card = build_training_data(inputs(train=pool(4000)), demo.variant, demo.data.budget, seed=0)
    assert len(pairs) == 3200 and card["unique_questions"] == 3200 and card["budget_met"]


def rewriting_teacher(tmp_path, wrong: set[str] = frozenset()):
    """A teacher whose rewrites keep the reference's answer (but for the problems in `wrong`);
    it counts the rewrites asked per problem."""
    asked = Counter()

    def respond(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        assert "Rewrite the reference solution" in prompt
        problem = re.search(r"Training problem (\d+)", prompt).group(1)
        asked[problem] += 1
        answer = int(re.findall(r"\\boxed\{(\d+)\}", prompt)[0]) + (problem in wrong)
        return f"Rewritten. \\boxed{{{answer}}}"

    return asked, respond


def local_teacher(server: TeacherServer, tmp_path):
    cfg = OmegaConf.structured(TeacherConfig(name="local", model="openai/scripted", api_base=server.url))
    return cache(lambda: Teacher(cfg, tmp_path))


def test_augment_samples_the_budget_from_three_teacher_answers_a_question(tmp_path):
    asked, respond = rewriting_teacher(tmp_path)
    with TeacherServer(respond) as server:
        data = inputs(local_teacher(server, tmp_path), train=pool(30))
        pairs, card = build_training_data(data, variant("augment"), budget=40, seed=0)
        assert len(pairs) == 40 and card["origins"] == {"rewrite": 40}
        assert {p["lineage"]["rule"] for p in pairs} == {"augment"}
        # Only the questions drawn are rewritten, each 3 times; none brings more than its 3 answers.
        assert set(asked.values()) == {3} and len(asked) == len(sources(pairs)) and max(sources(pairs).values()) <= 3
        everything, card = build_training_data(data, variant("augment"), budget=500, seed=0)
    assert len(everything) == 90 and sources(everything) == Counter({f"t{i}": 3 for i in range(30)})
    assert card["details"]["exhausted"] == "every pair of the pool's 30 questions x 3 answers is used"


def test_hard_is_levels_4_and_5_with_three_answers_each(tmp_path):
    asked, respond = rewriting_teacher(tmp_path, wrong={"3"})
    with TeacherServer(respond) as server:
        data = inputs(local_teacher(server, tmp_path), train=pool(30))
        pairs, card = build_training_data(data, variant("hard"), budget=1000, seed=0)
    # Levels 1 + i % 5 in (4, 5): 12 of 30 questions; the reference and 2 rewrites each, but t3's
    # rewrites change its answer and are dropped.
    hard = {f"t{i}" for i in range(30) if 1 + i % 5 in (4, 5)}
    assert sources(pairs) == Counter({q: 1 if q == "t3" else 3 for q in hard})
    assert card["origins"] == {"reference": 12, "rewrite": 22} and card["details"]["rejected_rewrites"]["wrong_answer"] == 2
    sampled, _ = build_training_data(inputs(train=pool(30)), variant("hard", answers="reference"), budget=5, seed=0)
    assert len(sampled) == 5 and set(sources(sampled)) <= hard
    assert {p["lineage"]["rule"] for p in sampled} == {"hard"}


def test_budget_shortfall_is_reported(caplog):
    caplog.set_level(logging.WARNING)
    pairs, card = build_training_data(inputs(), variant("train"), budget=10_000, seed=0)
    assert len(pairs) == 300 and not card["budget_met"]
    assert "made 300 of the 10000 pairs asked for: every pair of the pool's 300 questions x 1 answers is used" in caplog.text


class SlipTeacher:
    """Rewrites that keep the reference's answer, numbered by sample, but for the problems in
    `wrong`, whose every rewrite changes it; it records the problems of each batch it is asked."""

    def __init__(self, wrong: set[str]):
        self.wrong, self.batches = wrong, []

    def ask(self, requests, parser, desc):
        problems = [re.search(r"Training problem (\d+)", r.messages[-1]["content"]).group(1) for r in requests]
        self.batches.append(sorted(set(problems), key=int))
        return [Reply(r, f"Rewrite {r.sample}. \\boxed{{{int(p) + (p in self.wrong)}}}", None, None, 1)
                for r, p in zip(requests, problems)]


def test_sampled_refills_rejected_slots_with_new_ones_up_to_the_budget_exactly():
    """Half the pool's rewrites are rejected, so the first batch falls short: the next batches take
    new slots, just as many as are missing, until the budget is met (no slot twice, none over)."""
    teacher = SlipTeacher(wrong={str(i) for i in range(0, 20, 2)})
    answers = Answers(lambda: teacher, "rewrite", per_question=2)
    data = inputs(train=pool(20))
    pairs, stats = select.sampled(data, 12, random.Random(0), pool=data.train, answers=answers, rule="augment")
    assert len(pairs) == 12 and len({(p["source"], p["answer"]) for p in pairs}) == 12
    assert all(int(p["source"][1:]) % 2 and p["skills"] == data.skill_map[p["source"]] for p in pairs)
    assert len(teacher.batches) > 1 and sum(map(len, teacher.batches)) == len(set().union(*teacher.batches))
    # Every batch asks for at most the pairs still missing: 12 slots first, then fewer.
    assert len(teacher.batches[0]) <= 12 and all(len(b) < 12 for b in teacher.batches[1:])
    assert stats == {"pool": 20, "answers_per_question": 2,
                     "rejected_rewrites": {"unparsed": 0, "wrong_answer": answers.rejected["wrong_answer"]}}
    assert answers.rejected["wrong_answer"] == 2 * sum(int(p) % 2 == 0 for b in teacher.batches for p in b)

    everything, stats = select.sampled(data, 100, random.Random(0), pool=data.train, answers=answers, rule="augment")
    assert len(everything) == 20 and stats["exhausted"] == "every pair of the pool's 20 questions x 2 answers is used"


# embed_sel and embed_syn with a ranking fixed by hand: difficult question v0's nearest training
# questions are t0, t1, t2, ... in order; v1's are t4 (shared with v0), then t10, t11, t12, ...
RANKS = [list(range(40)), [4] + list(range(10, 40)) + [0, 1, 2, 3] + list(range(5, 10))]


def similarity(rank: int) -> float:
    return 1 - rank / 300  # more than four places: the lineage rounds it to four


@pytest.fixture
def ranked(monkeypatch):
    def nearest(queries, corpus, model_name, k, *, trust_remote_code):
        assert len(queries) == 2 and len(corpus) == 40 and model_name == VariantConfig.embedding_model
        assert trust_remote_code
        return [[(i, similarity(rank)) for rank, i in enumerate(r[:k], start=1)] for r in RANKS]

    monkeypatch.setattr(select, "nearest_neighbours", nearest)
    monkeypatch.setattr(synth, "nearest_neighbours", nearest)


def two_difficult(teacher=None) -> DataInputs:
    data = inputs(teacher, train=pool(40))
    data.difficult = [{"id": "v0", "problem": "Hard problem 0", "subject": "Algebra"},
                      {"id": "v1", "problem": "Hard problem 1", "subject": "Algebra"}]
    return data


FIRST_PASS = {f"t{i}" for i in [0, 1, 2, 3, 4, 10, 11, 12, 13]}  # v0: t0-t4; v1: t4 is taken, so t10-t13
SECOND_PASS = {f"t{i}" for i in [5, 6, 7, 8, 9, 14, 15, 16, 17, 18]}


def test_embed_sel_takes_the_five_nearest_with_three_answers_each(ranked, tmp_path):
    asked, respond = rewriting_teacher(tmp_path)
    with TeacherServer(respond) as server:
        pairs, card = build_training_data(two_difficult(local_teacher(server, tmp_path)), variant("embed_sel"),
                                          budget=27, seed=0)
    assert sources(pairs) == Counter({q: 3 for q in FIRST_PASS})  # 9 questions x (reference + 2 rewrites)
    assert card["details"]["passes"] == 1 and card["budget_met"]
    # t0-t4 are v0's ranks 1-5 (t4 too: v0 comes first); t10-t13 are v1's ranks 2-5 (its rank 1, t4, is v0's).
    expected = {f"t{i}": ("v0", i + 1) for i in range(5)} | {f"t{i}": ("v1", i - 8) for i in range(10, 14)}
    for p in pairs:
        difficult, rank = expected[p["source"]]
        assert p["lineage"] == select.lineage("embed_sel", difficult=[difficult], rank=rank,
                                              similarity=round(similarity(rank), 4))
        assert p["skills"] == [SKILLS[int(p["source"][1:]) % 3]]
    assert card["details"] == {"difficult_questions": 2, "questions": 9, "passes": 1,
                               "rejected_rewrites": {"unparsed": 0, "wrong_answer": 0}}


def test_embed_sel_later_passes_take_the_next_nearest_never_the_same_pairs(ranked):
    pairs, card = build_training_data(two_difficult(), variant("embed_sel", answers="reference"), budget=12, seed=0)
    drawn = sources(pairs)
    assert set(drawn.values()) == {1}  # no pair twice
    assert FIRST_PASS <= set(drawn) and len(set(drawn) & SECOND_PASS) == 3  # the nearer pass whole, then 3 more
    assert card["details"]["passes"] == 2 and card["details"]["questions"] == 19  # 9, then the 10 of pass 2
    # The 3 are sampled from the second pass, not its first 3 in order.
    thirds = {frozenset(set(sources(build_training_data(two_difficult(), variant("embed_sel", answers="reference"),
                                                        budget=12, seed=seed)[0])) & SECOND_PASS) for seed in range(5)}
    assert len(thirds) > 1


def test_embed_sel_stops_when_the_neighbours_run_out(ranked, caplog):
    caplog.set_level(logging.INFO)
    pairs, card = build_training_data(two_difficult(), variant("embed_sel", answers="reference"), budget=1000, seed=0)
    assert sources(pairs) == Counter({f"t{i}": 1 for i in range(40)})  # every training question once
    # Pass p takes v0's t(5p)..t(5p+4) and v1's next 5: v1 reaches t39 in pass 7 (t4, then t10..t13 + 5 x 6).
    assert card["details"]["passes"] == 7 and not card["budget_met"]
    assert "embed_sel stops after 7 passes with 40 pairs: every difficult question's nearest training questions " \
           "are taken (40)" in caplog.messages


def test_embed_sel_keeps_to_max_passes_and_a_question_without_skills(ranked):
    data = two_difficult()
    del data.skill_map["t0"]
    pairs, card = build_training_data(data, variant("embed_sel", answers="reference", max_passes=1), budget=12, seed=0)
    assert sources(pairs) == Counter({q: 1 for q in FIRST_PASS}) and card["details"]["passes"] == 1
    assert "exhausted" not in card["details"]  # stopped by max_passes, not by the neighbours running out
    assert [p["skills"] for p in pairs if p["source"] == "t0"] == [[]]


def test_embed_syn_writes_five_questions_from_different_groups_of_three_nearest(ranked, tmp_path):
    groups, subjects = Counter(), []

    def respond(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        if "NEW problems" in prompt:
            assert "Write 1 NEW problems" in prompt
            subjects.append("Algebra" in prompt)  # the difficult question's subject
            shown = tuple(sorted(int(n) for n in re.findall(r"Training problem (\d+)", prompt)))
            groups[shown] += 1
            return f"<question>New question from {shown}?</question>"
        return "Solved. \\boxed{7}"

    with TeacherServer(respond) as server:
        pairs, card = build_training_data(two_difficult(local_teacher(server, tmp_path)), variant("embed_syn"),
                                          budget=30, seed=0)
    v0 = [g for g in groups if set(g) <= {0, 1, 2, 3, 4}]
    v1 = [g for g in groups if set(g) <= {4, 10, 11, 12, 13}]
    # 5 different groups of 3 of each difficult question's 5 nearest, each asked once.
    assert len(v0) == len(v1) == 5 and len(groups) == 10 and set(groups.values()) == {1}
    assert all(len(g) == 3 for g in groups)
    # 10 new questions x 3 agreeing solutions: the budget of 30 in one pass.
    assert card["details"]["kept_questions"] == 10 and card["details"]["passes"] == 1
    assert len(pairs) == 30 and Counter(p["question"] for p in pairs).most_common(1)[0][1] == 3
    for p in pairs:  # each new question's lineage: its difficult question and the group it was written from
        why = p["lineage"]
        shown = tuple(sorted(int(t[1:]) for t in why["seed_ids"]))
        assert p["question"] == f"New question from {shown}?" and why["rule"] == "embed_syn" and why["agreeing"] == 3
        assert shown in (v0 if why["difficult_ids"] == ["v0"] else v1) and why["skill"] is None
        assert p["skills"] == [] and p["source"] == "synthetic"
    assert card["details"]["difficult_questions"] == 2 and len(subjects) == 10 and all(subjects)


def test_embed_syn_asks_each_pass_for_a_new_sample_from_every_group(ranked, tmp_path):
    """All ten groups of 3 of the 5 nearest may be used; a question without a subject is mathematics."""
    samples, subjects = [], []

    class Recording(Teacher):
        def ask(self, requests, parse, **kwargs):
            for r in requests:
                if r.kind == "synthesis":
                    samples.append(r.sample)
                    subjects.append(r.messages[-1]["content"].split("## Subject\n")[1].split("\n")[0])
            return super().ask(requests, parse, **kwargs)

    def respond(body: dict) -> str:
        if "NEW problems" in body["messages"][-1]["content"]:
            return f"<question>New question {abs(hash(str(body))) % 10**8}?</question>"
        return "Solved. \\boxed{7}"

    with TeacherServer(respond) as server:
        cfg = OmegaConf.structured(TeacherConfig(name="local", model="openai/scripted", api_base=server.url))
        data = two_difficult(cache(lambda: Recording(cfg, tmp_path)))
        del data.difficult[1]["subject"]
        build_training_data(data, variant("embed_syn", groups_per_question=10, max_passes=2), budget=10_000, seed=0)
    assert samples == [0] * 20 + [1] * 20  # 2 difficult questions x 10 groups, a pass
    assert subjects == (["Algebra"] * 10 + ["mathematics"] * 10) * 2


def test_embed_syn_needs_enough_groups(ranked):
    with pytest.raises(ValueError, match=r"groups_per_question \(11\) needs .* examples_per_pair \(3\)"):
        build_training_data(two_difficult(), variant("embed_syn", groups_per_question=11), budget=10, seed=0)


def test_agreeing_solutions_keeps_exactly_the_largest_group_of_two_or_more():
    assert agreeing_solutions(["a \\boxed{2}", "b \\boxed{2.0}", "c \\boxed{3}"], 2) == ["a \\boxed{2}", "b \\boxed{2.0}"]
    assert agreeing_solutions(["\\boxed{\\frac12}", "\\boxed{0.5}", "\\boxed{1/2}"], 2) == [
        "\\boxed{\\frac12}", "\\boxed{0.5}", "\\boxed{1/2}"]
    assert agreeing_solutions(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], 2) == []
    assert agreeing_solutions(["no answer", "\\boxed{1}"], 2) == []
    assert agreeing_solutions(["no answer", "\\boxed{1}", "\\boxed{1.0}"], 2) == ["\\boxed{1}", "\\boxed{1.0}"]
    assert agreeing_solutions([], 1) == agreeing_solutions(["no answer"], 1) == []


def test_near_copies_include_renamed_numbers():
    example = "A train travels 60 miles in 2 hours. What is its speed?"
    assert is_near_copy("A train travels 90 miles in 3 hours. What is its speed?", [example], 0.8)
    assert not is_near_copy("How many ways can 5 books be arranged on a shelf?", [example], 0.8)
    assert is_near_copy("Find 12 + 35 + 7.", ["Find 3 + 4 + 5."], 1.0)  # only numbers differ: a copy, at the threshold


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
    assert details["pairs_profiled"] == 10 and details["passes"] == 1
    kept = Counter(p["question"] for p in pairs)
    assert len(kept) == details["kept_questions"] == 10 and details["inconsistent"] == 10
    assert all(q.startswith("Fresh question A") and n == 2 for q, n in kept.items())  # the two agreeing solutions
    assert all(p["answer"].endswith("\\boxed{4}") for p in pairs)
    assert all(p["origin"] == "synthetic" and len(p["skills"]) == 1 for p in pairs)
    assert not card["budget_met"]
    missing = {d["id"]: d["skills"] for d in diagnoses()}
    train_ids = {r["id"] for r in pool()}
    for p in pairs:
        why = p["lineage"]
        assert why["rule"] == "syn" and why["skill"] == p["skills"][0] in missing[why["difficult_ids"][0]]
        assert len(why["seed_ids"]) == 3 and set(why["seed_ids"]) <= train_ids and why["agreeing"] == 2
        assert all(SKILLS[int(t[1:]) % 3] == why["skill"] for t in why["seed_ids"])  # examples with the skill


def test_stat_syn_asks_each_pass_for_a_new_sample(tmp_path):
    """A later pass is a fresh draw from the teacher, even where its prompt repeats an earlier one; so
    is each solution of a new question. The prompt names the skill and the subject."""
    samples, prompts, solutions = [], [], []

    class Recording(Teacher):
        def ask(self, requests, parse, **kwargs):
            samples.extend(r.sample for r in requests if r.kind == "synthesis")
            prompts.extend(r.messages[-1]["content"] for r in requests if r.kind == "synthesis")
            solutions.extend((r.messages[-1]["content"], r.sample) for r in requests if r.kind == "solution")
            return super().ask(requests, parse, **kwargs)

    with TeacherServer(scripted_synthesis()) as server:
        cfg = OmegaConf.structured(TeacherConfig(name="local", model="openai/scripted", api_base=server.url))
        teacher = cache(lambda: Recording(cfg, tmp_path))
        build_training_data(inputs(teacher), variant("syn", new_questions=3, max_passes=2), budget=10_000, seed=0)
    assert samples == [0] * 10 + [1] * 10  # ten (difficult question, skill) pairs a pass
    skills = [d["skills"][0] for d in diagnoses()] * 2
    assert all(f"`{skill}`, in Algebra" in prompt for skill, prompt in zip(skills, prompts))
    by_question = {}
    for prompt, sample in solutions:
        by_question.setdefault(prompt, []).append(sample)
    assert by_question and all(sorted(drawn) == [0, 1, 2] for drawn in by_question.values())


def test_stat_syn_keeps_count_questions_a_request_and_counts_unparsed_answers(tmp_path):
    def respond(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        if "NEW problems" in prompt:
            if "geometry_skill" in prompt:
                return "I cannot write these."
            tag = abs(hash(prompt)) % 10**8
            return "".join(f"<question>Fresh question {tag}-{n} about it?</question>" for n in range(3))
        return "Steps. \\boxed{4}"

    with TeacherServer(respond) as server:
        cfg = OmegaConf.structured(TeacherConfig(name="local", model="openai/scripted", api_base=server.url))
        pairs, card = build_training_data(inputs(cache(lambda: Teacher(cfg, tmp_path))),
                                          variant("syn", new_questions=2, max_passes=1), budget=10_000, seed=0)
    # 3 geometry pairs fail to parse; the other 7 keep 2 of their 3 questions, each with 3 agreeing solutions.
    assert card["details"] == {"unparsed_syntheses": 3, "near_copies": 0, "inconsistent": 0, "kept_questions": 14,
                               "pairs_profiled": 10, "passes": 1}
    assert len(pairs) == 42 and {p["source"] for p in pairs} == {"synthetic"}


def test_nearest_neighbours_passes_trust_remote_code_to_the_encoder(monkeypatch):
    import sentence_transformers

    class Loaded(Exception):
        pass

    def load(name, **kwargs):
        raise Loaded(name, kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", load)
    for trust in (True, False):
        with pytest.raises(Loaded) as loaded:
            select.nearest_neighbours(["q"], ["c"], "org/encoder", 1, trust_remote_code=trust)
        assert loaded.value.args == ("org/encoder", {"trust_remote_code": trust})


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
    # Each one's nearest neighbour is its copy; a budget of 10 takes 8 more in later passes, none twice.
    pairs, card = build_training_data(data, cfg, budget=2, seed=0)
    assert {p["source"] for p in pairs} == {"t17", "t205"} and card["budget_met"]
    assert [p["lineage"]["similarity"] for p in pairs] == [1.0, 1.0]  # cosine similarity of a copy
    pairs, card = build_training_data(data, cfg, budget=10, seed=0)
    assert {"t17", "t205"} <= set(sources(pairs)) and len(sources(pairs)) == 10 and card["budget_met"]


def test_fill_stops_at_the_first_pass_that_draws_nothing():
    passes = [["a", "b"], [], ["c"]]
    pairs, used = select.fill(lambda i: passes[i], budget=10, max_passes=5, rng=random.Random(0))
    assert sorted(pairs) == ["a", "b"] and used == 2  # the empty second pass ends it; "c" is never drawn
    pairs, used = select.fill(lambda i: passes[0], budget=3, max_passes=5, rng=random.Random(0))
    assert len(pairs) == 3 and set(pairs) == {"a", "b"} and used == 2  # cut to the budget
