"""The artifact store: keys, reuse, and atomic writes."""

import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import pytest

from stat_exp import store as store_module
from stat_exp.store import IncompleteArtifact, Store, acquire, hash_key, lock_path, write_jsonl


def make(store, calls, config=None, inputs=None, code=None, fail=False):
    def compute(out):
        calls.append(out)
        write_jsonl(out / "rows.jsonl", [{"x": 1}, {"x": 2}])
        if fail:
            raise KeyboardInterrupt  # a run killed halfway through the stage
        return {"n": 2}

    return store.stage("demo", config=config or {"a": 1}, inputs=inputs or {}, code=code or {"demo.py": "1"},
                       compute=compute)


def test_artifact_keys_stay_what_earlier_versions_wrote(tmp_path):
    """A key is the first 16 hex digits of the SHA-256 of the payload's canonical JSON (keys
    sorted, text unescaped, other objects as str): artifacts computed by an earlier version are
    still found. Changing the format recomputes every stage."""
    payload = {"subject": "Géométrie", "config": {"b": 2, "a": 1}, "path": Path("data/x.jsonl")}
    canonical = '{"config": {"a": 1, "b": 2}, "path": "data/x.jsonl", "subject": "Géométrie"}'
    assert hash_key(payload) == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    stage_key = '{"code": {"demo.py": "c1"}, "config": {"a": 1}, "inputs": {"rows": "k1"}, "stage": "demo"}'
    assert (Store(tmp_path).key("demo", {"a": 1}, {"rows": "k1"}, {"demo.py": "c1"})
            == hashlib.sha256(stage_key.encode()).hexdigest()[:16])


def test_computes_once_then_reuses(tmp_path):
    store, calls = Store(tmp_path), []
    first = make(store, calls)
    second = make(store, calls)
    assert len(calls) == 1
    assert first.key == second.key and second.rows() == [{"x": 1}, {"x": 2}]
    assert second.summary == {"n": 2}
    assert [(e.stage, e.key, e.status) for e in store.events] == [("demo", first.key, "computed"),
                                                                  ("demo", first.key, "reused")]
    assert first.stage == second.stage == "demo" and second.path == first.path
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["config"] == {"a": 1} and manifest["stage"] == "demo" and manifest["key"] == first.key


@pytest.mark.parametrize("change", [{"config": {"a": 2}}, {"inputs": {"up": "k2"}}, {"code": {"demo.py": "2"}}])
def test_key_changes_with_config_inputs_and_code(tmp_path, change):
    store, calls = Store(tmp_path), []
    base = make(store, calls, inputs={"up": "k1"})
    other = make(store, calls, **({"inputs": {"up": "k1"}} | change))
    assert base.key != other.key and len(calls) == 2


def test_interrupted_stage_leaves_nothing_trusted_and_its_folder_for_the_rerun(tmp_path):
    store, calls = Store(tmp_path), []
    with pytest.raises(KeyboardInterrupt):
        make(store, calls, fail=True)
    key = store.key("demo", {"a": 1}, {}, {"demo.py": "1"})
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [f".tmp-{key}"]
    assert not (tmp_path / "demo" / f".tmp-{key}" / "manifest.json").exists()
    artifact = make(store, calls)  # the rerun computes again, in the same folder (checkpoints would be there)
    assert calls[0] == calls[1] == tmp_path / "demo" / f".tmp-{key}"
    assert artifact.rows() == [{"x": 1}, {"x": 2}] and store.events[-1].status == "computed"
    assert not calls[0].exists() and artifact.path == tmp_path / "demo" / key


def test_folder_without_manifest_is_not_trusted(tmp_path):
    store, calls = Store(tmp_path), []
    artifact = make(store, calls)
    (artifact.path / "manifest.json").unlink()  # e.g. a copy cut short by hand
    (artifact.path / "rows.jsonl").write_text('{"x": "partial"}\n')
    again = make(store, calls)
    assert len(calls) == 2 and again.path == artifact.path
    assert again.rows() == [{"x": 1}, {"x": 2}]


def test_a_recompute_says_which_code_changed(tmp_path):
    store, calls = Store(tmp_path), []
    make(store, calls, code={"demo.py": "1", "helper.py": "1", "other.py": "1"})
    make(store, calls, code={"demo.py": "1", "helper.py": "2", "other.py": "1"})
    make(store, calls, config={"a": 2}, code={"demo.py": "1", "helper.py": "3", "other.py": "1"})
    assert [(e.status, e.reason) for e in store.events] == [
        ("computed", None), ("computed", "code changed in helper.py"), ("computed", None)]  # a new config: no claim
    manifest = json.loads((tmp_path / "demo" / store.events[1].key / "manifest.json").read_text())
    assert manifest["code"] == {"demo.py": "1", "helper.py": "2", "other.py": "1"}


