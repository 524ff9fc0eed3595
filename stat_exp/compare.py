"""The runs of a sweep side by side: accuracy before and after training, overall and per skill.

`SweepSummary` is a Hydra callback (`hydra.callbacks` in conf/hydra/default.yaml): when a
multirun ends it reads every job's metrics.json and writes `summary.json`, `summary.md` and a
per-skill accuracy chart per benchmark into the sweep folder, and logs the table. A sweep over
the SFT learning rate also gets the best rate per variant, as the paper chooses it.
"""

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

SELECTION_BENCHMARK = "math"  # the paper picks each method's SFT learning rate by MATH accuracy (C.1)


def load_runs(sweep_dir: Path) -> list[dict]:
    """The metrics of each finished job under `sweep_dir` (job folders in numeric order), each
    with the job's resolved config under "config" when its config.yaml is there."""
    paths = sorted(Path(sweep_dir).glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name))
    runs = []
    for path in paths:
        metrics = json.loads(path.read_text())
        config = path.parent / "config.yaml"
        runs.append(metrics | ({"config": yaml.safe_load(config.read_text())} if config.is_file() else {}))
    return runs


def final_stage(metrics: dict) -> str:
    """The last evaluated stage of a run: base, sft or rl."""
    return list(metrics.get("eval") or {"base": None})[-1]


def skill_accuracy(result: dict) -> dict[str, float]:
    """{skill: accuracy} of one benchmark's metrics ({} when its rows name no skills)."""
    return {skill: v["accuracy"] for skill, v in result.get("by_skill", {}).items()}


def compare(runs: list[dict]) -> dict[str, Any]:
    """Per benchmark: one row per run (its name, variant, accuracy before and after, and after
    per skill), plus the base student's Missing-Skill-Profile of the first run that has one."""
    benchmarks: dict[str, list[dict]] = {}
    names = _distinct_names([m.get("run", {}).get("name", str(i)) for i, m in enumerate(runs)])
    for metrics, run_name in zip(runs, names):
        stage = final_stage(metrics)
        for name, base in metrics.get("eval", {}).get("base", {}).items():
            after = metrics["eval"][stage].get(name)
            if after is None:
                continue
            benchmarks.setdefault(name, []).append({
                "run": run_name,
                "variant": metrics.get("run", {}).get("variant"),
                "stage": stage,
                "base": base["pass@1"],
                "after": after["pass@1"],
                "gain": round(after["pass@1"] - base["pass@1"], 4),
                "base_by_skill": skill_accuracy(base),
                "after_by_skill": skill_accuracy(after),
            })
    profile = next((m["profile"]["base"]["f"] for m in runs if "f" in m.get("profile", {}).get("base", {})), {})
    comparison = {"benchmarks": benchmarks, "profile": profile}
    rates = {_learning_rate(m) for m in runs} - {None}
    if len(rates) > 1:
        comparison["best_learning_rate"] = best_learning_rate(runs)
    return comparison


def best_learning_rate(runs: list[dict], benchmark: str = SELECTION_BENCHMARK) -> dict[str, dict]:
    """Per variant: the SFT learning rate of the run with the best pass@1 on `benchmark` after
    training (the first such run on a tie), with that accuracy and the run's name."""
    best: dict[str, dict] = {}
    for metrics in runs:
        rate = _learning_rate(metrics)
        after = metrics.get("eval", {}).get(final_stage(metrics), {}).get(benchmark)
        if rate is None or after is None or final_stage(metrics) == "base":
            continue
        variant = metrics["run"]["variant"]
        if variant not in best or after["pass@1"] > best[variant]["pass@1"]:
            best[variant] = {"learning_rate": rate, "pass@1": after["pass@1"], "run": metrics["run"]["name"]}
    return best


