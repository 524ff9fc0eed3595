"""Content-addressed artifact store: each stage's output lives under `<root>/<stage>/<key>/`.

key = hash(stage config, input keys, the stage's code fingerprint; see `code_fingerprint`).
An artifact is built in `<root>/<stage>/.tmp-<key>/` and renamed into place only when complete,
so an interrupted stage leaves nothing a rerun would trust, and a finished one is reused by
every run and sweep member. The unfinished folder is kept when the stage fails or is killed,
so checkpoints written into it survive and the rerun resumes from them.

Two lock files per key, under `<root>/.locks/<stage>/`, let processes share the cache safely
(`fcntl.flock`; the kernel drops a dead process's locks): `<key>.build`, held exclusively while
a stage computes, so two sweep members never build the same artifact at once (the second waits,
then reuses) and `gc` can tell a running stage's folder from a stale one; and `<key>.use`, held
shared by every store that used the artifact until `close()`, so `gc` never removes an artifact
a live run reads. Each use is also appended to the artifact's `uses.jsonl` (run folder, time).
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
USES = "uses.jsonl"  # one line per run that used the artifact: {"run": folder, "time": epoch seconds}
LOCKS = ".locks"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"  # what `gc` renamed away before deleting it


class IncompleteArtifact(RuntimeError):
    """A stage's output is not whole (failed requests, an empty result): nothing was stored for it."""


def discard(path: Path, stage_dir: Path, key: str) -> None:
    """Delete `path` (an artifact, or a part of one) so that no reader ever finds half of it:
    renamed to a `.trash-*` name in its stage's folder first (atomic; `gc` removes one a kill
    left behind), then removed."""
    trash = stage_dir / f"{TRASH_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    shutil.rmtree(trash)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hash_key(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def lock_path(root: Path, stage: str, key: str, kind: str) -> Path:
    """The `build` or `use` lock file of artifact `<root>/<stage>/<key>`."""
    return Path(root) / LOCKS / stage / f"{key}.{kind}"