def test_each_use_is_recorded_with_its_run_folder(tmp_path):
    first = Store(tmp_path / "cache", run_dir=tmp_path / "run1")
    second = Store(tmp_path / "cache", run_dir=tmp_path / "run2")
    artifact = make(first, [])
    make(second, [])
    uses = [json.loads(line) for line in (artifact.path / "uses.jsonl").read_text().splitlines()]
    assert [u["run"] for u in uses] == [str(tmp_path / "run1"), str(tmp_path / "run2")]
    assert all(abs(u["time"] - time.time()) < 60 for u in uses)


def test_a_second_process_waits_for_the_build_then_reuses_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=store_module.log.name)
    started, release, calls = threading.Event(), threading.Event(), []

    def slow(out):
        calls.append(out)
        started.set()
        assert release.wait(10)
        write_jsonl(out / "rows.jsonl", [{"x": 1}])
        return {}

    first, second = Store(tmp_path), Store(tmp_path)  # separate lock descriptors, as two processes have
    builder = threading.Thread(target=first.stage, args=("demo",), kwargs=dict(config={}, code={}, compute=slow))
    builder.start()
    assert started.wait(10)
    waiter = threading.Thread(target=second.stage, args=("demo",), kwargs=dict(config={}, code={}, compute=slow))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # blocked on the build lock, not building a second copy
    release.set()
    builder.join(10)
    waiter.join(10)
    key = second.key("demo", {}, {}, {})
    assert len(calls) == 1 and [(e.stage, e.key, e.status) for e in second.events] == [("demo", key, "reused")]
    # Said once, by the one that waited.
    waits = [m for m in caplog.messages if "another process" in m]
    assert waits == [f"stage demo {key} is being computed by another process: waiting for it"]


def test_after_a_failed_build_one_waiter_builds_while_the_other_waits(tmp_path):
    """The build lock taken after waiting is exclusive too: of two processes that waited on a build
    that then failed, one computes the stage and the other reuses it."""
    started, release, calls = threading.Event(), threading.Event(), []

    def failing(out):
        started.set()
        assert release.wait(10)
        raise RuntimeError("killed halfway")

    def slow(out):
        calls.append(out)
        time.sleep(0.3)  # long enough for the other waiter to reach its lock
        write_jsonl(out / "rows.jsonl", [{"x": 1}])
        return {}

    builder = threading.Thread(target=lambda: pytest.raises(RuntimeError, Store(tmp_path).stage, "demo",
                                                            config={}, code={}, compute=failing))
    builder.start()
    assert started.wait(10)
    waiting = [Store(tmp_path), Store(tmp_path)]
    waiters = [threading.Thread(target=s.stage, args=("demo",), kwargs=dict(config={}, code={}, compute=slow))
               for s in waiting]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.3)
    release.set()
    for thread in [builder, *waiters]:
        thread.join(10)
    assert len(calls) == 1
    assert sorted(e.status for s in waiting for e in s.events) == ["computed", "reused"]


def rows_of_sizes(*sizes: int):
    """A compute that writes `sizes[i]` rows on its i-th call, and says how many."""
    left = iter(sizes)

    def compute(out):
        n = next(left)
        write_jsonl(out / "rows.jsonl", [{"x": i} for i in range(n)])
        return {"n": n}

    return compute


def no_rows(summary: dict) -> str | None:
    return None if summary["n"] else "no rows"


def test_an_artifact_stored_incomplete_by_older_code_is_removed_and_computed_again(tmp_path, caplog):
    store, compute = Store(tmp_path), rows_of_sizes(0, 2)
    first = store.stage("demo", config={}, code={}, compute=compute)  # older code: no completeness check
    again = store.stage("demo", config={}, code={}, compute=compute, incomplete=no_rows)
    assert again.summary == {"n": 2} and again.rows() == [{"x": 0}, {"x": 1}]
    assert f"stage demo {first.key}: the stored artifact is incomplete (no rows); computing it again" in caplog.messages
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [first.key]  # nothing of the old copy is left
    # Complete now: reused.
    store.stage("demo", config={}, code={}, compute=compute, incomplete=no_rows)
    assert [e.status for e in store.events] == ["computed", "computed", "reused"]


@pytest.mark.parametrize("newest,changed", [(0, "a.py, b.py"), (1, "b.py")])
def test_a_recompute_names_what_changed_since_the_newest_older_code(tmp_path, caplog, monkeypatch, newest, changed):
    caplog.set_level(logging.INFO, logger=store_module.log.name)
    store = Store(tmp_path)
    older = [make(store, [], code={"a.py": "1", "b.py": "1"}), make(store, [], code={"a.py": "2", "b.py": "1"})]
    for i, artifact in enumerate(older):
        path = artifact.path / "manifest.json"
        created = "2026-02-01T00:00:00" if i == newest else "2026-01-01T00:00:00"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"created": created}))
    # A manifest that `gc` renamed away after the glob listed it is skipped, not the end of the search.
    glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: [self / "gone" / "manifest.json", *glob(self, pattern)])
    current = make(store, [], code={"a.py": "2", "b.py": "2"})
    event = store.events[-1]
    assert (event.status, event.reason) == ("computed", f"code changed in {changed}")
    assert isinstance(event.seconds, float) and 0 <= event.seconds < 60 and event.seconds == round(event.seconds, 3)
    line = rf"stage demo       computed {current.key} \(\d+\.\ds\): code changed in {re.escape(changed)}"
    assert re.fullmatch(line, caplog.messages[-1])
    assert re.fullmatch(rf"stage demo       computed {older[0].key} \(\d+\.\ds\)", caplog.messages[0])


