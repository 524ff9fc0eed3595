"""Batch mode through litellm's files and batches API, against the local server's /v1/files and /v1/batches."""

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stat_exp.skills import label_questions
from stat_exp.teacher.batch import BatchFailed
from stat_exp.teacher.client import Teacher
from teacher_server import TeacherServer
from test_teacher import CATALOGUE, labeller, questions, teacher_config

EXPECTED = [["triangles"], ["linear_equations", "factoring"]] * 5  # what labeller answers for questions(10)


def batch_config(server: TeacherServer, **overrides):
    return teacher_config(server, batch=True, batch_poll_interval=0.01, **overrides)


def input_ids(server: TeacherServer, batch_id: str) -> list[str]:
    """The custom ids (cache keys) of the requests a batch was created with."""
    lines = server.files[server.batches[batch_id]["input_file_id"]].splitlines()
    return [json.loads(line)["custom_id"] for line in lines]


def ledger(cache_dir: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(cache_dir / "teacher.sqlite") as db:
        rows = db.execute("SELECT id, status, keys FROM batches ORDER BY submitted").fetchall()
    return [(batch_id, status, len(json.loads(keys))) for batch_id, status, keys in rows]


def test_a_batch_is_submitted_polled_fetched_and_cached_under_the_online_keys(tmp_path):
    with TeacherServer(labeller, batch_polls=3) as server:
        teacher = Teacher(batch_config(server), tmp_path)
        records = label_questions(teacher, questions(10), CATALOGUE, max_skills=5)
        assert [r["skills"] for r in records] == EXPECTED
        assert server.batch_creates == 1 and server.answered == 0  # no online call
        assert server.batches["batch-1"]["status"] == "completed"
        assert teacher.usage.calls == 10 and teacher.usage.cache_hits == 0
        assert ledger(tmp_path) == [("batch-1", "completed", 10)]

        online = Teacher(teacher_config(server), tmp_path)  # online mode reads the batch's answers
        assert [r["skills"] for r in label_questions(online, questions(10), CATALOGUE, max_skills=5)] == EXPECTED
        again = Teacher(batch_config(server), tmp_path)  # and a batch-mode rerun submits nothing
        label_questions(again, questions(10), CATALOGUE, max_skills=5)
    assert online.usage.cache_hits == 10 and again.usage.cache_hits == 10
    assert server.batch_creates == 1 and server.answered == 0


def test_polling_shows_progress(tmp_path, capsys):
    with TeacherServer(labeller, batch_polls=4) as server:
        label_questions(Teacher(batch_config(server), tmp_path), questions(8), CATALOGUE, max_skills=5)
    err = capsys.readouterr().err
    assert "batch batch-1" in err and "8/8" in err


def test_a_failed_poll_is_retried(tmp_path):
    with TeacherServer(labeller, batch_poll_errors=3) as server:  # one more than litellm's default retries
        teacher = Teacher(batch_config(server, max_retries=3), tmp_path)
        records = label_questions(teacher, questions(4), CATALOGUE, max_skills=5)
    assert [r["skills"] for r in records] == EXPECTED[:4]
    assert server.batch_poll_errors == 0 and server.batch_creates == 1


def test_batch_answers_are_paid_at_the_batch_price(tmp_path):
    with TeacherServer(labeller) as server:
        teacher = Teacher(batch_config(server, model="openai/gpt-4o-mini"), tmp_path)
        label_questions(teacher, questions(4), CATALOGUE, max_skills=5)
    usage = teacher.usage
    assert usage.calls == 4 and usage.unpriced_calls == 0 and usage.prompt_tokens > 0
    # OpenAI's batch prices for gpt-4o-mini: $0.075 and $0.30 per million tokens, half the list $0.15 and $0.60.
    batch_price = (usage.prompt_tokens * 0.075 + usage.completion_tokens * 0.30) / 1e6
    assert usage.cost_usd == pytest.approx(batch_price, rel=1e-9)


def test_killed_after_submitting_a_rerun_polls_the_same_batch(tmp_path):
    script = (
        "import sys; from pathlib import Path\n"
        "from stat_exp.skills import label_questions\n"
        "from stat_exp.teacher.client import Teacher\n"
        "from test_teacher import CATALOGUE, questions, teacher_config\n"
        "class Server: url = sys.argv[1]\n"
        "cfg = teacher_config(Server, batch=True, batch_poll_interval=600)\n"
        "label_questions(Teacher(cfg, Path(sys.argv[2])), questions(10), CATALOGUE, max_skills=5)\n"
    )
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    with TeacherServer(labeller, batch_polls=2) as server:
        run = subprocess.Popen([sys.executable, "-c", script, server.url, str(tmp_path)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not (server.batches and server.batches["batch-1"]["status"] == "in_progress"):
                assert run.poll() is None, run.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the first run never polled its batch"
                time.sleep(0.05)
        finally:
            run.kill()  # while it waits for its next poll
            run.wait()
        assert ledger(tmp_path) == [("batch-1", "submitted", 10)]

        teacher = Teacher(batch_config(server), tmp_path)
        records = label_questions(teacher, questions(10), CATALOGUE, max_skills=5)
    assert [r["skills"] for r in records] == EXPECTED
    assert server.batch_creates == 1 and server.answered == 0
    assert ledger(tmp_path) == [("batch-1", "completed", 10)] and teacher.usage.calls == 10


def test_an_expired_batch_keeps_its_answers_and_sends_only_the_rest_again(tmp_path):
    with TeacherServer(labeller, batch_outcomes=["expired"]) as server:
        teacher = Teacher(batch_config(server), tmp_path)
        records = label_questions(teacher, questions(10), CATALOGUE, max_skills=5)
        first, second = input_ids(server, "batch-1"), input_ids(server, "batch-2")
        output = server.files[server.batches["batch-1"]["output_file_id"]]
        finished = [json.loads(line)["custom_id"] for line in output.splitlines()]
    assert [r["skills"] for r in records] == EXPECTED
    assert server.batch_creates == 2 and server.answered == 0
    assert finished == first[:5] and second == first[5:]  # the expired half, and only it
    assert ledger(tmp_path) == [("batch-1", "expired", 10), ("batch-2", "completed", 5)]
    assert teacher.usage.calls == 10


def test_a_failed_batch_raises_and_a_rerun_submits_a_new_one(tmp_path):
    with TeacherServer(labeller, batch_outcomes=["failed"]) as server:
        with pytest.raises(BatchFailed, match=r"batch-1 of 6 .*invalid_request: scripted failure"):
            label_questions(Teacher(batch_config(server), tmp_path), questions(6), CATALOGUE, max_skills=5)
        assert ledger(tmp_path) == [("batch-1", "failed", 6)]

        teacher = Teacher(batch_config(server), tmp_path)
        records = label_questions(teacher, questions(6), CATALOGUE, max_skills=5)
    assert [r["skills"] for r in records] == EXPECTED[:6] and server.batch_creates == 2


def test_an_unparsable_batch_answer_is_retried_online(tmp_path):
    def flaky(body: dict) -> str:
        if "Question 0 " in body["messages"][-1]["content"] and body["temperature"] == 0:
            return "It needs geometry."  # no tags: the first attempt, answered in the batch, fails to parse
        return labeller(body)

    with TeacherServer(flaky) as server:
        teacher = Teacher(batch_config(server), tmp_path)
        records = label_questions(teacher, questions(4), CATALOGUE, max_skills=5)
    assert [r["skills"] for r in records] == EXPECTED[:4]
    assert server.batch_creates == 1 and server.answered == 1  # the retry, online
    assert teacher.usage.parse_failures == 1 and teacher.usage.calls == 5


def test_more_requests_than_a_batch_holds_are_split(tmp_path):
    with TeacherServer(labeller) as server:
        records = label_questions(Teacher(batch_config(server, batch_max_requests=4), tmp_path), questions(10),
                                  CATALOGUE, max_skills=5)
        sizes = [len(input_ids(server, f"batch-{i}")) for i in (1, 2, 3)]
    assert [r["skills"] for r in records] == EXPECTED
    assert server.batch_creates == 3 and sizes == [4, 4, 2]


def test_a_provider_litellm_cannot_batch_is_refused_before_any_request(tmp_path):
    with TeacherServer(labeller) as server:
        teacher = Teacher(batch_config(server, model="anthropic/claude-sonnet-4-5"), tmp_path)
        with pytest.raises(ValueError, match="'anthropic'.*teacher.batch=false"):
            label_questions(teacher, questions(2), CATALOGUE, max_skills=5)
    assert server.files == {} and server.batch_creates == 0  # not even an upload


def test_an_empty_batch_size_is_named(tmp_path):
    with TeacherServer(labeller) as server:
        with pytest.raises(ValueError, match="teacher.batch_max_requests=0"):
            label_questions(Teacher(batch_config(server, batch_max_requests=0), tmp_path), questions(2), CATALOGUE,
                            max_skills=5)
    assert server.files == {}
