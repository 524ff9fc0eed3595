"""The paper's four claims on skillworld, each world from its own base student:

1. saturation: plain SFT stops gaining with more data while STAT keeps gaining;
2. ood: STAT's gain over plain SFT carries to chains longer than any the student saw (ood_test);
3. grpo_complement: GRPO after STAT beats both GRPO alone and STAT alone;
4. continual: a second STAT round profiled on ood_val raises ood_test accuracy beyond the first.

Run from the repository root:

    .venv/bin/python -m benchmarks.paper_claims --world-seeds 0 1 2 --out outputs/benchmarks/paper_claims
    .venv/bin/python -m benchmarks.paper_claims --quick --out outputs/benchmarks/paper_claims_quick

A world seed sets the world's generation (task.world.seed), its base student's pre-training
(model.tiny.seed, model.pretrain.seed), the data draw (data.seed) and the SFT and GRPO
shuffles. Each job is `pipeline.run` on a claims preset (conf/experiment/claims*.yaml, whose
sweeps give the variants; the budgets are `BUDGET_SCALES`), so every stage is cached: base students once per world, the demo
budget's SFT shared by the saturation grid, GRPO and the continual round, and a rerun resumes.
`--workers` jobs run at a time, each in its own process (default 2, for 2 cores).
Overrides of the presets follow `--`, e.g. `-- logger=wandb`. Writes paper_claims.json,
paper_claims.md and the plots into --out; the rules behind each verdict are `verdicts`'.
"""

import argparse
import json
import logging
import multiprocessing
import os
import re
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from stat_exp.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
STAT = ("sel", "syn")  # the two STAT variants every claim is read on
PLAIN = "train"  # plain SFT: uniform draws from the pool at STAT's budget
GRPO_ALONE = "none"  # the variant of the GRPO preset that skips SFT
BUDGET_SCALES = (0.25, 1, 4)  # the saturation grid, in multiples of the demo's budget (3,200 pairs)
# The paper's figures each claim is set beside (PAPER.md, Headline results; Llama-3.2-3B-Instruct on MATH).
PAPER = {
    "saturation": "plain SFT 44.8 vs STAT-Sel 51.5 / STAT-Syn 50.2 on MATH (base 44.0): STAT up to +7.5",
    "ood": "STAT's gain carries to the out-of-distribution benchmarks: +4.6 on average",
    "grpo_complement": "Sel+GRPO 52.2, Syn+GRPO 51.0 vs GRPO alone 45.4 and Sel 51.5 / Syn 50.2 on MATH",
    "continual": "a second round profiled on MATH-perturb-hard adapts to it (section 3.3; no figure in PAPER.md)",
}
RULES = {
    "saturation": "STAT-Sel at the demo budget beats plain SFT at 4x the demo budget on test by the margin",
    "ood": "STAT-Sel and STAT-Syn each beat plain SFT (all at the demo budget) on ood_test by the margin",
    "grpo_complement": "STAT-Sel+GRPO and STAT-Syn+GRPO each beat both GRPO alone and the same STAT variant "
                       "alone on test by the margin",
    "continual": "for STAT-Sel and STAT-Syn, the second round (profiled on ood_val) beats the first on ood_test "
                 "by the margin",
}
log = logging.getLogger("paper_claims")


@dataclass(frozen=True)
class Job:
    """One pipeline run of a claim's grid, run once per world."""

    name: str  # e.g. "sel@3200", "sel+grpo", "sel round 2": the key of its figures
    preset: str  # conf/experiment/<preset>.yaml
    overrides: tuple[str, ...]


def compose_preset(preset: str, overrides: list[str], *, hydra: bool = False) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={preset}", *overrides],
                       return_hydra_config=hydra)


def sweep(preset: str, key: str) -> list[str]:
    """The values the preset's multirun sweeps `key` over (its hydra.sweeper.params)."""
    return str(compose_preset(preset, [], hydra=True).hydra.sweeper.params[key]).split(",")