def test_the_manifest_as_written(tmp_path):
    """Readable JSON: indented, text unescaped, paths as strings, the time it was made and how long it took."""
    def compute(out):
        time.sleep(0.05)
        return {"subject": "Géométrie"}

    artifact = Store(tmp_path).stage("demo", config={"data": Path("d/x.jsonl")}, code={"demo.py": "1"},
                                     compute=compute)
    text = (artifact.path / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2, ensure_ascii=False) and "Géométrie" in text
    assert manifest["config"] == {"data": "d/x.jsonl"} and manifest["summary"] == {"subject": "Géométrie"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", manifest["created"])
    assert abs(time.mktime(time.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%S")) - time.time()) < 60
    seconds = manifest["seconds"]
    assert isinstance(seconds, float) and 0.05 <= seconds < 2.5 and seconds == round(seconds, 3)


def test_a_folder_left_without_a_manifest_is_replaced(tmp_path, caplog):
    store = Store(tmp_path)
    final = tmp_path / "demo" / store.key("demo", {"a": 1}, {}, {"demo.py": "1"})
    (final / "half").mkdir(parents=True)
    artifact = make(store, [])
    assert artifact.path == final and sorted(p.name for p in final.iterdir()) == ["manifest.json", "rows.jsonl"]
    assert f"replacing {final}: it has no manifest, so it was never completed" in caplog.messages


def test_an_incomplete_output_is_never_stored(tmp_path):
    store, compute = Store(tmp_path), rows_of_sizes(0, 2)
    with pytest.raises(IncompleteArtifact, match=r"^stage demo: no rows; nothing was stored$"):
        store.stage("demo", config={}, code={}, compute=compute, incomplete=no_rows)
    assert not any(p.name == store.key("demo", {}, {}, {}) for p in (tmp_path / "demo").iterdir())
    assert store.stage("demo", config={}, code={}, compute=compute, incomplete=no_rows).summary == {"n": 2}


def test_a_discard_killed_before_the_delete_leaves_a_trash_folder_and_no_artifact(tmp_path, monkeypatch):
    store, calls = Store(tmp_path), []
    artifact = make(store, calls)

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        store_module.discard(artifact.path, artifact.path.parent, artifact.key)
    # The name `gc` looks for: nothing a reader would take for the artifact.
    [left] = (tmp_path / "demo").iterdir()
    assert re.fullmatch(rf"\.trash-{artifact.key}-[0-9a-f]{{8}}", left.name)
    assert (left / "manifest.json").exists() and not artifact.path.exists()


def test_close_releases_the_artifacts_the_store_used(tmp_path):
    store = Store(tmp_path)
    artifact = make(store, [])
    lock = lock_path(tmp_path, "demo", artifact.key, "use")
    assert acquire(lock, exclusive=True, blocking=False) is None  # `gc` may not remove it while in use
    store.close()
    fd = acquire(lock, exclusive=True, blocking=False)
    assert fd is not None
    os.close(fd)


def test_rows_are_written_one_json_object_a_line_as_readable_utf8(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", ({"problem": "Trouve x·y"} if i else {"n": i} for i in range(2)))
    assert (tmp_path / "rows.jsonl").read_bytes() == '{"n": 0}\n{"problem": "Trouve x·y"}\n'.encode()


def test_lock_files_are_readable_and_not_executable(tmp_path):
    """rw-r--r-- under the usual umask: another user's run in a shared outputs/ can take a shared lock."""
    old = os.umask(0o022)
    try:
        os.close(acquire(tmp_path / "locks" / "a.use", exclusive=False))
    finally:
        os.umask(old)
    assert (tmp_path / "locks" / "a.use").stat().st_mode & 0o777 == 0o644


def test_a_lock_file_unlinked_while_waiting_is_locked_anew(tmp_path, monkeypatch):
    """`gc` removed the lock file between our open and our flock: the lock held is on a file no
    one else can open, so acquire locks the file now at the path instead."""
    path, flock = tmp_path / "a.build", store_module.fcntl.flock
    unlinked = []

    def flock_then_gc(fd, operation):
        flock(fd, operation)
        if not unlinked:
            unlinked.append(os.fstat(fd).st_ino)
            path.unlink()

    monkeypatch.setattr(store_module.fcntl, "flock", flock_then_gc)
    fd = acquire(path, exclusive=True)
    assert unlinked and os.fstat(fd).st_ino == path.stat().st_ino
    os.close(fd)