def acquire(path: Path, *, exclusive: bool, blocking: bool = True) -> int | None:
    """An open descriptor holding a flock on `path` (closing it releases the lock); None when
    `blocking` is False and another holder is in the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)  # `gc` unlinked the file while we waited: lock the one now at `path`


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
    reason: str | None = None  # why it was computed, when an artifact of older code existed


@dataclass
class Store:
    root: Path
    run_dir: Path | None = None  # recorded in each used artifact's uses.jsonl (None: not recorded)
    events: list[StageEvent] = field(default_factory=list)
    _held: list[int] = field(default_factory=list, repr=False)  # `use` locks, released by close()

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def key(self, stage: str, config: Any, inputs: Mapping[str, str], code: Mapping[str, str]) -> str:
        return hash_key({"stage": stage, "config": config, "inputs": dict(inputs), "code": dict(code)})

    def stage(
        self,
        stage: str,
        *,
        config: Any,
        inputs: Mapping[str, str] | None = None,
        code: Mapping[str, str],
        compute: Callable[[Path], dict],
        incomplete: Callable[[dict], str | None] | None = None,
    ) -> Artifact:
        """Return the stage's artifact, computing it with `compute(tmp_dir) -> summary` if absent.

        `compute` writes its files into `tmp_dir` (which may hold what a killed earlier attempt
        left there) and returns a JSON-able summary for the manifest. `inputs` maps names to the
        keys of upstream artifacts; `code` is `code_fingerprint.stage_code(stage)`.
        `incomplete(summary)` says why an output is not whole (else None): such an output is
        never stored, and one stored by older code is computed again rather than trusted.
        """
        inputs, code = dict(inputs or {}), dict(code)
        key = self.key(stage, config, inputs, code)
        stage_dir = self.root / stage
        final = stage_dir / key
        start = time.perf_counter()
        self._held.append(acquire(lock_path(self.root, stage, key, "use"), exclusive=False))
        if (final / MANIFEST).exists() and self._trusted(stage, key, final, incomplete):
            return self._reuse(stage, key, final, start)

        build = acquire(lock_path(self.root, stage, key, "build"), exclusive=True, blocking=False)
        if build is None:
            log.info("stage %s %s is being computed by another process: waiting for it", stage, key)
            build = acquire(lock_path(self.root, stage, key, "build"), exclusive=True)
        try:
            if (final / MANIFEST).exists():  # the process we waited for finished it
                return self._reuse(stage, key, final, start)
            reason = self._code_change(stage_dir, config, inputs, code)
            tmp = stage_dir / f"{TMP_PREFIX}{key}"
            tmp.mkdir(parents=True, exist_ok=True)
            summary = compute(tmp)  # on failure tmp stays, with any checkpoints, for the rerun
            reason_incomplete = incomplete(summary or {}) if incomplete else None
            if reason_incomplete is not None:
                raise IncompleteArtifact(f"stage {stage}: {reason_incomplete}; nothing was stored")
            manifest = {
                "stage": stage,
                "key": key,
                "config": config,
                "inputs": inputs,
                "code": code,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seconds": round(time.perf_counter() - start, 3),
                "summary": summary or {},
            }
            self._record_use(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
            if final.exists():
                log.warning("replacing %s: it has no manifest, so it was never completed", final)
                shutil.rmtree(final)
            os.rename(tmp, final)  # atomic on one file system: the artifact appears whole or not at all
        finally:
            os.close(build)
        self._record(stage, key, "computed", start, reason)
        return Artifact(stage, key, final, manifest)

    def close(self) -> None:
        """Release the artifacts this store used: `gc` may remove them from now on."""
        for fd in self._held:
            os.close(fd)
        self._held.clear()

    def _reuse(self, stage: str, key: str, final: Path, start: float) -> Artifact:
        manifest = json.loads((final / MANIFEST).read_text())
        self._record_use(final)
        self._record(stage, key, "reused", start)
        return Artifact(stage, key, final, manifest)

    @staticmethod
    def _trusted(stage: str, key: str, final: Path, incomplete: Callable[[dict], str | None] | None) -> bool:
        """False, after removing it, for an artifact that older code stored incomplete."""
        reason = incomplete(json.loads((final / MANIFEST).read_text()).get("summary", {})) if incomplete else None
        if reason is None:
            return True
        log.warning("stage %s %s: the stored artifact is incomplete (%s); computing it again", stage, key, reason)
        discard(final, final.parent, key)
        return False

    def _record_use(self, folder: Path) -> None:
        if self.run_dir is not None:
            with open(folder / USES, "a", encoding="utf-8") as f:  # one short append: whole lines
                f.write(json.dumps({"run": str(Path(self.run_dir).resolve()), "time": round(time.time())}) + "\n")

    @staticmethod
    def _code_change(stage_dir: Path, config: Any, inputs: dict, code: dict) -> str | None:
        """"code changed in <units>" when an artifact with this config and these inputs exists for other code."""
        same = hash_key({"config": config, "inputs": inputs})
        older = []
        for path in stage_dir.glob(f"*/{MANIFEST}"):
            try:
                manifest = json.loads(path.read_text())
            except FileNotFoundError:  # `gc` renamed it away since the glob
                continue
            if "code" in manifest and hash_key({"config": manifest["config"], "inputs": manifest["inputs"]}) == same:
                older.append(manifest)
        if not older:
            return None
        previous = max(older, key=lambda m: m["created"])["code"]
        changed = sorted(unit for unit in {*previous, *code} if previous.get(unit) != code.get(unit))
        return f"code changed in {', '.join(changed)}"

    def _record(self, stage: str, key: str, status: str, start: float, reason: str | None = None) -> None:
        event = StageEvent(stage, key, status, round(time.perf_counter() - start, 3), reason)
        self.events.append(event)
        log.info("stage %-10s %-8s %s (%.1fs)%s", stage, status, key, event.seconds, f": {reason}" if reason else "")
