import json
import multiprocessing
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import slurm_cluster
from helpers import compose_config

from stat_exp import pipeline
from stat_exp.config import GeneratorConfig, ModelConfig, RLConfig, SFTConfig
from stat_exp.student.generation import DataParallelGenerator, check_gpus, gpu_groups, make_generator, split
from stat_exp.student.launch import launch, launch_command, rank_args, slurm_hostnames, write_spec
from stat_exp.student.models import load_tokenizer
from stat_exp.student.sft import training_prompt
from stat_exp.store import Store

MODEL = ModelConfig(name="tiny", dtype="float32")
PAIRS = [(1, 2), (3, 4), (10, 20), (7, 8), (5, 5), (12, 13), (40, 2), (9, 9)]
ROWS = [
    {"question": f"What is {a}+{b}?", "answer": f"We compute {a}+{b} = {a + b}. The answer is \\boxed{{{a + b}}}."}
    for a, b in PAIRS
]
# A job of 2 nodes as SLURM describes it to the task on its second node.
SLURM_TWO_NODES = {
    "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456",
}


def hosts(nodelist: str) -> list[str]:
    """`scontrol show hostnames` for the node lists of these tests."""
    return {"gpu[07-08]": ["gpu07", "gpu08"]}[nodelist]


def test_one_node_is_standalone() -> None:
    assert rank_args(4, {}) == ["--standalone", "--nproc_per_node=4"]
    assert rank_args(2, {"SLURM_NNODES": "1", "SLURM_NODEID": "0"}) == ["--standalone", "--nproc_per_node=2"]


def test_several_nodes_take_rank_address_and_port_from_slurm() -> None:
    assert rank_args(4, SLURM_TWO_NODES, hosts) == [
        "--nnodes=2", "--node_rank=1", "--master_addr=gpu07", "--master_port=23456", "--nproc_per_node=4",
    ]  # port 20000 + 123456 % 10000, the same on both nodes
    node0 = rank_args(4, {**SLURM_TWO_NODES, "SLURM_NODEID": "0", "MASTER_PORT": "29500"}, hosts)
    assert node0[1:4] == ["--node_rank=0", "--master_addr=gpu07", "--master_port=29500"]


@pytest.fixture
def scontrol() -> None:
    """SLURM's client, installed as the cluster tests install it (a fresh machine has none)."""
    try:
        slurm_cluster.ensure_packages()
    except slurm_cluster.Unavailable as why:
        slurm_cluster.skip_or_fail(why)


def scontrol_conf(folder: Path) -> Path:
    """scontrol expands node lists by itself, but wants a configuration: a minimal one of its own."""
    conf = folder / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=debug Nodes=localhost\n")
    return conf


@pytest.mark.slurm
@pytest.mark.usefixtures("scontrol")
def test_the_main_address_is_the_first_host_scontrol_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CONF", str(scontrol_conf(tmp_path)))
    assert slurm_hostnames("gpu[07-08],cpu3") == ["gpu07", "gpu08", "cpu3"]
    assert rank_args(2, SLURM_TWO_NODES)[2] == "--master_addr=gpu07"


def test_several_nodes_without_a_node_id_is_an_error() -> None:
    env = {key: value for key, value in SLURM_TWO_NODES.items() if key != "SLURM_NODEID"}
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        rank_args(2, env, hosts)
    with pytest.raises(ValueError, match="num_processes must be at least 1, got 0"):
        rank_args(0, {})


def test_launch_command_runs_torchrun_here_and_one_per_node_through_srun() -> None:
    spec = Path("/out/launch.json")
    assert launch_command(2, spec, {}) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "stat_exp.student.launch", "/out/launch.json",
    ]
    assert launch_command(2, spec, SLURM_TWO_NODES) == [
        "srun", "--overlap", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
        sys.executable, "-m", "stat_exp.student.launch", "--node", "2", "/out/launch.json",
    ]


def full(**overrides) -> SFTConfig:
    """Full fine-tuning (every weight compared), 2 rows a pass, 2 optimizer steps, no dropout."""
    settings = dict(
        name="full", lora=False, learning_rate=1e-3, per_device_batch_size=2, gradient_accumulation_steps=1,
        warmup_ratio=0.0, max_length=128, max_steps=2, logging_steps=1, load_in_4bit=False, optim="adamw_torch",
        bf16=False,
    )
    return SFTConfig(**{**settings, **overrides})


