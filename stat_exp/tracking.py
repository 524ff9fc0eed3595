"""Experiment tracking: one W&B run per job, and the same figures as files in the run folder.

W&B is online when the user is logged in (`wandb login` or WANDB_API_KEY, as wandb itself
decides), offline otherwise, unless logger.mode or WANDB_MODE says; `logger=none` keeps only the
files. wandb is imported only when a W&B run is started.
"""

import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from stat_exp.config import MASK, is_secret, mask_secrets

log = logging.getLogger(__name__)


def resolved_config(cfg: DictConfig) -> dict:
    """The resolved config as plain data with secrets masked: what may be saved or logged."""
    return mask_secrets(OmegaConf.to_container(cfg, resolve=True))


class Tracker:
    """Collects metrics for `metrics.json` and mirrors them to W&B when a run is active."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.run_dir = Path(run_dir)
        # Who this run is, for tables that compare the runs of a sweep (stat_exp/compare.py).
        self.metrics: dict[str, Any] = {"run": {"name": _run_name(self.run_dir), "variant": cfg.variant.name,
                                                "experiment": cfg.experiment_name, "overrides": _overrides()}}
        self.wandb_run = None
        self._produced: set[str] = set()  # W&B artifacts this run logged as its outputs
        self.stopped = False  # the job is being stopped (preempted, timed out, interrupted), not ending
        if cfg.logger.name == "wandb":
            self.wandb_run = _start_wandb(cfg, self.run_dir)
        elif cfg.logger.name != "none":
            raise ValueError(f"unknown logger {cfg.logger.name!r}; choose wandb or none")

    @property
    def report_to(self) -> str:
        """What TRL should report its training curves to: this job's W&B run, when there is one."""
        return "wandb" if self.wandb_run is not None else "none"

    def log(self, metrics: dict[str, Any]) -> None:
        """Record flat `a/b/c` metrics: nested into metrics.json, flat into W&B."""
        for name, value in metrics.items():
            node = self.metrics
            *parents, leaf = name.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        # A job being stopped may have lost W&B's service already (SLURM stops every process of the
        # job): an error here would replace the exit that lets submitit requeue it.
        if self.wandb_run is not None and not self.stopped:
            self.wandb_run.log(metrics)

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, bar: bool = False) -> None:
        """A `wandb.Table` (and, with `bar`, a bar chart of its first two columns) and the same
        rows as JSON under `tables/` in the run folder."""
        path = self.run_dir / "tables" / f"{name.replace('/', '.')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"columns": list(columns), "rows": [list(r) for r in rows]}, indent=1))
        if self.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
            self.wandb_run.log({name: table})
            if bar:
                self.wandb_run.log({f"{name}_chart": wandb.plot.bar(table, columns[0], columns[1], title=name)})

    def link(self, artifact, kind: str, *, produced: bool) -> None:
        """Record a store artifact in W&B's lineage graph: an output of the run that computed it,
        an input of every other run that reads it. Files are referenced, never uploaded."""
        if self.wandb_run is None:
            return
        import wandb

        name = f"{artifact.stage}-{artifact.key}"
        if not produced and name in self._produced:
            return
        record = wandb.Artifact(name, type=kind, metadata=artifact.summary)
        # Checksums read every file: cheap for data, not for model weights.
        record.add_reference(artifact.path.resolve().as_uri(), checksum=kind != "model")
        if produced:
            self.wandb_run.log_artifact(record)
            self._produced.add(name)
        elif self.wandb_run.settings._offline:
            # use_artifact refuses offline runs; this is the record it writes online for a new
            # artifact, so `wandb sync` replays the use and the lineage graph is the same.
            self.wandb_run._log_artifact(record, is_user_created=True, use_after_commit=True)
        else:
            self.wandb_run.use_artifact(record)

    def finish(self) -> Path:
        path = self.run_dir / "metrics.json"
        path.write_text(json.dumps(self.metrics, indent=2, default=str))
        if self.wandb_run is not None and self.stopped:
            # SLURM is stopping every process of the job. W&B's service may be gone already (then the
            # run stays open), or still running (then it is closed, so that the id is free): either
            # way the requeued job resumes this run under the same id.
            try:
                self.wandb_run.finish(exit_code=1)
            except Exception as err:  # the lost service surfaces as one of several wandb-internal types
                log.warning("job stopped: W&B run %s left open (%s: %s); the requeued job resumes it",
                            self.wandb_run.id, type(err).__name__, err)
        elif self.wandb_run is not None:
            self.wandb_run.summary.update(_flatten(self.metrics))
            self.wandb_run.finish()
        self.wandb_run = None
        return path


def wandb_mode(cfg: DictConfig) -> tuple[str, str]:
    """(mode, why): logger.mode or WANDB_MODE when set, else online iff wandb finds credentials
    (WANDB_API_KEY, or the ~/.netrc that `wandb login` writes), asked of wandb without a prompt."""
    if cfg.logger.mode:
        return cfg.logger.mode, "logger.mode"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    import wandb

    if wandb.login(prompt=False, verify=False):
        return "online", "W&B credentials found (WANDB_API_KEY or `wandb login`)"
    return "offline", "no W&B credentials: run `wandb login` or set WANDB_API_KEY to log online"


def _start_wandb(cfg: DictConfig, run_dir: Path):
    import wandb

    mode, why = wandb_mode(cfg)
    log.info("W&B %s: %s", mode, why)
    # W&B records the command line with the run: an override that sets a secret must not reach it.
    argv, sys.argv = sys.argv, [_masked_override(arg) for arg in sys.argv]
    try:
        run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.experiment_name,
            job_type=cfg.variant.name,  # the dashboard compares variants side by side
            name=_run_name(run_dir),
            tags=list(cfg.logger.tags),
            config=resolved_config(cfg),
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",  # a multirun job never writes into the previous job's run
            # One id per run folder: a job requeued after preemption or a time-out goes on in the same run.
            id=hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12],
            resume="allow",
        )
    finally:
        sys.argv = argv
    log.info("W&B run %s (%s) in %s", run.id, mode, run_dir)
    return run


def _masked_override(arg: str) -> str:
    """`key=value` with the value masked when the key names a secret; any other argument as it is."""
    key, sep, _ = arg.partition("=")
    return f"{key}={MASK}" if sep and is_secret(key.split(".")[-1]) else arg


def _run_name(run_dir: Path) -> str:
    """The job's overrides (e.g. `model=qwen,variant=sel`), else the run folder's name.

    Hydra's `override_dirname`, rebuilt the way Hydra builds it, but with the value of an override
    that sets a secret (`+x.hf_token=...`) masked: the name reaches metrics.json and W&B.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return run_dir.name
    hydra_cfg = HydraConfig.get()
    spec = hydra_cfg.job.config.override_dirname
    overrides = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    lines = sorted(_masked_override(o.input_line) for o in overrides if o.key_or_group not in spec.exclude_keys)
    return re.sub("=", spec.kv_sep, spec.item_sep.join(lines)) or run_dir.name


def _overrides() -> list[str]:
    """The command-line overrides that made this job (a sweep job's own values included), secrets masked."""
    from hydra.core.hydra_config import HydraConfig

    return [_masked_override(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []


def _flatten(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat
