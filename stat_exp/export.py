"""`python -m stat_exp.export RUN_DIR OUT_DIR [--hub-id ORG/NAME]`: a run's training data as a
Hugging Face dataset, to train on with another trainer or to publish.

OUT_DIR gets the `DatasetDict` (`save_to_disk`; split `train`, or `round1`, `round2`, ... for the
continual variant), the Missing-Skill-Profile (`profile.json`) and the teacher's diagnoses
(`diagnoses.jsonl`) it was drawn for, and a dataset card (`README.md` with the hub's YAML
metadata). With `--hub-id` the same goes to the hub (`push_to_hub`).
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

from stat_exp.store import MANIFEST, read_jsonl, write_jsonl

COLUMNS = ("question", "answer", "messages", "skills", "origin", "source", "lineage")


class ExportError(ValueError):
    """The folder given is not a run whose training data can be exported."""


def export(run_dir: Path, out_dir: Path, hub_id: str | None = None):
    """Write the run's training data, profile, diagnoses and card to `out_dir`; push to `hub_id` if given."""
    from datasets import Dataset, DatasetDict

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    metrics, config = _run_files(run_dir)
    cache = Path(metrics.get("cache_dir") or config["paths"]["cache_dir"])
    keys = list(dict.fromkeys(e["key"] for e in metrics.get("stages", []) if e["stage"] == "data"))
    if not keys:
        raise ExportError(f"{run_dir} has no training data: its run made none (variant="
                          f"{config['variant']['name']}), or stopped before the data stage")
    manifests = [_manifest(cache / "data" / key) for key in keys]
    splits = {"train": keys[0]} if len(keys) == 1 else {f"round{i}": key for i, key in enumerate(keys, start=1)}
    dataset = DatasetDict({
        split: Dataset.from_list([{c: row.get(c) for c in COLUMNS} for row in read_jsonl(cache / "data" / key / "rows.jsonl")])
        for split, key in splits.items()
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset.save_to_disk(str(out_dir))

    profile_key = manifests[0]["inputs"].get("profile")
    profile = _manifest(cache / "profile" / profile_key)["summary"] if profile_key else None
    extra = []
    if profile is not None:
        (out_dir / "profile.json").write_text(json.dumps(profile, indent=1, ensure_ascii=False))
        write_jsonl(out_dir / "diagnoses.jsonl", read_jsonl(cache / "profile" / profile_key / "rows.jsonl"))
        extra = ["profile.json", "diagnoses.jsonl"]
    card = dataset_card(metrics, config, [m["summary"] for m in manifests], profile, dataset)
    card.save(out_dir / "README.md")
    if hub_id:
        from huggingface_hub import HfApi

        dataset.push_to_hub(hub_id)
        card.push_to_hub(hub_id, repo_type="dataset")
        for name in extra:
            HfApi().upload_file(path_or_fileobj=str(out_dir / name), path_in_repo=name, repo_id=hub_id,
                                repo_type="dataset")
    return dataset


def dataset_card(metrics: dict, config: dict, cards: list[dict], profile: dict | None, dataset):
    """The hub's dataset card: YAML metadata, then what made the data and what it holds."""
    from huggingface_hub import DatasetCard, DatasetCardData

    teacher = config.get("teacher") or {}
    models = {"default": teacher.get("model"), **(teacher.get("models") or {})} if teacher else {}
    variant = config["variant"]["name"]
    pairs = sum(len(split) for split in dataset.values())
    metadata = DatasetCardData(
        license=config["task"].get("license") or "other",
        language=["en"],
        task_categories=["text-generation"],
        tags=["stat", "skill-targeted-adaptive-training", f"variant-{variant}", config["task"]["name"]],
        size_categories=["n<1K" if pairs < 1000 else "1K<n<10K" if pairs < 10_000 else "10K<n<100K"],
        pretty_name=f"STAT {variant} data for {config['model']['name']}",
    )
    student = config["model"].get("hub_id") or config["model"]["name"]
    lines = [
        f"# STAT training data: variant `{variant}`",
        "",
        "Question-answer pairs made by [stat_exp](https://arxiv.org/abs/2510.10023) (Skill-Targeted Adaptive "
        "Training) for the student below. Each row's `lineage` says why it is here.",
        "",
        f"- **Command:** `{_command(metrics)}`",
        f"- **Student:** `{student}`",
        f"- **Teacher:** {', '.join(f'{kind}: `{model}`' for kind, model in models.items()) or 'none'}",
        f"- **Task:** `{config['task']['name']}` (source data licence: {config['task'].get('license') or 'unknown'})",
        f"- **Budget:** {cards[0]['budget']} pairs; made: {', '.join(str(c['pairs']) for c in cards)}; "
        f"unique questions: {', '.join(str(c['unique_questions']) for c in cards)}",
        f"- **Origins:** {', '.join(json.dumps(c['origins']) for c in cards)}",
        f"- **Splits:** {', '.join(f'{name} ({len(split)})' for name, split in dataset.items())}",
    ]
    if profile is not None:
        top = list(profile["profile"].items())[:10]
        lines += ["", f"## Missing-Skill-Profile ({profile['difficult']} difficult validation answers)", "",
                  "| skill | difficult questions missing it |", "|---|---|",
                  *[f"| {skill} | {n} |" for skill, n in top],
                  "", "The whole profile is in `profile.json`, the teacher's diagnoses in `diagnoses.jsonl`."]
    return DatasetCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _run_files(run_dir: Path) -> tuple[dict, dict]:
    metrics, config = run_dir / "metrics.json", run_dir / "config.yaml"
    if not metrics.exists() or not config.exists():
        raise ExportError(f"{run_dir} is not a stat_exp run folder: it lacks metrics.json or config.yaml")
    return json.loads(metrics.read_text()), yaml.safe_load(config.read_text())


def _manifest(artifact_dir: Path) -> dict:
    path = artifact_dir / MANIFEST
    if not path.exists():
        raise ExportError(f"{artifact_dir} is missing from the cache (removed by `stat_exp.cache gc`?): rerun the "
                          "experiment to make it again")
    return json.loads(path.read_text())


def _command(metrics: dict) -> str:
    return " ".join(["python -m stat_exp", *metrics.get("run", {}).get("overrides", [])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stat_exp.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (outputs/runs/... or a sweep job's folder)")
    parser.add_argument("out_dir", type=Path, help="where the dataset, profile and card are written")
    parser.add_argument("--hub-id", help="also push to this Hugging Face dataset repo (ORG/NAME)")
    args = parser.parse_args(argv)
    try:
        dataset = export(args.run_dir, args.out_dir, args.hub_id)
    except ExportError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {', '.join(f'{k} ({len(v)} rows)' for k, v in dataset.items())} to {args.out_dir}"
          + (f" and pushed to {args.hub_id}" if args.hub_id else ""))


if __name__ == "__main__":
    main()
