"""benchmarks/paper_claims.py: the claim presets compose, the jobs are the four claims' grids,
the verdicts follow the README's rules (checked on hand-made figures, at the margin's edge), and
the benchmark runs end to end at a reduced size."""

import json

import pytest
import yaml

from benchmarks import paper_claims
from benchmarks.paper_claims import gain, plan, verdicts, world_overrides
from helpers import compose_config
from test_demo import REDUCED


def test_claim_presets_compose() -> None:
    claims = compose_config("experiment=claims")
    assert claims.task.name == "skillworld" and list(claims.eval.benchmarks) == ["test", "ood_test"]
    assert claims.eval.max_tokens == claims.difficulty.max_tokens == 96 and claims.data.budget == 3200
    assert claims.rl is None and claims.stat.rounds == 1 and claims.sft.epochs == 1 and not claims.stat.profile_after
    grpo = compose_config("experiment=claims_grpo", "data.seed=5")
    assert grpo.rl.name == "grpo" and grpo.rl.max_steps == 40 and grpo.rl.rewards == ["correctness"]
    assert grpo.rl.seed == 5 and grpo.sft.seed == 5 and list(grpo.eval.benchmarks) == ["test", "ood_test"]
    continual = compose_config("experiment=claims_continual")
    assert continual.stat.rounds == 2 and continual.stat.round_val == "ood_val" and continual.rl is None
    assert paper_claims.sweep("claims", "variant") == ["sel", "syn", "train"]
    assert paper_claims.sweep("claims_grpo", "variant") == ["none", "train", "sel", "syn"]
    assert paper_claims.sweep("claims_continual", "variant") == ["sel", "syn"]


def test_a_world_seed_sets_the_world_the_base_student_the_data_and_the_shuffles() -> None:
    cfg = paper_claims.compose_preset("claims_grpo", world_overrides(7))
    assert cfg.task.world.seed == cfg.model.tiny.seed == cfg.model.pretrain.seed == 7
    assert cfg.data.seed == cfg.sft.seed == cfg.rl.seed == 7


def test_plan_runs_each_claims_grid() -> None:
    jobs, demo = plan(False, ["data.budget=16"])
    assert demo == 16
    names = [job.name for job in jobs]
    assert names[:9] == [f"{v}@{b}" for v in ("sel", "syn", "train") for b in (4, 16, 64)]
    assert names[9:] == ["grpo", "train+grpo", "sel+grpo", "syn+grpo", "sel round 2", "syn round 2"]
    assert jobs[0].overrides == ("variant=sel", "data.budget=4") and jobs[9].preset == "claims_grpo"
    quick, _ = plan(True, [])
    assert [job.name for job in quick][:6] == ["sel@3200", "sel@12800", "syn@3200", "syn@12800", "train@3200",
                                               "train@12800"]


def test_gain_holds_only_beyond_three_times_the_spread() -> None:
    # Differences 0.25 and 0.125: gain 0.1875, half-range 0.0625, margin 0.1875: at the edge, no.
    edge = gain([0.75, 0.625], [0.5, 0.5])
    assert (edge["gain"], edge["spread"], edge["margin"], edge["holds"]) == (0.1875, 0.0625, 0.1875, False)
    # Differences 0.25 and 0.1875: gain 0.21875 against a margin of 3 x 0.03125 = 0.09375.
    beyond = gain([0.75, 0.6875], [0.5, 0.5])
    assert (beyond["gain"], beyond["margin"], beyond["holds"]) == (0.21875, 0.09375, True)
    assert beyond["per_world"] == [0.25, 0.1875]
    # One world: no spread, so any gain above 0 holds (a check, not a verdict).
    assert gain([0.5078125], [0.5])["holds"] and not gain([0.5], [0.5])["holds"]
    with pytest.raises(ValueError):
        gain([0.5, 0.5], [0.5])


