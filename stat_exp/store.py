"""Content-addressed artifact store: each stage's output lives under `<root>/<stage>/<key>/`.

key = hash(stage config, input keys, stage code version). An artifact is built in its
unfinished folder `<root>/<stage>/.tmp-<key>` and renamed into place only when complete, so an
interrupted stage leaves nothing a rerun would trust as finished, and a finished one is reused
by every run and sweep member. The unfinished folder outlives a failed or killed compute, and
the rerun computes in the same folder again, so that a stage can resume from the checkpoints
or shards it left there.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hash_key(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path
    manifest: dict

    @property
    def summary(self) -> dict:
        return self.manifest.get("summary", {})

    def rows(self, name: str = "rows") -> list[dict]:
        return read_jsonl(self.path / f"{name}.jsonl")


@dataclass
class StageEvent:
    stage: str
    key: str
    status: str  # computed | reused
    seconds: float


@dataclass
class Store:
    root: Path
    events: list[StageEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def key(self, stage: str, config: Any, inputs: Mapping[str, str], version: str) -> str:
        return hash_key({"stage": stage, "config": config, "inputs": dict(inputs), "version": version})

    def stage(
        self,
        stage: str,
        *,
        config: Any,
        inputs: Mapping[str, str] | None = None,
        version: str,
        compute: Callable[[Path], dict],
    ) -> Artifact:
        """Return the stage's artifact, computing it with `compute(tmp_dir) -> summary` if absent.

        `compute` writes its files into `tmp_dir` and returns a JSON-able summary for the
        manifest. `inputs` maps names to the keys of upstream artifacts. `tmp_dir` is the same
        folder for every attempt at the same key, and keeps what a failed attempt left in it.
        """
        inputs = dict(inputs or {})
        key = self.key(stage, config, inputs, version)
        final = self.root / stage / key
        start = time.perf_counter()
        if (final / MANIFEST).exists():
            manifest = json.loads((final / MANIFEST).read_text())
            self._record(stage, key, "reused", start)
            return Artifact(stage, key, final, manifest)

        tmp = self.root / stage / f".tmp-{key}"
        if tmp.exists():
            log.info("stage %s %s: resuming in its unfinished folder %s", stage, key, tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        summary = compute(tmp)  # on failure tmp stays, with the checkpoints or shards the rerun resumes from
        manifest = {
            "stage": stage,
            "key": key,
            "version": version,
            "config": config,
            "inputs": inputs,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": round(time.perf_counter() - start, 3),
            "summary": summary or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
        if final.exists() and not (final / MANIFEST).exists():
            log.warning("replacing %s: it has no manifest, so it was never completed", final)
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)  # atomic on one file system: the artifact appears whole or not at all
        except OSError:
            if not (final / MANIFEST).exists():
                raise
            # A parallel sweep member finished the same stage first; its artifact is identical.
            log.info("stage %s %s was completed concurrently; using that copy", stage, key)
            shutil.rmtree(tmp, ignore_errors=True)
            manifest = json.loads((final / MANIFEST).read_text())
        self._record(stage, key, "computed", start)
        return Artifact(stage, key, final, manifest)

    def _record(self, stage: str, key: str, status: str, start: float) -> None:
        event = StageEvent(stage, key, status, round(time.perf_counter() - start, 3))
        self.events.append(event)
        log.info("stage %-10s %-8s %s (%.1fs)", stage, status, key, event.seconds)
