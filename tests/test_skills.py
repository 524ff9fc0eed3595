"""The `skills` and `skill_map` stages: from the released files, and from the teacher over HTTP."""

import json
import logging
import re

import pytest

from helpers import SHARED_DATA, compose_config
from stat_exp.pipeline import run
from teacher_server import TeacherServer
from wandb_records import logged

SECRET = "sk-test-secret-4f9a"


def test_catalogue_and_map_load_from_the_released_files(tmp_path):
    cfg = compose_config(f"task.data_dir={SHARED_DATA}", "task.skills.catalogue_file=math/skills.json",
                         "task.skills.map_file=math/skill_map.jsonl", "eval.benchmarks=[]", "logger=none",
                         f"paths.cache_dir={tmp_path}")
    metrics = run(cfg, tmp_path / "run")
    (catalogue_dir,) = (tmp_path / "skills").iterdir()
    catalogue = json.loads((catalogue_dir / "catalogue.json").read_text())
    assert len(catalogue) == 7 and sum(map(len, catalogue.values())) == 117
    (map_dir,) = (tmp_path / "skill_map").iterdir()
    summary = json.loads((map_dir / "manifest.json").read_text())["summary"]
    assert summary["questions"] == 4000  # the 4,500-question pool less the 500 held out for validation
    assert summary["labelled"] > 3900 and summary["unknown_skill_names"] > 0
    assert metrics["skill_map"]["labelled"] == summary["labelled"]


def scripted_teacher(body: dict) -> str:
    """Extraction, clustering and labelling answers, chosen by the prompt's wording."""
    prompt = body["messages"][-1]["content"]
    if "Label this problem with the ONE" in prompt:
        number = int(re.search(r"Problem (\d+)", prompt).group(1))
        return f"<skill>fine_skill_{number % 4}</skill><reason>it is needed</reason>"
    if "Group them into between" in prompt:
        return ("<skill>counting_things</skill><members>fine_skill_0, fine_skill_1</members>"
                "<skill>Solving Equations</skill><members>fine_skill_2, fine_skill_3</members>")
    if "Which skills from this list" in prompt:
        number = int(re.search(r"Problem (\d+)", prompt).group(1))
        if number == 7:
            return "no tags at all"  # a malformed answer: retried, then recorded
        return "<skill>solving_equations, made_up_skill</skill><reason>both</reason>"  # the paper's format
    raise AssertionError(f"unexpected prompt: {prompt[:200]}")


@pytest.fixture
def tiny_task(tmp_path):
    rows = [{"problem": f"Problem {i}: what is {i}+1?", "solution": f"It is \\boxed{{{i + 1}}}.",
             "type": "Algebra" if i % 3 else "Geometry", "level": "Level 2"} for i in range(24)]
    data = tmp_path / "data"
    (data / "math").mkdir(parents=True)
    (data / "math" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_teacher_builds_catalogue_and_map_and_rerun_calls_nothing(tmp_path, tiny_task, monkeypatch, caplog, capsys):
    monkeypatch.setenv("STAT_TEST_TEACHER_KEY", SECRET)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    caplog.set_level(logging.DEBUG)
    with TeacherServer(scripted_teacher) as server:
        overrides = [f"task.data_dir={tiny_task}", "task.val_size=4", "task.skills.extraction_questions=5",
                     "teacher=local", f"teacher.api_base={server.url}", "teacher.model=openai/scripted",
                     "teacher.api_key_env=STAT_TEST_TEACHER_KEY", "teacher.backoff_initial=0.01",
                     "eval.benchmarks=[]", f"paths.cache_dir={tmp_path / 'cache'}"]
        metrics = run(compose_config(*overrides), tmp_path / "run1")
        first_requests = server.requests
        assert server.api_keys == {SECRET}
        # 5 questions named per subject, 2 clusterings, 20 labels + 2 retries of the malformed one.
        assert first_requests == 10 + 2 + 20 + 2
        labelling = [p for p in (b["messages"][-1]["content"] for b in server.bodies) if "Which skills from this list" in p]
        assert len(labelling) == 22 and not [p for p in labelling if "\\boxed" in p]  # as in the paper, no solution shown

        again = run(compose_config(*overrides), tmp_path / "run2")
        assert server.requests == first_requests  # every answer came from the cache
        assert [s["status"] for s in again["stages"]][:2] == ["reused", "reused"]

    (catalogue_dir,) = (tmp_path / "cache" / "skills").iterdir()
    catalogue = json.loads((catalogue_dir / "catalogue.json").read_text())
    assert catalogue == {"Algebra": ["counting_things", "solving_equations"],
                         "Geometry": ["counting_things", "solving_equations"]}
    (map_dir,) = (tmp_path / "cache" / "skill_map").iterdir()
    records = {r["id"]: r for r in map(json.loads, (map_dir / "rows.jsonl").read_text().splitlines())}
    assert len(records) == 20
    labelled = [r for r in records.values() if r["skills"]]
    assert len(labelled) == 19 and all(r["skills"] == ["solving_equations"] for r in labelled)
    assert all(r["unknown"] == ["made_up_skill"] for r in labelled)
    (failed,) = [r for r in records.values() if not r["skills"]]
    assert failed["raw"] == "no tags at all" and "unparsable" in failed["error"]

    assert metrics["skill_map"]["unlabelled"] == 1 and metrics["skill_map"]["unknown_skill_names"] == 19
    assert metrics["teacher"]["skill_map"]["calls"] == 22 and metrics["teacher"]["skill_map"]["parse_failures"] == 3

    # The key reached the server, and nowhere else: run folders, artifacts, cache, W&B, logs.
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]
    assert SECRET not in caplog.text and SECRET not in "".join(capsys.readouterr())
    assert logged(tmp_path / "run1")["config"]["teacher"]["api_key_env"] == "STAT_TEST_TEACHER_KEY"