def hand_made() -> dict[str, dict[str, list[float]]]:
    """Two worlds, demo budget 100: ood and grpo_complement hold by a wide margin, saturation and
    Syn's continual round sit exactly at the margin."""
    return {
        "sel@100": {"test": [0.75, 0.75], "ood_test": [0.5, 0.5]},
        "syn@100": {"test": [0.75, 0.75], "ood_test": [0.5, 0.5]},
        "train@100": {"test": [0.5, 0.5], "ood_test": [0.25, 0.25]},
        "train@400": {"test": [0.5, 0.625], "ood_test": [0.25, 0.25]},
        "grpo": {"test": [0.5, 0.5]},
        "sel+grpo": {"test": [0.875, 0.875]},
        "syn+grpo": {"test": [0.875, 0.875]},
        "sel round 2": {"ood_test": [0.625, 0.625]},
        "syn round 2": {"ood_test": [0.625, 0.75]},
    }


def test_verdicts_follow_the_rules() -> None:
    figures = hand_made()
    judged = verdicts(figures, 100)
    assert judged["ood"]["holds"] and judged["grpo_complement"]["holds"]
    assert not judged["saturation"]["holds"] and not judged["continual"]["holds"]
    # OOD: each STAT variant minus plain SFT = 0.25 in both worlds: no spread, margin 0.
    assert judged["ood"]["comparisons"]["syn@100 over train@100"] | {"per_world": None} == {
        "gain": 0.25, "spread": 0.0, "margin": 0.0, "holds": True, "per_world": None}
    # Saturation: Sel@100 minus plain SFT@400 = 0.25 and 0.125: gain 0.1875 = its margin, so no.
    saturation = judged["saturation"]["comparisons"]["sel@100 over train@400"]
    assert (saturation["gain"], saturation["margin"]) == (0.1875, 0.1875) and not saturation["holds"]
    # Continual: Syn's second round minus its first = 0.125 and 0.25: gain 0.1875, margin 0.1875,
    # so the claim fails though Sel's round (+0.125 in both worlds) holds.
    assert not judged["continual"]["comparisons"]["syn round 2 over syn@100"]["holds"]
    assert judged["continual"]["comparisons"]["sel round 2 over sel@100"]["holds"]
    # Either side of the edge: differences 0.109375 and 0.25 (gain 0.1796875, margin 3 x 0.0703125
    # = 0.2109375) fail; 0.140625 and 0.25 (gain 0.1953125, margin 3 x 0.0546875 = 0.1640625) hold.
    figures["syn round 2"]["ood_test"] = [0.625 - 1 / 64, 0.75]
    assert not verdicts(figures, 100)["continual"]["holds"]
    figures["syn round 2"]["ood_test"] = [0.625 + 1 / 64, 0.75]
    assert verdicts(figures, 100)["continual"]["holds"]
    assert set(judged["grpo_complement"]["comparisons"]) == {"sel+grpo over grpo", "sel+grpo over sel@100",
                                                             "syn+grpo over grpo", "syn+grpo over syn@100"}


def test_each_claim_fails_when_one_comparison_does() -> None:
    figures = hand_made()
    figures["syn+grpo"]["test"] = [0.75, 0.75]  # no better than Syn alone
    figures["syn@100"]["ood_test"] = [0.25, 0.375]  # gain 0.0625 on OOD, margin 0.1875
    judged = verdicts(figures, 100)
    assert not judged["grpo_complement"]["holds"] and not judged["ood"]["holds"]
    assert judged["grpo_complement"]["comparisons"]["syn+grpo over grpo"]["holds"]
    assert judged["ood"]["comparisons"]["sel@100 over train@100"]["holds"]


SMALL = ["task.world.val_size=16", "task.world.test_size=16", "task.world.ood_val_size=12",
         "task.world.ood_test_size=12", "data.budget=16"]
SMALL_REDUCED = [o for o in REDUCED if not o.startswith(("data.budget", "task.world.val_size", "task.world.test_size"))]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("claims")
    claims = paper_claims.main(["--world-seeds", "3", "--quick", "--out", str(tmp / "out"),
                                "--rl", "max_steps=1", "questions_per_batch=2", "questions_per_update=2",
                                "max_completion_length=16", "--", *SMALL_REDUCED, *SMALL, f"paths.cache_dir={tmp / 'cache'}"])
    return tmp / "out", claims


