"""Training data written by the teacher: STAT-Syn and the embedding baseline `embed_syn`.

STAT-Syn: for every (difficult question, missing skill) pair, the teacher sees
`examples_per_pair` training questions with that skill and their solutions and writes
`new_questions` new ones; near-copies of the examples are rejected; the teacher then solves
each new question `solutions_per_question` times, and a question is kept, with its agreeing
solutions, when at least `min_agreement` final answers agree (math-verify).

embed_syn (the paper's Embed-Syn, appendix C.2): for every difficult question,
`groups_per_question` new questions, each written from a different group of
`examples_per_pair` of its `neighbours` nearest training questions; solved and filtered alike.
"""

import difflib
import itertools
import random
import re
from typing import Sequence

from stat_exp.config import VariantConfig
from stat_exp.grading import extract_boxed, verify_answer
from stat_exp.select import Pair, fill, lineage, nearest_neighbours, pair, questions_by_skill
from stat_exp.teacher import parsers
from stat_exp.teacher.client import Request
from stat_exp.teacher.prompts import render


def agreeing_solutions(solutions: Sequence[str], min_agreement: int) -> list[str]:
    """The solutions in the largest group with equivalent final answers, if it has >= min_agreement."""
    groups: list[tuple[str, list[str]]] = []  # (representative answer, solutions)
    for solution in solutions:
        answer = extract_boxed(solution)
        if answer is None:
            continue
        for representative, members in groups:
            if verify_answer(representative, answer):
                members.append(solution)
                break
        else:
            groups.append((answer, [solution]))
    best = max((members for _, members in groups), key=len, default=[])
    return best if len(best) >= min_agreement else []


def _shape(text: str) -> list[str]:
    # Numbers are masked so that an example with its numbers changed still counts as a copy.
    return re.sub(r"\d+(\.\d+)?", "#", text.lower()).split()


def is_near_copy(question: str, examples: Sequence[str], threshold: float) -> bool:
    shape = _shape(question)
    return any(difflib.SequenceMatcher(None, shape, _shape(e)).ratio() >= threshold for e in examples)


def synthesize(inputs, cfg: VariantConfig, targets: list[tuple[str | None, str, list[dict], str]], pass_index: int,
               stats: dict, *, count: int, rule: str) -> list[Pair]:
    """`count` new questions, with agreeing solutions, for each (skill or None, subject, examples,
    difficult question id) target."""
    teacher = inputs.teacher()
    requests = [
        Request("synthesis", tuple(render("synthesis", skill=skill, subject=subject, count=count,
                                          examples=[{"problem": e["problem"]} for e in examples])),
                sample=pass_index)
        for skill, subject, examples, _ in targets
    ]
    replies = teacher.ask(requests, lambda text: parsers.parse_questions(text, count), desc="writing questions")
    questions = []  # (question, skill, why)
    for (skill, _, examples, difficult), reply in zip(targets, replies):
        if reply.parsed is None:
            stats["unparsed_syntheses"] += 1
            continue
        for question in reply.parsed:
            if is_near_copy(question, [e["problem"] for e in examples], cfg.copy_threshold):
                stats["near_copies"] += 1
            else:
                questions.append((question, skill, lineage(rule, difficult=[difficult], skill=skill,
                                                           seeds=[e["id"] for e in examples])))
    solutions = teacher.ask(
        [Request("solution", tuple(render("solution", problem=q)), sample=i)
         for q, _, _ in questions for i in range(cfg.solutions_per_question)],
        parsers.parse_solution,
        desc="solving new questions",
    )
    rows = []
    for n, (question, skill, why) in enumerate(questions):
        texts = [r.parsed for r in solutions[n * cfg.solutions_per_question:(n + 1) * cfg.solutions_per_question] if r.parsed]
        agreeing = agreeing_solutions(texts, cfg.min_agreement)
        if not agreeing:
            stats["inconsistent"] += 1
            continue
        stats["kept_questions"] += 1
        why = why | {"agreeing": len(agreeing)}
        rows += [pair(question, s, source="synthetic", skills=[skill] if skill else [], origin="synthetic", why=why)
                 for s in agreeing]
    return rows


def _new_stats() -> dict:
    return {"unparsed_syntheses": 0, "near_copies": 0, "inconsistent": 0, "kept_questions": 0}


def stat_syn(inputs, cfg: VariantConfig, budget: int, rng: random.Random) -> tuple[list[Pair], dict]:
    by_skill = questions_by_skill(inputs)
    subject_of = {d["id"]: d["subject"] for d in inputs.diagnoses}
    pairs_ = [(d["id"], skill) for d in inputs.diagnoses for skill in d["skills"] if by_skill[skill]]
    stats = _new_stats()

    def draw_pass(i: int) -> list[Pair]:
        targets = [(skill, subject_of[qid], rng.sample(by_skill[skill], min(cfg.examples_per_pair, len(by_skill[skill]))),
                    qid) for qid, skill in pairs_]
        return synthesize(inputs, cfg, targets, i, stats, count=cfg.new_questions, rule="syn")

    rows, passes = fill(draw_pass, budget, cfg.max_passes, rng)
    return rows, stats | {"pairs_profiled": len(pairs_), "passes": passes}


def embed_syn(inputs, cfg: VariantConfig, budget: int, rng: random.Random) -> tuple[list[Pair], dict]:
    neighbours = nearest_neighbours([r["problem"] for r in inputs.difficult], [r["problem"] for r in inputs.train],
                                    cfg.embedding_model, cfg.neighbours, trust_remote_code=cfg.embedding_remote_code)
    groups = [list(itertools.combinations([i for i, _ in near], cfg.examples_per_pair)) for near in neighbours]
    if any(len(options) < cfg.groups_per_question for options in groups):
        raise ValueError(f"variant.groups_per_question ({cfg.groups_per_question}) needs that many different groups of "
                         f"examples_per_pair ({cfg.examples_per_pair}) of the neighbours ({cfg.neighbours}) "
                         f"in a pool of {len(inputs.train)}")
    stats = _new_stats()

    def draw_pass(i: int) -> list[Pair]:
        targets = [(None, d.get("subject") or "mathematics", [inputs.train[j] for j in group], d["id"])
                   for d, options in zip(inputs.difficult, groups)
                   for group in rng.sample(options, cfg.groups_per_question)]
        return synthesize(inputs, cfg, targets, i, stats, count=1, rule="embed_syn")

    rows, passes = fill(draw_pass, budget, cfg.max_passes, rng)
    return rows, stats | {"difficult_questions": len(groups), "passes": passes}
