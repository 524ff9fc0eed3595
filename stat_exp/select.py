"""Training data chosen from the training pool: STAT-Sel and the selection baselines.

STAT-Sel: for every (difficult question, missing skill) pair, draw `questions_per_pair`
training questions that the skill map labels with that skill, so skill s is drawn about
k x f(s) times; each drawn question brings its answers (the reference solution and/or
teacher rewrites). Baselines draw from the same pool at the same budget: `train` (uniform,
reference solutions), `augment` (uniform, teacher rewrites), `hard` (levels 4-5 only) and
`embed_sel` (nearest training questions of each difficult question by sentence embedding).
"""

import random
from collections import defaultdict
from typing import Callable, Sequence

from stat_exp.config import VariantConfig
from stat_exp.grading import extract_boxed, verify_answer
from stat_exp.teacher import parsers
from stat_exp.teacher.client import Request, Teacher
from stat_exp.teacher.prompts import render

Pair = dict  # a training row: question, answer, source, skills, origin


def pair(question: str, answer: str, *, source: str, skills: Sequence[str], origin: str) -> Pair:
    return {
        "question": question,
        "answer": answer,
        "source": source,
        "skills": list(skills),
        "origin": origin,  # reference | rewrite | synthetic
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
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

    def of(self, row: dict, skills: Sequence[str]) -> list[Pair]:
        answers = ([(row["solution"], "reference")] if self.mode != "rewrite" else [])
        answers += [(text, "rewrite") for text in self.rewrites.get(row["id"], [])]
        return [pair(row["problem"], text, source=row["id"], skills=skills, origin=origin) for text, origin in answers]


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
        for _, skill in pairs_:
            pool = by_skill[skill]
            draws += [(row, skill) for row in rng.sample(pool, min(cfg.questions_per_pair, len(pool)))]
        answers.fetch([row for row, _ in draws])
        return [p for row, skill in draws for p in answers.of(row, [skill])]

    rows, passes = fill(draw_pass, budget, cfg.max_passes, rng)
    return rows, {"pairs_profiled": len(pairs_), "skills_without_questions": empty, "passes": passes,
                  "rejected_rewrites": answers.rejected}


def uniform(inputs, cfg: VariantConfig, budget: int, rng: random.Random, *, pool: Sequence[dict], mode: str) -> tuple[list[Pair], dict]:
    """Training questions drawn uniformly from `pool` (epoch by epoch), with answers by `mode`."""
    answers = Answers(inputs.teacher, mode, 1 if mode == "reference" else cfg.answers_per_question)
    per_question = max(1, answers.rewrites_wanted + (mode != "rewrite"))

    def draw_pass(_: int) -> list[Pair]:
        rows = rng.sample(list(pool), min(len(pool), -(-budget // per_question)))
        answers.fetch(rows)
        return [p for row in rows for p in answers.of(row, inputs.skill_map.get(row["id"], []))]

    rows, passes = fill(draw_pass, budget, cfg.max_passes, rng)
    return rows, {"pool": len(pool), "passes": passes, "rejected_rewrites": answers.rejected}


def train_baseline(inputs, cfg, budget, rng):
    return uniform(inputs, cfg, budget, rng, pool=inputs.train, mode="reference")


def augment_baseline(inputs, cfg, budget, rng):
    return uniform(inputs, cfg, budget, rng, pool=inputs.train, mode="rewrite")


def hard_baseline(inputs, cfg, budget, rng):
    pool = [r for r in inputs.train if r.get("level") in set(cfg.hard_levels)]
    return uniform(inputs, cfg, budget, rng, pool=pool, mode="reference")


def nearest_neighbours(queries: Sequence[str], corpus: Sequence[str], model_name: str, k: int) -> list[list[int]]:
    """Indices of the k corpus texts nearest each query, by cosine similarity of sentence embeddings."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_name)
    corpus_vectors = model.encode(list(corpus), normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=True)
    query_vectors = model.encode(list(queries), normalize_embeddings=True, convert_to_tensor=True)
    scores = query_vectors @ corpus_vectors.T
    return scores.topk(min(k, len(corpus)), dim=1).indices.tolist()


def embed_sel(inputs, cfg: VariantConfig, budget: int, rng: random.Random) -> tuple[list[Pair], dict]:
    queries = [r["problem"] for r in inputs.difficult]
    neighbours = nearest_neighbours(queries, [r["problem"] for r in inputs.train], cfg.embedding_model, cfg.neighbours)
    answers = Answers(inputs.teacher, cfg.answers, cfg.answers_per_question)
    chosen = [inputs.train[i] for near in neighbours for i in near]

    def draw_pass(_: int) -> list[Pair]:
        answers.fetch(chosen)
        return [p for row in chosen for p in answers.of(row, inputs.skill_map.get(row["id"], []))]

    rows, passes = fill(draw_pass, budget, cfg.max_passes, rng)
    return rows, {"difficult_questions": len(queries), "passes": passes, "rejected_rewrites": answers.rejected}
