"""Teacher throughput: N labelling calls to a local OpenAI-compatible server with fixed latency.

Compares the Teacher client (async, `--concurrency` in flight), calling the OpenAI-compatible
server through the openai SDK (its default) and through litellm (`teacher.direct_openai=false`),
with a one-call-at-a-time litellm loop, the way research code usually calls its teacher, and with
the ideal N x latency / concurrency: the ratio ideal / wall (1.0 at best) and the client's CPU
time per call. The server runs in its own process, as a provider does, so that its threads do not take
the client's interpreter lock. Run from the repository root:

    .venv/bin/python -m benchmarks.teacher_throughput --n 1000 --latency 0.1 --concurrency 32 64
"""

import argparse
import multiprocessing
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


def serve(latency: float, conn) -> None:
    """The local server, in a process of its own: sends its URL, serves until told to stop."""
    with TeacherServer(answer, Faults(latency=latency)) as server:
        conn.send(server.url)
        conn.recv()


def sequential(url: str, n: int) -> float:
    import litellm

    start = time.perf_counter()
    for row in rows(n):
        messages = render("skill_labelling", subject="Algebra", problem=row["problem"], solution=row["solution"],
                          skills=CATALOGUE["Algebra"], max_skills=5)
        litellm.completion(model="openai/test-teacher", messages=messages, api_base=url, api_key="EMPTY",
                           temperature=0, max_tokens=512)
    return time.perf_counter() - start


def concurrent(url: str, n: int, concurrency: int, direct: bool = True) -> tuple[float, float]:
    """Wall seconds and client CPU seconds for n labelling calls through the Teacher."""
    cfg = OmegaConf.structured(TeacherConfig(name="local", model="openai/test-teacher", api_base=url,
                                             concurrency=concurrency, direct_openai=direct))
    with tempfile.TemporaryDirectory() as cache:  # a cold cache: every call goes to the server
        teacher = Teacher(cfg, Path(cache))
        start, cpu = time.perf_counter(), time.process_time()
        label_questions(teacher, rows(n), CATALOGUE, max_skills=5)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert teacher.usage.calls == n, teacher.usage
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--sequential-n", type=int, default=None, help="calls for the sequential loop (default: --n)")
    args = parser.parse_args()
    seq_n = args.sequential_n or args.n
    ours, theirs = multiprocessing.Pipe()
    server = multiprocessing.Process(target=serve, args=(args.latency, theirs), daemon=True)
    server.start()
    url = ours.recv()
    try:
        for direct in (True, False):  # warm up: the first calls import and build what later calls reuse
            concurrent(url, 50, 8, direct)
        seq = sequential(url, seq_n) * args.n / seq_n
        print(f"{'method':<30} {'wall s':>8} {'calls/s':>8} {'vs sequential':>14} {'ideal/wall':>10} "
              f"{'CPU ms/call':>11}")
        print(f"{'one call at a time':<30} {seq:8.1f} {args.n / seq:8.1f} {1:13.1f}x {'':>10} {'':>11}"
              + ("" if seq_n == args.n else f"  (timed on {seq_n} calls)"))
        for concurrency in args.concurrency:
            for direct, path in ((False, "litellm"), (True, "openai SDK")):
                wall, cpu = concurrent(url, args.n, concurrency, direct)
                ideal = args.n * args.latency / concurrency
                print(f"{f'Teacher ({path}), conc. {concurrency}':<30} {wall:8.1f} {args.n / wall:8.1f} "
                      f"{seq / wall:13.1f}x {ideal / wall:10.2f} {1000 * cpu / args.n:11.2f}")
    finally:
        ours.send("stop")
        server.join()


if __name__ == "__main__":
    main()
