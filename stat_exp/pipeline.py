"""The STAT pipeline: the stages in order, each a cached artifact in the store.

skills -> skill_map -> probe -> difficulty -> profile -> data (-> sft -> rl), then eval.
`run` reads top to bottom as the method; each stage function below turns its config and
its inputs' artifacts into its own artifact.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import yaml
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from stat_exp import evaluate as evaluation
from stat_exp.code_fingerprint import digest, module_code, stage_code
from stat_exp.store import Artifact, Store, hash_key, write_jsonl
from stat_exp.tasks import fingerprint, load_benchmark, load_train_val, split_note
from stat_exp.tracking import Tracker, resolved_config

log = logging.getLogger(__name__)

DIAGNOSED_VARIANTS = ("sel", "syn")  # built from the Missing-Skill-Profile
PROBED_VARIANTS = ("sel", "syn", "embed_sel", "embed_syn")  # built from the difficult questions
# Training settings that change how a stage runs, not what it makes: kept out of its key.
# Activation checkpointing recomputes the same activations (RNG state included): measured bit-identical.
_NOT_IN_RESULT = ("save_steps", "save_total_limit", "save_merged", "activation_checkpointing")


def _result_settings(training: DictConfig, *also: str) -> dict:
    """The settings of `training` (sft or rl) that its stage key holds: all but `_NOT_IN_RESULT` and `also`."""
    return {k: v for k, v in OmegaConf.to_container(training).items() if k not in (*_NOT_IN_RESULT, *also)}


@dataclass(frozen=True)
class Student:
    """A model the generation backends can load, and the key that identifies its weights."""

    path: str
    key: str


@dataclass(frozen=True)
class Diagnosis:
    """Steps 3-5 for one student: its probe answers, which are difficult, and (with a teacher) why."""

    probes: dict[str, Artifact]  # "val", and "test" when difficulty.test_benchmark is set
    verdicts: Artifact
    profile: Artifact | None  # None without a skill catalogue


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the experiment described by `cfg`; return the metrics also written to metrics.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_config(cfg), sort_keys=False))
    store = Store(Path(to_absolute_path(cfg.paths.cache_dir)), run_dir=run_dir)
    tracker = Tracker(cfg, run_dir)
    try:
        _check(cfg)
        train, val = load_train_val(cfg.task)
        if note := split_note(cfg.task):
            log.warning("%s (pool %d questions, validation %d)", note, len(train), len(val))
        teacher = _lazy_teacher(cfg, store)
        catalogue = smap = None
        if cfg.teacher is not None or cfg.task.skills.catalogue_file or cfg.task.skills.map_file:
            catalogue = skill_catalogue(cfg, store, tracker, teacher, train)  # step 1
            smap = skill_map(cfg, store, tracker, teacher, train, catalogue)  # step 2
        student = base_student(cfg, store, tracker, train)
        before = diagnose(cfg, store, tracker, teacher, student, val, catalogue, label="base")  # steps 3-5
        benchmarks = _benchmarks(cfg, before)
        evaluate_student(cfg, store, tracker, student, benchmarks, label="base")
        diagnosis, probed, stage = before, val, "base"
        later_val = round_validation(cfg, val) if cfg.stat.rounds > 1 else val  # loaded before any training
        for round_ in range(1, cfg.stat.rounds + 1):
            if cfg.variant.name == "none":
                break
            data = training_data(cfg, store, tracker, teacher, train, probed, smap, catalogue, diagnosis)  # step 6
            if cfg.sft is None:
                break
            student = finetune(cfg, store, tracker, student, data, label=f"sft{round_}")  # step 7
            stage = "sft"
            if round_ < cfg.stat.rounds:  # the continual variant (section 3.3): diagnose the improved student again
                probed = later_val
                diagnosis = diagnose(cfg, store, tracker, teacher, student, probed, catalogue,
                                     label=f"round{round_ + 1}")
        if cfg.rl is not None:
            student = reinforce(cfg, store, tracker, student, train)  # step 8
            stage = "rl"
        if stage != "base":  # step 9: evaluation and the profile after training
            evaluate_student(cfg, store, tracker, student, benchmarks, label=stage)
            _compare_skill_accuracy(tracker, stage)
            if cfg.stat.profile_after:
                after = diagnose(cfg, store, tracker, teacher, student, val, catalogue, label="after")
                _compare_profiles(tracker, before, after)
        _summary_table(tracker)
    except (SystemExit, KeyboardInterrupt):
        # SLURM preempting or timing out the job (submitit exits it to requeue), or ^C: W&B is
        # left open so that the requeued job resumes the same run.
        tracker.stopped = True
        raise
    finally:
        store.close()
        tracker.metrics["stages"] = [vars(e) for e in store.events]
        tracker.metrics["cache_dir"] = str(store.root)  # where `python -m stat_exp.export` finds them
        tracker.log({f"cache/{status}": sum(e.status == status for e in store.events) for status in ("computed", "reused")})
        metrics_path = tracker.finish()
    log.info("stages: %s", ", ".join(f"{e.stage} {e.status}" for e in store.events))
    for e in store.events:
        if e.reason:
            log.info("recomputed %s %s: %s", e.stage, e.key, e.reason)
    log.info("metrics written to %s", metrics_path)
    return tracker.metrics


def round_validation(cfg: DictConfig, val: list[dict]) -> list[dict]:
    """The questions a later round of the continual variant builds its profile on: the benchmark
    `stat.round_val` (the paper: MATH-perturb-hard), or, when null, the same validation questions."""
    if cfg.stat.round_val is None:
        log.info("stat.round_val is null: rounds after the first probe the same %d validation questions again",
                 len(val))
        return val
    rows = load_benchmark(cfg.task, cfg.stat.round_val)
    log.info("rounds after the first build their profile on %s (%d questions)", cfg.stat.round_val, len(rows))
    return rows


def base_student(cfg: DictConfig, store: Store, tracker: Tracker, train: list[dict]) -> Student:
    """The student before training: a hub model, or the tiny model built locally (and, with
    `model.pretrain`, pre-trained from scratch), each step a cached artifact."""
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
        code=stage_code("model"),
        compute=compute,
    )
    student = Student(str(artifact.path), artifact.key)
    return student if model_cfg.pretrain is None else pretrained(cfg, store, tracker, student)


def pretrained(cfg: DictConfig, store: Store, tracker: Tracker, student: Student) -> Student:
    """The freshly built `student` pre-trained on the task's "pretrain" split (skillworld's base)."""
    from stat_exp.student.pretrain import pretrain

    if cfg.task.world is None:
        raise ValueError(f"model={cfg.model.name} pre-trains on the task's 'pretrain' split, which task "
                         f"{cfg.task.name!r} lacks: use task=skillworld, or a model without pretrain")
    rows = load_benchmark(cfg.task, "pretrain")
    prompt = {"instruction": cfg.model.instruction, "system_prompt": cfg.model.system_prompt}
    artifact = store.stage(
        "pretrain",
        config={"pretrain": OmegaConf.to_container(cfg.model.pretrain), "prompt": list(prompt.values())},
        inputs={"model": student.key, "data": fingerprint(rows)},
        code=stage_code("pretrain"),
        compute=lambda out: pretrain(Path(student.path), rows, cfg.model.pretrain, out, device=cfg.generator.device,
                                     **prompt),
    )
    tracker.log({f"pretrain/{k}": v for k, v in artifact.summary.items()})
    log.info("base student pre-trained: %s", artifact.summary)
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
            code=stage_code("skills"),
            compute=lambda out: _save_catalogue(out, catalogue, []),
        )
    _require_teacher(cfg, "build the skill catalogue (or set task.skills.catalogue_file)")
    kinds = ("skill_extraction", "skill_clustering")

    def compute(out: Path) -> dict:
        (catalogue, records), usage = _metered(cfg, teacher, lambda: skills.extract_catalogue(teacher(), train, spec, cfg.seed))
        return _save_catalogue(out, catalogue, records) | {"teacher": usage}

    artifact = store.stage(
        "skills",
        config={"teacher": _teacher_identity(cfg, kinds), "skills": OmegaConf.to_container(spec), "seed": cfg.seed},
        inputs={"train": fingerprint(train)},
        code=stage_code("skills"),
        compute=compute,
        incomplete=_catalogue_incomplete,
    )
    _log_teacher_usage(tracker, artifact)
    return artifact


def skill_map(
    cfg: DictConfig, store: Store, tracker: Tracker, teacher: Callable, train: list[dict], catalogue: Artifact
) -> Artifact:
    """STAT step 2: every training question labelled with up to five skills of its subject."""
    from stat_exp import skills

    spec = cfg.task.skills
    catalogue_dict = _catalogue(catalogue)
    if spec.map_file:
        path = Path(cfg.task.data_dir or ".") / spec.map_file
        config = {"file": str(path), "sha256": _file_hash(path), "max": spec.max_skills_per_question}

        def label() -> tuple[list[dict], dict]:
            return skills.load_skill_map(path, train, catalogue_dict, spec.max_skills_per_question), {}
    else:
        _require_teacher(cfg, "label the training questions (or set task.skills.map_file)")
        config = {"teacher": _teacher_identity(cfg, ("skill_labelling",)), "max": spec.max_skills_per_question}

        def label() -> tuple[list[dict], dict]:
            return _metered(cfg, teacher, lambda: skills.label_questions(teacher(), train, catalogue_dict,
                                                                    spec.max_skills_per_question))

    def compute(out: Path) -> dict:
        records, usage = label()
        write_jsonl(out / "rows.jsonl", records)
        return skills.map_summary(records) | ({"teacher": usage} if usage else {})

    artifact = store.stage(
        "skill_map",
        config=config,
        inputs={"train": fingerprint(train), "catalogue": catalogue.key},
        code=stage_code("skill_map"),
        compute=compute,
        incomplete=_map_incomplete,
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


def diagnose(cfg: DictConfig, store: Store, tracker: Tracker, teacher: Callable, student: Student, val: list[dict],
             catalogue: Artifact | None, *, label: str) -> Diagnosis | None:
    """Probe the student, classify its difficult answers, and profile their missing skills."""
    if cfg.difficulty is None:
        return None
    probes = probe(cfg, store, student, val, math_d=label == "base")
    verdicts = difficulty(cfg, store, tracker, probes, label=label)
    missing = None
    if catalogue is not None:
        missing = profile(cfg, store, tracker, teacher, val, probes["val"], verdicts, catalogue, label=label)
    return Diagnosis(probes, verdicts, missing)


def probe(cfg: DictConfig, store: Store, student: Student, val: list[dict], *, math_d: bool) -> dict[str, Artifact]:
    """STAT step 3: the student answers the validation questions and, with `math_d`, the benchmark
    whose difficult questions form MATH-D. Only the base student's MATH-D is used: a trained
    student is evaluated on that benchmark instead (step 9)."""
    d = cfg.difficulty
    splits = {"val": val}
    if math_d and d.test_benchmark:
        splits["test"] = load_benchmark(cfg.task, d.test_benchmark)
    artifacts = {}
    for split, rows in splits.items():
        def compute(out: Path, rows=rows) -> dict:
            records = evaluation.answer_and_grade(
                rows, out, model_path=student.path, model_cfg=cfg.model, gen_cfg=cfg.generator, eval_cfg=cfg.eval,
                samples=d.samples, temperature=d.temperature, top_p=d.top_p, max_tokens=d.max_tokens, seed=cfg.seed)
            return evaluation.summarize(records)

        artifacts[split] = store.stage(
            "probe",
            config={"split": split, "sampling": [d.samples, d.temperature, d.top_p, d.max_tokens, cfg.seed],
                    "generator": _generator_key(cfg),
                    "prompt": [cfg.model.instruction, cfg.model.system_prompt]},
            inputs={"model": student.key, "data": fingerprint(rows)},
            code=stage_code("probe"),
            compute=compute,
        )
    return artifacts


def difficulty(cfg: DictConfig, store: Store, tracker: Tracker, probes: dict[str, Artifact], *, label: str) -> Artifact:
    """STAT step 4: which probe answers are difficult; the difficult test questions form MATH-D."""
    from stat_exp import difficulty as classifiers

    d = cfg.difficulty

    def compute(out: Path) -> dict:
        summary = {}
        for split, artifact in probes.items():
            records = artifact.rows()
            verdicts = classifiers.classify(records, d)
            write_jsonl(out / f"{split}.jsonl", [{"id": r["id"]} | v for r, v in zip(records, verdicts)])
            summary[split] = {"questions": len(records), "difficult": sum(v["difficult"] for v in verdicts)}
            if d.name != "outcome":  # how the classifier agrees with being wrong (the paper's Table 11)
                outcome = classifiers.classify(records, OmegaConf.merge(d, {"name": "outcome"}))
                summary[split]["vs_outcome"] = classifiers.agreement(verdicts, outcome)
        return summary

    artifact = store.stage(
        "difficulty",
        config=OmegaConf.to_container(d),
        inputs={split: a.key for split, a in probes.items()},
        code=stage_code("difficulty"),
        compute=compute,
    )
    for split, numbers in artifact.summary.items():
        tracker.log({f"difficulty/{label}/{split}/{k}": v for k, v in numbers.items() if not isinstance(v, dict)})
        for k, v in numbers.get("vs_outcome", {}).items():
            tracker.log({f"difficulty/{label}/{split}/vs_outcome/{k}": v})
        log.info("difficulty (%s, %s) on %s: %d of %d questions difficult", d.name, label, split,
                 numbers["difficult"], numbers["questions"])
    return artifact


def profile(cfg: DictConfig, store: Store, tracker: Tracker, teacher: Callable, val: list[dict], probe_val: Artifact,
            verdicts: Artifact, catalogue: Artifact, *, label: str) -> Artifact:
    """STAT step 5: the teacher diagnoses each difficult answer; f(s) counts the missing skills."""
    from stat_exp import profile as profiles

    _require_teacher(cfg, "diagnose the difficult answers")
    catalogue_dict = _catalogue(catalogue)

    def compute(out: Path) -> dict:
        solutions = {row["id"]: row["solution"] for row in val}  # shown with teacher.diagnosis_sees_reference
        records = [r | {"solution": solutions.get(r["id"], "")} for r in probe_val.rows()]
        diagnoses, usage = _metered(cfg, teacher, lambda: profiles.diagnose(teacher(), records, verdicts.rows("val"),
                                                                       catalogue_dict))
        write_jsonl(out / "rows.jsonl", diagnoses)
        return profiles.profile_summary(diagnoses) | {"teacher": usage}

    artifact = store.stage(
        "profile",
        config={"teacher": _teacher_identity(cfg, ("diagnosis",)),
                "sees_reference": cfg.teacher.diagnosis_sees_reference},
        inputs={"probe": probe_val.key, "difficulty": verdicts.key, "catalogue": catalogue.key},
        code=stage_code("profile"),
        compute=compute,
        incomplete=_profile_incomplete,
    )
    tracker.link(artifact, "dataset", produced=_computed(store, artifact))
    summary = artifact.summary
    f = summary["profile"]
    tracker.log({f"profile/{label}/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.log({f"profile/{label}/f": f})
    tracker.table(f"profile/{label}", ["skill", "missing"], [[s, n] for s, n in f.items()], bar=True)
    profiles.plot_profiles({label: f}, tracker.run_dir / f"profile_{label}.png")
    (tracker.run_dir / f"profile_{label}.json").write_text(json.dumps(summary, indent=1))
    _log_teacher_usage(tracker, artifact)
    log.info("Missing-Skill-Profile (%s): %d difficult, %d judged incorrect; top skills %s", label,
             summary["difficult"], summary["judged_incorrect"], list(f.items())[:5])
    return artifact


def training_data(cfg: DictConfig, store: Store, tracker: Tracker, teacher: Callable, train: list[dict],
                  val: list[dict], smap: Artifact | None, catalogue: Artifact | None,
                  diagnosis: Diagnosis | None) -> Artifact:
    """STAT step 6: the variant's question-answer pairs at the data budget, with a data card."""
    from stat_exp.data import DataInputs, build_training_data

    v = cfg.variant
    verdicts = diagnosis.verdicts if diagnosis else None
    diagnoses = diagnosis.profile if diagnosis else None
    if v.name in DIAGNOSED_VARIANTS and diagnoses is None:
        raise ValueError(f"variant={v.name} needs the Missing-Skill-Profile: set difficulty (e.g. difficulty=outcome), "
                         "a teacher, and a skill catalogue")
    if v.name in PROBED_VARIANTS and verdicts is None:
        raise ValueError(f"variant={v.name} needs the difficult questions: set difficulty (e.g. difficulty=outcome)")
    upstream = {"train": fingerprint(train)} | {
        name: a.key for name, a in [("skill_map", smap), ("difficulty", verdicts), ("profile", diagnoses)] if a}

    def compute(out: Path) -> dict:
        difficult_ids = {r["id"] for r in verdicts.rows("val") if r["difficult"]} if verdicts else set()
        inputs = DataInputs(
            train=train,
            skill_map={r["id"]: r["skills"] for r in smap.rows()} if smap else {},
            catalogue=_catalogue(catalogue) if catalogue else {},
            diagnoses=diagnoses.rows() if diagnoses else [],
            difficult=[r for r in val if r["id"] in difficult_ids],
            teacher=teacher,
        )
        (pairs, card), usage = _metered(cfg, teacher, lambda: build_training_data(inputs, v, cfg.data.budget,
                                                                                  cfg.data.seed))
        write_jsonl(out / "rows.jsonl", pairs)
        return card | ({"teacher": usage} if usage else {})

    # Only the teacher's identity enters the key, and only for variants that ask it something.
    artifact = store.stage(
        "data",
        config={"variant": OmegaConf.to_container(v), "data": OmegaConf.to_container(cfg.data),
                "teacher": _teacher_identity(cfg, ("rewrite", "synthesis", "solution")) if asks_teacher(v) else None},
        inputs=upstream,
        code=stage_code("data"),
        compute=compute,
        incomplete=_teacher_incomplete,
    )
    if diagnoses is not None:
        tracker.link(diagnoses, "dataset", produced=False)  # the profile the data was drawn for
    tracker.link(artifact, "dataset", produced=_computed(store, artifact))
    card = artifact.summary
    tracker.log({f"data/{k}": v for k, v in card.items() if isinstance(v, (int, float, bool))})
    tracker.log({"data/card": card})
    profile_f = card["profile"]
    tracker.table("data/skills", ["skill", "pairs", "profile"],
                  [[s, card["skill_histogram"].get(s, 0), profile_f.get(s, 0)]
                   for s in dict.fromkeys([*profile_f, *card["skill_histogram"]])])
    tracker.table("data/sample", ["question", "answer", "skills", "origin", "lineage"],
                  [[p["question"], p["answer"], ", ".join(p["skills"]), p["origin"], json.dumps(p["lineage"])]
                   for p in artifact.rows()[:20]])
    _log_teacher_usage(tracker, artifact)
    log.info("data (%s): %d pairs of the %d budget, %d unique questions, origins %s", v.name, card["pairs"],
             card["budget"], card["unique_questions"], card["origins"])
    return artifact


