"""What a run needs on this machine, checked before any stage runs.

The paper's recipe needs a teacher's API key, a GPU for the PRM and for 4-bit QLoRA, vLLM when
chosen, and the hub (or a local copy) for its models and data sets. `check` lists everything
this machine lacks for the stages the config will run, each with the override that avoids it,
so one try of a command says all there is to fix; `require` stops the run with that list.

The checks follow the config, not the artifact cache: whether a stage is cached is known only
from its key, which hashes its inputs' artifacts (and the teacher's answers), so knowing it
would mean running the upstream stages. A rerun served from the cache needs the same machine.
"""

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from stat_exp.pipeline import uses_teacher
from stat_exp.tasks import is_local
from stat_exp.tasks.loader import val_from_source

LOCAL_DATA = "../shared/data"  # the project's local copy of MATH, MATH500, AIME24 and AMC23: what to suggest
CONNECT_TIMEOUT = 3.0  # seconds to wait for the hub or the teacher's server to accept a connection


@dataclass(frozen=True)
class Missing:
    """One thing the run needs and this machine lacks."""

    what: str  # the need and why it is not met
    fix: str  # the override (or step) that avoids it


@dataclass
class Machine:
    """What this machine has, as far as a run is concerned (`Machine.probe()` finds out)."""

    gpu: bool
    vllm: bool
    # Whether the Hugging Face hub answers (and HF_HUB_OFFLINE is not set); None until asked, and
    # asked only when a model or data set the run needs has no local copy: no needless traffic.
    hub: bool | None = None

    @staticmethod
    def probe() -> "Machine":
        import torch

        return Machine(gpu=torch.cuda.is_available(), vllm=importlib.util.find_spec("vllm") is not None)

    def reaches_hub(self) -> bool:
        if self.hub is None:
            self.hub = _hub_reachable()
        return self.hub


def require(cfg: DictConfig) -> None:
    """Stop the run (exit status 1, no traceback) when this machine lacks anything it needs."""
    missing = check(cfg, Machine.probe())
    if missing:
        raise SystemExit(report(missing))


def report(missing: list[Missing]) -> str:
    """The message that lists every missing item with its fix."""
    lines = [f"This run cannot start here: {len(missing)} thing(s) missing. Each with the override that avoids it:"]
    for item in missing:
        lines += [f"  - {item.what}", f"      -> {item.fix}"]
    return "\n".join(lines)


def check(cfg: DictConfig, machine: Machine) -> list[Missing]:
    """Everything the stages of `cfg` need that `machine` lacks."""
    return [*_teacher(cfg), *_gpu_and_models(cfg, machine), *_data(cfg, machine)]


def _teacher(cfg: DictConfig) -> list[Missing]:
    """The teacher's credentials, or its server when it is a local one; none for skillworld's oracle."""
    from stat_exp.teacher import oracle

    t = cfg.teacher
    if t is None or not uses_teacher(cfg) or oracle.serves(t.model):
        return []
    avoid = ("teacher=local teacher.api_base=http://HOST:PORT/v1 (any OpenAI-compatible server), "
             "or teacher=oracle with task=skillworld")
    if t.api_base:
        if _connects(t.api_base):
            return []
        return [Missing(f"the teacher's server {t.api_base} does not answer", f"start it, or {avoid}")]
    models = [t.model, *(OmegaConf.select(cfg, "teacher.models", default=None) or {}).values()]
    if t.api_key_env:
        keys = [] if os.environ.get(t.api_key_env) else [t.api_key_env]
    else:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else litellm fetches prices from GitHub
        import litellm

        keys = [k for m in dict.fromkeys(models) for k in litellm.validate_environment(model=m)["missing_keys"]]
    return [Missing(f"teacher={t.name} ({', '.join(dict.fromkeys(models))}) needs {key}, which is not set",
                    f"export {key}=..., or {avoid}") for key in dict.fromkeys(keys)]


def _gpu_and_models(cfg: DictConfig, machine: Machine) -> list[Missing]:
    missing = []
    model = cfg.model
    trains = cfg.variant.name != "none" and cfg.sft is not None
    if model.tiny is None:
        missing += _hub_model(model.hub_id, machine, "the student",
                              f"model.hub_id=/path/to/a/copy of {model.hub_id} (or model=tiny to try the pipeline)")
    d = cfg.difficulty
    if d is not None and d.name == "prm":
        if not machine.gpu and not Path(d.prm_model).is_dir():  # a local (e.g. a test's tiny) PRM may run on a CPU
            missing.append(Missing(f"difficulty=prm scores steps with {d.prm_model} on a GPU: this machine has none",
                                   "difficulty=outcome"))
        missing += _hub_model(d.prm_model, machine, "difficulty=prm's reward model", "difficulty=outcome")
    if trains and cfg.sft.load_in_4bit and model.tiny is None and not machine.gpu:
        missing.append(Missing(f"sft={cfg.sft.name} loads {model.hub_id} in 4 bits (bitsandbytes), which needs a GPU",
                               "sft=lora"))
    if cfg.generator.backend == "vllm":
        if not machine.vllm:
            missing.append(Missing("generator=vllm needs vLLM, which is not installed",
                                   "generator=hf, or pip install -e '.[vllm]'"))
        if not machine.gpu:
            missing.append(Missing("generator=vllm needs a GPU: this machine has none", "generator=hf"))
    if cfg.variant.name in ("embed_sel", "embed_syn"):
        v = cfg.variant
        missing += _hub_model(v.embedding_model, machine, f"variant={v.name}'s embedding model",
                              "variant.embedding_model=/path/to/a/copy")
    return missing


