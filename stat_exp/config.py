"""Structured configs: the single source of defaults, registered in Hydra's ConfigStore.

`conf/config.yaml` starts its defaults list with `schema`, so every group's YAML is merged
into these dataclasses: a misspelled key or a value of the wrong type fails at start-up.
This module imports nothing heavy; `python -m stat_exp --cfg job` must stay fast.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DataSource:
    """Where one split of a task lives: a local JSONL file, or a Hugging Face dataset."""

    path: Optional[str] = None  # JSONL file relative to task.data_dir; used when data_dir is set
    hub_id: Optional[str] = None  # Hugging Face dataset id; used when data_dir is null
    hub_config: Optional[str] = None  # dataset config name (e.g. gsm8k's "main")
    split: str = "test"  # hub split
    fields: Dict[str, str] = field(default_factory=dict)  # our field -> source field renames
    answer_format: str = "boxed"  # boxed: last \boxed{} of the solution | gsm8k: text after '####'


@dataclass
class TaskConfig:
    name: str = MISSING
    data_dir: Optional[str] = None  # local data root (e.g. ../shared/data); null = Hugging Face hub
    train: DataSource = field(default_factory=DataSource)  # training pool; validation is carved from it
    val_size: int = 500  # questions moved from the training pool to the validation split
    split_seed: int = 0  # seed of the validation split
    benchmarks: Dict[str, DataSource] = field(default_factory=dict)  # evaluation sets by name


@dataclass
class TinyModelConfig:
    """A small Qwen2 model with its own BPE tokenizer, built locally (no hub)."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    tokenizer_corpus_size: int = 2000  # training-pool rows the tokenizer is trained on
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    hub_id: Optional[str] = None  # hub id or local path; null when the model is built locally
    revision: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    tiny: Optional[TinyModelConfig] = None  # set: build this model locally instead of loading hub_id
    system_prompt: Optional[str] = None
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class GeneratorConfig:
    backend: str = "hf"  # hf (transformers, CPU default) | vllm (GPU, optional extra)
    batch_size: int = 16  # prompts per forward batch (hf)
    device: str = "auto"  # auto | cpu | cuda (hf)
    tensor_parallel_size: int = 1  # vllm
    gpu_memory_utilization: float = 0.9  # vllm


@dataclass
class EvalConfig:
    benchmarks: List[str] = field(default_factory=lambda: ["math500"])  # names in task.benchmarks
    limit: Optional[int] = None  # evaluate the first N questions of each benchmark
    samples: int = 1  # k: answers per question (avg@k and pass@k when k > 1)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int = 0
    grading_workers: int = 0  # 0: grade in the main process; N: a pool of N worker processes
    grading_timeout: float = 5.0  # seconds per answer before math-verify gives up


@dataclass
class VariantConfig:
    name: str = MISSING  # none: no training data, evaluation only


@dataclass
class LoggerConfig:
    name: str = MISSING  # wandb | none
    project: str = "stat_exp"
    entity: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; null = online iff WANDB_API_KEY is set
    tags: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    cache_dir: str = "outputs/cache"  # content-addressed artifacts, shared by every run


@dataclass
class StatConfig:
    """The root config. Groups with no implementation yet stay null."""

    task: TaskConfig = MISSING
    model: ModelConfig = MISSING
    teacher: Optional[Any] = None
    variant: VariantConfig = MISSING
    difficulty: Optional[Any] = None
    generator: GeneratorConfig = MISSING
    sft: Optional[Any] = None
    rl: Optional[Any] = None
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    experiment_name: str = "default"  # W&B group and run-folder name
    seed: int = 0


def register_configs() -> None:
    ConfigStore.instance().store(name="schema", node=StatConfig)


# Whole words of a key: hf_token and api_key are secrets, max_tokens and tokenizer_* are not.
SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|password)(_|$)", re.IGNORECASE)
MASK = "***"


def mask_secrets(node: Any) -> Any:
    """A copy of a plain config container with every secret-looking value replaced by ***."""
    if isinstance(node, dict):
        return {
            k: MASK if _is_secret(k) and node[k] not in (None, "") else mask_secrets(node[k])
            for k in node
        }
    if isinstance(node, list):
        return [mask_secrets(v) for v in node]
    return node


def _is_secret(key: Any) -> bool:
    return bool(SECRET_KEY.search(str(key)))
