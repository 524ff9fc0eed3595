"""The STAT pipeline: the stages in order, each a cached artifact in the store.

Implemented so far: the student (built locally for `model=tiny`, else a hub id) and its
evaluation on the configured benchmarks.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from stat_exp import evaluate as evaluation
from stat_exp.store import Store, hash_key
from stat_exp.tracking import Tracker, resolved_config

log = logging.getLogger(__name__)

TINY_MODEL_VERSION = "1"


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
        student = base_student(cfg, store)
        evaluate_student(cfg, store, tracker, student, label="base")
    finally:
        tracker.metrics["stages"] = [vars(e) for e in store.events]
        tracker.log({f"cache/{status}": sum(e.status == status for e in store.events) for status in ("computed", "reused")})
        metrics_path = tracker.finish()
    log.info("stages: %s", ", ".join(f"{e.stage} {e.status}" for e in store.events))
    log.info("metrics written to %s", metrics_path)
    return tracker.metrics


def base_student(cfg: DictConfig, store: Store) -> Student:
    """The student before training: a hub model, or the tiny model built and cached locally."""
    model_cfg = cfg.model
    if model_cfg.tiny is None:
        if not model_cfg.hub_id:
            raise ValueError(f"model {model_cfg.name!r} sets neither hub_id nor tiny")
        return Student(model_cfg.hub_id, hash_key([model_cfg.hub_id, model_cfg.revision]))

    from stat_exp.student.models import build_tiny_model
    from stat_exp.tasks import fingerprint, load_train_val

    train, _ = load_train_val(cfg.task)
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


def evaluate_student(cfg: DictConfig, store: Store, tracker: Tracker, student: Student, *, label: str) -> dict:
    """Evaluate `student` on every configured benchmark (one cached artifact each) and log it."""
    from stat_exp.tasks import fingerprint, load_benchmark

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
