"""Start-up cost of the CLI: `python -m stat_exp --cfg job` against `python -c "import hydra"`.

The CLI must not import torch, transformers, litellm or wandb before a stage needs them.
Run from the repository root: python benchmarks/startup.py --repeats 10
"""

import argparse
import statistics
import subprocess
import sys
import time


def best_and_median(cmd: list[str], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    baseline = best_and_median([sys.executable, "-c", "import hydra"], args.repeats)
    cli = best_and_median([sys.executable, "-m", "stat_exp", "--cfg", "job"], args.repeats)
    heavy = [sys.executable, "-c", "import sys, stat_exp.__main__, stat_exp.pipeline; "
             "print(sorted(m for m in ('torch', 'transformers', 'litellm', 'wandb', 'vllm') if m in sys.modules))"]
    loaded = subprocess.run(heavy, check=True, capture_output=True, text=True).stdout.strip()
    print(f"{'command':<34} {'best s':>8} {'median s':>9}")
    for name, (best, median) in [('python -c "import hydra"', baseline), ("python -m stat_exp --cfg job", cli)]:
        print(f"{name:<34} {best:8.3f} {median:9.3f}")
    print(f"ratio (median): {cli[1] / baseline[1]:.2f}x; heavy modules loaded by the CLI and pipeline imports: {loaded}")


if __name__ == "__main__":
    main()
