"""Loading a task's training pool and benchmarks into one row schema.

A row is a plain dict: id (str), problem (str), solution (str, "" when the source has none),
answer (str), subject (str | None), level (int | None), and skills (list[str]) when the
source labels them. Sources are local JSONL files under `task.data_dir`, or Hugging Face
datasets when it is null or holds no file for the source; `DataSource.fields` maps their
field names onto ours. A task with
`world` set (skillworld) generates its rows instead: its splits are the benchmarks "val" and
"test", and "pretrain", the base student's corpus.
"""

import hashlib
import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stat_exp.config import DataSource, TaskConfig
from stat_exp.grading import extract_boxed

log = logging.getLogger(__name__)

_ANSWER_FORMATS = ("boxed", "gsm8k")
_FIELDS = ("id", "unique_id", "problem", "solution", "answer", "subject", "level", "skills")


class DataError(ValueError):
    """A source row that cannot become a row of our schema; says where it is and why."""

    def __init__(self, origin: str, line: int, message: str) -> None:
        super().__init__(f"{origin}:{line}: {message}")
        self.origin, self.line = origin, line


def is_local(source: DataSource, data_dir: str | None) -> bool:
    """Whether `source` is read from `data_dir`, which holds its file (else from the hub)."""
    return data_dir is not None and source.path is not None and (Path(data_dir) / source.path).is_file()


def load_source(source: DataSource, data_dir: str | None, name: str) -> list[dict]:
    """The rows of one source: the JSONL file `data_dir/source.path` where `data_dir` holds it,
    else the hub dataset. `name` prefixes the ids of rows that have none."""
    if source.answer_format not in _ANSWER_FORMATS:
        raise ValueError(f"{name}: answer_format must be one of {_ANSWER_FORMATS}, got {source.answer_format!r}")
    if is_local(source, data_dir):
        path = Path(data_dir) / source.path
        origin, records = str(path), _read_jsonl(path)
    else:
        if source.hub_id is None:
            where = f"no file {Path(data_dir) / source.path}" if data_dir else "task.data_dir is null"
            raise FileNotFoundError(f"{name} has no hub_id and {where}: set task.data_dir to a folder that "
                                    f"holds {source.path}")
        if data_dir is not None and source.path is not None:
            log.info("%s: no file %s, so from the hub (%s)", name, Path(data_dir) / source.path, source.hub_id)
        import datasets  # heavy: only when a hub source is actually loaded

        dataset = datasets.load_dataset(source.hub_id, source.hub_config, split=source.split)
        origin, records = f"{source.hub_id}[{source.split}]", enumerate(dataset, start=1)
    keys = _source_keys(dict(source.fields))
    return [_to_row(record, keys, source.answer_format, origin, line, f"{name}-{index}")
            for index, (line, record) in enumerate(records)]


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, record) for each non-blank line."""
    with path.open(encoding="utf-8") as file:
        for line, text in enumerate(file, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(str(path), line, f"invalid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise DataError(str(path), line, f"expected a JSON object, got {type(record).__name__}")
            yield line, record


def _source_keys(fields: dict[str, str]) -> dict[str, str | None]:
    """Our field -> the source field it comes from (None: the source has no such field).

    A source field renamed to one of ours is not also read under its own name: gsm8k's
    `answer` is its worked solution, and its final answer is extracted from it.
    """
    claimed = set(fields.values())
    return {ours: fields.get(ours, None if ours in claimed else ours) for ours in _FIELDS}


def _to_row(record: dict, keys: dict[str, str | None], answer_format: str, origin: str,
            line: int, default_id: str) -> dict:
    def get(field: str) -> Any:
        key = keys[field]
        return None if key is None else record.get(key)

    problem = get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(origin, line, f"missing field 'problem' (source field {keys['problem']!r})")
    solution = get("solution") or ""
    answer = _render_answer(get("answer"))
    if answer is None:
        answer = _answer_from_solution(solution, answer_format)
    if answer is None:
        raise DataError(origin, line, f"missing field 'answer' (source field {keys['answer']!r}), "
                                      f"and no {answer_format} answer in the solution")
    row_id = get("unique_id")
    if row_id is None:
        row_id = get("id")
    row = {
        "id": default_id if row_id is None else str(row_id),
        "problem": problem,
        "solution": str(solution),
        "answer": answer,
        "subject": get("subject"),
        "level": _parse_level(get("level"), origin, line),
    }
    skills = get("skills")
    if skills is not None:
        row["skills"] = [str(skill) for skill in skills]
    return row


def _render_answer(value: Any) -> str | None:
    """A source answer as text; numbers as written by a person (27.0 -> "27")."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _answer_from_solution(solution: str, answer_format: str) -> str | None:
    if answer_format == "boxed":
        return extract_boxed(solution) or None
    _, marker, tail = solution.rpartition("####")  # gsm8k: "... #### 1,234"
    if not marker:
        return None
    return tail.strip().replace(",", "") or None


