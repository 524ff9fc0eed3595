"""The `replay` generator: a previous run's recorded responses instead of new ones.

It reads the `rows.jsonl` an eval (or probe) artifact wrote and answers each question with the
responses recorded for the same problem text, so an old run can be graded again (a new grader,
the strict metric) without generating again.
"""

from pathlib import Path
from typing import Sequence

from stat_exp.store import read_jsonl


def recorded_responses(path: str | Path, rows: Sequence[dict], samples: int) -> list[list[str]]:
    """The first `samples` responses recorded in `path` for each of `rows`, matched by problem text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator.replay_from={str(path)!r} is not a file (a run's rows.jsonl)")
    recorded = {r["problem"]: r["responses"] for r in read_jsonl(path)}
    out = []
    for row in rows:
        responses = recorded.get(row["problem"])
        if responses is None:
            raise KeyError(f"{path} records no responses for question {row.get('id')!r}: {row['problem'][:80]!r}")
        if len(responses) < samples:
            raise ValueError(f"{path} records {len(responses)} responses for question {row.get('id')!r}, "
                             f"but {samples} samples were asked for")
        out.append(list(responses[:samples]))
    return out