def _hub_model(hub_id: str, machine: Machine, role: str, fix: str) -> list[Missing]:
    if Path(hub_id).is_dir() or _cached(hub_id, "model") or machine.reaches_hub():
        return []
    return [Missing(f"{role} {hub_id} is on the hub, which {_no_hub()}, and is not in the local cache",
                    f"{fix}; or `huggingface-cli download {hub_id}` where the hub answers")]


def _data(cfg: DictConfig, machine: Machine) -> list[Missing]:
    """The training pool, validation and the benchmarks this run reads: local files or the hub."""
    task = cfg.task
    if task.world is not None:  # generated
        return []
    sources = {f"{task.name}-train": task.train}
    if val_from_source(task):
        sources[f"{task.name}-val"] = task.val
    test_benchmark = cfg.difficulty.test_benchmark if cfg.difficulty is not None else None
    # Names the task lacks are left to the loader, which lists the task's benchmarks.
    sources |= {name: task.benchmarks[name] for name in [*cfg.eval.benchmarks, test_benchmark] if name in task.benchmarks}
    unreadable = {name: why for name, source in sources.items() if (why := _unreadable(source, task.data_dir, machine))}
    # The project's copy fixes what it holds, when no data_dir is chosen (validation is then carved from its pool).
    local_copy = LOCAL_DATA if task.data_dir is None and is_local(task.train, LOCAL_DATA) else None
    fixable = [n for n in unreadable if local_copy and (n == f"{task.name}-val" or is_local(sources[n], local_copy))]
    lost = [n for n in unreadable if n not in fixable]
    missing = []
    if fixable:
        missing.append(Missing(_grouped({n: unreadable[n] for n in fixable}), f"task.data_dir={local_copy}"))
    for name in lost:
        if name not in cfg.eval.benchmarks:
            fix = ("difficulty.test_benchmark=null (no MATH-D)" if name == test_benchmark else
                   f"task.data_dir=a folder that holds {sources[name].path or task.train.path}")
            missing.append(Missing(f"{name}: {unreadable[name]}", fix))
    if lost_benchmarks := [b for b in cfg.eval.benchmarks if b in lost]:
        keep = ",".join(b for b in cfg.eval.benchmarks if b not in lost_benchmarks)
        files = ", ".join(p for b in lost_benchmarks if (p := task.benchmarks[b].path))
        missing.append(Missing(_grouped({n: unreadable[n] for n in lost_benchmarks}), f"eval.benchmarks=[{keep}]"
                               + (f" (or task.data_dir=a folder that holds {files})" if files else "")))
    return missing


def _grouped(reasons: dict[str, str]) -> str:
    """'a, b: why; c: why else': data sets that fail for the same reason, named together."""
    names: dict[str, list[str]] = {}
    for name, why in reasons.items():
        names.setdefault(why, []).append(name)
    return "; ".join(f"{', '.join(group)}: {why}" for why, group in names.items())


def _unreadable(source, data_dir: str | None, machine: Machine) -> str | None:
    """Why the rows of `source` cannot be read on this machine, or None."""
    if is_local(source, data_dir):
        return None
    if source.hub_id is None:
        return "no hub copy, and " + (f"no file under {data_dir}" if data_dir else "no task.data_dir")
    if _cached(source.hub_id, "dataset") or machine.reaches_hub():
        return None
    return f"on the hub, which {_no_hub()}, and not in the local cache"


def _no_hub() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return "HF_HUB_OFFLINE forbids" if offline else "this machine cannot reach"


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    return _connects(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def _connects(url: str) -> bool:
    """Whether the host of `url` accepts a TCP connection (no request is sent)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


def _cached(hub_id: str, repo_type: str) -> bool:
    """Whether the hub's local cache (or the datasets library's) holds a copy of `hub_id`."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{hub_id.replace('/', '--')}"
    if (folder / "snapshots").is_dir() and any((folder / "snapshots").iterdir()):
        return True
    if repo_type == "dataset":
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
        return (datasets_cache / hub_id.replace("/", "___")).is_dir()
    return False