def plan(quick: bool, overrides: list[str], rl: tuple[str, ...] = ()) -> tuple[list[Job], int]:
    """Every job of the four claims, and the demo's budget (the claims preset's data.budget, after
    `overrides`): the saturation grid (the demo's variants at `BUDGET_SCALES` times it; --quick: at
    1x and 4x, the two the saturation rule reads), GRPO from each starting point (with the `rl`
    settings, KEY=VALUE, on top of the preset's), and the continual round of each STAT variant."""
    demo = compose_preset("claims", overrides).data.budget
    budgets = [round(scale * demo) for scale in ((1, 4) if quick else BUDGET_SCALES)]
    jobs = [Job(f"{v}@{b}", "claims", (f"variant={v}", f"data.budget={b}"))
            for v in sweep("claims", "variant") for b in budgets]
    jobs += [Job("grpo" if v == GRPO_ALONE else f"{v}+grpo", "claims_grpo", (f"variant={v}", *(f"rl.{o}" for o in rl)))
             for v in sweep("claims_grpo", "variant")]
    jobs += [Job(f"{v} round 2", "claims_continual", (f"variant={v}",)) for v in sweep("claims_continual", "variant")]
    return jobs, demo


def world_overrides(seed: int) -> list[str]:
    """What a world seed sets: the world, its base student's build and pre-training, the data draw
    and the SFT shuffle (the GRPO presets' rl.seed follows data.seed)."""
    return [f"task.world.seed={seed}", f"model.tiny.seed={seed}", f"model.pretrain.seed={seed}",
            f"data.seed={seed}", f"sft.seed={seed}"]