def _parse_level(value: Any, origin: str, line: int) -> int | None:
    """MATH writes "Level 3" (and "Level ?" for a few unrated problems); MATH500 writes 3."""
    if value is None or value == "Level ?":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"(?:Level\s*)?(\d+)", str(value).strip())
    if match is None:
        raise DataError(origin, line, f"unreadable level {value!r}")
    return int(match.group(1))


def val_from_source(task: TaskConfig) -> bool:
    """Whether validation comes from `task.val` (the paper's split of MATH test) rather than
    from the training pool. A pool read from `data_dir` keeps its validation inside it unless
    `data_dir` holds task.val too: ../shared/data's pool is itself MATH test questions."""
    return task.val is not None and (is_local(task.val, task.data_dir) or not is_local(task.train, task.data_dir))


def load_train_val(task: TaskConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation), drawn with `task.split_seed`, so the same seed always holds out the
    same questions: `task.val_source_size` rows of `task.val` beside the whole pool, or without
    it `task.val_size` rows carved from the pool. A generated world has its own splits."""
    if task.world is not None:
        generated = world_splits(task.world)
        return generated["train"], generated["val"]
    pool = load_source(task.train, task.data_dir, f"{task.name}-train")
    if val_from_source(task):
        source = load_source(task.val, task.data_dir, f"{task.name}-val")
        return pool, _draw(source, task.val_source_size, task.split_seed, "val_source_size")[1]
    return _draw(pool, task.val_size, task.split_seed, "val_size")


def _draw(rows: list[dict], size: int, seed: int, key: str) -> tuple[list[dict], list[dict]]:
    """(rest, drawn): `size` rows drawn with `seed`, both in their original order."""
    if not 0 <= size <= len(rows):
        raise ValueError(f"{key} {size} must be between 0 and the source's {len(rows)} rows")
    drawn = set(random.Random(seed).sample(range(len(rows)), size))
    return [r for i, r in enumerate(rows) if i not in drawn], [r for i, r in enumerate(rows) if i in drawn]


def split_note(task: TaskConfig) -> str | None:
    """What the splits of `task` change from its own validation source (the paper's), or None."""
    if task.world is not None or task.val is None or val_from_source(task):
        return None
    tests = ", ".join(f"{name} is {source.path}" for name, source in task.benchmarks.items()
                      if source.exclude_val and is_local(source, task.data_dir))
    return (f"{task.name} differs from the paper's splits: the pool is {Path(task.data_dir) / task.train.path} "
            f"and validation {task.val_size} questions carved from it, not {task.val_source_size} of "
            f"{task.val.hub_id}[{task.val.split}]" + (f"; {tests}" if tests else ""))


def load_benchmark(task: TaskConfig, name: str, limit: int | None = None) -> list[dict]:
    """The first `limit` rows (all when None) of the benchmark `name` of `task.benchmarks`,
    or of a generated world's splits. A benchmark with `exclude_val` leaves out the
    validation questions (MATH test minus validation is the paper's 4k MATH)."""
    generated = world_splits(task.world) if task.world is not None else None
    names = sorted(task.benchmarks if generated is None else generated)
    if name not in names:
        raise ValueError(f"unknown benchmark {name!r}; {task.name} has {names}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if generated is not None:
        rows = generated[name]
    else:
        source = task.benchmarks[name]
        rows = load_source(source, task.data_dir, name)
        if source.exclude_val:
            validation = {r["problem"] for r in load_train_val(task)[1]}
            rows = [r for r in rows if r["problem"] not in validation]
    return rows if limit is None else rows[:limit]


def world_splits(world: Any) -> dict[str, list[dict]]:
    """A skillworld's splits (see `skillworld.splits`), generated once per process and world."""
    spec = OmegaConf.to_container(world) if OmegaConf.is_config(world) else asdict(world)
    return _world_splits(json.dumps(spec, sort_keys=True))


@lru_cache(maxsize=2)
def _world_splits(spec: str) -> dict[str, list[dict]]:
    from stat_exp.config import WorldConfig
    from stat_exp.tasks import skillworld

    return skillworld.splits(WorldConfig(**json.loads(spec)))


def fingerprint(rows: list[dict]) -> str:
    """A short content hash of rows, for artifact cache keys: any change to any row changes it."""
    canonical = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
