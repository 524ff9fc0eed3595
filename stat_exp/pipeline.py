"""The STAT pipeline: the stages in order, each a cached artifact in the store.

Implemented so far: the student (built locally for `model=tiny`, else a hub id), the skill
catalogue and skill map (from files or the teacher), and evaluation on the benchmarks.
"""

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Callable

import yaml
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from stat_exp import evaluate as evaluation
from stat_exp.store import Artifact, Store, hash_key, write_jsonl
from stat_exp.tasks import fingerprint, load_benchmark, load_train_val
from stat_exp.tracking import Tracker, resolved_config

log = logging.getLogger(__name__)

TINY_MODEL_VERSION = "1"
SKILLS_VERSION = "1"


@dataclass(frozen=True)
class Student:
    """A model the generation backends can load, and the key that identifies its weights."""

    path: str
    key: str


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the experiment described by `cfg`; return the metrics also written to metrics.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_config(cfg), sort_keys=False))
    store = Store(Path(to_absolute_path(cfg.paths.cache_dir)))
    tracker = Tracker(cfg, run_dir)
    try:
        train, _ = load_train_val(cfg.task)
        teacher = _lazy_teacher(cfg, store)
        if cfg.teacher is not None or cfg.task.skills.catalogue_file or cfg.task.skills.map_file:
            catalogue = skill_catalogue(cfg, store, tracker, teacher, train)
            skill_map(cfg, store, tracker, teacher, train, catalogue)
        if cfg.eval.benchmarks:
            student = base_student(cfg, store, train)
            evaluate_student(cfg, store, tracker, student, label="base")
    finally:
        tracker.metrics["stages"] = [vars(e) for e in store.events]
        tracker.log({f"cache/{status}": sum(e.status == status for e in store.events) for status in ("computed", "reused")})
        metrics_path = tracker.finish()
    log.info("stages: %s", ", ".join(f"{e.stage} {e.status}" for e in store.events))
    log.info("metrics written to %s", metrics_path)
    return tracker.metrics


def base_student(cfg: DictConfig, store: Store, train: list[dict]) -> Student:
    """The student before training: a hub model, or the tiny model built and cached locally."""
    model_cfg = cfg.model
    if model_cfg.tiny is None:
        if not model_cfg.hub_id:
            raise ValueError(f"model {model_cfg.name!r} sets neither hub_id nor tiny")
        return Student(model_cfg.hub_id, hash_key([model_cfg.hub_id, model_cfg.revision]))

    from stat_exp.student.models import build_tiny_model

    corpus = [r["problem"] + "\n" + r["solution"] for r in train[: model_cfg.tiny.tokenizer_corpus_size]]

    def compute(out: Path) -> dict:
        build_tiny_model(model_cfg.tiny, corpus, out)
        return {"corpus_rows": len(corpus)}

    artifact = store.stage(
        "model",
        config=OmegaConf.to_container(model_cfg.tiny),
        inputs={"corpus": fingerprint([{"text": t} for t in corpus])},
        version=TINY_MODEL_VERSION,
        compute=compute,
    )
    return Student(str(artifact.path), artifact.key)


def skill_catalogue(cfg: DictConfig, store: Store, tracker: Tracker, teacher: Callable, train: list[dict]) -> Artifact:
    """STAT step 1: {subject: [skill, ...]}, loaded from `task.skills.catalogue_file` or built by the teacher."""
    from stat_exp import skills

    spec = cfg.task.skills
    if spec.catalogue_file:
        path = Path(cfg.task.data_dir or ".") / spec.catalogue_file
        catalogue = skills.load_catalogue(path)  # read now: a bad file fails before anything is cached
        return store.stage(
            "skills",
            config={"file": str(path), "sha256": _file_hash(path)},
            version=SKILLS_VERSION,
            compute=lambda out: _save_catalogue(out, catalogue, []),
        )
    _require_teacher(cfg, "build the skill catalogue (or set task.skills.catalogue_file)")
    kinds = ("skill_extraction", "skill_clustering")

    def compute(out: Path) -> dict:
        (catalogue, records), usage = _metered(teacher, lambda: skills.extract_catalogue(teacher(), train, spec, cfg.seed))
        return _save_catalogue(out, catalogue, records) | {"teacher": usage}

    artifact = store.stage(
        "skills",
        config={"teacher": _teacher_identity(cfg, kinds), "skills": OmegaConf.to_container(spec), "seed": cfg.seed},
        inputs={"train": fingerprint(train)},
        version=SKILLS_VERSION,
        compute=compute,
    )
    _log_teacher_usage(tracker, artifact)
    return artifact


