"""Training data chosen from the training pool: STAT-Sel and the selection baselines.

STAT-Sel: for every (difficult question, missing skill) pair, draw `questions_per_pair`
training questions that the skill map labels with that skill, so skill s is drawn about
k x f(s) times; each drawn question brings its answers (the reference solution and/or
teacher rewrites). The baselines, as the paper's appendix C.2: `train` (every training question
once with its reference solution, or a budget of them), `augment` (the budget sampled from
every question's teacher answers), `hard` (the same from levels 4-5 only) and `embed_sel` (the
nearest training questions of each difficult question by sentence embedding, with their answers).
A baseline never repeats a (question, answer) pair.
"""

import logging
import random
from collections import defaultdict
from typing import Callable, Sequence

from stat_exp.config import VariantConfig
from stat_exp.grading import extract_boxed, verify_answer
from stat_exp.teacher import parsers
from stat_exp.teacher.client import Request, Teacher
from stat_exp.teacher.prompts import render

log = logging.getLogger(__name__)

Pair = dict  # a training row: question, answer, source, skills, origin, lineage


def lineage(rule: str, *, difficult: Sequence[str] = (), skill: str | None = None, seeds: Sequence[str] = (),
            agreeing: int | None = None, rank: int | None = None, similarity: float | None = None) -> dict:
    """Why a pair is in the data, with the same keys on every row (None or [] where the rule has no such reason).

    rule: the variant that chose it; difficult: the difficult validation question(s) that drew
    it; skill: the missing skill it was drawn or written for; seeds: the training questions the
    teacher was shown to write it; agreeing: how many of its solutions agreed; rank and
    similarity: its place among a difficult question's nearest training questions (1 = nearest).
    """
    return {"rule": rule, "difficult_ids": list(difficult), "skill": skill, "seed_ids": list(seeds),
            "agreeing": agreeing, "rank": rank, "similarity": similarity}


def pair(question: str, answer: str, *, source: str, skills: Sequence[str], origin: str, why: dict) -> Pair:
    return {
        "question": question,
        "answer": answer,
        "source": source,
        "skills": list(skills),
        "origin": origin,  # reference | rewrite | synthetic
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "lineage": why,
    }


class Answers:
    """Answers of training questions: the reference and teacher rewrites, fetched once per question."""

    def __init__(self, teacher: Callable[[], Teacher] | None, mode: str, per_question: int):
        if mode not in ("reference", "rewrite", "both"):
            raise ValueError(f"variant.answers must be reference, rewrite or both, got {mode!r}")
        self.teacher, self.mode, self.per_question = teacher, mode, per_question
        self.rewrites: dict[str, list[str]] = {}
        self.rejected = {"unparsed": 0, "wrong_answer": 0}

    @property
    def per_row(self) -> int:
        """Answers a question brings when no rewrite is rejected."""
        return 1 if self.mode == "reference" else self.per_question

    @property
    def rewrites_wanted(self) -> int:
        return {"reference": 0, "rewrite": self.per_question, "both": self.per_question - 1}[self.mode]

    def fetch(self, rows: Sequence[dict]) -> None:
        """Ask the teacher for the rewrites of rows not seen yet (all in one concurrent batch)."""
        todo = list({r["id"]: r for r in rows if r["id"] not in self.rewrites}.values())
        n = self.rewrites_wanted
        if not todo or n == 0:
            return
        requests = [Request("rewrite", tuple(render("rewrite", problem=r["problem"], solution=r["solution"])), sample=i)
                    for r in todo for i in range(n)]
        replies = iter(self.teacher().ask(requests, parsers.parse_solution, desc="rewriting solutions"))
        for row in todo:
            kept = []
            for _ in range(n):
                reply = next(replies)
                if reply.parsed is None:
                    self.rejected["unparsed"] += 1
                elif not verify_answer(row["answer"], extract_boxed(reply.parsed)):
                    self.rejected["wrong_answer"] += 1  # a rewrite must keep the reference's final answer
                else:
                    kept.append(reply.parsed)
            self.rewrites[row["id"]] = kept

    def of(self, row: dict, skills: Sequence[str], why: dict) -> list[Pair]:
        answers = ([(row["solution"], "reference")] if self.mode != "rewrite" else [])
        answers += [(text, "rewrite") for text in self.rewrites.get(row["id"], [])]
        return [pair(row["problem"], text, source=row["id"], skills=skills, origin=origin, why=why)
                for text, origin in answers]


