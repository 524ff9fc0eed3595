import json
from pathlib import Path

import yaml

from stat_exp.compare import best_learning_rate, compare, markdown, summarize_sweep


def job(name: str, variant: str, base: float, after: float, by_skill: dict[str, float], profile=None) -> dict:
    skills = {s: {"n": 10, "accuracy": a} for s, a in by_skill.items()}
    metrics = {"run": {"name": name, "variant": variant},
               "eval": {"base": {"test": {"pass@1": base, "by_skill": {s: {"n": 10, "accuracy": 0.5} for s in by_skill}}},
                        "sft": {"test": {"pass@1": after, "by_skill": skills}}}}
    return metrics | ({"profile": {"base": {"f": profile}}} if profile else {})


RUNS = [job("seed=1,variant=sel", "sel", 0.5, 0.8, {"add": 0.9, "multiply": 0.7}, {"multiply": 9, "add": 1}),
        job("seed=1,variant=train", "train", 0.5, 0.6, {"add": 0.8, "multiply": 0.4})]

# compare(RUNS) worked out by hand: names without the shared `seed=1`, gains after - base, the
# base's per-skill accuracy (0.5 everywhere) beside the fine-tuned one, the first run's profile.
EXPECTED = {
    "benchmarks": {"test": [
        {"run": "variant=sel", "variant": "sel", "stage": "sft", "base": 0.5, "after": 0.8, "gain": 0.3,
         "base_by_skill": {"add": 0.5, "multiply": 0.5}, "after_by_skill": {"add": 0.9, "multiply": 0.7}},
        {"run": "variant=train", "variant": "train", "stage": "sft", "base": 0.5, "after": 0.6, "gain": 0.1,
         "base_by_skill": {"add": 0.5, "multiply": 0.5}, "after_by_skill": {"add": 0.8, "multiply": 0.4}},
    ]},
    "profile": {"multiply": 9, "add": 1},
}


def test_compare_names_runs_by_what_differs_and_reports_gains() -> None:
    comparison = compare(RUNS)
    assert comparison == EXPECTED
    rows = comparison["benchmarks"]["test"]
    assert [r["run"] for r in rows] == ["variant=sel", "variant=train"]
    assert [r["gain"] for r in rows] == [0.3, 0.1] and rows[1]["after_by_skill"]["multiply"] == 0.4
    assert comparison["profile"] == {"multiply": 9, "add": 1}
    table = markdown(comparison)
    assert "| variant=sel | sel | 0.500 | 0.800 | +0.300 |" in table
    # Skills the profile named come first.
    assert table.index("| multiply | 0.500 | 0.700 | 0.400 |") < table.index("| add | 0.500 | 0.900 | 0.800 |")


def test_summarize_sweep_writes_the_comparison(tmp_path: Path) -> None:
    assert summarize_sweep(tmp_path) is None  # no finished job yet
    for i, metrics in enumerate(RUNS):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(metrics))
    summarize_sweep(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == EXPECTED
    assert "| variant=train | train |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "skill_accuracy_test.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_from_different_base_students_show_base_and_after_per_cell() -> None:
    other = job("seed=1,variant=train", "train", 0.4, 0.6, {"add": 0.8, "multiply": 0.4})
    other["eval"]["base"]["test"]["by_skill"]["add"]["accuracy"] = 0.2
    table = markdown(compare([RUNS[0], other]))
    assert "| skill | variant=sel | variant=train |" in table
    assert "| add | 0.500 -> 0.900 | 0.200 -> 0.800 |" in table


def lr_job(variant: str, rate: float, math: float) -> dict:
    """A job of sweeps/sft_lr.yaml: its metrics on math before and after SFT, and its saved config."""
    return {"run": {"name": f"sft.learning_rate={rate},variant={variant}", "variant": variant},
            "eval": {"base": {"math": {"pass@1": 0.4}}, "sft": {"math": {"pass@1": math}}},
            "config": {"variant": {"name": variant}, "sft": {"learning_rate": rate}}}


LR_RUNS = [lr_job("sel", 1e-4, 0.50), lr_job("sel", 2e-4, 0.62), lr_job("sel", 5e-4, 0.58),
           lr_job("train", 1e-4, 0.47), lr_job("train", 2e-4, 0.45)]


def test_the_best_learning_rate_per_variant_by_math_accuracy() -> None:
    assert best_learning_rate(LR_RUNS) == {
        "sel": {"learning_rate": 2e-4, "pass@1": 0.62, "run": "sft.learning_rate=0.0002,variant=sel"},
        "train": {"learning_rate": 1e-4, "pass@1": 0.47, "run": "sft.learning_rate=0.0001,variant=train"}}
    table = markdown(compare(LR_RUNS))
    assert "| sel | 0.0002 | 0.620 | sft.learning_rate=0.0002,variant=sel |" in table
    assert "| train | 0.0001 | 0.470 |" in table
    assert "best_learning_rate" not in compare(RUNS)  # a sweep that does not vary the rate names none


def test_summarize_sweep_reads_each_jobs_learning_rate_from_its_config(tmp_path: Path) -> None:
    for i, job in enumerate(LR_RUNS):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps({k: v for k, v in job.items() if k != "config"}))
        (tmp_path / str(i) / "config.yaml").write_text(yaml.safe_dump(job["config"]))
    comparison = summarize_sweep(tmp_path)
    assert {v: b["learning_rate"] for v, b in comparison["best_learning_rate"].items()} == {"sel": 2e-4, "train": 1e-4}
    assert "### Best SFT learning rate per variant (math pass@1 after training)" in (tmp_path / "summary.md").read_text()
