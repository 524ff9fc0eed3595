"""experiment=demo: the preset composes as the README says, and its multirun runs end to end
(skillworld, pre-training, the oracle teacher, Sel/Syn/train, evaluation, plots, comparison)
at a reduced size."""

import json

import pytest

from helpers import compose_config, run_cli
from wandb_records import logged

REDUCED = [
    "task.world.pretrain_size=600", "task.world.train_size=300", "task.world.val_size=40", "task.world.test_size=40",
    "task.skills.extraction_questions=10",
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.pretrain.steps=30", "model.pretrain.warmup_steps=5",
    "difficulty.max_tokens=32", "eval.max_tokens=32", "data.budget=48", "sft.max_steps=2",
]


def test_demo_composes_to_the_three_variants_on_skillworld() -> None:
    cfg = compose_config("experiment=demo")
    assert cfg.task.name == "skillworld" and cfg.task.world.rare_skills == ["multiply", "digit_sum"]
    assert cfg.model.tiny.vocab_size == 260 and cfg.model.pretrain.steps > 0  # one token per character
    assert cfg.teacher.model == "oracle/skillworld" and cfg.difficulty.name == "outcome"
    assert cfg.difficulty.test_benchmark == "test" and list(cfg.eval.benchmarks) == ["test"]
    assert cfg.sft.name == "lora" and cfg.sft.lora and not cfg.sft.load_in_4bit


def test_the_oracles_stages_key_on_its_code_and_world(monkeypatch) -> None:
    from stat_exp import pipeline

    cfg = compose_config("experiment=demo")
    identity = pipeline._teacher_identity(cfg, ("diagnosis",))
    monkeypatch.setattr(pipeline, "module_code", lambda module: {"stat_exp/teacher/oracle.py": "edited"})
    assert pipeline._teacher_identity(cfg, ("diagnosis",)) != identity
    monkeypatch.undo()
    cfg.task.world.max_operand = 9
    assert pipeline._teacher_identity(cfg, ("diagnosis",)) != identity


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    printed = run_cli("experiment=demo", *REDUCED, f"paths.cache_dir={tmp / 'cache'}", f"hydra.sweep.dir={tmp / 'sweep'}")
    return tmp / "sweep", printed


def test_demo_runs_each_variant_from_one_base_student(demo) -> None:
    sweep, _ = demo
    jobs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(3)]
    assert [job["run"]["variant"] for job in jobs] == ["sel", "syn", "train"]
    for job in jobs:
        assert set(job["eval"]) == {"base", "sft"}
        assert set(job["eval"]["sft"]) == {"test"} | ({"test_d"} if "test_d" in job["eval"]["base"] else set())
        assert job["data"]["pairs"] == 48
    # Built, pre-trained, probed and diagnosed once; the later jobs reuse it all.
    first = {e["stage"]: e["status"] for e in jobs[0]["stages"]}
    assert first["model"] == first["pretrain"] == "computed"
    for job in jobs[1:]:
        statuses = {(e["stage"], e["status"]) for e in job["stages"]}
        assert {("model", "reused"), ("pretrain", "reused"), ("skills", "reused"), ("profile", "reused")} <= statuses
        assert ("sft", "computed") in statuses
    assert jobs[0]["pretrain"]["steps"] == 30 and jobs[0]["pretrain"]["final_loss"] < jobs[0]["pretrain"]["initial_loss"]
    profile = jobs[0]["profile"]["base"]["f"]
    assert profile and set(profile) <= set(compose_config("experiment=demo").task.world.skills)


def test_demo_writes_plots_tables_and_wandb_runs(demo) -> None:
    sweep, output = demo
    for i, variant in enumerate(["sel", "syn", "train"]):
        job = sweep / str(i)
        for name in ["profile_base.png", "profile_before_after.png", "skill_accuracy_test.png"]:
            assert (job / name).read_bytes()[:4] == b"\x89PNG", name
        table = json.loads((job / "tables" / "eval.skill_accuracy.test.json").read_text())
        assert table["columns"] == ["skill", "base", "sft", "gain"] and table["rows"]
        run = logged(job)
        # Named by the job's overrides (W&B run names tell the sweep's members apart).
        assert run["group"] == "demo" and run["job_type"] == variant and run["name"].endswith(f",variant={variant}")
        assert "eval/sft/test/pass@1" in run["summary"] and "pretrain/final_loss" in run["summary"]
    summary = json.loads((sweep / "summary.json").read_text())
    assert [row["variant"] for row in summary["benchmarks"]["test"]] == ["sel", "syn", "train"]
    assert set(summary["profile"]) <= set(summary["benchmarks"]["test"][0]["base_by_skill"])
    assert (sweep / "skill_accuracy_test.png").read_bytes()[:4] == b"\x89PNG"
    table = (sweep / "summary.md").read_text()
    # Runs are named by the overrides that tell them apart.
    assert "| variant=sel | sel |" in table and "| variant=train | train |" in table
    assert "sweep summary" in output and "| skill | base | variant=sel | variant=syn | variant=train |" in output