@pytest.mark.slow  # twelve pipeline jobs with a pre-training, four GRPO runs: 3 minutes on 2 loaded cores
def test_the_quick_benchmark_writes_the_four_claims(quick_run) -> None:
    out, claims = quick_run
    written = json.loads((out / "paper_claims.json").read_text())
    assert list(written) == ["saturation", "ood", "grpo_complement", "continual"] and written == json.loads(
        json.dumps(claims))
    for entry in written.values():
        assert isinstance(entry["holds"], bool) and entry["seeds"] == [3] and entry["rule"] and entry["paper"]
        for compared in entry["comparisons"].values():
            assert compared["margin"] == 0 and len(compared["per_world"]) == 1  # one world: no spread
    figures = written["saturation"]["figures"]
    assert {"sel@16", "sel@64", "syn@16", "train@64", "base"} <= set(figures) and "test" in figures["sel@16"]
    # Each verdict is read off the runs' own metrics.
    sel = json.loads((out / "runs" / "world3" / "sel_16" / "metrics.json").read_text())
    assert figures["sel@16"]["test"]["per_world"] == [sel["eval"]["sft"]["test"]["pass@1"]]
    assert set(sel["profile"]) == {"base"}  # stat.profile_after=false: the trained student is not profiled
    # The grid's budget wins over the demo budget given after --.
    assert sel["data"]["pairs"] == 16
    assert json.loads((out / "runs" / "world3" / "train_64" / "metrics.json").read_text())["data"]["pairs"] == 64
    grpo = json.loads((out / "runs" / "world3" / "sel_grpo" / "metrics.json").read_text())
    assert grpo["stages"] and {"sft", "rl"} <= {e["stage"] for e in grpo["stages"]}
    assert written["grpo_complement"]["figures"]["sel+grpo"]["test"]["per_world"] == [grpo["eval"]["rl"]["test"]["pass@1"]]
    continual = json.loads((out / "runs" / "world3" / "syn_round_2" / "metrics.json").read_text())
    assert continual["eval"]["sft"]["ood_test"]["pass@1"] == written["continual"]["figures"]["syn round 2"][
        "ood_test"]["per_world"][0]
    # The world seed reached the world, the base student and the data.
    config = yaml.safe_load((out / "runs" / "world3" / "sel_16" / "config.yaml").read_text())
    assert config["task"]["world"]["seed"] == config["model"]["pretrain"]["seed"] == config["data"]["seed"] == 3
    assert "## saturation: " in (out / "paper_claims.md").read_text()
    for name in ("saturation", "ood", "grpo_complement", "continual"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # eight reduced pipeline jobs, four of them two at a time in processes of their own
def test_jobs_run_two_at_a_time_answer_exactly_as_one_at_a_time(tmp_path) -> None:
    overrides = ["logger=none", *SMALL_REDUCED, *SMALL]
    jobs = [job for job in plan(True, overrides)[0] if job.name in ("sel@16", "train@16")]
    figures, written = {}, {}
    for workers in (1, 2):  # each from scratch, in a cache of its own
        out = tmp_path / f"workers{workers}"
        figures[workers] = paper_claims.run_all(jobs, [3, 4], out, [*overrides, f"paths.cache_dir={out / 'cache'}"],
                                                workers)
        written[workers] = {p.relative_to(out / "cache"): p.read_bytes() for p in sorted((out / "cache").rglob("*"))
                            if p.name == "rows.jsonl" or p.suffix == ".safetensors"}
    assert set(figures[1]) == {"sel@16", "train@16", "base"} and len(figures[1]["train@16"]["test"]) == 2
    # Every weight of every student and every answer it wrote, to the byte: on one thread or two,
    # the same base students, the same fine-tuned ones and the same evaluations.
    assert sum(p.suffix == ".safetensors" for p in written[1]) >= 6
    assert sum(p.name == "rows.jsonl" for p in written[1]) >= 6
    assert written[1] == written[2] and figures[1] == figures[2]
