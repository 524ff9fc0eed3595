import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stat_exp.config import DataSource, TaskConfig, WorldConfig
from stat_exp.tasks import DataError, fingerprint, load_benchmark, load_source, load_train_val, split_note, world_splits

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SUBJECTS = {
    "Algebra", "Intermediate Algebra", "Prealgebra", "Precalculus",
    "Number Theory", "Geometry", "Counting & Probability",
}


@pytest.fixture
def task():
    """The real math task config, on the local data."""
    config = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(ROOT / "conf" / "task" / "math.yaml"))
    config.data_dir = str(DATA)
    return config


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_math_train_rows(task):
    rows = load_source(task.train, task.data_dir, "math-train")
    assert len(rows) == 4500
    assert rows[0] == {
        "id": "math-train-0",
        "problem": "How many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have?",
        "solution": rows[0]["solution"],
        "answer": "2",
        "subject": "Algebra",
        "level": 3,
    }
    assert rows[2]["answer"] == r"\dfrac{9}{7}"
    assert {row["subject"] for row in rows} == SUBJECTS
    assert {row["level"] for row in rows} == {1, 2, 3, 4, 5}
    assert len({row["id"] for row in rows}) == 4500


def test_benchmarks(task):
    math500 = load_benchmark(task, "math500")
    assert len(math500) == 500
    assert math500[0]["id"] == "test/precalculus/807.json"
    assert math500[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    assert math500[0]["subject"] == "Precalculus" and math500[0]["level"] == 2

    amc23 = load_benchmark(task, "amc23")
    assert len(amc23) == 40
    assert amc23[0]["answer"] == "27"  # written 27.0 in the file
    assert amc23[0]["solution"] == "" and amc23[0]["id"] == "0"
    assert all(row["answer"].lstrip("-").isdigit() for row in amc23)

    aime24 = load_benchmark(task, "aime24", limit=3)
    assert [row["answer"] for row in aime24] == ["204", "113", "371"]
    assert aime24[0]["level"] is None and aime24[0]["subject"] is None


def test_validation_split(task):
    train, val = load_train_val(task)
    assert (len(train), len(val)) == (4000, 500)
    train_ids, val_ids = {row["id"] for row in train}, {row["id"] for row in val}
    assert not train_ids & val_ids
    assert len(train_ids | val_ids) == 4500
    assert load_train_val(task) == (train, val)  # same seed, same split
    task.split_seed = 1
    assert {row["id"] for row in load_train_val(task)[1]} != val_ids


def test_validation_larger_than_pool(task):
    task.val_size = 4501
    with pytest.raises(ValueError, match="4501"):
        load_train_val(task)


def test_missing_problem_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        json.dumps({"problem": "1+1?", "answer": "2"}),
        "",
        json.dumps({"question": "2+2?", "answer": "4"}),
    ])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: missing field 'problem'")):
        load_source(DataSource(path="bad.jsonl"), str(tmp_path), "bad")


def test_missing_answer_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        json.dumps({"problem": "1+1?", "solution": r"It is $\boxed{2}$."}),
        json.dumps({"problem": "2+2?", "solution": "It is 4."}),
    ])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: missing field 'answer'")):
        load_source(DataSource(path="bad.jsonl"), str(tmp_path), "bad")


def test_invalid_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"problem": "1+1?", "answer": "2"}', '{"problem": '])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: invalid JSON")):
        load_source(DataSource(path="bad.jsonl"), str(tmp_path), "bad")


def test_gsm8k_format(tmp_path):
    """gsm8k's `answer` field is the worked solution; the answer follows '####'."""
    write_jsonl(tmp_path / "gsm8k.jsonl", [json.dumps({"question": "How many?", "answer": "6*2=12\n#### 1,234"})])
    source = DataSource(path="gsm8k.jsonl", fields={"problem": "question", "solution": "answer"},
                        answer_format="gsm8k")
    [row] = load_source(source, str(tmp_path), "gsm8k")
    assert row == {"id": "gsm8k-0", "problem": "How many?", "solution": "6*2=12\n#### 1,234",
                   "answer": "1234", "subject": None, "level": None}


def test_levels_and_skills(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [
        json.dumps({"problem": "a", "answer": "1", "level": "Level ?", "skills": ["algebra"]}),
        json.dumps({"problem": "b", "answer": 2, "level": "Level 5"}),
    ])
    first, second = load_source(DataSource(path="rows.jsonl"), str(tmp_path), "rows")
    assert (first["level"], first["skills"]) == (None, ["algebra"])
    assert (second["level"], second["answer"]) == (5, "2")
    assert "skills" not in second


def test_unreadable_level(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [json.dumps({"problem": "c", "answer": "3", "level": "hard"})])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: unreadable level 'hard'")):
        load_source(DataSource(path="rows.jsonl"), str(tmp_path), "rows")


def test_unknown_benchmark(task):
    with pytest.raises(ValueError, match=r"unknown benchmark 'math5000'.*'aime24', 'aime25', 'amc23', 'gsm8k', 'math'"):
        load_benchmark(task, "math5000")


def test_missing_data_file_without_a_hub_copy(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"nope has no hub_id and no file {tmp_path / 'nope.jsonl'}")):
        load_source(DataSource(path="nope.jsonl"), str(tmp_path), "nope")


class FakeHub:
    """`datasets.load_dataset` standing in for the hub: MATH-shaped splits by (hub_id, split), calls recorded."""

    def __init__(self, splits: dict[tuple[str, str], list[dict]]):
        self.splits, self.calls = splits, []

    def __call__(self, hub_id, config=None, split=None):
        self.calls.append((hub_id, split))
        return self.splits[hub_id, split]