def fill(draw_pass: Callable[[int], list[Pair]], budget: int, max_passes: int, rng: random.Random) -> tuple[list[Pair], int]:
    """Passes of `draw_pass(i)` until the budget is reached (or passes run out), shuffled and cut to it."""
    pairs: list[Pair] = []
    passes = 0
    while len(pairs) < budget and passes < max_passes:
        new = draw_pass(passes)
        passes += 1
        if not new:
            break
        pairs += new
    rng.shuffle(pairs)
    return pairs[:budget], passes


def questions_by_skill(inputs) -> dict[str, list[dict]]:
    """The skill map inverted: skill -> the training questions labelled with it."""
    by_skill: dict[str, list[dict]] = defaultdict(list)
    for row in inputs.train:
        for skill in inputs.skill_map.get(row["id"], []):
            by_skill[skill].append(row)
    return by_skill


def stat_sel(inputs, cfg: VariantConfig, budget: int, rng: random.Random) -> tuple[list[Pair], dict]:
    by_skill = questions_by_skill(inputs)
    pairs_ = [(d["id"], skill) for d in inputs.diagnoses for skill in d["skills"]]
    empty = sorted({s for _, s in pairs_ if not by_skill[s]})
    answers = Answers(inputs.teacher, cfg.answers, cfg.answers_per_question)

    def draw_pass(_: int) -> list[Pair]:
        draws = []
        for question, skill in pairs_:
            pool = by_skill[skill]
            draws += [(row, skill, question) for row in rng.sample(pool, min(cfg.questions_per_pair, len(pool)))]
        answers.fetch([row for row, _, _ in draws])
        return [p for row, skill, question in draws
                for p in answers.of(row, [skill], lineage("sel", difficult=[question], skill=skill))]

    rows, passes = fill(draw_pass, budget, cfg.max_passes, rng)
    return rows, {"pairs_profiled": len(pairs_), "skills_without_questions": empty, "passes": passes,
                  "rejected_rewrites": answers.rejected}


def sampled(inputs, budget: int, rng: random.Random, *, pool: Sequence[dict], answers: Answers,
            rule: str) -> tuple[list[Pair], dict]:
    """`budget` pairs drawn without replacement from every (question, answer) of `pool`.

    The same draw as writing every question's answers and sampling the budget from them, at the
    cost of the questions drawn only: the (question, answer number) slots are shuffled and taken
    in order, and only the questions taken are rewritten. A slot whose rewrite was rejected is
    empty and a later slot fills in; short of the budget only when the pool's pairs run out.
    """
    slots = [(row, j) for row in pool for j in range(answers.per_row)]
    rng.shuffle(slots)
    pairs: list[Pair] = []
    taken = 0
    while len(pairs) < budget and taken < len(slots):
        batch = slots[taken:taken + budget - len(pairs)]
        taken += len(batch)
        answers.fetch([row for row, _ in batch])
        for row, j in batch:
            made = answers.of(row, inputs.skill_map.get(row["id"], []), lineage(rule))
            if j < len(made):
                pairs.append(made[j])
    stats = {"pool": len(pool), "answers_per_question": answers.per_row, "rejected_rewrites": answers.rejected}
    if len(pairs) < budget:
        stats["exhausted"] = f"every pair of the pool's {len(pool)} questions x {answers.per_row} answers is used"
    return pairs, stats