@pytest.mark.distributed
def test_two_cpu_ranks_match_one_rank_with_doubled_accumulation(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = launch("sft", 2, str(tiny_model_dir), ROWS, full(), tmp_path / "two", model_cfg=MODEL)
    one = launch("sft", 1, str(tiny_model_dir), ROWS, full(gradient_accumulation_steps=2), tmp_path / "one",
                 model_cfg=MODEL)

    # 2 ranks x 2 rows a step: half of the 8 rows, so one epoch in 2 steps (1 rank alone: a quarter a step).
    assert (two["ranks"], one["ranks"]) == (2, 1)
    assert two["steps"] == 2 and two["epochs"] == [0.5, 1.0]
    # After one epoch every row was seen once: the tokens of all 8 chats, counted here by hand.
    tokenizer = load_tokenizer(str(tiny_model_dir))
    chats = [training_prompt(tokenizer, row["question"], MODEL) + [{"role": "assistant", "content": row["answer"]}]
             for row in ROWS]
    epoch_tokens = sum(len(tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"]) for chat in chats)
    assert epoch_tokens == 814 and two["num_tokens"][-1] == epoch_tokens
    assert one["epochs"] == two["epochs"] and one["num_tokens"] == two["num_tokens"]

    # The same rows a step, the gradient averaged over them either way: measured difference 7e-9,
    # against weight changes of 2e-3.
    base = load_file(tiny_model_dir / "model.safetensors")
    weights = {name: load_file(tmp_path / name / "model" / "model.safetensors") for name in ("one", "two")}
    assert max((weights["one"][k] - base[k]).abs().max().item() for k in base) > 1e-4
    assert max((weights["one"][k] - weights["two"][k]).abs().max().item() for k in base) < 1e-6
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)


@pytest.mark.distributed
def test_grpo_trains_in_two_cpu_ranks(tiny_model_dir: Path, tmp_path: Path) -> None:
    # One question a rank per step: the 4 questions in 2 steps, 4 samples each, rewarded in each rank.
    cfg = RLConfig(name="grpo", learning_rate=1e-3, num_generations=4, max_completion_length=8, questions_per_batch=2,
                   questions_per_update=2,
                   max_steps=2, logging_steps=1, rewards=["correctness"], bf16=False)
    rows = [{"problem": f"What is {a}+{b}?", "answer": str(a + b)} for a, b in PAIRS[:4]]
    summary = launch("grpo", 2, str(tiny_model_dir), rows, cfg, tmp_path, model_cfg=MODEL,
                     options={"use_vllm": False})
    assert summary["ranks"] == 2 and summary["steps"] == 2 and len(summary["rewards"]) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # no launch.json, summary.json, checkpoints


@pytest.mark.distributed
@pytest.mark.slurm
@pytest.mark.usefixtures("scontrol")
def test_two_nodes_on_one_host_train_as_two_ranks(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What `srun` starts on each node of a 2-node job, run here twice with each node's SLURM environment."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = write_spec("sft", str(tiny_model_dir), ROWS, full(), tmp_path, model_cfg=MODEL)
    slurm = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7",
             "MASTER_PORT": str(port), "SLURM_CONF": str(scontrol_conf(tmp_path))}
    nodes = [subprocess.Popen([sys.executable, "-m", "stat_exp.student.launch", "--node", "1", str(spec)],
                              env={**os.environ, **slurm, "SLURM_NODEID": str(node)}) for node in (0, 1)]
    assert [node.wait(timeout=120) for node in nodes] == [0, 0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["epochs"] == [0.5, 1.0]  # one rank a node, 2 rows each a step


def test_launch_refuses_an_unknown_stage(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown training stage 'dpo'"):
        launch("dpo", 2, "model", ROWS, full(), tmp_path, model_cfg=MODEL)


class Echo:
    """A fake backend that names the seed each prompt got (vLLM's: seed + its index) and its GPUs."""

    def __init__(self, tag: str):
        self.tag = tag

    def generate(self, prompts, *, n, temperature, top_p, max_tokens, seed):
        device = os.environ.get("CUDA_VISIBLE_DEVICES", "none")
        return [[f"{self.tag}:{prompt}:seed{seed + i}:{sample}@{device}" for sample in range(n)]
                for i, prompt in enumerate(prompts)]


def test_split_covers_every_item_once_in_order() -> None:
    assert split(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]


def test_data_parallel_answers_in_order_with_the_one_engine_seeds() -> None:
    prompts = [f"q{i}" for i in range(7)]
    settings = dict(n=2, temperature=1.0, top_p=1.0, max_tokens=8)
    generator = DataParallelGenerator(partial(Echo, "m"), ["0,1", "2,3", "4,5"])
    completions = generator.generate(prompts, seed=10, **settings)
    alone = Echo("m").generate(prompts, seed=10, **settings)
    assert [[text.split("@")[0] for text in own] for own in completions] == [[t.split("@")[0] for t in own]
                                                                             for own in alone]
    # prompts 0-2 on the first engine, 3-4 on the second, 5-6 on the third, each on its own GPUs
    assert [own[0].split("@")[1] for own in completions] == ["0,1"] * 3 + ["2,3"] * 2 + ["4,5"] * 2
    assert completions[3] == ["m:q3:seed13:0@2,3", "m:q3:seed13:1@2,3"]
    assert generator.generate(prompts, seed=10, **settings) == completions  # the engines persist, deterministic


class Broken:
    def __init__(self):
        raise ValueError(f"no engine on GPUs {os.environ['CUDA_VISIBLE_DEVICES']}")


def test_data_parallel_engine_errors_reach_the_driver() -> None:
    generator = DataParallelGenerator(Broken, ["0", "1"])
    with pytest.raises(RuntimeError, match="(?s)data-parallel engine 0 failed.*ValueError: no engine on GPUs 0"):
        generator.generate(["q"] * 2, n=1, temperature=0.0, top_p=1.0, max_tokens=8, seed=0)


def test_gpu_groups_are_consecutive_tensor_parallel_groups() -> None:
    cfg = GeneratorConfig(backend="vllm", tensor_parallel_size=2, data_parallel_size=2)
    assert gpu_groups(cfg, ["4", "5", "6", "7"]) == ["4,5", "6,7"]


def test_gpus_are_checked_against_the_job() -> None:
    check_gpus(GeneratorConfig(backend="vllm"), 0)  # one engine of one device: vLLM on the CPU
    check_gpus(GeneratorConfig(backend="vllm", tensor_parallel_size=2, data_parallel_size=2), 4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(2\) x generator.data_parallel_size \(2\) = 4 "
                                         r"GPUs, but this job sees 3"):
        check_gpus(GeneratorConfig(backend="vllm", tensor_parallel_size=2, data_parallel_size=2), 3)
    with pytest.raises(ValueError, match="generator.data_parallel_size must be at least 1, got 0"):
        check_gpus(GeneratorConfig(backend="vllm", data_parallel_size=0), 8)


def test_data_parallel_needs_vllm() -> None:
    with pytest.raises(ValueError, match="generator.data_parallel_size=2 needs generator=vllm, not 'hf'"):
        make_generator(GeneratorConfig(backend="hf", data_parallel_size=2), "model")


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_num_processes_sends_the_stage_to_the_launcher(stage: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def recorded(name, num_processes, model_path, rows, cfg, out_dir, *, model_cfg, options=None):
        calls.append((name, num_processes, model_path, rows, options))
        return {"steps": 1}

    monkeypatch.setattr("stat_exp.student.launch.launch", recorded)
    # Without rl for the sft case: GRPO would need the (here faked) SFT's merged weights.
    cfg = compose_config("sft=lora", "sft.num_processes=2", *(["rl=grpo", "rl.num_processes=2"] if stage != "sft" else []))
    tracker = SimpleNamespace(log=lambda metrics: None, link=lambda *args, **kwargs: None, report_to="none")
    student = pipeline.Student("base", "base-key")
    if stage == "sft":
        data = SimpleNamespace(rows=lambda: [{"question": "q", "answer": "a", "origin": "x"}], key="data-key")
        pipeline.finetune(cfg, Store(tmp_path), tracker, student, data, label="sft")
        assert calls == [("sft", 2, "base", [{"question": "q", "answer": "a"}], None)]
    else:
        pipeline.reinforce(cfg, Store(tmp_path), tracker, student, [{"problem": "p", "answer": "1", "level": 3}])
        assert calls == [("grpo", 2, "base", [{"problem": "p", "answer": "1"}], {"use_vllm": False})]


def test_data_parallelism_keeps_the_probe_and_eval_keys() -> None:
    plain = pipeline._generator_key(compose_config())
    assert pipeline._generator_key(compose_config("generator.data_parallel_size=4")) == plain
    assert pipeline._generator_key(compose_config("generator.tensor_parallel_size=4")) != plain


def test_data_parallel_engines_stop_with_their_generator() -> None:
    generator = DataParallelGenerator(partial(Echo, "m"), ["0", "1"])
    generator.generate(["q"], n=1, temperature=0.0, top_p=1.0, max_tokens=8, seed=0)
    processes = multiprocessing.active_children()
    assert len(processes) == 2
    del generator
    assert not any(process.is_alive() for process in processes)


def test_only_the_first_task_of_a_multi_node_job_drives_the_pipeline(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from helpers import ROOT

    def run(task: str) -> None:
        env = {**os.environ, "SLURM_PROCID": task, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        subprocess.run([sys.executable, "-m", "stat_exp", "experiment=eval_tiny", "eval.benchmarks=[]", "logger=none",
                        "task.data_dir=../shared/data", f"paths.cache_dir={tmp_path / task}",
                        f"hydra.run.dir={tmp_path / 'run' / task}"], cwd=ROOT, env=env, check=True, timeout=300)

    run("1")
    assert not (tmp_path / "1").exists() and not (tmp_path / "run" / "1" / "metrics.json").exists()
    run("0")
    assert (tmp_path / "0" / "model").is_dir() and (tmp_path / "run" / "0" / "metrics.json").exists()