def accuracies(metrics: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(the trained student's pass@1 per benchmark, the base student's) from a job's metrics."""
    evals = metrics["eval"]
    final = "rl" if "rl" in evals else "sft"
    return ({name: m["pass@1"] for name, m in evals[final].items()},
            {name: m["pass@1"] for name, m in evals["base"].items()})


def run_job(job: Job, seed: int, out: Path, overrides: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """One job in one world, in out/runs/world<seed>/<job>: `accuracies` of its metrics."""
    from stat_exp.pipeline import run

    # The job's own values (its variant, its budget) last: the grid wins over `overrides`.
    cfg = compose_preset(job.preset, [*overrides, *world_overrides(seed), *job.overrides])
    return accuracies(run(cfg, out / "runs" / f"world{seed}" / re.sub(r"\W+", "_", job.name)))


def _start_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [job process %(process)d] %(name)s: %(message)s")


def run_all(jobs: list[Job], seeds: list[int], out: Path, overrides: list[str],
            workers: int = 1) -> dict[str, dict[str, list[float]]]:
    """figures[job][benchmark] = one accuracy per world seed, in `seeds` order; "base" is the
    base student. With `workers` > 1 the jobs run that many at a time, each in a process of its own
    on cores / workers threads: the tiny student's tensors are too small for a second thread to
    help much, and its sums come out the same on any number of threads (the same figures). The
    jobs are dealt out world by world, so that jobs running together seldom need one stage; when
    they do, the store's locks build it once."""
    from tqdm import tqdm

    tasks = [(job, seed) for job in jobs for seed in seeds]
    results: dict[tuple[str, int], tuple[dict, dict]] = {}
    with tqdm(total=len(tasks), desc="paper claims", unit="job") as bar:
        if workers == 1:
            for job, seed in tasks:
                bar.set_postfix_str(f"world {seed}: {job.name}")
                results[job.name, seed] = run_job(job, seed, out, overrides)
                bar.update()
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start_worker, initargs=(threads,))
            try:
                running = {pool.submit(run_job, job, seed, out, overrides): (job.name, seed) for job, seed in tasks}
                for done in as_completed(running):
                    results[running[done]] = done.result()
                    bar.set_postfix_str(f"world {running[done][1]}: {running[done][0]} done")
                    bar.update()
            finally:  # a failed job stops the benchmark: the jobs not started are dropped
                pool.shutdown(cancel_futures=True)
    figures: dict[str, dict[str, list[float]]] = {}
    for job, seed in tasks:
        for name, value in results[job.name, seed][0].items():
            figures.setdefault(job.name, {}).setdefault(name, []).append(value)
    for seed in seeds:
        for name, value in results[jobs[-1].name, seed][1].items():
            figures.setdefault("base", {}).setdefault(name, []).append(value)
    return figures


def gain(a: list[float], b: list[float]) -> dict:
    """A beats B when the mean of the per-world differences A - B exceeds the margin, three times
    their spread (half the range over worlds; 0 with one world, where the verdict is a check only)."""
    differences = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.mean(differences)
    spread = (max(differences) - min(differences)) / 2
    return {"gain": mean, "spread": spread, "margin": 3 * spread, "holds": mean > 3 * spread,
            "per_world": differences}


def verdicts(figures: dict[str, dict[str, list[float]]], demo: int) -> dict[str, dict]:
    """Each claim's comparisons and whether it holds (`RULES`), from per-world accuracies
    (`run_all`'s figures) and the demo's budget."""
    def acc(job: str, benchmark: str) -> list[float]:
        return figures[job][benchmark]

    comparisons = {
        "saturation": {f"sel@{demo} over {PLAIN}@{4 * demo}": gain(acc(f"sel@{demo}", "test"),
                                                                    acc(f"{PLAIN}@{4 * demo}", "test"))},
        "ood": {f"{v}@{demo} over {PLAIN}@{demo}": gain(acc(f"{v}@{demo}", "ood_test"),
                                                        acc(f"{PLAIN}@{demo}", "ood_test")) for v in STAT},
        "grpo_complement": {
            f"{v}+grpo over {other}": gain(acc(f"{v}+grpo", "test"), acc(other, "test"))
            for v in STAT for other in ("grpo", f"{v}@{demo}")},
        "continual": {f"{v} round 2 over {v}@{demo}": gain(acc(f"{v} round 2", "ood_test"),
                                                           acc(f"{v}@{demo}", "ood_test")) for v in STAT},
    }
    return {claim: {"holds": all(c["holds"] for c in compared.values()), "rule": RULES[claim],
                    "comparisons": compared} for claim, compared in comparisons.items()}


def claim_jobs(claim: str, figures: dict, demo: int) -> dict[str, list[str]]:
    """The figures each claim reports: job -> benchmarks."""
    at_demo = [f"{v}@{demo}" for v in (*STAT, PLAIN)]
    if claim == "saturation":
        return {job: ["test", "test_d"] for job in figures if "@" in job or job == "base"}
    if claim == "ood":
        return {job: ["test", "ood_test"] for job in ["base", *at_demo]}
    if claim == "grpo_complement":
        return {job: ["test"] for job in ["base", "grpo", f"{PLAIN}+grpo", *(f"{v}+grpo" for v in STAT), *at_demo]}
    return {job: ["ood_test"] for job in ["base", *(x for v in STAT for x in (f"{v}@{demo}", f"{v} round 2"))]}


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "spread": (max(values) - min(values)) / 2, "per_world": values}


def result(figures: dict, demo: int, seeds: list[int]) -> dict:
    """paper_claims.json: per claim, its verdict, the figures behind it (mean, spread over worlds
    and per world) and the seeds."""
    judged = verdicts(figures, demo)
    return {claim: judged[claim] | {
        "paper": PAPER[claim], "seeds": seeds,
        "figures": {job: {b: summarize(figures[job][b]) for b in benches if b in figures[job]}
                    for job, benches in claim_jobs(claim, figures, demo).items()}}
        for claim in judged}