def math_rows(prefix: str, n: int) -> list[dict]:
    return [{"problem": f"{prefix} problem {i}", "solution": f"so \\boxed{{{i}}}", "type": "Algebra",
             "level": f"Level {1 + i % 5}"} for i in range(n)]


@pytest.fixture
def hub(monkeypatch):
    """MATH on a fake hub, scaled down 100x: train 75, test 50."""
    import datasets

    fake = FakeHub({("DigitalLearningGmbH/MATH-lighteval", "train"): math_rows("train", 75),
                    ("DigitalLearningGmbH/MATH-lighteval", "test"): math_rows("test", 50)})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def test_the_papers_splits_from_the_hub(task, hub):
    """MATH train is the pool; MATH test splits, seeded, into validation and the benchmark math (1k / 4k, scaled)."""
    task.data_dir = None
    task.val_source_size = 10
    train, val = load_train_val(task)
    math = load_benchmark(task, "math")
    assert (len(train), len(val), len(math)) == (75, 10, 40)
    assert {r["problem"] for r in train} == {f"train problem {i}" for i in range(75)}
    test_problems = {f"test problem {i}" for i in range(50)}
    assert {r["problem"] for r in val} | {r["problem"] for r in math} == test_problems
    assert not {r["problem"] for r in val} & {r["problem"] for r in math}
    assert split_note(task) is None
    assert load_train_val(task)[1] == val  # seeded
    task.split_seed = 1
    assert load_train_val(task)[1] != val


def test_the_papers_splits_from_local_files(task, tmp_path):
    """The same split when a data_dir holds MATH train and test (written here, 100x smaller)."""
    (tmp_path / "math").mkdir()
    for split, n in (("train", 75), ("test", 50)):
        (tmp_path / "math" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math_rows(split, n)))
    task.data_dir = str(tmp_path)
    task.val.path = task.benchmarks.math.path = "math/test.jsonl"
    task.val_source_size = 10
    train, val = load_train_val(task)
    math = load_benchmark(task, "math")
    assert (len(train), len(val), len(math)) == (75, 10, 40)
    assert len({r["problem"] for r in val} | {r["problem"] for r in math}) == 50
    assert split_note(task) is None


def test_a_data_dir_keeps_the_prm800k_split_and_says_how_it_differs(task, hub):
    """With ../shared/data (MATH test minus MATH500 as the pool): validation from the pool, MATH500 as math."""
    train, val = load_train_val(task)
    assert (len(train), len(val)) == (4000, 500) and hub.calls == []
    assert [r["id"] for r in load_benchmark(task, "math", limit=2)] == [r["id"] for r in load_benchmark(task, "math500",
                                                                                                       limit=2)]
    assert split_note(task) == (f"math differs from the paper's splits: the pool is {DATA / 'math/train.jsonl'} and "
                                "validation 500 questions carved from it, not 1000 of DigitalLearningGmbH/MATH-lighteval"
                                "[test]; math is math500/test.jsonl")


def test_a_data_dir_without_a_sources_file_falls_back_to_the_hub(task, hub, tmp_path, caplog):
    caplog.set_level("INFO", logger="stat_exp.tasks.loader")
    (tmp_path / "amc23").mkdir()
    (tmp_path / "amc23" / "test.jsonl").write_text('{"question": "2+2?", "answer": 4.0}\n')
    task.data_dir = str(tmp_path)  # holds amc23 only: the pool and validation come from the hub
    task.val_source_size = 10
    train, val = load_train_val(task)
    assert (len(train), len(val)) == (75, 10)
    assert hub.calls == [("DigitalLearningGmbH/MATH-lighteval", "train"), ("DigitalLearningGmbH/MATH-lighteval", "test")]
    assert f"math-train: no file {tmp_path / 'math/train.jsonl'}, so from the hub" in caplog.text
    assert [r["answer"] for r in load_benchmark(task, "amc23")] == ["4"]


def test_fingerprint(task):
    rows = load_benchmark(task, "math500", limit=20)
    assert fingerprint(rows) == fingerprint(load_benchmark(task, "math500", limit=20))
    assert fingerprint(rows) == fingerprint([dict(reversed(list(row.items()))) for row in rows])
    changed = [dict(row) for row in rows]
    changed[7]["answer"] += "0"
    assert fingerprint(changed) != fingerprint(rows)
    assert fingerprint(rows[:19]) != fingerprint(rows)
    assert len(fingerprint(rows)) == 16


def test_dataclass_config_works_too():
    task = TaskConfig(name="t", data_dir=str(DATA), benchmarks={"amc23": DataSource(
        path="amc23/test.jsonl", fields={"problem": "question"})})
    assert [row["answer"] for row in load_benchmark(task, "amc23", limit=2)] == ["27", "36"]


def test_import_is_light():
    code = "import sys, stat_exp.tasks; print(sorted({'datasets', 'torch', 'sympy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_generated_world_is_a_task_with_its_splits_as_benchmarks():
    world = WorldConfig(pretrain_size=60, train_size=40, val_size=10, test_size=12)
    task = OmegaConf.structured(TaskConfig(name="skillworld", world=world))
    train, val = load_train_val(task)
    assert (len(train), len(val)) == (40, 10) and train == world_splits(world)["train"]
    assert load_benchmark(task, "test", limit=5) == world_splits(task.world)["test"][:5]
    assert len(load_benchmark(task, "pretrain")) == 60
    with pytest.raises(ValueError, match=r"unknown benchmark 'math500'; skillworld has \['ood_test', 'ood_val', 'pretrain', 'test', 'train', 'val'\]"):
        load_benchmark(task, "math500")