def finetune(cfg: DictConfig, store: Store, tracker: Tracker, student: Student, data: Artifact, *,
             label: str) -> Student:
    """STAT step 7: supervised fine-tuning on the variant's data (TRL SFTTrainer).

    A LoRA student is its adapter (transformers loads base plus adapter) unless a later stage
    needs plain full weights: vLLM generation and GRPO load a merged checkpoint.
    """
    from stat_exp.student.launch import launch
    from stat_exp.student.sft import ensure_merged, train_sft

    needs_merged = cfg.generator.backend == "vllm" or cfg.rl is not None
    sft_cfg = OmegaConf.merge(cfg.sft, {"save_merged": needs_merged if cfg.sft.save_merged is None
                                        else cfg.sft.save_merged})

    def compute(out: Path) -> dict:
        rows = [{"question": p["question"], "answer": p["answer"]} for p in data.rows()]
        if sft_cfg.num_processes:  # this stage alone fans out to data-parallel ranks
            return launch("sft", sft_cfg.num_processes, student.path, rows, sft_cfg, out, model_cfg=cfg.model)
        return train_sft(student.path, rows, sft_cfg, out, model_cfg=cfg.model, report_to=tracker.report_to)

    artifact = store.stage(
        "sft",
        # N ranks multiply SFT's effective batch, so num_processes stays in the key.
        config={"sft": _result_settings(cfg.sft),
                "prompt": [cfg.model.instruction, cfg.model.system_prompt]},
        inputs={"model": student.key, "data": data.key},
        code=stage_code("sft"),
        compute=compute,
    )
    tracker.link(data, "dataset", produced=False)  # what it was trained on
    tracker.link(artifact, "model", produced=_computed(store, artifact))
    tracker.log({f"train/{label}/{k}": v for k, v in artifact.summary.items() if isinstance(v, (int, float))})
    model = artifact.path / "model"
    if cfg.sft.lora and needs_merged:  # kept adapter-only (sft.save_merged=false, or `cache gc --merged-weights`)
        model = ensure_merged(artifact.path, student.path, cfg.model)
    return Student(str(model if model.exists() else artifact.path / "adapter"), artifact.key)


