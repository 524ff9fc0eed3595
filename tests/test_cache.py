"""The artifact cache keeps itself true and small: keys follow the code (`code_fingerprint`), and
`python -m stat_exp.cache` lists, sizes and prunes it without touching what a live run holds."""

import argparse
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest

from helpers import ROOT, SHARED_DATA, compose_config
from stat_exp import cache, pipeline
from stat_exp.code_fingerprint import PACKAGE_DIR, module_code, stage_code
from stat_exp.config import ModelConfig, SFTConfig
from stat_exp.store import Store, write_jsonl

STAGES = ["model", "pretrain", "skills", "skill_map", "probe", "difficulty", "profile", "data", "sft", "rl", "eval"]
SMALL = ["experiment=eval_tiny", f"task.data_dir={SHARED_DATA}", "eval.limit=2", "eval.max_tokens=8",
         "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.tokenizer_corpus_size=200",
         "logger=none"]


# Keys that follow the code

def edited(tmp_path: Path, name: str, relative: str, old: str, new: str) -> Path:
    """A copy of the package in which `relative` has `old` replaced by `new` (exactly once)."""
    package = tmp_path / name / "stat_exp"
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    path = package / relative
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} must occur once in {relative}"
    path.write_text(text.replace(old, new))
    return package


def changed_stages(tmp_path: Path, relative: str, old: str, new: str) -> dict[str, list[str]]:
    """{stage: [units whose hash changed]} for the stages whose code differs after the edit."""
    before = edited(tmp_path, "before", relative, old, old)
    after = edited(tmp_path, "after", relative, old, new)
    result = {}
    for stage in STAGES:
        a, b = stage_code(stage, before), stage_code(stage, after)
        if a != b:
            result[stage] = sorted(unit for unit in {*a, *b} if a.get(unit) != b.get(unit))
    return result


def test_a_change_to_a_helper_of_the_data_stage_changes_its_key_and_nothing_upstream(tmp_path):
    # select.fill is how every variant tops its pairs up to the budget.
    changed = changed_stages(tmp_path, "select.py", "def fill(", "def fill(*_unused, ")
    assert changed == {"data": ["stat_exp/select.py"]}
    before, after = tmp_path / "before" / "stat_exp", tmp_path / "after" / "stat_exp"
    store = Store(tmp_path / "cache")
    assert store.key("data", {}, {}, stage_code("data", before)) != store.key("data", {}, {}, stage_code("data", after))


def test_a_change_to_a_module_the_stage_imports_transitively_changes_it(tmp_path):
    # grading is imported by parsers (skills, skill_map, profile, data), evaluate (probe, eval), difficulty,
    # and rewards (rl, and sft through the rank launcher it shares with GRPO).
    changed = changed_stages(tmp_path, "grading.py", "def extract_boxed(", "def extract_boxed(*_unused, ")
    assert set(changed) == {"skills", "skill_map", "probe", "difficulty", "profile", "data", "sft", "rl", "eval"}
    assert all(units == ["stat_exp/grading.py"] for units in changed.values())


def test_a_change_to_a_stage_function_in_the_pipeline_changes_that_stage_only(tmp_path):
    changed = changed_stages(tmp_path, "pipeline.py", 'write_jsonl(out / "rows.jsonl", pairs)',
                             'write_jsonl(out / "rows.jsonl", pairs[:1])')
    assert changed == {"data": ["stat_exp/pipeline.py:training_data"]}


@pytest.mark.parametrize("relative, old, new", [
    ("tracking.py", "def finish(self)", "def finish(self, *_unused)"),  # W&B logging
    ("plots.py", "def bar_chart(", "def bar_chart(*_unused, "),
    ("select.py", "def fill(", "# a comment\ndef fill("),  # comments, docstrings and layout do not count
    ("select.py", '"""Training data chosen', '"""Edited. Training data chosen'),
    ("pipeline.py", "def _summary_table(tracker: Tracker) -> None:",
     "def _summary_table(tracker: Tracker, *_unused) -> None:"),  # not a stage's code
])
def test_a_change_to_unrelated_code_changes_no_key(tmp_path, relative, old, new):
    assert changed_stages(tmp_path, relative, old, new) == {}


def test_the_oracle_is_keyed_by_its_own_code_only_where_it_teaches(tmp_path):
    before = edited(tmp_path, "before", "teacher/oracle.py", "def serves(", "def serves(")
    after = edited(tmp_path, "after", "teacher/oracle.py", "def serves(", "def serves(*_unused, ")
    assert module_code("stat_exp.teacher.oracle", before) != module_code("stat_exp.teacher.oracle", after)
    assert all(stage_code(s, before) == stage_code(s, after) for s in STAGES)  # via _teacher_identity instead