def markdown(claims: dict, seeds: list[int]) -> str:
    def points(x: float) -> str:
        return f"{100 * x:.1f}"

    lines = [f"# The paper's claims on skillworld (world seeds {seeds})", "",
             "Accuracy in points, mean ± half the range over worlds; a gain is the mean of the per-world "
             "differences, its margin 3x their half-range" + (" (one world: margin 0, a check, not a verdict)."
                                                              if len(seeds) == 1 else "."), ""]
    for claim, entry in claims.items():
        lines += [f"## {claim}: {'holds' if entry['holds'] else 'does not hold'}", "",
                  f"Rule: {entry['rule']}. Paper: {entry['paper']}.", "",
                  "| comparison | gain | margin | holds | per world |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {100 * c['gain']:+.1f} | {points(c['margin'])} | {c['holds']} | "
                  f"{', '.join(f'{100 * d:+.1f}' for d in c['per_world'])} |" for name, c in entry["comparisons"].items()]
        benches = list(dict.fromkeys(b for job in entry["figures"].values() for b in job))
        lines += ["", f"| job | {' | '.join(benches)} |", "|---|" + "---|" * len(benches)]
        lines += [f"| {job} | " + " | ".join(f"{points(v[b]['mean'])} ± {points(v[b]['spread'])}" if b in v else ""
                                            for b in benches) + " |" for job, v in entry["figures"].items()]
        lines.append("")
    return "\n".join(lines)


def plot(claims: dict, out: Path) -> list[Path]:
    """saturation.png (accuracy against budget on test and test_d) and one bar chart per other claim."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    from stat_exp.plots import bar_chart

    figures = claims["saturation"]["figures"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, bench in zip(axes, ("test", "test_d")):
        for variant in (*STAT, PLAIN):
            points = sorted((int(job.split("@")[1]), v[bench]) for job, v in figures.items()
                            if job.startswith(f"{variant}@") and bench in v)
            ax.errorbar([b for b, _ in points], [100 * s["mean"] for _, s in points],
                        yerr=[100 * s["spread"] for _, s in points], marker="o", capsize=3, label=variant)
        if bench in figures["base"]:
            ax.axhline(100 * figures["base"][bench]["mean"], color="grey", linestyle=":", label="base")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training pairs")
        ax.set_ylabel(f"{bench} accuracy (%)")
        ax.legend()
    fig.suptitle("Saturation: accuracy against the SFT budget")
    fig.tight_layout()
    paths = [out / "saturation.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    for claim in ("ood", "grpo_complement", "continual"):
        series: dict[str, dict[str, float]] = {}
        for job, values in claims[claim]["figures"].items():
            for bench, s in values.items():
                series.setdefault(bench, {})[job] = 100 * s["mean"]
        paths.append(bar_chart(series, out / f"{claim}.png", title=f"{claim}: accuracy (%), mean over worlds",
                               xlabel="accuracy (%)", order=list(claims[claim]["figures"])))
    return paths


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "paper_claims")
    parser.add_argument("--quick", action="store_true", help="one world (the first seed) and the budgets the "
                        "saturation rule reads: for checking a change")
    parser.add_argument("--rl", nargs="+", default=[], metavar="KEY=VALUE",
                        help="the GRPO jobs' RL settings on top of claims_grpo's, e.g. --rl max_steps=80")
    parser.add_argument("--workers", type=int, default=2,
                        help="jobs at a time, each in its own process on cores / workers threads (2 on 2 cores: "
                        "1.6 times the work of one job on both; README, the paper's four claims)")
    parser.add_argument("overrides", nargs="*", help="overrides of every job (the claims presets), after --")
    args = parser.parse_args(argv)
    seeds = args.world_seeds[:1] if args.quick else args.world_seeds
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--world-seeds repeats a seed: {seeds}")
    if args.workers < 1:
        raise SystemExit(f"--workers must be at least 1, not {args.workers}")
    logging.basicConfig(level=logging.INFO)
    overrides = ["logger=none", *args.overrides]
    jobs, demo = plan(args.quick, overrides, tuple(args.rl))
    args.out.mkdir(parents=True, exist_ok=True)
    figures = run_all(jobs, seeds, args.out, overrides, args.workers)
    claims = result(figures, demo, seeds)
    write_atomic(args.out / "paper_claims.json", json.dumps(claims, indent=2))
    write_atomic(args.out / "paper_claims.md", markdown(claims, seeds))
    plot(claims, args.out)
    print(markdown(claims, seeds))
    return claims


if __name__ == "__main__":
    main()
