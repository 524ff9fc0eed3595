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

    path: Optional[str] = None  # JSONL file relative to task.data_dir; used when data_dir holds it
    hub_id: Optional[str] = None  # Hugging Face dataset id; used otherwise
    hub_config: Optional[str] = None  # dataset config name (e.g. gsm8k's "main")
    split: str = "test"  # hub split
    fields: Dict[str, str] = field(default_factory=dict)  # our field -> source field renames
    answer_format: str = "boxed"  # boxed: last \boxed{} of the solution | gsm8k: text after '####'
    exclude_val: bool = False  # drop the validation questions (by problem text): MATH test minus validation = the paper's 4k MATH


@dataclass
class SkillsConfig:
    """Where the skill catalogue and the skill map come from: a file, or the teacher."""

    catalogue_file: Optional[str] = None  # {subject: [skill, ...]} JSON under task.data_dir; null = teacher extracts
    map_file: Optional[str] = None  # JSONL of {problem, skills} under task.data_dir; null = teacher labels
    extraction_questions: int = 100  # questions per subject the teacher names fine-grained skills for
    min_skills: int = 10  # coarse skills per subject asked of the clustering step
    max_skills: int = 25
    max_skills_per_question: int = 5


@dataclass
class WorldConfig:
    """Skillworld: arithmetic word problems generated with known skills (see tasks/skillworld.py)."""

    skills: List[str] = field(
        default_factory=lambda: ["add", "subtract", "multiply", "modulo", "compare", "digit_sum"]
    )
    # Scarce in pre-training. multiply is a table the student can learn in fine-tuning; modulo (a
    # division table 4x larger) is not learnt within a demo's budget, so it is not rare by default.
    rare_skills: List[str] = field(default_factory=lambda: ["multiply", "digit_sum"])
    rare_weight: float = 0.03  # sampling weight of a rare skill in the pre-training mixture (others: 1)
    max_skills_per_problem: int = 3
    max_operand: int = 20  # starting values and the numbers added, subtracted and compared with
    max_value: int = 99  # no number in a problem or its solution exceeds it (problems that would are redrawn)
    pretrain_size: int = 40000  # problems the tiny base student is pre-trained on
    # The training pool STAT selects from. Its rare skills are scarce too (10x less than the others),
    # as skills a student lacks are in real corpora; a uniform pool (1.0) makes plain SFT itself a
    # curriculum for them (a third of its problems multiply). 20000 hold ~800 that multiply.
    train_size: int = 20000
    train_rare_weight: float = 0.1
    val_size: int = 500
    test_size: int = 500
    # Out of distribution (the paper's OOD benchmarks): longer chains than any problem of pretrain,
    # train, val or test, uniform over skills; ood_val is probed by a continual round, ood_test held out.
    ood_min_skills: int = 4  # fewest steps of an OOD problem; must exceed max_skills_per_problem
    ood_max_skills: int = 4  # most steps of an OOD problem
    ood_val_size: int = 500
    ood_test_size: int = 500
    seed: int = 0


@dataclass
class TaskConfig:
    name: str = MISSING
    data_dir: Optional[str] = None  # local data root (e.g. ../shared/data); sources it lacks (or all, when null) use the hub
    train: DataSource = field(default_factory=DataSource)  # training pool
    # Validation's own source (the paper: MATH test). Null, or a pool read from data_dir while
    # task.val is not: validation is carved from the training pool instead.
    val: Optional[DataSource] = None
    val_size: int = 500  # questions moved from the training pool to the validation split (without task.val)
    val_source_size: int = 1000  # questions drawn from task.val; its rest is a benchmark with exclude_val
    split_seed: int = 0  # seed of the validation split
    benchmarks: Dict[str, DataSource] = field(default_factory=dict)  # evaluation sets by name
    skills: SkillsConfig = field(default_factory=SkillsConfig)
    world: Optional[WorldConfig] = None  # set: problems are generated (skillworld), not loaded
    license: Optional[str] = None  # the source data's licence (hub id, e.g. mit), written into exported dataset cards


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
class PretrainConfig:
    """Pre-training the locally built tiny model from scratch (skillworld's base student)."""

    steps: int = 1200  # about 5 minutes on 2 CPU cores for the tiny_pretrained model
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    hub_id: Optional[str] = None  # hub id or local path; null when the model is built locally
    revision: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    tiny: Optional[TinyModelConfig] = None  # set: build this model locally instead of loading hub_id
    pretrain: Optional[PretrainConfig] = None  # set (with tiny): pre-train it on the task's pre-training pool
    system_prompt: Optional[str] = None
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class GeneratorConfig:
    backend: str = "hf"  # hf (transformers, CPU default) | vllm (GPU, optional extra) | replay (recorded answers)
    batch_size: int = 16  # prompts per forward batch (hf)
    device: str = "auto"  # auto | cpu | cuda (hf)
    tensor_parallel_size: int = 1  # vllm: GPUs per engine (one model split across them)
    data_parallel_size: int = 1  # vllm: engines, each on its own tensor_parallel_size GPUs, splitting the prompts
    gpu_memory_utilization: float = 0.9  # vllm
    replay_from: Optional[str] = None  # replay: a previous run's rows.jsonl whose responses are graded again
    enforce_eager: bool = False  # vllm: skip torch.compile and graph capture (starts in seconds, decodes slower)
    shard_size: int = 256  # questions per shard that probe and eval write as they go (a killed stage keeps them)


