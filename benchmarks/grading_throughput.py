"""Grading throughput: MATH500 reference answers (last \\boxed{} of each solution vs the gold
answer), graded inline and in a worker pool, in answers per second.

    .venv/bin/python -m benchmarks.grading_throughput [--limit N] [--workers 2] [--data-dir DIR]

The pool's figure includes starting its worker processes, as every `grade` call pays it.
"""

import argparse
import json
import time
from pathlib import Path

from stat_exp.grading import extract_boxed, grade


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--limit", type=int, default=None, help="grade the first N answers (default: all 500)")
    parser.add_argument("--workers", type=int, default=2, help="pool size for the pool run")
    args = parser.parse_args()

    with (args.data_dir / "math500" / "test.jsonl").open() as file:
        rows = [json.loads(line) for line in file][: args.limit]
    golds = [row["answer"] for row in rows]
    preds = [extract_boxed(row["solution"]) for row in rows]

    grade(golds[:1], preds[:1], progress=False)  # import math-verify outside the timed runs
    timings = {}
    for label, workers in (("inline", 0), (f"pool (workers={args.workers})", args.workers)):
        start = time.perf_counter()
        grades = grade(golds, preds, workers=workers, progress=False)
        seconds = time.perf_counter() - start
        timings[label] = seconds
        correct = sum(g.correct for g in grades)
        print(f"{label:<20} {len(rows):>5} answers  {seconds:7.2f} s  {len(rows) / seconds:8.1f} answers/s"
              f"  {correct} verified")
    inline, pool = timings.values()
    print(f"{'pool/inline':<20} {inline / pool:.2f}x answers/s")


if __name__ == "__main__":
    main()
