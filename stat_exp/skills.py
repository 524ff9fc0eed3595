"""Skill catalogue and skill map (STAT steps 1-2), from files or from the teacher.

The catalogue is {subject: [skill, ...]}, built as in Didolkar et al. (2024): the teacher
names one fine-grained skill per training question, then clusters each subject's names into
`min_skills`..`max_skills` coarse skills. The map labels every training question with up to
`max_skills_per_question` skills from its subject's list.
"""

import json
import random
from functools import partial
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

from stat_exp.config import SkillsConfig
from stat_exp.store import IncompleteArtifact
from stat_exp.teacher import parsers
from stat_exp.teacher.client import Request, Teacher
from stat_exp.teacher.prompts import render

Catalogue = dict[str, list[str]]


def load_catalogue(path: Path) -> Catalogue:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(isinstance(v, list) and v for v in data.values()):
        raise ValueError(f"{path}: a skill catalogue is a JSON object {{subject: [skill, ...]}}")
    return {subject: [str(s) for s in skills] for subject, skills in data.items()}


def subject_skills(catalogue: Catalogue, row: dict) -> list[str]:
    """The skill list of a row's subject; an error naming both when the catalogue lacks it."""
    skills = catalogue.get(row.get("subject"))
    if not skills:
        raise ValueError(f"row {row['id']}: subject {row.get('subject')!r} is not in the skill catalogue "
                         f"(subjects: {sorted(catalogue)})")
    return skills


def extract_catalogue(teacher: Teacher, rows: Sequence[dict], cfg: SkillsConfig, seed: int) -> tuple[Catalogue, list[dict]]:
    """The teacher's catalogue of `rows`, and one record per questioned row (its fine-grained skill)."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("subject") is None:
            raise ValueError(f"row {row['id']} has no subject: the catalogue is built per subject")
        by_subject[row["subject"]].append(row)
    rng = random.Random(seed)
    sampled = {s: rng.sample(rs, min(cfg.extraction_questions, len(rs))) for s, rs in sorted(by_subject.items())}
    flat = [row for rs in sampled.values() for row in rs]
    replies = teacher.ask(
        [Request("skill_extraction", tuple(render("skill_extraction", subject=r["subject"], problem=r["problem"],
                                                  solution=r["solution"]))) for r in flat],
        parsers.parse_fine_skill,
        desc="naming skills",
    )
    records = [_record(row, reply, fine_skill=reply.parsed) for row, reply in zip(flat, replies)]
    fine: dict[str, list[str]] = defaultdict(list)
    for record in records:
        if record["fine_skill"]:
            fine[record["subject"]].append(record["fine_skill"])
    silent = [s for s in sampled if not fine[s]]
    if silent:  # a subject the catalogue lacked would fail every later stage that meets its questions
        example = next(r.get("raw") for r in records if r["subject"] == silent[0])
        raise IncompleteArtifact(f"no skill-extraction answer for subject(s) {silent} could be parsed, so the "
                                 f"catalogue would lack them; one answer was {example!r:.300}")
    subjects = sorted(fine)
    clusters = teacher.ask(
        [Request("skill_clustering", tuple(render("skill_clustering", subject=s, skills=sorted(set(fine[s])),
                                                  min_skills=cfg.min_skills, max_skills=cfg.max_skills)))
         for s in subjects],
        parsers.parse_clusters,
        desc="clustering skills",
    )
    catalogue = {}
    for subject, reply in zip(subjects, clusters):
        if reply.parsed is None:
            raise ValueError(f"the teacher's clustering of {subject} could not be parsed ({reply.error}); "
                             f"its answer was: {(reply.raw or '')[:500]!r}")
        catalogue[subject] = reply.parsed
    return catalogue, records


def label_questions(teacher: Teacher, rows: Sequence[dict], catalogue: Catalogue, max_skills: int) -> list[dict]:
    """One record per row: up to `max_skills` skills the teacher picked from its subject's list.

    Names outside the list are dropped and kept under `unknown`; a row whose answer never
    parsed has no skills, and keeps the raw answer and the error.
    """
    skill_lists = [subject_skills(catalogue, row) for row in rows]
    replies = teacher.ask(
        [Request("skill_labelling", tuple(render("skill_labelling", subject=row["subject"], problem=row["problem"],
                                                 skills=skills, max_skills=max_skills)))
         for row, skills in zip(rows, skill_lists)],
        [partial(parsers.parse_labels, catalogue=skills, max_skills=max_skills) for skills in skill_lists],
        desc="labelling skills",
    )
    return [
        _record(row, reply, skills=list(reply.parsed.skills) if reply.parsed else [],
                unknown=list(reply.parsed.unknown) if reply.parsed else [],
                reason=reply.parsed.reason if reply.parsed else None)
        for row, reply in zip(rows, replies)
    ]


def load_skill_map(path: Path, rows: Sequence[dict], catalogue: Catalogue, max_skills: int) -> list[dict]:
    """Records for `rows` from a {problem, skills} JSONL file, matched by problem text."""
    by_problem: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            entry = json.loads(line)
            if "problem" not in entry or "skills" not in entry:
                missing = "problem" if "problem" not in entry else "skills"
                raise ValueError(f"{path}:{line_number}: missing field {missing!r}")
            by_problem[entry["problem"].strip()] = list(entry["skills"])
    records = []
    for row in rows:
        named = by_problem.get(row["problem"].strip(), [])
        known, unknown = parsers.match_skills(named, subject_skills(catalogue, row))
        records.append({"id": row["id"], "subject": row["subject"], "skills": known[:max_skills],
                        "unknown": unknown, "error": None if row["problem"].strip() in by_problem else "not in map"})
    return records


def map_summary(records: Sequence[dict]) -> dict:
    """Counts for the manifest: labelled rows, failures, unknown names, questions per skill."""
    skill_counts = Counter(skill for r in records for skill in r["skills"])
    unknown = Counter(name for r in records for name in r.get("unknown", []))
    return {
        "questions": len(records),
        "labelled": sum(bool(r["skills"]) for r in records),
        "unlabelled": sum(not r["skills"] for r in records),
        "unknown_skill_names": sum(unknown.values()),
        "top_unknown": dict(unknown.most_common(10)),
        "skill_counts": dict(sorted(skill_counts.items())),
    }


def _record(row: dict, reply, **fields) -> dict:
    record = {"id": row["id"], "subject": row.get("subject"), **fields, "error": reply.error}
    if reply.parsed is None:
        record["raw"] = reply.raw  # kept for inspection: what the teacher said instead
    return record
