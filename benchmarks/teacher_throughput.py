"""Teacher throughput: N labelling calls to a local OpenAI-compatible server with fixed latency.

Compares the Teacher client (async, `--concurrency` in flight) with a one-call-at-a-time
litellm loop, the way research code usually calls its teacher, and with the ideal
N x latency / concurrency. Run from the repository root:

    .venv/bin/python -m benchmarks.teacher_throughput --n 1000 --latency 0.1 --concurrency 32
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from stat_exp.config import TeacherConfig  # noqa: E402
from stat_exp.skills import label_questions  # noqa: E402
from stat_exp.teacher.client import Teacher  # noqa: E402
from stat_exp.teacher.prompts import render  # noqa: E402
from teacher_server import Faults, TeacherServer  # noqa: E402

CATALOGUE = {"Algebra": ["linear_equations", "factoring", "quadratics"]}


def answer(body: dict) -> str:
    return "<skill>factoring</skill><reason>it factors</reason>"


def rows(n: int) -> list[dict]:
    return [{"id": str(i), "subject": "Algebra", "problem": f"Factor x^2 + {i}x.", "solution": "\\boxed{x(x+1)}"}
            for i in range(n)]


def sequential(server: TeacherServer, n: int) -> float:
    import litellm

    start = time.perf_counter()
    for row in rows(n):
        messages = render("skill_labelling", subject="Algebra", problem=row["problem"], solution=row["solution"],
                          skills=CATALOGUE["Algebra"], max_skills=5)
        litellm.completion(model="openai/test-teacher", messages=messages, api_base=server.url, api_key="EMPTY",
                           temperature=0, max_tokens=512)
    return time.perf_counter() - start


def concurrent(server: TeacherServer, n: int, concurrency: int) -> float:
    cfg = OmegaConf.structured(TeacherConfig(name="local", model="openai/test-teacher", api_base=server.url,
                                             concurrency=concurrency))
    with tempfile.TemporaryDirectory() as cache:  # a cold cache: every call goes to the server
        teacher = Teacher(cfg, Path(cache))
        start = time.perf_counter()
        label_questions(teacher, rows(n), CATALOGUE, max_skills=5)
        elapsed = time.perf_counter() - start
        assert teacher.usage.calls == n, teacher.usage
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--sequential-n", type=int, default=None, help="calls for the sequential loop (default: --n)")
    args = parser.parse_args()
    seq_n = args.sequential_n or args.n
    with TeacherServer(answer, Faults(latency=args.latency)) as server:
        seq = sequential(server, seq_n) * args.n / seq_n
        print(f"{'method':<28} {'wall s':>8} {'calls/s':>8} {'vs sequential':>14} {'vs ideal':>9}")
        print(f"{'one call at a time':<28} {seq:8.1f} {args.n / seq:8.1f} {1:14.1f}x {'':>9}"
              + ("" if seq_n == args.n else f"  (timed on {seq_n} calls)"))
        for concurrency in args.concurrency:
            wall = concurrent(server, args.n, concurrency)
            ideal = args.n * args.latency / concurrency
            print(f"{f'Teacher, concurrency {concurrency}':<28} {wall:8.1f} {args.n / wall:8.1f} "
                  f"{seq / wall:14.1f}x {wall / ideal:8.2f}x")


if __name__ == "__main__":
    main()