def reinforce(cfg: DictConfig, store: Store, tracker: Tracker, student: Student, train: list[dict]) -> Student:
    """STAT step 8 (optional): GRPO on the training questions with rewards named in `rl.rewards`."""
    from stat_exp.student.grpo import train_grpo
    from stat_exp.student.launch import launch

    def compute(out: Path) -> dict:
        rows = [{"problem": r["problem"], "answer": r["answer"]} for r in train]
        if cfg.rl.num_processes:  # this stage alone fans out to data-parallel ranks
            return launch("grpo", cfg.rl.num_processes, student.path, rows, cfg.rl, out, model_cfg=cfg.model,
                          options={"use_vllm": cfg.generator.backend == "vllm"})
        return train_grpo(student.path, rows, cfg.rl, out, model_cfg=cfg.model,
                          use_vllm=cfg.generator.backend == "vllm", report_to=tracker.report_to)

    artifact = store.stage(
        "rl",
        # GRPO divides its gradient accumulation by the ranks: their number does not change the model.
        config={"rl": _result_settings(cfg.rl, "num_processes"),
                "prompt": [cfg.model.instruction, cfg.model.system_prompt]},
        inputs={"model": student.key, "train": fingerprint(train)},
        code=stage_code("rl"),
        compute=compute,
    )
    tracker.log({f"train/rl/{k}": v for k, v in artifact.summary.items() if isinstance(v, (int, float))})
    return Student(str(artifact.path / "model"), artifact.key)