def train_baseline(inputs, cfg: VariantConfig, budget: int, rng: random.Random) -> tuple[list[Pair], dict]:
    """Distinct training questions with their reference solutions (the whole pool: `build_training_data`
    sets the budget to its size for `whole_pool`)."""
    return sampled(inputs, budget, rng, pool=inputs.train, answers=Answers(None, "reference", 1), rule="train")


def augment_baseline(inputs, cfg: VariantConfig, budget: int, rng: random.Random) -> tuple[list[Pair], dict]:
    """The budget sampled from `answers_per_question` teacher answers of every training question."""
    answers = Answers(inputs.teacher, "rewrite", cfg.answers_per_question)
    return sampled(inputs, budget, rng, pool=inputs.train, answers=answers, rule="augment")


def hard_baseline(inputs, cfg: VariantConfig, budget: int, rng: random.Random) -> tuple[list[Pair], dict]:
    """The budget sampled from the answers (`variant.answers`) of the questions at `hard_levels`."""
    pool = [r for r in inputs.train if r.get("level") in set(cfg.hard_levels)]
    answers = Answers(inputs.teacher, cfg.answers, cfg.answers_per_question)
    return sampled(inputs, budget, rng, pool=pool, answers=answers, rule="hard")


def nearest_neighbours(queries: Sequence[str], corpus: Sequence[str], model_name: str, k: int, *,
                       trust_remote_code: bool) -> list[list[tuple[int, float]]]:
    """(index, cosine similarity) of the k corpus texts nearest each query, nearest first, by sentence embeddings."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_name, trust_remote_code=trust_remote_code)
    corpus_vectors = model.encode(list(corpus), normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=True)
    query_vectors = model.encode(list(queries), normalize_embeddings=True, convert_to_tensor=True)
    scores = query_vectors @ corpus_vectors.T
    top = scores.topk(min(k, len(corpus)), dim=1)
    return [list(zip(indices, values)) for indices, values in zip(top.indices.tolist(), top.values.tolist())]


def embed_sel(inputs, cfg: VariantConfig, budget: int, rng: random.Random) -> tuple[list[Pair], dict]:
    """The `neighbours` training questions nearest each difficult question, with their answers; the budget sampled.

    While short of the budget, each further pass takes every difficult question's next
    `neighbours` nearest. A training question is taken once, however many difficult questions
    it is near, so no pair repeats; the passes stop when the neighbours run out.
    """
    queries = [r["problem"] for r in inputs.difficult]
    k = cfg.neighbours
    ranked = nearest_neighbours(queries, [r["problem"] for r in inputs.train], cfg.embedding_model, k * cfg.max_passes,
                                trust_remote_code=cfg.embedding_remote_code)
    answers = Answers(inputs.teacher, cfg.answers, cfg.answers_per_question)
    taken: set[int] = set()
    pairs: list[Pair] = []
    stats: dict = {"difficult_questions": len(queries), "questions": 0}
    passes = 0
    while len(pairs) < budget and passes < cfg.max_passes:
        chosen = []  # (training row, why)
        for difficult, near in zip(inputs.difficult, ranked):
            for rank, (i, similarity) in enumerate(near[passes * k:(passes + 1) * k], start=passes * k + 1):
                if i not in taken:
                    taken.add(i)
                    chosen.append((inputs.train[i], lineage("embed_sel", difficult=[difficult["id"]], rank=rank,
                                                            similarity=round(similarity, 4))))
        if not chosen:
            stats["exhausted"] = f"every difficult question's nearest training questions are taken ({len(taken)})"
            log.info("embed_sel stops after %d passes with %d pairs: %s", passes, len(pairs), stats["exhausted"])
            break
        passes += 1
        answers.fetch([row for row, _ in chosen])
        new = [p for row, why in chosen for p in answers.of(row, inputs.skill_map.get(row["id"], []), why)]
        rng.shuffle(new)  # nearer passes are kept whole; the last one is sampled down to the budget
        pairs += new[:budget - len(pairs)]
        stats["questions"] += len(chosen)
    rng.shuffle(pairs)
    return pairs, stats | {"passes": passes, "rejected_rewrites": answers.rejected}
