"""STAT's gain over plain SFT on skillworld: STAT-Sel, STAT-Syn and plain SFT (variant=train)
fine-tune the same pre-trained base student on the same budget, once per seed (the data draw
and the SFT shuffle); held-out test accuracy, overall and on the world's rare skills, as mean
and spread over the seeds. Run from the repository root (6 minutes on 2 CPU cores with the
demo's base student cached, about 11 cold):

    .venv/bin/python -m benchmarks.skillworld_gain --seeds 0 1 2

It runs `python -m stat_exp experiment=demo data.seed=...` (a multirun over variants x seeds),
so any override of the demo can follow `--`, e.g. `-- data.budget=1600`; `--experiment claims`
runs the paper-claims preset instead (one epoch), for the spread within the claims' world 0.
"""

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from stat_exp.compare import load_runs

ROOT = Path(__file__).resolve().parents[1]


def run(experiment: str, seeds: list[int], sweep_dir: Path, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "stat_exp", f"experiment={experiment}", "experiment_name=skillworld_gain",
               f"data.seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={sweep_dir}", *overrides]
    subprocess.run(command, cwd=ROOT, check=True)


def weak_accuracy(by_skill: dict, skills: list[str]) -> float:
    """Accuracy on the test questions that use any of `skills`, from per-skill counts."""
    # by_skill counts a question under each of its skills; weight each skill by its questions.
    n = sum(by_skill[s]["n"] for s in skills if s in by_skill)
    return sum(by_skill[s]["accuracy"] * by_skill[s]["n"] for s in skills if s in by_skill) / max(n, 1)


def collect(sweep_dir: Path) -> tuple[dict, dict, list[str], dict]:
    """Per variant: the seeds' test accuracy after SFT, overall and on the rare skills; the base's."""
    runs = load_runs(sweep_dir)
    if not runs:
        raise SystemExit(f"no finished jobs under {sweep_dir}")
    # Every job shares the world and the base student: read them off the first.
    rare = yaml.safe_load((sweep_dir / "0" / "config.yaml").read_text())["task"]["world"]["rare_skills"]
    before = runs[0]["eval"]["base"]["test"]
    base = {"overall": before["pass@1"], "rare": weak_accuracy(before["by_skill"], rare)}
    results: dict[str, dict[str, list[float]]] = {}
    for metrics in runs:
        after = metrics["eval"]["sft"]["test"]
        scores = results.setdefault(metrics["run"]["variant"], {"overall": [], "rare": []})
        scores["overall"].append(after["pass@1"])
        scores["rare"].append(weak_accuracy(after["by_skill"], rare))
    return results, base, rare, runs[0]["profile"]["base"]["f"]


def report(results: dict, base: dict, rare: list[str], profile: dict) -> str:
    def cell(values: list[float]) -> str:
        spread = max(values) - min(values)
        return f"{100 * statistics.mean(values):.1f} ± {100 * spread / 2:.1f}"

    baseline = statistics.mean(results["train"]["overall"]) if "train" in results else None
    lines = [f"Base student: {100 * base['overall']:.1f} overall, {100 * base['rare']:.1f} on the rare skills "
             f"({', '.join(rare)}). Profile of its wrong answers: {profile}.", "",
             "| variant | seeds | test accuracy | on rare skills | gain over plain SFT |", "|---|---|---|---|---|"]
    for variant, scores in results.items():
        gain = "" if baseline is None else f"{100 * (statistics.mean(scores['overall']) - baseline):+.1f}"
        lines.append(f"| {variant} | {len(scores['overall'])} | {cell(scores['overall'])} | {cell(scores['rare'])} "
                     f"| {gain} |")
    lines.append("\n(mean ± half the range over seeds, in points)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="demo", help="the preset each job runs (demo, or claims)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep-dir", type=Path, default=ROOT / "outputs" / "benchmarks" / "skillworld_gain")
    parser.add_argument("--report-only", action="store_true", help="summarize a finished sweep without running")
    parser.add_argument("overrides", nargs="*", help="overrides of the preset, after --")
    args = parser.parse_args()
    if not args.report_only:
        run(args.experiment, args.seeds, args.sweep_dir, args.overrides)
    print(report(*collect(args.sweep_dir)))


if __name__ == "__main__":
    main()
