"""`python -m stat_exp.export`: a run folder's training data as a Hugging Face dataset."""

import json
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT
from stat_exp.export import export
from stat_exp.store import Store, write_jsonl

LINEAGE = {"rule": "sel", "difficult_ids": ["v1"], "skill": "factoring", "seed_ids": [], "agreeing": None,
           "rank": None, "similarity": None}


def pair(i: int) -> dict:
    question, answer = f"Factor x^2-{i * i}.", f"(x-{i})(x+{i}), so \\boxed{{{i}}}."
    return {"question": question, "answer": answer, "source": f"t{i}", "skills": ["factoring"], "origin": "reference",
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "lineage": LINEAGE | {"seed_ids": [f"t{i}"]}}


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as the pipeline leaves it: its config, metrics and overrides, and the cache."""
    def diagnoses(out):
        write_jsonl(out / "rows.jsonl", [{"id": "v1", "skills": ["factoring"]}])
        return {"difficult": 1, "profile": {"factoring": 1}}

    def pairs(out):
        write_jsonl(out / "rows.jsonl", [pair(i) for i in range(5)])
        return {"budget": 5, "pairs": 5, "unique_questions": 5, "origins": {"reference": 5}}

    store = Store(tmp_path / "cache")
    profile = store.stage("profile", config={}, code={}, compute=diagnoses)
    data = store.stage("data", config={}, inputs={"profile": profile.key}, code={}, compute=pairs)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "task": {"name": "math", "license": "mit"}, "model": {"name": "qwen", "hub_id": "Qwen/Qwen2.5-3B"},
        "variant": {"name": "sel"}, "teacher": {"model": "openai/gpt-4o-mini", "models": {"synthesis": "openai/gpt-4o"}},
        "paths": {"cache_dir": "unused"}}))
    (run / "metrics.json").write_text(json.dumps({"run": {"overrides": ["variant=sel", "model=qwen"]},
                                                  "cache_dir": str(store.root), "stages": [
        {"stage": "profile", "key": profile.key}, {"stage": "data", "key": data.key}]}))
    return run


def test_export_round_trips_rows_lineage_and_card(run_dir, tmp_path):
    from datasets import load_from_disk
    from huggingface_hub import DatasetCard

    export(run_dir, tmp_path / "out")
    dataset = load_from_disk(str(tmp_path / "out"))
    assert [dict(row) for row in dataset["train"]] == [pair(i) for i in range(5)]
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "mit" and card.data.task_categories == ["text-generation"]
    assert "`python -m stat_exp variant=sel model=qwen`" in card.text and "`Qwen/Qwen2.5-3B`" in card.text
    assert "synthesis: `openai/gpt-4o`" in card.text and "| factoring | 1 |" in card.text
    assert json.loads((tmp_path / "out" / "profile.json").read_text())["profile"] == {"factoring": 1}


def test_push_to_hub_sends_the_dataset_card_and_profile(run_dir, tmp_path, monkeypatch):
    from datasets import DatasetDict
    from huggingface_hub import DatasetCard, HfApi

    calls = []
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo: calls.append(("data", repo, len(self["train"]))))
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, repo, repo_type: calls.append(
        ("card", repo, repo_type, self.data.license)))
    monkeypatch.setattr(HfApi, "upload_file", lambda self, **kw: calls.append(("file", kw["repo_id"], kw["path_in_repo"])))
    export(run_dir, tmp_path / "out", hub_id="org/stat-sel")
    assert calls == [("data", "org/stat-sel", 5), ("card", "org/stat-sel", "dataset", "mit"),
                     ("file", "org/stat-sel", "profile.json"), ("file", "org/stat-sel", "diagnoses.jsonl")]


def test_a_run_without_training_data_is_a_clear_error(run_dir, tmp_path):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["stages"] = [s for s in metrics["stages"] if s["stage"] != "data"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    out = subprocess.run([sys.executable, "-m", "stat_exp.export", str(run_dir), str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1 and f"error: {run_dir} has no training data" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()