def skill_map(
    cfg: DictConfig, store: Store, tracker: Tracker, teacher: Callable, train: list[dict], catalogue: Artifact
) -> Artifact:
    """STAT step 2: every training question labelled with up to five skills of its subject."""
    from stat_exp import skills

    spec = cfg.task.skills
    catalogue_dict = json.loads((catalogue.path / "catalogue.json").read_text())
    if spec.map_file:
        path = Path(cfg.task.data_dir or ".") / spec.map_file
        config = {"file": str(path), "sha256": _file_hash(path), "max": spec.max_skills_per_question}

        def label() -> tuple[list[dict], dict]:
            return skills.load_skill_map(path, train, catalogue_dict, spec.max_skills_per_question), {}
    else:
        _require_teacher(cfg, "label the training questions (or set task.skills.map_file)")
        config = {"teacher": _teacher_identity(cfg, ("skill_labelling",)), "max": spec.max_skills_per_question}

        def label() -> tuple[list[dict], dict]:
            return _metered(teacher, lambda: skills.label_questions(teacher(), train, catalogue_dict,
                                                                    spec.max_skills_per_question))

    def compute(out: Path) -> dict:
        records, usage = label()
        write_jsonl(out / "rows.jsonl", records)
        return skills.map_summary(records) | ({"teacher": usage} if usage else {})

    artifact = store.stage(
        "skill_map",
        config=config,
        inputs={"train": fingerprint(train), "catalogue": catalogue.key},
        version=SKILLS_VERSION,
        compute=compute,
    )
    summary = artifact.summary
    tracker.log({f"skill_map/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    subject_of = {s: subject for subject, names in catalogue_dict.items() for s in names}
    tracker.table("skill_map/questions_per_skill", ["subject", "skill", "questions"],
                  [[subject_of.get(s), s, n] for s, n in summary["skill_counts"].items()])
    _log_teacher_usage(tracker, artifact)
    log.info("skill map: %d of %d questions labelled, %d unknown skill names dropped",
             summary["labelled"], summary["questions"], summary["unknown_skill_names"])
    return artifact


def evaluate_student(cfg: DictConfig, store: Store, tracker: Tracker, student: Student, *, label: str) -> dict:
    """Evaluate `student` on every configured benchmark (one cached artifact each) and log it."""
    results = {}
    for name in cfg.eval.benchmarks:
        rows = load_benchmark(cfg.task, name, limit=cfg.eval.limit)
        artifact = store.stage(
            "eval",
            config={
                "benchmark": name,
                "eval": OmegaConf.to_container(cfg.eval),
                "generator": OmegaConf.to_container(cfg.generator),
                "prompt": [cfg.model.instruction, cfg.model.system_prompt],
            },
            inputs={"model": student.key, "data": fingerprint(rows)},
            version=evaluation.VERSION,
            compute=lambda out, rows=rows: evaluation.evaluate(
                rows, out, cfg=cfg.eval, gen_cfg=cfg.generator, model_cfg=cfg.model, model_path=student.path
            ),
        )
        metrics = artifact.summary
        results[name] = metrics
        tracker.log({f"eval/{label}/{name}/{k}": v for k, v in metrics.items() if not k.startswith("by_")})
        for group in ("subject", "level", "skill"):
            breakdown = metrics.get(f"by_{group}")
            if breakdown:
                tracker.log({f"eval/{label}/{name}/by_{group}": breakdown})
                tracker.table(
                    f"eval/{label}/{name}/accuracy_by_{group}",
                    [group, "n", "accuracy"],
                    [[key, v["n"], v["accuracy"]] for key, v in breakdown.items()],
                )
        log.info("%s on %s: %s", label, name, {k: v for k, v in metrics.items() if not k.startswith("by_")})
    return results


def _lazy_teacher(cfg: DictConfig, store: Store) -> Callable:
    """The teacher client, made on first use: a rerun served from the cache needs no API key."""

    @cache
    def teacher():
        from stat_exp.teacher.client import Teacher

        return Teacher(cfg.teacher, store.root / "teacher")

    return teacher


def _metered(teacher: Callable, work: Callable):
    """work()'s result and the teacher usage it caused."""
    before = replace(teacher().usage)
    result = work()
    return result, teacher().usage.since(before).as_dict()


def _require_teacher(cfg: DictConfig, purpose: str) -> None:
    if cfg.teacher is None:
        raise ValueError(f"a teacher is needed to {purpose}: choose one, e.g. teacher=gpt-4o-mini")


def _teacher_identity(cfg: DictConfig, kinds: tuple[str, ...]) -> dict:
    """What makes the teacher's answers what they are: model, prompts and sampling (not speed settings)."""
    from stat_exp.teacher.prompts import template_source

    t = cfg.teacher
    return {
        "model": t.model,
        "parse_retries": t.parse_retries,
        "parse_retry_temperature": t.parse_retry_temperature,
        "kinds": {k: {"sampling": OmegaConf.to_container(t.sampling[k]),
                      "template": hashlib.sha256(template_source(k).encode()).hexdigest()[:12]} for k in kinds},
    }


def _save_catalogue(out: Path, catalogue: dict, records: list) -> dict:
    (out / "catalogue.json").write_text(json.dumps(catalogue, indent=1, ensure_ascii=False))
    write_jsonl(out / "rows.jsonl", records)
    return {"subjects": len(catalogue), "skills": sum(map(len, catalogue.values())),
            "fine_grained_unparsed": sum(1 for r in records if r.get("error"))}


def _log_teacher_usage(tracker: Tracker, artifact: Artifact) -> None:
    usage = artifact.summary.get("teacher")
    if usage:
        tracker.log({f"teacher/{artifact.stage}/{k}": v for k, v in usage.items()})


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