def markdown(comparison: dict[str, Any]) -> str:
    """The comparison as Markdown tables: pass@1 before and after, then accuracy by skill."""
    lines = []
    if comparison.get("best_learning_rate"):
        lines += [f"### Best SFT learning rate per variant ({SELECTION_BENCHMARK} pass@1 after training)", "",
                  "| variant | learning rate | pass@1 | run |", "|---|---|---|---|"]
        lines += [f"| {variant} | {b['learning_rate']:g} | {b['pass@1']:.3f} | {b['run']} |"
                  for variant, b in comparison["best_learning_rate"].items()]
        lines.append("")
    profile = comparison["profile"]
    if profile:
        lines += ["Missing-Skill-Profile of the base student: "
                  + ", ".join(f"{skill} {count}" for skill, count in profile.items()), ""]
    for name, rows in comparison["benchmarks"].items():
        lines += [f"### {name}", "", "| run | variant | base | after | gain |", "|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['variant']} | {r['base']:.3f} | {r['after']:.3f} | {r['gain']:+.3f} |"
                  for r in rows]
        skills = _skills(rows, profile)
        if skills:
            # One base column when every run started from the same student, else base -> after per cell.
            shared = _shared_base(rows)
            lines += ["", "| skill | " + ("base | " if shared else "") + " | ".join(r["run"] for r in rows) + " |",
                      "|---" * (len(rows) + 1 + bool(shared)) + "|"]
            for skill in skills:
                cells = [_cell(r["after_by_skill"].get(skill)) if shared else
                         f"{_cell(r['base_by_skill'].get(skill))} -> {_cell(r['after_by_skill'].get(skill))}"
                         for r in rows]
                if shared:
                    cells.insert(0, _cell(shared.get(skill)))
                lines.append(f"| {skill} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def summarize_sweep(sweep_dir: Path) -> dict[str, Any] | None:
    """Write the comparison of the jobs under `sweep_dir` there; None when no job finished."""
    from stat_exp.plots import bar_chart

    sweep_dir = Path(sweep_dir)
    runs = load_runs(sweep_dir)
    if not runs:
        log.warning("no finished jobs under %s: nothing to compare", sweep_dir)
        return None
    comparison = compare(runs)
    (sweep_dir / "summary.json").write_text(json.dumps(comparison, indent=1))
    table = markdown(comparison)
    (sweep_dir / "summary.md").write_text(table)
    for name, rows in comparison["benchmarks"].items():
        if any(r["after_by_skill"] for r in rows):
            shared = _shared_base(rows)
            series = ({"base": shared} if shared else {}) | {r["run"]: r["after_by_skill"] for r in rows}
            bar_chart(series, sweep_dir / f"skill_accuracy_{name}.png", xlabel="accuracy",
                      order=_skills(rows, comparison["profile"]),
                      title=f"Accuracy by skill on {name} after training" + (" (and of the base)" if shared else ""))
    log.info("sweep summary (%s)\n%s", sweep_dir / "summary.md", table)
    return comparison


class SweepSummary(Callback):
    """Hydra callback: compare the jobs of a multirun when it ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        summarize_sweep(Path(config.hydra.sweep.dir))


def _learning_rate(metrics: dict) -> float | None:
    """The run's SFT learning rate, from the config saved beside its metrics (None without SFT)."""
    return ((metrics.get("config") or {}).get("sft") or {}).get("learning_rate")


def _skills(rows: list[dict], profile: dict[str, int]) -> list[str]:
    """Every skill with an accuracy in `rows`, the ones the profile named most first."""
    skills = list(dict.fromkeys(s for r in rows for s in [*r["base_by_skill"], *r["after_by_skill"]]))
    return sorted(skills, key=lambda s: -profile.get(s, 0))


def _shared_base(rows: list[dict]) -> dict[str, float] | None:
    """The base student's per-skill accuracy when every run has the same one (a sweep over variants)."""
    first = rows[0]["base_by_skill"]
    return first if first and all(r["base_by_skill"] == first for r in rows) else None


def _distinct_names(names: list[str]) -> list[str]:
    """Run names (their `key=value,...` overrides) without the overrides every run shares."""
    items = [name.split(",") for name in names]
    shared = set.intersection(*map(set, items)) if len(items) > 1 else set()
    return [",".join(i for i in parts if i not in shared) or name for parts, name in zip(items, names)]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