def test_an_unknown_stage_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"stage 'dta'.*data, difficulty"):
        stage_code("dta")


# ls, du and gc on a cache built by a run

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache made by one eval-only run of the tiny model (a model and an eval artifact)."""
    tmp = tmp_path_factory.mktemp("cache_run")
    cfg = compose_config(*SMALL, f"paths.cache_dir={tmp / 'cache'}")
    metrics = pipeline.run(cfg, tmp / "runs" / "first")
    return tmp, cfg, {e["stage"]: e["key"] for e in metrics["stages"]}


def cli(capsys, root: Path, *args: str) -> list[list[str]]:
    cache.main(["--root", str(root), *args])
    return [line.split("  ") for line in capsys.readouterr().out.splitlines()]


def cells(row: list[str]) -> list[str]:
    return [cell.strip() for cell in row if cell.strip()]


def test_ls_and_du_report_the_runs_cache(built, capsys):
    tmp, _, keys = built
    root = tmp / "cache"
    rows = [cells(r) for r in cli(capsys, root, "ls")]
    assert rows[0] == ["stage", "key", "size", "created", "last used", "runs"]
    by_key = {row[1]: row for row in rows[1:]}
    assert set(by_key) == {keys["model"], keys["eval"]}
    for stage in ("model", "eval"):
        row = by_key[keys[stage]]
        assert row[0] == stage and row[2] == cache.human_size(cache.folder_size(root / stage / keys[stage]))
        assert row[5] == str(tmp / "runs" / "first")
        assert time.mktime(time.strptime(row[4], "%Y-%m-%d %H:%M")) > time.time() - 3600

    du = {row[0]: row for row in map(cells, cli(capsys, root, "du"))}
    model_size = cache.folder_size(root / "model" / keys["model"])
    assert du["model"][1:3] == ["1", cache.human_size(model_size)] and du["eval"][1] == "1"
    total = model_size + cache.folder_size(root / "eval" / keys["eval"])
    assert du["total"][1:3] == ["2", cache.human_size(total)]


def one_row(out: Path) -> dict:
    write_jsonl(out / "rows.jsonl", [{"x": 1}])
    return {}


def failing(out: Path) -> dict:
    write_jsonl(out / "rows.jsonl", [{"half": True}])
    raise RuntimeError("killed halfway")


def test_gc_removes_exactly_the_unreferenced_and_stale_and_a_run_then_reuses_the_rest(built, capsys):
    tmp, cfg, keys = built
    root = tmp / "cache"
    (tmp / "runs" / "deleted").mkdir()
    anonymous, deleted = Store(root), Store(root, run_dir=tmp / "runs" / "deleted")
    unused = anonymous.stage("data", config={"orphan": 1}, code={}, compute=one_row)  # no run recorded it
    of_deleted_run = deleted.stage("data", config={"orphan": 2}, code={}, compute=one_row)
    with pytest.raises(RuntimeError):
        anonymous.stage("data", config={"orphan": 3}, code={}, compute=failing)  # a killed stage
    anonymous.close()
    deleted.close()
    shutil.rmtree(tmp / "runs" / "deleted")
    (stale,) = (root / "data").glob(".tmp-*")
    (root / "eval" / ".trash-leftover").mkdir()
    expected = {unused.key, of_deleted_run.key, stale.name, ".trash-leftover"}

    rows = [cells(r) for r in cli(capsys, root, "gc", "--dry-run")]
    assert {row[2] for row in rows[1:-1]} == expected and all(row[0] == "would remove" for row in rows[1:-1])
    assert rows[-1][0].startswith(f"would remove {len(expected)} folders")
    assert unused.path.exists() and of_deleted_run.path.exists() and stale.exists()

    rows = [cells(r) for r in cli(capsys, root, "gc")]
    assert {row[2] for row in rows[1:-1]} == expected and all(row[0] == "removed" for row in rows[1:-1])
    assert not unused.path.exists() and not of_deleted_run.path.exists() and not stale.exists()
    left = [p.name for p in root.glob("*/*") if not p.parent.name.startswith(".")]  # not the lock files
    assert sorted(left) == sorted([keys["model"], keys["eval"]])

    again = pipeline.run(cfg, tmp / "runs" / "after_gc")
    assert [(e["stage"], e["status"]) for e in again["stages"]] == [("model", "reused"), ("eval", "reused")]


def test_a_run_says_which_stages_were_recomputed_because_their_code_changed(built, monkeypatch, caplog):
    tmp, cfg, keys = built
    real = pipeline.stage_code
    monkeypatch.setattr(pipeline, "stage_code",
                        lambda stage: real(stage) | ({"stat_exp/evaluate.py": "edited"} if stage == "eval" else {}))
    with caplog.at_level(logging.INFO, logger="stat_exp"):
        metrics = pipeline.run(cfg, tmp / "runs" / "edited")
    stages = {e["stage"]: e for e in metrics["stages"]}
    assert stages["model"]["status"] == "reused" and stages["model"]["reason"] is None
    assert stages["eval"]["status"] == "computed" and stages["eval"]["key"] != keys["eval"]
    assert stages["eval"]["reason"] == "code changed in stat_exp/evaluate.py"
    saved = json.loads((tmp / "runs" / "edited" / "metrics.json").read_text())
    assert saved["stages"] == metrics["stages"]
    assert f"recomputed eval {stages['eval']['key']}: code changed in stat_exp/evaluate.py" in caplog.messages


def test_gc_racing_a_running_stage_leaves_both_intact(tmp_path):
    root = tmp_path / "cache"
    reader = Store(root)  # a live run that used an artifact nobody records: gc may not take it from under it
    used = reader.stage("demo", config={"a": 1}, code={}, compute=one_row)
    started, release = threading.Event(), threading.Event()

    def slow(out: Path) -> dict:
        write_jsonl(out / "rows.jsonl", [{"x": 2}])
        started.set()
        assert release.wait(10)
        return {"done": True}

    builder_store, built = Store(root), {}
    builder = threading.Thread(target=lambda: built.update(a=builder_store.stage("demo", config={"a": 2}, code={},
                                                                                compute=slow)))
    builder.start()
    assert started.wait(10)

    plan = cache.gc(root)
    assert sorted(r.reason for r in plan) == ["kept: being built by a live run", "kept: in use by a live run"]
    assert all(r.kept and not r.removed for r in plan)
    assert used.rows() == [{"x": 1}] and len(list((root / "demo").glob(".tmp-*"))) == 1
    release.set()
    builder.join(10)
    assert built["a"].rows() == [{"x": 2}] and built["a"].summary == {"done": True}

    reader.close()
    builder_store.close()
    assert sorted(r.entry.key for r in cache.gc(root) if r.removed) == sorted([used.key, built["a"].key])


def sft_like(out: Path) -> dict:
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"a" * 1000)
    (out / "model").mkdir()
    (out / "model" / "model.safetensors").write_bytes(b"m" * 50_000)
    return {}


def test_gc_merged_weights_and_older_than(tmp_path):
    root, run = tmp_path / "cache", tmp_path / "run"
    run.mkdir()
    store = Store(root, run_dir=run)
    artifact = store.stage("sft", config={}, code={}, compute=sft_like)
    store.close()
    assert cache.gc(root) == []  # used by a run folder that exists
    (removal,) = cache.gc(root, merged=True)
    assert removal.removed and removal.size == 50_000 and removal.part == artifact.path / "model"
    assert not (artifact.path / "model").exists() and (artifact.path / "adapter" / "adapter_model.safetensors").exists()
    assert (artifact.path / "manifest.json").exists()

    assert cache.gc(root, older_than=3 * 3600, now=time.time() + 2 * 3600) == []
    (old,) = cache.gc(root, older_than=3600, now=time.time() + 2 * 3600, dry_run=True)
    assert old.reason == "last used 2h ago" and not old.removed and artifact.path.exists()
    (old,) = cache.gc(root, older_than=3600, now=time.time() + 2 * 3600)
    assert old.removed and not artifact.path.exists() and not list(root.glob("sft/.trash-*"))


@pytest.mark.parametrize("size, text", [(999, "999 B"), (51_234, "51.2 kB"), (6_425_000_000, "6.4 GB"),
                                        (97_000_000_000_000, "97.0 TB")])
def test_sizes(size, text):
    assert cache.human_size(size) == text


@pytest.mark.parametrize("text, seconds", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45),
                                           ("2", 2 * 86400), ("1.5w", 1.5 * 7 * 86400)])
def test_ages(text, seconds):
    assert cache.parse_age(text) == seconds


def test_a_bad_age_is_named():
    with pytest.raises(argparse.ArgumentTypeError, match="'soon'"):
        cache.parse_age("soon")


def test_the_command_line_runs_as_a_module(tmp_path):
    import subprocess
    import sys

    store = Store(tmp_path)
    store.stage("sft", config={}, code={}, compute=sft_like)
    store.close()
    out = subprocess.run([sys.executable, "-m", "stat_exp.cache", "--root", str(tmp_path), "du"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    size = cache.human_size(cache.folder_size(next(tmp_path.glob("sft/*"))))
    assert out.splitlines()[1].split() == ["sft", "1", *size.split(), "50.0", "kB"]
    missing = subprocess.run([sys.executable, "-m", "stat_exp.cache", "--root", str(tmp_path / "nope"), "ls"],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "nope: no such folder" in missing.stderr


# Merged weights on demand

def test_lora_keeps_only_the_adapter_without_save_merged_and_generates_from_it(tiny_model_dir, tmp_path):
    import torch

    from stat_exp.student.models import load_model
    from stat_exp.student.sft import ensure_merged, train_sft

    cfg = SFTConfig(name="lora", learning_rate=1e-2, per_device_batch_size=4, gradient_accumulation_steps=1,
                    warmup_ratio=0.0, max_length=128, max_steps=2, logging_steps=1, load_in_4bit=False,
                    optim="adamw_torch", bf16=False, save_merged=False)
    model_cfg = ModelConfig(name="tiny", dtype="float32")
    rows = [{"question": f"What is {a}+1?", "answer": f"\\boxed{{{a + 1}}}"} for a in range(8)]
    train_sft(str(tiny_model_dir), rows, cfg, tmp_path, model_cfg=model_cfg)
    assert (tmp_path / "adapter" / "adapter_config.json").exists() and not (tmp_path / "model").exists()

    ids = torch.tensor([[5, 6, 7, 8]])
    adapted = load_model(str(tmp_path / "adapter"), dtype="float32", device="cpu")(ids).logits  # base + adapter
    assert not torch.allclose(adapted, load_model(str(tiny_model_dir), dtype="float32", device="cpu")(ids).logits)
    merged = ensure_merged(tmp_path, str(tiny_model_dir), model_cfg)  # what vLLM or GRPO would ask for later
    assert merged == tmp_path / "model" and not list(tmp_path.glob(".model-*"))
    assert torch.allclose(load_model(str(merged), dtype="float32", device="cpu")(ids).logits, adapted, atol=1e-5)


def test_the_pipeline_keeps_the_adapter_only_until_vllm_or_grpo_needs_merged_weights(tiny_model_dir, tmp_path):
    from stat_exp.tracking import Tracker

    cfg = compose_config(*SMALL, "sft=lora", "sft.max_steps=1", "sft.per_device_batch_size=2",
                         "sft.bf16=false", "model.dtype=float32")
    store = Store(tmp_path / "cache")

    def pairs(out: Path) -> dict:
        write_jsonl(out / "rows.jsonl", [{"question": f"What is {a}+1?", "answer": str(a + 1)} for a in range(4)])
        return {}

    data = store.stage("data", config={}, code={}, compute=pairs)
    base = pipeline.Student(str(tiny_model_dir), "base")
    tracker = Tracker(cfg, tmp_path / "run")

    student = pipeline.finetune(cfg, store, tracker, base, data, label="sft1")  # hf generation, no GRPO
    artifact = Path(student.path).parent
    assert student.path == str(artifact / "adapter") and not (artifact / "model").exists()

    cfg.generator.backend = "vllm"  # a later run generates with vLLM: same artifact, merged now
    student = pipeline.finetune(cfg, store, tracker, base, data, label="sft1")
    assert [e.status for e in store.events[1:]] == ["computed", "reused"]
    assert student.path == str(artifact / "model") and (artifact / "model" / "config.json").exists()
    store.close()


def test_a_parse_broken_by_cpythons_ast_race_is_tried_again(monkeypatch):
    from stat_exp import code_fingerprint

    real, calls = code_fingerprint.ast.parse, []

    def racing(source, filename):
        calls.append(filename)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=138, after=32)")
        return real(source, filename=filename)

    monkeypatch.setattr(code_fingerprint.ast, "parse", racing)
    tree = code_fingerprint._parse_source("x = 1", "f.py")
    assert code_fingerprint.ast.dump(tree) == code_fingerprint.ast.dump(real("x = 1")) and len(calls) == 2
    monkeypatch.setattr(code_fingerprint.ast, "parse", lambda source, filename: (_ for _ in ()).throw(SystemError("other")))
    with pytest.raises(SystemError, match="other"):
        code_fingerprint._parse_source("x = 1", "f.py")