@dataclass
class BenchmarkSampling:
    """One benchmark's sampling where it differs from eval's own (the paper: AMC23 and AIME at 64 samples, 1.0)."""

    samples: Optional[int] = None  # null: eval.samples
    temperature: Optional[float] = None  # null: eval.temperature


@dataclass
class EvalConfig:
    benchmarks: List[str] = field(default_factory=lambda: ["math500"])  # names in task.benchmarks
    per_benchmark: Dict[str, BenchmarkSampling] = field(default_factory=dict)  # benchmark name -> its own sampling
    limit: Optional[int] = None  # evaluate the first N questions of each benchmark
    samples: int = 1  # k: answers per question (avg@k and pass@k when k > 1)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int = 0
    grading_workers: int = 0  # 0: grade in the main process; N: a pool of N worker processes
    grading_timeout: float = 5.0  # seconds per answer before math-verify gives up


@dataclass
class Sampling:
    temperature: float = 0.0
    max_tokens: int = 1024


def _teacher_sampling() -> Dict[str, Sampling]:
    return {
        "skill_extraction": Sampling(0.0, 256),
        "skill_clustering": Sampling(0.0, 4096),
        "skill_labelling": Sampling(0.0, 512),
        "diagnosis": Sampling(0.0, 1024),
        "synthesis": Sampling(0.7, 2048),  # diverse new questions
        "solution": Sampling(0.7, 2048),  # independent solutions for the agreement filter
        "rewrite": Sampling(0.7, 2048),
    }


@dataclass
class TeacherConfig:
    """The teacher LLM, reached through litellm. API keys come from the environment only."""

    name: str = MISSING
    model: str = MISSING  # litellm model id: openai/gpt-4o-mini, anthropic/claude-..., openai/<served> + api_base
    models: Dict[str, str] = field(default_factory=dict)  # prompt kind -> litellm model; kinds not listed use `model`
    api_base: Optional[str] = None  # an OpenAI-compatible server (vLLM, SGLang, ...) instead of the provider
    api_key_env: Optional[str] = None  # env var with the key; null: the provider's default (OPENAI_API_KEY, ...)
    concurrency: int = 16  # requests in flight at once
    requests_per_minute: Optional[int] = None  # spacing between request starts; null = no limit
    max_retries: int = 5  # per request, on rate limits, 5xx, connection errors and time-outs
    backoff_initial: float = 1.0  # seconds before the first retry; doubles each time, with jitter
    backoff_max: float = 30.0
    timeout: float = 120.0  # seconds per request
    parse_retries: int = 2  # fresh samples asked for when an answer cannot be parsed
    parse_retry_temperature: float = 0.7  # so that a retry can differ from the unparsable answer
    max_cost_usd: Optional[float] = None  # stop (keeping every paid answer) once a run has spent this
    max_failed: int = 0  # requests a stage may leave failed after every retry and still be stored
    # Above this share of a stage's requests left unparsed after every attempt, the stage fails: the
    # teacher's format and the parser disagree, and a profile built on the rest would be skewed.
    max_unparsed_fraction: float = 0.1
    diagnosis_sees_reference: bool = False  # show the diagnosis the reference solution and answer (the paper's shows neither)
    sampling: Dict[str, Sampling] = field(default_factory=_teacher_sampling)  # per prompt kind
    # OpenAI and OpenAI-compatible servers (litellm provider "openai") are called through the openai SDK
    # directly, with litellm's parameter mapping and prices: ~2.5x less CPU a call. false: all through litellm.
    direct_openai: bool = True
    batch: bool = False  # a stage's uncached requests go through the provider's Batch API: half price, up to 24 h
    batch_poll_interval: float = 60.0  # seconds between retrievals of a submitted batch
    batch_completion_window: str = "24h"  # the provider's deadline; a batch past it expires with what it finished
    batch_max_requests: int = 50000  # requests per batch (OpenAI's limit); more are split into several


