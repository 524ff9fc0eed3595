"""The real config composes for every group option, and bad overrides fail clearly."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from helpers import ROOT, compose_config
from stat_exp.config import MASK, mask_secrets, register_configs

CONF = ROOT / "conf"
GROUPS = ["task", "model", "teacher", "generator", "eval", "variant", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_config(f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group in ("task", "model", "teacher", "variant", "logger"):
        assert cfg[group].name == option


def test_model_presets_name_the_papers_students():
    assert compose_config("model=qwen").model.hub_id == "Qwen/Qwen2.5-3B"
    assert compose_config("model=llama").model.hub_id == "meta-llama/Llama-3.2-3B-Instruct"
    tiny = compose_config("model=tiny").model
    assert tiny.hub_id is None and tiny.tiny.num_layers >= 1


def test_misspelled_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("eval.limt=3")
    assert "limt" in str(err.value.__cause__ or err.value)


def test_wrong_type_fails_naming_the_value():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("eval.samples=many")
    assert "many" in str(err.value.__cause__ or err.value)


def test_unknown_group_option_fails():
    with pytest.raises(ConfigCompositionException, match="model/qwn"):
        compose_config("model=qwn")


SECRET_NAMES = ["api_key", "key", "hf_token", "token", "access_token", "aws_secret_access_key", "private_key",
                "client_secret", "credentials", "gcp_credential_file", "password", "db_passwd", "apiKey",
                "accessToken", "api_keys", "WANDB_API_KEY", "secret"]
NOT_SECRET_NAMES = ["max_tokens", "api_key_env", "tokenizer_corpus_size", "num_prompt_tokens", "completion_tokens",
                    "max_new_tokens", "pad_token_id", "num_key_value_heads", "keyword", "name"]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_key_that_names_a_secret_is_masked_at_any_depth(name):
    # An unset secret (None or "") stays as it is: the saved config shows that it was not set.
    cfg = {name: "CANARY", "teacher": {name: "CANARY", "base": {name: None}, "other": {name: ""}}, "list": [{name: 123}]}
    assert mask_secrets(cfg) == {name: MASK, "teacher": {name: MASK, "base": {name: None}, "other": {name: ""}},
                                 "list": [{name: MASK}]}
    assert cfg[name] == "CANARY"  # the original is untouched


@pytest.mark.parametrize("name", NOT_SECRET_NAMES)
def test_a_key_that_names_no_secret_is_kept(name):
    cfg = {"teacher": {name: 512}, "list": [{name: "OPENAI_API_KEY"}]}
    assert mask_secrets(cfg) == cfg


def sweep_values(sweep: str) -> list[tuple[str, str]]:
    """(key, value) for every value of every parameter the sweep file lists."""
    params = OmegaConf.load(ROOT / "sweeps" / f"{sweep}.yaml").hydra.sweeper.params
    return [(key, value.strip()) for key, values in params.items() for value in str(values).split(",")]


@pytest.mark.parametrize("sweep,key,value", [
    (s, k, v) for s in sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")) for k, v in sweep_values(s)])
def test_every_sweep_value_composes_into_the_config(sweep, key, value):
    """Each job of the sweep: the preset with one of its swept values, as the job would compose it."""
    cfg = compose_config(f"+sweeps={sweep}", f"{key}={value}")
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.experiment_name == sweep
    if key == "rl" and value == "none":  # conf/rl/none.yaml: the group off
        assert cfg.rl is None
    elif (CONF / key).is_dir():  # a config group: the option chosen
        assert cfg[key].name == value
    else:
        assert OmegaConf.select(cfg, key) == pytest.approx(float(value))


def test_sweep_grids_are_the_documented_ones():
    variants = "sel,syn,train,augment,hard,embed_sel,embed_syn"
    for model in ("llama1b", "llama3b", "qwen3b"):
        assert sweep_values(f"paper_{model}") == [("variant", v) for v in f"{variants},none".split(",")] + [
            ("rl", "none"), ("rl", "grpo")]
    assert sweep_values("sft_lr") == [("variant", v) for v in variants.split(",")] + [
        ("sft.learning_rate", v) for v in ["5e-4", "2e-4", "1e-4", "8e-5", "2e-5"]]  # the paper's C.1 grid


def test_slurm_launcher_composes():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == 1 and "SlurmLauncher" in cfg.hydra.launcher._target_


def test_stat_on_math_takes_the_papers_recipe():
    cfg = compose_config("variant=syn", "model=qwen")
    assert (cfg.teacher.name, cfg.teacher.model) == ("gpt-4o-mini", "openai/gpt-4o-mini")
    d = cfg.difficulty
    assert (d.name, d.prm_model, d.tau1, d.tau2, d.test_benchmark) == ("prm", "RLHFlow/Llama3.1-8B-PRM-Mistral-Data",
                                                                        0.85, 0.7, "math")
    assert (cfg.sft.name, cfg.sft.load_in_4bit, cfg.sft.lora_r) == ("qlora", True, 16)
    e = cfg.eval
    assert (e.samples, e.temperature, e.seed) == (1, 0.1, 0)
    assert list(e.benchmarks) == ["math", "math2", "gsm8k", "amc23", "math_perturb_simple", "math_perturb_hard",
                                  "aime24", "aime25"]
    assert {name: (s.samples, s.temperature) for name, s in e.per_benchmark.items()} == {
        "amc23": (64, 1.0), "aime24": (64, 1.0), "aime25": (64, 1.0)}
    assert set(e.benchmarks) <= set(cfg.task.benchmarks)
    assert compose_config("variant=sel").difficulty.name == "prm"  # STAT-Sel too


@pytest.mark.parametrize("override,key,value", [
    ("teacher=local", "teacher.name", "local"), ("difficulty=outcome", "difficulty.name", "outcome"),
    ("sft=lora", "sft.name", "lora"), ("eval=default", "eval.temperature", 0.0),
    ("difficulty.tau1=0.9", "difficulty.tau1", 0.9), ("eval.temperature=0.6", "eval.temperature", 0.6),
])
def test_the_command_line_replaces_the_recipe(override, key, value):
    assert OmegaConf.select(compose_config("variant=syn", override), key) == value


@pytest.mark.parametrize("overrides", [["variant=none"], ["variant=train"], ["task=skillworld", "variant=sel"]])
def test_eval_only_baselines_and_skillworld_take_no_recipe(overrides):
    cfg = compose_config(*overrides)
    assert cfg.teacher is None and cfg.difficulty is None and cfg.sft is None
    assert (list(cfg.eval.benchmarks), cfg.eval.temperature, dict(cfg.eval.per_benchmark)) == (["math500"], 0.0, {})


def test_presets_keep_their_groups():
    demo = compose_config("experiment=demo", "variant=sel")  # a job of the demo's sweep
    assert (demo.teacher.name, demo.difficulty.name, demo.sft.name) == ("oracle", "outcome", "lora")
    assert list(demo.eval.benchmarks) == ["test"] and demo.eval.temperature == 0.0
    assert compose_config("experiment=eval_tiny").teacher is None
    assert compose_config("experiment=math_skills").difficulty is None


def test_cfg_job_shows_the_recipe():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "stat_exp", "variant=syn", "model=qwen", "--cfg", "job"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    job = OmegaConf.create(out)
    assert (job.teacher.name, job.difficulty.name, job.sft.name, job.eval.temperature) == ("gpt-4o-mini", "prm",
                                                                                            "qlora", 0.1)


PAPER_SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("paper_*.yaml"))


def sweep_jobs(sweep: str) -> list[list[str]]:
    """Every job of a sweep file: the product of its sweeper params, as override lists."""
    import itertools

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        params = compose("config", overrides=[f"+sweeps={sweep}"], return_hydra_config=True).hydra.sweeper.params
    grid = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    return [list(job) for job in itertools.product(*grid)]


def test_the_paper_tables_cover_three_students():
    models = {sweep: compose_config(f"+sweeps={sweep}").model.hub_id for sweep in PAPER_SWEEPS}
    assert models == {"paper_llama1b": "meta-llama/Llama-3.2-1B-Instruct",
                      "paper_llama3b": "meta-llama/Llama-3.2-3B-Instruct", "paper_qwen3b": "Qwen/Qwen2.5-3B"}


@pytest.mark.parametrize("sweep", PAPER_SWEEPS)
def test_every_job_of_a_paper_table_composes_in_the_papers_setting(sweep):
    jobs = sweep_jobs(sweep)
    assert len(jobs) == 16  # 8 variants, each without and with GRPO
    for job in jobs:
        cfg = compose_config(f"+sweeps={sweep}", *job)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        variant = job[0].split("=")[1]
        assert cfg.variant.name == variant and (cfg.rl is None) == (job[1] == "rl=none")
        assert (cfg.teacher.name, cfg.difficulty.name, cfg.difficulty.test_benchmark, cfg.sft.name) == (
            "gpt-4o-mini", "prm", "math", "qlora")
        assert cfg.eval.temperature == 0.1 and cfg.eval.per_benchmark.amc23.samples == 64
        assert cfg.generator.backend == "vllm" and cfg.experiment_name == sweep


def test_the_sft_learning_rate_and_threshold_grids_are_the_papers():
    lr_jobs = sweep_jobs("sft_lr")
    assert {j[1] for j in lr_jobs} == {f"sft.learning_rate={r}" for r in ("5e-4", "2e-4", "1e-4", "8e-5", "2e-5")}
    assert len(lr_jobs) == 7 * 5  # every training variant at each rate
    cfg = compose_config("+sweeps=sft_lr", *lr_jobs[-1])
    assert cfg.sft.learning_rate == 2e-5 and cfg.variant.name == "embed_syn" and cfg.difficulty.name == "prm"
    tau_jobs = sweep_jobs("difficulty_thresholds")
    assert len(tau_jobs) == 16
    cfg = compose_config("+sweeps=difficulty_thresholds", *tau_jobs[5])
    assert (cfg.difficulty.tau1, cfg.difficulty.tau2, cfg.variant.name) == (0.8, 0.6, "sel")


def test_rl_none_is_no_rl():
    assert compose_config("rl=none").rl is None and compose_config("rl=grpo").rl.name == "grpo"


class RecordingGenerator:
    """A generation backend that records what it is asked for and answers \\boxed{2}."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, n, temperature, top_p, max_tokens, seed):
        self.calls.append({"prompts": len(prompts), "n": n, "temperature": temperature, "max_tokens": max_tokens,
                           "seed": seed})
        return [["\\boxed{2}"] * n for _ in prompts]