def test_wandb_lineage_links_profile_data_and_model_across_the_sweep(demo) -> None:
    sweep, _ = demo
    jobs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(3)]
    # The first of each stage: the base student's profile, the data, the fine-tuned model.
    keys = [{e["stage"]: e["key"] for e in reversed(job["stages"])} for job in jobs]
    profile = f"profile-{keys[0]['profile']}"
    assert all(k["profile"] == keys[0]["profile"] for k in keys)  # one profile, made by the first job
    for i, job in enumerate(jobs):
        artifacts = set(logged(sweep / str(i))["artifacts"])
        data, model = f"data-{keys[i]['data']}", f"sft-{keys[i]['sft']}"
        # Each job made its own data and model; the profile is the first job's output, the others' input.
        assert {(data, "dataset", "output"), (model, "model", "output")} <= artifacts
        assert (profile, "dataset", "output" if i == 0 else "input") in artifacts
        assert (profile, "dataset", "input" if i == 0 else "output") not in artifacts


def test_export_writes_a_hugging_face_dataset_with_its_card(demo, tmp_path) -> None:
    from datasets import load_from_disk
    from huggingface_hub import DatasetCard

    from stat_exp.export import COLUMNS, export

    sweep, _ = demo
    export(sweep / "0", tmp_path / "sel")
    dataset = load_from_disk(str(tmp_path / "sel"))
    assert list(dataset) == ["train"] and len(dataset["train"]) == 48
    assert set(COLUMNS) <= set(dataset["train"].column_names)
    row = dataset["train"][0]
    assert row["messages"] == [{"role": "user", "content": row["question"]},
                               {"role": "assistant", "content": row["answer"]}]
    card = DatasetCard.load(tmp_path / "sel" / "README.md")
    assert card.data.license == "apache-2.0" and "variant-sel" in card.data.tags
    assert card.data.size_categories == ["n<1K"]
    command = next(line for line in card.text.splitlines() if line.startswith("- **Command:**"))
    assert "`python -m stat_exp " in command and "experiment=demo" in command and "variant=sel" in command
    assert "oracle/skillworld" in card.text and "## Missing-Skill-Profile" in card.text
    profile = json.loads((tmp_path / "sel" / "profile.json").read_text())
    logged_profile = json.loads((sweep / "0" / "metrics.json").read_text())["profile"]["base"]
    assert profile["profile"] == logged_profile["f"] and profile["difficult"] == logged_profile["difficult"]
    assert (tmp_path / "sel" / "diagnoses.jsonl").read_text().count("\n") == profile["difficult"]


def test_exported_rows_say_why_they_are_there(demo, tmp_path) -> None:
    from datasets import load_from_disk

    from stat_exp.export import export

    sweep, _ = demo
    rows = {}
    for i, variant in enumerate(["sel", "syn", "train"]):
        export(sweep / str(i), tmp_path / variant)
        rows[variant] = list(load_from_disk(str(tmp_path / variant))["train"])
    diagnosed = {}  # difficult question -> the skills the profile says it misses
    for line in (tmp_path / "sel" / "diagnoses.jsonl").read_text().splitlines():
        diagnosis = json.loads(line)
        diagnosed[diagnosis["id"]] = diagnosis["skills"]
    for row in rows["sel"] + rows["syn"]:
        why = row["lineage"]
        assert why["skill"] in diagnosed[why["difficult_ids"][0]] and row["skills"] == [why["skill"]]
    assert all(r["lineage"]["rule"] == "sel" and r["lineage"]["seed_ids"] == [] for r in rows["sel"])
    assert all(r["lineage"]["rule"] == "syn" and len(r["lineage"]["seed_ids"]) == 3 and r["lineage"]["agreeing"] >= 2
               for r in rows["syn"])
    assert all(r["lineage"] == {"rule": "train", "difficult_ids": [], "skill": None, "seed_ids": [], "agreeing": None,
                                "rank": None, "similarity": None} for r in rows["train"])