@dataclass
class DifficultyConfig:
    """Which probe answers are difficult (STAT step 4). Paper: one sample at temperature 0.1."""

    name: str = MISSING  # prm | outcome | consistency | length
    samples: int = 1  # probe answers per question (consistency needs >= 2)
    temperature: float = 0.1
    top_p: float = 1.0
    max_tokens: int = 1024
    test_benchmark: Optional[str] = "math500"  # probed too: its difficult questions form MATH-D
    # prm: difficult if last-step score <= tau1, or mean <= tau1, or any earlier step <= tau2
    prm_model: str = "RLHFlow/Llama3.1-8B-PRM-Mistral-Data"
    tau1: float = 0.85
    tau2: float = 0.7
    step_separator: str = "\n\n"  # a regex: how a response is cut into steps
    prm_batch_size: int = 8
    min_agreement: int = 2  # consistency: difficult if the most common answer appears fewer times
    min_words: int = 800  # length: difficult if the responses average at least this many words


@dataclass
class VariantConfig:
    """How the training data is made (STAT step 6): STAT-Sel, STAT-Syn, or a baseline."""

    name: str = MISSING  # sel | syn | train | augment | hard | embed_sel | embed_syn | none
    questions_per_pair: int = 5  # sel: training questions drawn per (difficult question, missing skill)
    answers_per_question: int = 3  # sel/augment/hard/embed_sel: answers each selected question brings
    answers: str = "both"  # sel/hard/embed_sel: reference | rewrite | both (the reference solution, then teacher rewrites)
    whole_pool: bool = False  # train: every training question once (the pool's size, not data.budget)
    examples_per_pair: int = 3  # syn: training questions with the skill shown to the teacher; embed_syn: group size
    new_questions: int = 2  # syn: questions the teacher writes per pair
    solutions_per_question: int = 3  # syn/embed_syn: teacher solutions per new question
    min_agreement: int = 2  # syn/embed_syn: keep a question when this many solutions agree on the final answer
    copy_threshold: float = 0.8  # syn/embed_syn: word overlap with an example above which a question is a near-copy
    hard_levels: List[int] = field(default_factory=lambda: [4, 5])  # hard
    embedding_model: str = "Alibaba-NLP/gte-Qwen2-7B-instruct"  # embed_*: sentence-transformers model (the paper's)
    embedding_remote_code: bool = True  # embed_*: run the model's own code from the hub (gte-Qwen2 ships its modeling)
    neighbours: int = 5  # embed_*: nearest training questions per difficult question (per pass for embed_sel)
    groups_per_question: int = 5  # embed_syn: new questions per difficult question, each from a different group
    max_passes: int = 100  # passes over the pairs (new draws or syntheses) before the budget is given up on


@dataclass
class DataConfig:
    budget: int = 9500  # question-answer pairs for every variant (paper: 9.5k, ~4k unique questions)
    seed: int = 0


@dataclass
class StatLoopConfig:
    rounds: int = 1  # probe -> profile -> data -> train, repeated on the improved student
    round_val: Optional[str] = None  # benchmark later rounds profile on (paper: MATH-perturb-hard); null = val again
    profile_after: bool = True  # step 9: probe and profile the trained student again, beside the base's profile


@dataclass
class SFTConfig:
    """Supervised fine-tuning with TRL's SFTTrainer; defaults are the paper's (QLoRA)."""

    name: str = MISSING  # qlora | lora | full
    learning_rate: float = 1e-4
    epochs: float = 3.0
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 2  # effective batch 8 on one device
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    weight_decay: float = 0.1
    group_by_length: bool = True
    max_length: int = 2048
    max_steps: int = -1  # > 0 caps training (tests, demos)
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    load_in_4bit: bool = True  # NF4 through bitsandbytes (GPU or CPU), computing in bf16 when bf16 is set
    optim: str = "paged_adamw_8bit"
    bf16: bool = True
    activation_checkpointing: bool = True  # TRL's default: memory for time; the weights trained are the same
    logging_steps: int = 10
    seed: int = 0
    num_processes: Optional[int] = None  # set: train in N data-parallel ranks per node (stat_exp.student.launch)
    save_merged: Optional[bool] = None  # LoRA: save merged weights too; null: if vllm/rl load them (else on demand)
    save_steps: int = 200  # checkpoint every N optimizer steps into the stage's unfinished folder (a rerun resumes)
    save_total_limit: int = 2  # checkpoints kept (the oldest are deleted); none stay in the finished artifact