def test_per_benchmark_sampling_reaches_the_generator(tmp_path, monkeypatch):
    """The paper's evaluation: MATH at pass@1, temperature 0.1; AMC23 and AIME24 at 64 samples, temperature 1.0."""
    from stat_exp import pipeline
    from stat_exp.store import Store
    from stat_exp.student import generation, models
    from stat_exp.tracking import Tracker

    recorder = RecordingGenerator()
    monkeypatch.setattr(generation, "make_generator", lambda *args, **kwargs: recorder)
    monkeypatch.setattr(models, "load_tokenizer", lambda *args, **kwargs: None)
    monkeypatch.setattr(models, "format_prompt", lambda tokenizer, problem, **kwargs: problem)
    cfg = compose_config("eval=paper", "logger=none", f"paths.cache_dir={tmp_path}")
    rows = [{"id": "1", "problem": "1+1?", "answer": "2"}]
    results = pipeline.evaluate_student(cfg, Store(tmp_path), Tracker(cfg, tmp_path / "run"),
                                        pipeline.Student("unused", "key"),
                                        {"math": rows, "amc23": rows, "aime24": rows}, label="base")
    assert [(c["n"], c["temperature"], c["seed"], c["max_tokens"]) for c in recorder.calls] == [
        (1, 0.1, 0, 2048), (64, 1.0, 0, 2048), (64, 1.0, 0, 2048)]
    assert results["amc23"]["avg@64"] == results["aime24"]["pass@64"] == 1.0 and "avg@64" not in results["math"]


def test_per_benchmark_sampling_for_an_unknown_benchmark_fails_before_any_stage():
    from stat_exp.pipeline import _check

    with pytest.raises(ValueError, match=r"eval.per_benchmark names \['amc32'\], not benchmarks of task math"):
        _check(compose_config("eval=paper", "++eval.per_benchmark={amc32:{samples:2}}"))
    _check(compose_config("eval=paper", "++eval.per_benchmark={gsm8k:{samples:2}}"))


def test_stage_keys_leave_out_what_changes_how_training_runs_not_what_it_makes() -> None:
    from stat_exp.pipeline import _result_settings

    cfg = compose_config("sft=lora", "rl=grpo")
    sft, rl = _result_settings(cfg.sft), _result_settings(cfg.rl, "num_processes")
    for kept in (sft, rl):
        assert "learning_rate" in kept and "seed" in kept and "bf16" in kept
        assert not {"activation_checkpointing", "save_steps", "save_total_limit"} & set(kept)
    assert "num_processes" in sft and "num_processes" not in rl  # ranks multiply SFT's batch, not GRPO's
