"""Missing-Skill-Profile (STAT step 5): the teacher diagnoses every difficult answer.

For each difficult answer the teacher returns a judgement, a reason and the skills from the
question's subject list that the answer failed to apply. The profile is the histogram
f(s) = number of difficult questions missing skill s.
"""

from collections import Counter
from functools import partial
from pathlib import Path
from typing import Sequence

from stat_exp.skills import Catalogue, subject_skills
from stat_exp.teacher import parsers
from stat_exp.teacher.client import Request, Teacher
from stat_exp.teacher.prompts import render


def diagnose(teacher: Teacher, records: Sequence[dict], verdicts: Sequence[dict], catalogue: Catalogue) -> list[dict]:
    """One diagnosis per difficult record: judge, reason, missing skills (empty when judged correct).

    A diagnosis that never parses keeps the raw answer and its error, and names no skill. As in
    the paper, the teacher sees no reference solution or answer unless
    `teacher.diagnosis_sees_reference` is set.
    """
    difficult = [(r, v) for r, v in zip(records, verdicts, strict=True) if v["difficult"]]
    skill_lists = [subject_skills(catalogue, r) for r, _ in difficult]
    sees_reference = teacher.cfg.diagnosis_sees_reference
    requests = [
        Request("diagnosis", tuple(render("diagnosis", subject=r["subject"], problem=r["problem"],
                                          response=r["responses"][v["response"]], skills=skills,
                                          **({"reference": r.get("solution") or "", "answer": r["answer"]}
                                             if sees_reference else {}))))
        for (r, v), skills in zip(difficult, skill_lists)
    ]
    replies = teacher.ask(requests, [partial(parsers.parse_diagnosis, catalogue=s) for s in skill_lists],
                          desc="diagnosing")
    diagnoses = []
    for (record, verdict), reply in zip(difficult, replies):
        parsed = reply.parsed
        diagnosis = {
            "id": record["id"],
            "subject": record["subject"],
            "response": verdict["response"],
            "judge": parsed.judge if parsed else None,
            "reason": parsed.reason if parsed else None,
            "skills": list(parsed.skills) if parsed else [],
            "unknown": list(parsed.unknown) if parsed else [],
            "error": reply.error,
        }
        if parsed is None:
            diagnosis["raw"] = reply.raw
        diagnoses.append(diagnosis)
    return diagnoses


def missing_skill_profile(diagnoses: Sequence[dict]) -> dict[str, int]:
    """f(s): how many diagnosed questions miss skill s, most missed first."""
    counts = Counter(skill for d in diagnoses for skill in set(d["skills"]))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def profile_summary(diagnoses: Sequence[dict]) -> dict:
    return {
        "difficult": len(diagnoses),
        "judged_incorrect": sum(d["judge"] == "incorrect" for d in diagnoses),
        "judged_correct": sum(d["judge"] == "correct" for d in diagnoses),
        "unparsed": sum(d["judge"] is None for d in diagnoses),
        "unknown_skill_names": sum(len(d["unknown"]) for d in diagnoses),
        "pairs": sum(len(d["skills"]) for d in diagnoses),  # (difficult question, missing skill) pairs
        "profile": missing_skill_profile(diagnoses),
    }


def plot_profiles(profiles: dict[str, dict[str, int]], path: Path, title: str = "Missing-Skill-Profile") -> Path:
    """A horizontal bar chart of one or more profiles side by side (e.g. before and after training)."""
    from stat_exp.plots import bar_chart

    return bar_chart(profiles, path, title=title, xlabel="difficult questions missing the skill")