def evaluate_student(cfg: DictConfig, store: Store, tracker: Tracker, student: Student,
                     benchmarks: dict[str, list[dict]], *, label: str) -> dict:
    """STAT step 9: evaluate `student` on every benchmark (one cached artifact each) and log it."""
    results = {}
    for name, rows in benchmarks.items():
        eval_cfg = evaluation.benchmark_config(cfg.eval, name)
        artifact = store.stage(
            "eval",
            config={
                "benchmark": name,
                "eval": {k: v for k, v in OmegaConf.to_container(eval_cfg).items() if k not in ("benchmarks",
                                                                                              "per_benchmark")},
                "generator": _generator_key(cfg),
                "prompt": [cfg.model.instruction, cfg.model.system_prompt],
            },
            inputs={"model": student.key, "data": fingerprint(rows)},
            code=stage_code("eval"),
            compute=lambda out, rows=rows, eval_cfg=eval_cfg: evaluation.evaluate(
                rows, out, cfg=eval_cfg, gen_cfg=cfg.generator, model_cfg=cfg.model, model_path=student.path
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


def _benchmarks(cfg: DictConfig, diagnosis: Diagnosis | None) -> dict[str, list[dict]]:
    """The configured benchmarks, and MATH-D: the test questions the base student found difficult."""
    benchmarks = {name: load_benchmark(cfg.task, name, limit=cfg.eval.limit) for name in cfg.eval.benchmarks}
    if diagnosis is not None and "test" in diagnosis.probes:
        difficult = {r["id"] for r in diagnosis.verdicts.rows("test") if r["difficult"]}
        rows = [r for r in load_benchmark(cfg.task, cfg.difficulty.test_benchmark) if r["id"] in difficult]
        if rows:
            benchmarks[f"{cfg.difficulty.test_benchmark}_d"] = rows
    return benchmarks


def _compare_profiles(tracker: Tracker, before: Diagnosis | None, after: Diagnosis | None) -> None:
    """The profile after training beside the profile before: which skills' failure counts fell."""
    from stat_exp.profile import plot_profiles

    if before is None or after is None or before.profile is None or after.profile is None:
        return
    f_before, f_after = before.profile.summary["profile"], after.profile.summary["profile"]
    skills = list(dict.fromkeys([*f_before, *f_after]))
    rows = [[s, f_before.get(s, 0), f_after.get(s, 0), f_before.get(s, 0) - f_after.get(s, 0)] for s in skills]
    tracker.table("profile/before_after", ["skill", "before", "after", "fell_by"], rows)
    tracker.log({"profile/skills_fell": sum(r[3] > 0 for r in rows), "profile/skills_rose": sum(r[3] < 0 for r in rows)})
    plot_profiles({"before": f_before, "after": f_after}, tracker.run_dir / "profile_before_after.png",
                  title="Missing-Skill-Profile before and after training")


def _compare_skill_accuracy(tracker: Tracker, stage: str) -> None:
    """Per-skill accuracy of the trained student beside the base student's, per benchmark."""
    from stat_exp.compare import skill_accuracy
    from stat_exp.plots import bar_chart

    results = tracker.metrics.get("eval", {})
    for name, base in results.get("base", {}).items():
        accuracy = {"base": skill_accuracy(base), stage: skill_accuracy(results.get(stage, {}).get(name, {}))}
        if not accuracy["base"] or not accuracy[stage]:
            continue
        skills = list(dict.fromkeys([*accuracy["base"], *accuracy[stage]]))
        tracker.table(f"eval/skill_accuracy/{name}", ["skill", "base", stage, "gain"],
                      [[s, accuracy["base"].get(s), accuracy[stage].get(s),
                        round(accuracy[stage].get(s, 0) - accuracy["base"].get(s, 0), 4)] for s in skills])
        bar_chart(accuracy, tracker.run_dir / f"skill_accuracy_{name}.png", order=skills, xlabel="accuracy",
                  title=f"Accuracy by skill on {name}, before and after training")


def _summary_table(tracker: Tracker) -> None:
    """Benchmark x stage accuracy, in metrics.json, W&B and the log."""
    results = tracker.metrics.get("eval", {})
    stages = list(results)
    names = list(dict.fromkeys(name for stage in stages for name in results[stage]))
    if not names:
        return
    rows = [[name, *[results[stage].get(name, {}).get("pass@1") for stage in stages]] for name in names]
    tracker.table("summary", ["benchmark", *stages], rows)
    tracker.metrics["summary"] = {name: dict(zip(stages, row[1:])) for name, row in zip(names, rows)}
    width = max(len(n) for n in names) + 2
    lines = [f"{'pass@1':<{width}}" + "".join(f"{s:>10}" for s in stages)]
    lines += [f"{row[0]:<{width}}" + "".join(f"{'-' if v is None else f'{v:.3f}':>10}" for v in row[1:]) for row in rows]
    log.info("summary\n%s", "\n".join(lines))


def _lazy_teacher(cfg: DictConfig, store: Store) -> Callable:
    """The teacher client, made on first use: a rerun served from the cache needs no API key."""

    @cache
    def teacher():
        from stat_exp.teacher import oracle
        from stat_exp.teacher.client import Teacher

        _require_teacher(cfg, f"run variant={cfg.variant.name}")
        if oracle.serves(cfg.teacher.model) and cfg.task.world is not None:
            oracle.register(OmegaConf.to_object(cfg.task.world))  # it writes new problems in this world's numbers
        return Teacher(cfg.teacher, store.root / "teacher")

    return teacher


def _check(cfg: DictConfig) -> None:
    """Config combinations that would fail late, failed early with what to change."""
    if cfg.variant.name in PROBED_VARIANTS and cfg.difficulty is None:
        raise ValueError(f"variant={cfg.variant.name} needs difficult questions: choose a classifier, "
                         "e.g. difficulty=outcome (or difficulty=prm, the paper's)")
    if cfg.variant.name in DIAGNOSED_VARIANTS and cfg.teacher is None:
        raise ValueError(f"variant={cfg.variant.name} needs a teacher to diagnose missing skills, e.g. teacher=gpt-4o-mini")
    unknown = sorted(set(cfg.eval.per_benchmark) - set(cfg.task.benchmarks))
    if unknown and cfg.task.world is None:
        raise ValueError(f"eval.per_benchmark names {unknown}, not benchmarks of task {cfg.task.name} "
                         f"({sorted(cfg.task.benchmarks)})")


def asks_teacher(variant: DictConfig) -> bool:
    """Whether the variant's data needs the teacher (rewrites, new questions, their solutions)."""
    return variant.name in ("syn", "embed_syn", "augment") or (variant.name in ("sel", "hard", "embed_sel")
                                                                and variant.answers != "reference")


def uses_teacher(cfg: DictConfig) -> bool:
    """Whether the run asks its teacher anything: a catalogue or map not loaded from files, the profile, the data."""
    spec, v = cfg.task.skills, cfg.variant
    return cfg.teacher is not None and (not spec.catalogue_file or not spec.map_file or asks_teacher(v)
                                        or (v.name in DIAGNOSED_VARIANTS and cfg.difficulty is not None))


def _metered(cfg: DictConfig, teacher: Callable, work: Callable):
    """work()'s result and the teacher usage it caused ({} without a teacher).

    Raises when the stage's teacher requests are not whole: more failed after every retry than
    `teacher.max_failed`, or more than `teacher.max_unparsed_fraction` of them never parsed.
    """
    if cfg.teacher is None:
        return work(), {}
    from stat_exp.teacher.client import TeacherFailed

    client = teacher()
    before, unparsed_before = client.usage.snapshot(), len(client.unparsed_answers)
    result = work()
    usage = client.usage.since(before)
    limit = cfg.teacher.max_failed
    if usage.failed > limit:
        raise TeacherFailed(client.failure_report(usage.failed, usage.requests, usage.errors, "this stage"))
    if usage.requests and usage.unparsed / usage.requests > cfg.teacher.max_unparsed_fraction:
        examples = "\n".join(f"  {raw[:300]!r}" for raw in client.unparsed_answers[unparsed_before:][:3])
        raise TeacherFailed(
            f"{usage.unparsed} of {usage.requests} teacher answers could not be parsed after every attempt, more than "
            f"teacher.max_unparsed_fraction={cfg.teacher.max_unparsed_fraction}: the teacher's format and the parser "
            f"disagree, and what parsed would skew the result. Some of the answers:\n{examples}")
    summary = usage.as_dict()
    if usage.failed:
        summary["failures_accepted"] = limit
        log.warning("%d failed teacher requests accepted (teacher.max_failed=%d): %s", usage.failed, limit, usage.errors)
    return result, summary


def _teacher_incomplete(summary: dict) -> str | None:
    """Why a stage's stored output is not whole on account of its teacher (None when it is)."""
    usage = summary.get("teacher") or {}
    failed = usage.get("failed", 0)
    if failed > usage.get("failures_accepted", 0):
        return f"{failed} of its teacher requests failed"
    return None


def _require_teacher(cfg: DictConfig, purpose: str) -> None:
    if cfg.teacher is None:
        raise ValueError(f"a teacher is needed to {purpose}: choose one, e.g. teacher=gpt-4o-mini")


def _catalogue_incomplete(summary: dict) -> str | None:
    return "the skill catalogue has no skills" if not summary.get("skills") else _teacher_incomplete(summary)


def _map_incomplete(summary: dict) -> str | None:
    if summary.get("questions") and not summary.get("labelled"):
        return f"none of the {summary['questions']} questions was labelled with a skill"
    return _teacher_incomplete(summary)


def _profile_incomplete(summary: dict) -> str | None:
    if summary.get("difficult") and summary.get("unparsed") == summary["difficult"]:
        return f"none of the {summary['difficult']} difficult answers was diagnosed"
    return _teacher_incomplete(summary)


def _teacher_identity(cfg: DictConfig, kinds: tuple[str, ...]) -> dict:
    """What makes the teacher's answers what they are: model, prompts and sampling (not speed settings)."""
    from stat_exp.teacher import oracle
    from stat_exp.teacher.client import model_for
    from stat_exp.teacher.prompts import template_source

    t = cfg.teacher
    identity = {
        "parse_retries": t.parse_retries,
        "parse_retry_temperature": t.parse_retry_temperature,
        "kinds": {k: {"model": model_for(t, k), "sampling": OmegaConf.to_container(t.sampling[k]),
                      "template": hashlib.sha256(template_source(k).encode()).hexdigest()[:12]} for k in kinds},
    }
    if any(oracle.serves(model_for(t, k)) for k in kinds):  # skillworld's teacher: its answers follow its code and world
        identity["oracle"] = {"code": digest(module_code(oracle.__name__)), "world": OmegaConf.to_container(cfg.task.world)}
    return identity


def _computed(store: Store, artifact: Artifact) -> bool:
    """Whether this run computed `artifact` (rather than reusing it from the cache)."""
    return any(e.key == artifact.key and e.stage == artifact.stage and e.status == "computed" for e in store.events)


def _catalogue(artifact: Artifact) -> dict:
    return json.loads((artifact.path / "catalogue.json").read_text())


def _save_catalogue(out: Path, catalogue: dict, records: list) -> dict:
    (out / "catalogue.json").write_text(json.dumps(catalogue, indent=1, ensure_ascii=False))
    write_jsonl(out / "rows.jsonl", records)
    return {"subjects": len(catalogue), "skills": sum(map(len, catalogue.values())),
            "fine_grained_unparsed": sum(1 for r in records if r.get("error"))}


def _log_teacher_usage(tracker: Tracker, artifact: Artifact) -> None:
    usage = artifact.summary.get("teacher")
    if usage:
        tracker.log({f"teacher/{artifact.stage}/{k}": v for k, v in usage.items()})


def _generator_key(cfg: DictConfig) -> dict:
    """The generator settings that can change answers: data parallelism splits the prompts but keeps
    each one's seed, so its answers are one engine's (stat_exp.student.generation.DataParallelGenerator)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.generator).items() if k != "data_parallel_size"}


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