@dataclass
class RLConfig:
    """GRPO with TRL's GRPOTrainer; defaults are the paper's."""

    name: str = MISSING  # grpo
    learning_rate: float = 5e-7
    lr_scheduler: str = "constant"
    beta: float = 0.0  # KL coefficient (none)
    num_generations: int = 4  # rollouts per question
    max_completion_length: int = 2048
    questions_per_batch: int = 256  # questions sampled in one generation round
    questions_per_update: int = 64  # mini-batch: questions per gradient update (256 / 64 = 4 updates a round)
    epochs: float = 6.0  # TRL has no entropy bonus, so the paper's entropy coefficient 0 needs no setting
    temperature: float = 1.0
    rewards: List[str] = field(default_factory=lambda: ["correctness"])  # names in stat_exp.rewards
    reward_weights: Optional[List[float]] = None
    max_steps: int = -1
    bf16: bool = True
    activation_checkpointing: bool = True  # TRL's default: memory for time; the weights trained are the same
    logging_steps: int = 10
    seed: int = 0
    save_steps: int = 50  # checkpoint every N optimizer steps into the stage's unfinished folder (a rerun resumes)
    save_total_limit: int = 2  # checkpoints kept (the oldest are deleted); none stay in the finished artifact
    num_processes: Optional[int] = None  # set: train in N data-parallel ranks per node (stat_exp.student.launch)


@dataclass
class LoggerConfig:
    name: str = MISSING  # wandb | none
    project: str = "stat_exp"
    entity: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; null = WANDB_MODE, else online iff logged in to W&B
    tags: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    cache_dir: str = "outputs/cache"  # content-addressed artifacts, shared by every run


@dataclass
class StatConfig:
    """The root config. Groups with no implementation yet stay null."""

    task: TaskConfig = MISSING
    model: ModelConfig = MISSING
    teacher: Optional[TeacherConfig] = None
    variant: VariantConfig = MISSING
    difficulty: Optional[DifficultyConfig] = None
    generator: GeneratorConfig = MISSING
    sft: Optional[SFTConfig] = None
    rl: Optional[RLConfig] = None
    eval: EvalConfig = field(default_factory=EvalConfig)  # conf/eval/ or a recipe may replace it
    logger: LoggerConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    stat: StatLoopConfig = field(default_factory=StatLoopConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    experiment_name: str = "default"  # W&B group and run-folder name
    seed: int = 0


def register_configs() -> None:
    ConfigStore.instance().store(name="schema", node=StatConfig)


# A key holds a secret when its last word (after `_`, `-` or `.`) ends in `key`, `keys` or `token`
# (api_key, private_key, aws_secret_access_key, hf_token, apiKey), or it contains `secret`,
# `password`, `passwd` or `credential` anywhere. Names whose last word is something else name no
# secret: max_tokens and num_*_tokens (counts), tokenizer_*, pad_token_id, num_key_value_heads,
# api_key_env (the name of a variable, not its value).
SECRET_LAST_WORD = re.compile(r"(key|keys|token)$")
SECRET_PART = re.compile(r"secret|password|passwd|credential")
MASK = "***"


def mask_secrets(node: Any) -> Any:
    """A copy of a plain config container with every secret-looking value replaced by ***."""
    if isinstance(node, dict):
        return {
            k: MASK if is_secret(k) and node[k] not in (None, "") else mask_secrets(node[k])
            for k in node
        }
    if isinstance(node, list):
        return [mask_secrets(v) for v in node]
    return node


def is_secret(key: Any) -> bool:
    """Whether a config key (its last dotted part, e.g. of an override) names a secret."""
    name = str(key).lower()
    return bool(SECRET_LAST_WORD.search(re.split(r"[_.\-]", name)[-1]) or SECRET_PART.search(name))
