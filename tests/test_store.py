"""The artifact store: keys, reuse, and atomic writes."""

import json

import pytest

from stat_exp.store import Store, write_jsonl


def make(store, calls, config=None, inputs=None, version="1", fail=False):
    def compute(out):
        calls.append(out)
        write_jsonl(out / "rows.jsonl", [{"x": 1}, {"x": 2}])
        if fail:
            raise KeyboardInterrupt  # a run killed halfway through the stage
        return {"n": 2}

    return store.stage("demo", config=config or {"a": 1}, inputs=inputs or {}, version=version, compute=compute)


def test_computes_once_then_reuses(tmp_path):
    store, calls = Store(tmp_path), []
    first = make(store, calls)
    second = make(store, calls)
    assert len(calls) == 1
    assert first.key == second.key and second.rows() == [{"x": 1}, {"x": 2}]
    assert second.summary == {"n": 2}
    assert [e.status for e in store.events] == ["computed", "reused"]
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["config"] == {"a": 1} and manifest["stage"] == "demo"


@pytest.mark.parametrize("change", [{"config": {"a": 2}}, {"inputs": {"up": "k2"}}, {"version": "2"}])
def test_key_changes_with_config_inputs_and_version(tmp_path, change):
    store, calls = Store(tmp_path), []
    base = make(store, calls, inputs={"up": "k1"})
    other = make(store, calls, **({"inputs": {"up": "k1"}} | change))
    assert base.key != other.key and len(calls) == 2


def test_interrupted_stage_leaves_nothing_trusted_and_its_unfinished_folder_for_the_rerun(tmp_path):
    store, calls = Store(tmp_path), []
    with pytest.raises(KeyboardInterrupt):
        make(store, calls, fail=True)
    (unfinished,) = (tmp_path / "demo").iterdir()  # no finished folder, no manifest
    assert unfinished.name.startswith(".tmp-") and not (unfinished / "manifest.json").exists()
    assert (unfinished / "rows.jsonl").exists()  # what the killed compute wrote, to resume from
    artifact = make(store, calls)  # the rerun computes in the same folder
    assert len(calls) == 2 and calls[1] == calls[0] == unfinished
    assert artifact.rows() == [{"x": 1}, {"x": 2}] and store.events[-1].status == "computed"
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [artifact.key]  # renamed into place


def test_folder_without_manifest_is_not_trusted(tmp_path):
    store, calls = Store(tmp_path), []
    artifact = make(store, calls)
    (artifact.path / "manifest.json").unlink()  # e.g. a copy cut short by hand
    (artifact.path / "rows.jsonl").write_text('{"x": "partial"}\n')
    again = make(store, calls)
    assert len(calls) == 2 and again.path == artifact.path
    assert again.rows() == [{"x": 1}, {"x": 2}]
